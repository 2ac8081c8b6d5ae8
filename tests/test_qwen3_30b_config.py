"""configs/qwen3_30b_a3b.py: the real-scale model, built abstractly (no memory).

The oracles are the published numbers (30.5B total, 3.3B active parameters)
and the released checkpoint's config.json mapped by `config_from_hf`.
"""

import importlib.util
import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from pr2_jax.config import ModelConfig
from pr2_jax.hf.config_map import config_from_hf
from pr2_jax.models.transformer import MoETransformer

CONFIG_FILE = pathlib.Path(__file__).resolve().parents[1] / "configs" / "qwen3_30b_a3b.py"

# config.json of the released Qwen/Qwen3-30B-A3B checkpoint (transformers 4.51 format).
RELEASED_CONFIG_JSON = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


def load_config():
  spec = importlib.util.spec_from_file_location("qwen3_30b_a3b", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def abstract_param_counts(cfg: ModelConfig) -> tuple[int, int]:
  """(all parameters, expert parameters) of the model, from shapes alone."""
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  params = jax.eval_shape(MoETransformer(cfg).init, jax.random.key(0), tokens)["params"]
  flat = traverse_util.flatten_dict(nn.unbox(params))
  total = sum(math.prod(x.shape) for x in flat.values())
  experts = sum(math.prod(x.shape) for p, x in flat.items()
                if p[-1] in ("gate_proj", "up_proj", "down_proj") and p[-2] == "mlp")
  return total, experts


def test_config_builds_and_every_field_is_commented():
  """get_config() gives a valid ModelConfig and mesh sizes; each field line has a comment."""
  c = load_config()
  cfg = ModelConfig.from_dict(c.model)
  cfg.validate_mesh(c.mesh_expert)
  assert c.mesh_data >= 0 and c.mesh_expert >= 1
  field_lines = [line for line in CONFIG_FILE.read_text().splitlines()
                 if line.strip().startswith(("c.", "m.")) and " = " in line
                 and "ConfigDict()" not in line]
  assert field_lines and all("#" in line for line in field_lines), field_lines
  doc = CONFIG_FILE.read_text()
  assert "python -m experiments.memory_plan --config=configs/qwen3_30b_a3b.py" in doc


def test_config_matches_released_checkpoint_config_json():
  """Mapping the released config.json gives exactly our model fields (training knobs aside)."""
  ours = ModelConfig.from_dict(load_config().model)
  from_hub = config_from_hf(RELEASED_CONFIG_JSON)
  knobs = ("dtype", "expert_impl", "capacity_factor", "aux_loss_coef")
  assert from_hub == ours.replace(**{k: getattr(from_hub, k) for k in knobs})


def test_parameter_counts_match_published_30b_a3b():
  """eval_shape of the full model: total ~30.5B, active (top-8 of 128 experts) ~3.3B."""
  cfg = ModelConfig.from_dict(load_config().model)
  total, experts = abstract_param_counts(cfg)
  active = total - experts + experts * cfg.top_k // cfg.num_experts
  # Hand count: experts 48*128*3*2048*768; attention 48*(2*2048*4096 + 2*2048*512 + 2*128);
  # embeddings and head 2*151936*2048; router 48*2048*128; norms 97*2048.
  assert experts == 48 * 128 * 3 * 2048 * 768
  assert total == (experts + 48 * (2 * 2048 * 4096 + 2 * 2048 * 512 + 2 * 128)
                   + 2 * 151936 * 2048 + 48 * 2048 * 128 + 97 * 2048)
  assert 30.4e9 < total < 30.6e9, total
  assert 3.2e9 < active < 3.4e9, active
