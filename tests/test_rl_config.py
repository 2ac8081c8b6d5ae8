"""Tests for pr2_jax.rl.config: every bad field fails at start with its name."""

import pytest

from pr2_jax.rl.config import ExperimentConfig, RLConfig, SFTConfig


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts_per_step=3, group_size=2, off_policy_k=2, micro_steps=2),
     r"batch prompts_per_step\*group_size=6 must be divisible by off_policy_k\*micro_steps=2\*2"),
    (dict(replay_mode="r4"), r"replay_mode='r4' must be one of \('none', 'r2', 'r3', 'pr2', 'pr2_r2'\)"),
    (dict(loss="ppo"), "loss='ppo' must be one of"),
    (dict(ratio_denominator="x"), "ratio_denominator='x'"),
    (dict(rollout_dtype="float16"), "rollout_dtype='float16'"),
    (dict(group_size=1, prompts_per_step=4), "group_size=1 must be >= 2"),
    (dict(off_policy_k=0), "off_policy_k must be a positive int"),
    (dict(clip_low=1.5), "clip_low=1.5 must be < 1"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(temperature=0.0), "temperature=0"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(balance_mode="eplb"),
     r"balance_mode='eplb' must be one of \('none', 'eplb_step', 'foresight'\)"),
    (dict(eplb_ema=1.0), r"RLConfig.eplb_ema=1.0 must be in \[0, 1\)"),
    (dict(eplb_ema=-0.1), r"RLConfig.eplb_ema=-0.1 must be in \[0, 1\)"),
    (dict(capacity_mode="exact"),
     r"RLConfig.capacity_mode='exact' must be one of \('auto', 'model', 'bucket', 'forecast'\)"),
    (dict(capacity_buckets=0), r"RLConfig.capacity_buckets=0 must be a positive int"),
    (dict(redundant_slots=-1), "redundant_slots must be >= 0"),
    (dict(planner_method="greedy"),
     r"RLConfig.planner_method='greedy' must be one of \('lpt', 'rounds'\)"),
])
def test_bad_rl_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    RLConfig(**kwargs)


def test_batch_sizes():
  c = RLConfig(prompts_per_step=8, group_size=4, off_policy_k=2, micro_steps=4)
  assert c.batch_size == 32 and c.micro_batch_size == 4


def test_micro_batch_must_split_over_token_shards():
  c = RLConfig(prompts_per_step=8, group_size=4, off_policy_k=2, micro_steps=4, eval_size=8)
  c.validate_mesh(4)
  with pytest.raises(ValueError, match="micro-batch size 4 .* 8 token shards"):
    c.validate_mesh(8)


def test_experiment_from_dict_rejects_unknown_fields():
  base = {"model": {}, "rl": {}, "sft": {}}
  ExperimentConfig.from_dict(base)
  with pytest.raises(ValueError, match="Unknown config fields \\['bogus'\\]"):
    ExperimentConfig.from_dict({**base, "bogus": 1})
  with pytest.raises(ValueError, match="Unknown RLConfig fields \\['kappa'\\]"):
    ExperimentConfig.from_dict({**base, "rl": {"kappa": 2}})
  with pytest.raises(ValueError, match="num_steps >= 0"):
    SFTConfig(num_steps=-1)


def test_capacity_mode_auto_buckets_only_with_a_balance_mode():
  assert RLConfig().effective_capacity_mode == "model"
  assert RLConfig(balance_mode="foresight").effective_capacity_mode == "bucket"
  assert RLConfig(balance_mode="eplb_step").effective_capacity_mode == "bucket"
  assert RLConfig(balance_mode="foresight", capacity_mode="model").effective_capacity_mode == "model"
  assert RLConfig(capacity_mode="forecast").effective_capacity_mode == "forecast"


@pytest.mark.parametrize("name", ["tiny", "hf_pr2"])
def test_experiment_configs_expose_every_field(name):
  """Every dataclass field is in the config file, so any of them can be set by a flag."""
  import dataclasses
  import importlib
  from pr2_jax.rl.config import PR2Config
  cfg = importlib.import_module(f"configs.{name}").get_config()
  for section, cls in (("rl", RLConfig), ("pr2", PR2Config), ("sft", SFTConfig)):
    missing = {f.name for f in dataclasses.fields(cls)} - set(cfg[section].keys())
    assert not missing, f"configs/{name}.py {section} lacks {sorted(missing)}"


def test_planner_methods_match_the_planner():
  """config.py stays jax-free, so it repeats the planner's method names: they must agree."""
  from pr2_jax.balance.planner import METHODS
  from pr2_jax.rl.config import PLANNER_METHODS
  assert PLANNER_METHODS == METHODS
  assert RLConfig().planner_method == "rounds"
