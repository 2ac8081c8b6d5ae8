"""config.json <-> ModelConfig: hand-worked mappings, transformers' defaults, clear errors."""

import pytest

from pr2_jax.config import ModelConfig
from pr2_jax.hf import config_map
from pr2_jax.hf.config_map import config_from_hf, config_to_hf, dense_layer_ids

TINY = {"model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "moe_intermediate_size": 16, "num_experts": 8, "num_experts_per_tok": 2,
        "intermediate_size": 48}


def test_dense_layer_ids_follow_transformers_rule():
  """Layer i is dense if listed in mlp_only_layers or (i + 1) % decoder_sparse_step != 0."""
  assert dense_layer_ids(4, [], 1) == ()
  assert dense_layer_ids(4, [1], 1) == (1,)
  assert dense_layer_ids(6, [], 2) == (0, 2, 4)
  assert dense_layer_ids(6, [1], 3) == (0, 1, 3, 4)
  with pytest.raises(ValueError, match="decoder_sparse_step"):
    dense_layer_ids(4, [], 0)


def test_minimal_config_uses_transformers_defaults():
  """Absent fields take transformers' defaults: norm_topk_prob False (ours is True), theta 1e4."""
  cfg = config_from_hf(TINY)
  assert cfg == ModelConfig(vocab_size=64, num_layers=4, d_model=32, num_heads=4, num_kv_heads=2,
                            head_dim=8, expert_d_ff=16, num_experts=8, top_k=2,
                            norm_topk_prob=False, rope_theta=10_000.0, rms_norm_eps=1e-6,
                            tie_embeddings=False)
  assert cfg.dense_d_ff == 0  # intermediate_size only matters with dense layers


def test_v5_spellings_and_head_dim_fallback():
  """transformers 5 writes num_local_experts and rope_parameters; head_dim defaults to D/H."""
  hf = {k: v for k, v in TINY.items() if k not in ("num_experts", "head_dim")}
  hf.update(num_local_experts=4, rope_parameters={"rope_type": "default", "rope_theta": 5e5},
            mlp_only_layers=[0], norm_topk_prob=True, tie_word_embeddings=True)
  cfg = config_from_hf(hf)
  assert (cfg.num_experts, cfg.head_dim, cfg.rope_theta) == (4, 32 // 4, 5e5)
  assert (cfg.dense_layers, cfg.dense_d_ff) == ((0,), 48)
  assert cfg.norm_topk_prob and cfg.tie_embeddings


def test_missing_kv_heads_take_transformers_default_of_four():
  """transformers' Qwen3MoeConfig reads an absent num_key_value_heads as 4, whatever
  num_attention_heads is (no fallback to it, unlike Llama's config): we read 8 heads as MHA,
  so a checkpoint transformers loads was refused for its k_proj shape."""
  hf = {k: v for k, v in TINY.items() if k != "num_key_value_heads"}
  assert config_from_hf(dict(hf, num_attention_heads=8)).num_kv_heads == 4


def test_sliding_window_value_is_ignored_when_not_used():
  """Released Qwen3 configs carry sliding_window=4096 with use_sliding_window=false."""
  assert config_from_hf(dict(TINY, sliding_window=4096, use_sliding_window=False))


def test_omitted_or_null_fields_read_as_transformers_reads_them():
  """Dense layers without intermediate_size take transformers' default width (the error named
  our dense_d_ff); a null num_experts beside num_local_experts is the latter."""
  import transformers  # the oracle (a test dependency)
  hf = {k: v for k, v in TINY.items() if k != "intermediate_size"}
  cfg = config_from_hf(dict(hf, mlp_only_layers=[0]))
  assert cfg.dense_d_ff == transformers.Qwen3MoeConfig().intermediate_size == 6144
  assert config_from_hf(dict(TINY, num_experts=None, num_local_experts=4)).num_experts == 4


def test_a_sliding_window_left_to_transformers_default_is_refused():
  """use_sliding_window=true without a sliding_window key is transformers' 4096-token window
  (logits 0.38 apart after position 4096 when loaded as full attention); an explicit null is
  full attention in both."""
  import transformers  # the oracle (a test dependency)
  assert transformers.Qwen3MoeConfig(use_sliding_window=True).sliding_window == (
      config_map.HF_SLIDING_WINDOW)
  hf = {k: v for k, v in TINY.items() if k != "sliding_window"}
  with pytest.raises(ValueError, match=r"use_sliding_window=true \(sliding_window=4096, "
                                       r"transformers default\) is not supported"):
    config_from_hf(dict(hf, use_sliding_window=True))
  assert config_from_hf(dict(hf, use_sliding_window=True, sliding_window=None))


@pytest.mark.parametrize("change, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
     "rope_parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True, "sliding_window": 128}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"num_experts": 0}, "num_experts"),
    ({"hidden_size": None}, "hidden_size"),
    ({"num_experts_per_tok": 9}, "top_k"),
    ({"num_key_value_heads": 3}, "num_kv_heads"),
    ({"rope_theta": "abc"}, "rope_theta='abc' must be a number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": [1e4]}}, "rope_theta"),
    ({"rms_norm_eps": True}, "rms_norm_eps=True must be a number"),
    # Were a ZeroDivisionError or TypeError in the arithmetic, or a silent truncation to 48.
    ({"num_attention_heads": 0, "head_dim": None}, "num_attention_heads=0 must be a positive"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers=4.0 must be a positive int"),
    ({"hidden_size": "32"}, "hidden_size='32' must be a positive int"),
    ({"intermediate_size": 48.7, "mlp_only_layers": [0]}, "intermediate_size=48.7"),
    ({"head_dim": 8.0}, "head_dim=8.0"),
    # 0 was taken as unset: head_dim D/H and dense width 6144 in place of a broken value.
    ({"head_dim": 0}, "head_dim=0 must be a positive int"),
    ({"intermediate_size": 0, "mlp_only_layers": [0]}, "intermediate_size=0 must be a positive"),
    ({"mlp_only_layers": 3}, "mlp_only_layers=3"),
    ({"mlp_only_layers": ["0"]}, "mlp_only_layers"),
])
def test_unsupported_or_bad_fields_name_the_field(change, field):
  with pytest.raises(ValueError, match=field):
    config_from_hf(dict(TINY, **change))


