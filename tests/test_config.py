"""ModelConfig: defaults are valid, it is frozen, and every bad value names its field."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import pr2_jax as p2
from pr2_jax import config
from pr2_jax.config import ModelConfig


def test_default_config_is_valid_and_frozen():
  """The default builds, is exported at top level, is hashable and cannot be mutated."""
  cfg = p2.ModelConfig()
  assert cfg is not None and p2.ModelConfig is ModelConfig
  assert cfg.moe_layers == tuple(range(cfg.num_layers))
  assert cfg.num_moe_layers == cfg.num_layers
  assert hash(cfg) == hash(ModelConfig())
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.num_experts = 4  # type: ignore[misc]


def test_moe_layers_skip_dense_layers():
  """moe_layers lists the non-dense layers in order; lists are stored as tuples."""
  cfg = ModelConfig(num_layers=4, dense_layers=[0, 2], dense_d_ff=32)
  assert cfg.dense_layers == (0, 2)
  assert cfg.moe_layers == (1, 3)
  assert cfg.num_moe_layers == 2


def test_replace_revalidates():
  """replace() returns a new validated config."""
  cfg = ModelConfig().replace(top_k=3)
  assert cfg.top_k == 3
  with pytest.raises(ValueError, match="top_k"):
    ModelConfig().replace(top_k=100)


@pytest.mark.parametrize("changes, pattern", [
    (dict(top_k=9, num_experts=8), r"top_k=9 must be <= num_experts=8"),
    (dict(num_heads=6, num_kv_heads=4), r"num_heads=6 must be divisible by num_kv_heads=4"),
    (dict(attention_blocks=0), r"attention_blocks must be a positive int, got 0"),
    (dict(dtype="float16"), r"dtype='float16' must be one of"),
    (dict(expert_impl="megablocks"), r"expert_impl='megablocks' must be one of"),
    (dict(num_layers=2, dense_layers=(2,), dense_d_ff=32),
     r"dense_layers=\(2,\) has ids \[2\] outside"),
    (dict(num_layers=2, dense_layers=(-1,), dense_d_ff=32), r"dense_layers=\(-1,\) has ids \[-1\]"),
    (dict(num_layers=3, dense_layers=(1, 1), dense_d_ff=32), r"dense_layers=.* repeated"),
    (dict(num_layers=2, dense_layers=(0,)), r"dense_d_ff must be a positive int"),
    (dict(num_layers=2, dense_layers=(0, 1), dense_d_ff=32), r"no MoE layer"),
    (dict(head_dim=15), r"head_dim=15 must be even"),
    (dict(capacity_factor=-1.0), r"capacity_factor=-1.0 must be >= 0"),
    (dict(aux_loss_coef=-0.1), r"aux_loss_coef=-0.1 must be >= 0"),
    (dict(fsdp=1), r"ModelConfig.fsdp must be a bool, got 1"),
    # a string from a command line or JSON is truthy: "false" would tie the head silently
    (dict(tie_embeddings="false"), r"ModelConfig.tie_embeddings must be a bool, got 'false'"),
    (dict(norm_topk_prob=0), r"ModelConfig.norm_topk_prob must be a bool, got 0"),
    (dict(rope_theta=0.0), r"ModelConfig.rope_theta must be > 0, got 0.0"),
    (dict(rms_norm_eps=-1e-6), r"ModelConfig.rms_norm_eps must be > 0, got -1e-06"),
    (dict(rope_theta=float("inf")), r"ModelConfig.rope_theta must be a finite real .* inf"),
    (dict(rms_norm_eps=float("nan")), r"ModelConfig.rms_norm_eps must be a finite real .* nan"),
    (dict(capacity_factor=float("nan")), r"ModelConfig.capacity_factor must be a finite .* nan"),
    (dict(aux_loss_coef=float("nan")), r"ModelConfig.aux_loss_coef must be a finite .* nan"),
    (dict(rope_theta="1e4"), r"ModelConfig.rope_theta must be a finite real number, got '1e4'"),
    (dict(aux_loss_coef=True), r"ModelConfig.aux_loss_coef must be a finite real .* True"),
    (dict(dense_d_ff=2.5), r"ModelConfig.dense_d_ff must be an int >= 0, got 2.5"),
    (dict(dense_d_ff=-1), r"ModelConfig.dense_d_ff must be an int >= 0, got -1"),
    (dict(num_layers=2, dense_layers=(0.5,), dense_d_ff=32),
     r"ModelConfig.dense_layers must hold int layer ids, got \[0.5\]"),
    (dict(dense_layers=3), r"ModelConfig.dense_layers must be a sequence of ints, got 3"),
    (dict(d_model=0), r"ModelConfig.d_model must be a positive int, got 0"),
    (dict(num_experts=2.0), r"ModelConfig.num_experts must be a positive int, got 2.0"),
    (dict(top_k=True), r"ModelConfig.top_k must be a positive int, got True"),
])
def test_bad_values_raise_naming_the_field(changes, pattern):
  """Each invalid field raises ValueError whose message names that field and value."""
  with pytest.raises(ValueError, match=pattern):
    ModelConfig(**changes)


def test_numbers_of_any_real_type_and_ints_for_floats_are_accepted():
  """A float field takes an int (a config file's `rope_theta = 10000`); values are kept."""
  cfg = ModelConfig(rope_theta=10_000, capacity_factor=1, aux_loss_coef=0, rms_norm_eps=1e-5)
  assert (cfg.rope_theta, cfg.capacity_factor, cfg.rms_norm_eps) == (10_000, 1, 1e-5)


def test_validate_mesh_expert_axis():
  """Experts must split evenly over the 'expert' mesh axis; even splits pass silently."""
  cfg = ModelConfig(num_experts=8)
  for size in (1, 2, 4, 8):
    cfg.validate_mesh(size)  # must not raise
  with pytest.raises(ValueError, match=r"num_experts=8 must be divisible by the "
                                       r"mesh's 'expert' axis size 3"):
    cfg.validate_mesh(3)
  with pytest.raises(ValueError, match=r"num_experts=6 .* 'expert' axis size 4"):
    ModelConfig(num_experts=6).validate_mesh(4)


def test_from_dict_round_trip_and_unknown_key():
  """from_dict rebuilds a config from its fields and rejects unknown keys by name."""
  cfg = ModelConfig(num_experts=4, top_k=1, dense_layers=(0,), dense_d_ff=16, num_layers=3)
  assert ModelConfig.from_dict(dataclasses.asdict(cfg)) == cfg
  with pytest.raises(ValueError, match=r"Unknown ModelConfig fields "
                                       r"\['hidden_size', 'n_experts'\]"):
    ModelConfig.from_dict({"hidden_size": 32, "n_experts": 4, "top_k": 1})
  with pytest.raises(ValueError, match="top_k"):
    ModelConfig.from_dict({"top_k": 0})


@pytest.mark.parametrize("dtype, want", [("bfloat16", "float32"), ("float16", "float32"),
                                         ("float32", "float32"), ("int32", "int32")])
def test_storage_dtype_widens_only_16_bit_floats_on_cpu(dtype, want):
  assert jax.default_backend() == "cpu"  # the suite's fake devices
  assert config.storage_dtype(dtype) == jnp.dtype(want)


def test_top_k_may_equal_num_experts():
  """The bound is top_k <= num_experts: every expert per token is a legal (dense-like) MoE, and
  a `>=` check would refuse it with a message that says `<=`."""
  cfg = ModelConfig(num_experts=4, top_k=4)
  assert (cfg.top_k, cfg.num_experts) == (4, 4)


def test_validate_mesh_fsdp_needs_d_model_divisible_by_the_data_axis():
  """fsdp splits every parameter's d_model dim over 'data': a size that does not divide it must
  be refused here, not as a sharding error inside jit; without fsdp the data axis is free."""
  cfg = ModelConfig(d_model=64, fsdp=True)
  for size in (1, 2, 4, 8):
    cfg.validate_mesh(1, size)  # must not raise
  with pytest.raises(ValueError, match=r"fsdp=True splits d_model=64 over the mesh's 'data' "
                                       r"axis, but its size 3 does not divide it"):
    cfg.validate_mesh(1, 3)
  ModelConfig(d_model=64).validate_mesh(1, 3)  # no fsdp: d_model is not split
