"""pr2_jax: Predictive Routing Replay and routing-foresight load balancing for RL on MoE models."""

from setuptools import find_packages, setup

setup(
    name="pr2_jax",
    version="0.1.0",
    description=("RL on Mixture-of-Experts LMs in JAX/Flax: routing replay, PR2, "
                 "micro-step load balancing"),
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pr2_jax", "pr2_jax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "chex>=0.1.92",
        "absl-py>=2.5.1",
        "ml_collections>=1.1.0",
        "numpy",
        "safetensors",
        "tokenizers",
        "matplotlib",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-rerunfailures", "torch==2.13.0", "transformers",
                 "nbclient", "nbformat", "ipykernel"],
        "colab": ["matplotlib", "ipykernel"],
    },
)
