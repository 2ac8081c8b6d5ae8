"""Hugging Face interop: Qwen3-MoE checkpoints (safetensors) and `tokenizers` tokenizers."""

from pr2_jax.hf.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from pr2_jax.hf.config_map import config_from_hf, config_to_hf, read_hf_config
from pr2_jax.hf.tokenizer import HFTokenizer