@pytest.mark.parametrize("cfg", [
    ModelConfig(),
    ModelConfig(num_layers=3, dense_layers=(0, 2), dense_d_ff=24, tie_embeddings=True,
                norm_topk_prob=False, rope_theta=1e6, rms_norm_eps=1e-5, num_kv_heads=1),
])
def test_round_trip_through_config_json(cfg):
  """config_from_hf(config_to_hf(cfg)) == cfg for every computation field."""
  assert config_from_hf(config_to_hf(cfg)) == cfg


def test_extra_fields_are_kept_but_ours_win():
  """extra carries ids and limits from the source checkpoint; conflicting fields are ours."""
  hf = config_to_hf(ModelConfig(), "bfloat16",
                    extra={"eos_token_id": 7, "max_position_embeddings": 40960, "hidden_size": 1,
                           "rope_scaling": {"rope_type": "yarn"}, "num_local_experts": 99})
  assert hf["eos_token_id"] == 7 and hf["max_position_embeddings"] == 40960
  assert hf["hidden_size"] == ModelConfig().d_model and hf["torch_dtype"] == "bfloat16"
  assert "rope_scaling" not in hf and "num_local_experts" not in hf
  assert config_from_hf(hf) == ModelConfig()


def test_rope_parameters_beyond_type_and_theta_are_refused():
  """Only {rope_type: 'default', rope_theta} is plain RoPE: any other key (a scaling factor, a
  partial rotary fraction) is named, even under rope_type 'default'."""
  for extra in ({"factor": 4.0}, {"partial_rotary_factor": 0.5}):
    params = dict({"rope_type": "default", "rope_theta": 1e4}, **extra)
    with pytest.raises(ValueError, match=r"rope_parameters=.* is not supported \(only "
                                         r"rope_type='default' with rope_theta\)"):
      config_from_hf(dict(TINY, rope_parameters=params))
  assert config_from_hf(dict(TINY, rope_parameters={"type": "default"})).rope_theta == 1e4


def test_config_to_hf_writes_both_rope_spellings_and_the_moe_layout_fields():
  """Hand-checked fields of the written config.json: rope theta in both the v4 (rope_theta) and
  v5 (rope_parameters) spelling, every layer on the sparse step with dense ones listed, full
  attention, and intermediate_size only with dense layers."""
  hf = config_to_hf(ModelConfig(num_layers=3, dense_layers=(1,), dense_d_ff=24, rope_theta=1e6))
  assert hf["rope_theta"] == 1e6
  assert hf["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6}
  assert (hf["decoder_sparse_step"], hf["mlp_only_layers"], hf["intermediate_size"]) == (
      1, [1], 24)
  assert (hf["use_sliding_window"], hf["sliding_window"], hf["attention_bias"]) == (
      False, None, False)
  assert "intermediate_size" not in config_to_hf(ModelConfig())
