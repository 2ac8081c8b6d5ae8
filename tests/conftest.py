"""Every test sees 8 fake CPU devices (set before any JAX operation).

The whole suite, its xdist workers and the runs it starts as subprocesses share
one persistent XLA compilation cache: many end-to-end tests compile the same
tiny-config programs (a run and its resumed rerun, two runs compared), and on
2 CPU cores compiling is a large part of their time. Set
JAX_COMPILATION_CACHE_DIR yourself to choose the directory, or to "" to turn it off.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"pr2_jax_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
