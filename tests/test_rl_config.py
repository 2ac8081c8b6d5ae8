"""Tests for pr2_jax.rl.config: every bad field fails at start with its name."""

import pytest

from pr2_jax.rl.config import (ExperimentConfig, RLConfig, SetupError, SFTConfig,
                               replay_phases)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts_per_step=3, group_size=2, off_policy_k=2, micro_steps=2),
     r"batch prompts_per_step\*group_size=6 must be divisible by off_policy_k\*micro_steps=2\*2"),
    (dict(replay_mode="r4"),
     r"replay_mode='r4' must be one of \('none', 'r2', 'r3', 'pr2', 'pr2_r2'\)"),
    (dict(loss="ppo"), "loss='ppo' must be one of"),
    (dict(ratio_denominator="x"), "ratio_denominator='x'"),
    (dict(rollout_dtype="float16"), "rollout_dtype='float16'"),
    (dict(group_size=1, prompts_per_step=4), "group_size=1 must be >= 2"),
    (dict(off_policy_k=0), "off_policy_k must be a positive int"),
    (dict(clip_low=1.5), "clip_low=1.5 must be < 1"),
    (dict(clip_low=1.0), "clip_low=1.0 must be < 1"),  # 1 - ε_low = 0 clips nothing below
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), r"RLConfig.top_p=1.5 must be in \(0, 1\]"),
    (dict(temperature=0.0), "temperature=0"),
    (dict(learning_rate=0.0), "learning_rate must be > 0"),
    (dict(balance_mode="eplb"),
     r"balance_mode='eplb' must be one of \('none', 'eplb_step', 'foresight'\)"),
    (dict(eplb_ema=1.0), r"RLConfig.eplb_ema=1.0 must be in \[0, 1\)"),
    (dict(eplb_ema=-0.1), r"RLConfig.eplb_ema=-0.1 must be in \[0, 1\)"),
    (dict(capacity_mode="exact"),
     r"RLConfig.capacity_mode='exact' must be one of \('auto', 'model', 'bucket', 'forecast'\)"),
    (dict(capacity_buckets=0), r"RLConfig.capacity_buckets must be a positive int, got 0"),
    (dict(redundant_slots=-1), r"RLConfig.redundant_slots must be an int >= 0, got -1"),
    (dict(redundant_slots=1.5), r"RLConfig.redundant_slots must be an int >= 0, got 1.5"),
    (dict(eval_every=2.5), r"RLConfig.eval_every must be an int >= 0, got 2.5"),
    (dict(logits_chunk=-1), r"RLConfig.logits_chunk must be an int >= 0, got -1"),
    (dict(logits_chunk=2.5), r"RLConfig.logits_chunk must be an int >= 0, got 2.5"),
    (dict(num_steps=True), r"RLConfig.num_steps must be a positive int, got True"),
    (dict(capacity_buckets=2.0), r"RLConfig.capacity_buckets must be a positive int, got 2.0"),
    (dict(grad_clip=-1.0), r"RLConfig.grad_clip must be > 0, got -1.0"),
    (dict(grad_clip=0.0), r"RLConfig.grad_clip must be > 0, got 0.0"),
    (dict(weight_decay=-0.1), r"RLConfig.weight_decay must be >= 0, got -0.1"),
    (dict(learning_rate="1e-3"), r"RLConfig.learning_rate must be a finite real .* got '1e-3'"),
    (dict(learning_rate=float("nan")), r"RLConfig.learning_rate must be a finite real .* nan"),
    (dict(temperature=float("nan")), r"RLConfig.temperature must be a finite real .* nan"),
    (dict(clip_high=float("nan")), r"RLConfig.clip_high must be a finite real .* nan"),
    (dict(clip_high=-0.1), r"RLConfig.clip_high must be > 0, got -0.1"),
    (dict(tis_cap=float("nan")), r"RLConfig.tis_cap must be a finite real .* nan"),
    (dict(tis_cap=-1.0), r"RLConfig.tis_cap must be >= 0, got -1.0"),
    (dict(eval_temperature=float("nan")), r"RLConfig.eval_temperature must be a finite .* nan"),
    (dict(eval_temperature=-1.0), r"RLConfig.eval_temperature must be >= 0, got -1.0"),
    (dict(top_p=float("inf")), r"RLConfig.top_p must be a finite real number, got inf"),
    (dict(eplb_ema=float("nan")), r"RLConfig.eplb_ema must be a finite real number, got nan"),
    (dict(weight_decay=None), r"RLConfig.weight_decay must be a finite real number, got None"),
    (dict(planner_method="greedy"),
     r"RLConfig.planner_method='greedy' must be one of \('lpt', 'rounds'\)"),
    (dict(trainable="router"),
     r"RLConfig.trainable='router' must be one of \('all', 'routers'\)"),
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


def test_eval_size_must_split_over_token_shards():
  """Evaluation batches of eval_size split over the token shards like the micro-batches: a size
  that does not divide is a SetupError at start-up (the micro-batch check alone passed)."""
  c = RLConfig(prompts_per_step=8, group_size=4, off_policy_k=2, micro_steps=2, eval_size=12)
  c.validate_mesh(4)  # micro-batch 8 and eval_size 12 both split over 4 shards
  with pytest.raises(SetupError, match=r"RLConfig.eval_size=12 must be divisible by the 8 "
                                       r"token shards"):
    c.validate_mesh(8)  # the micro-batch of 8 would split


def test_experiment_from_dict_rejects_unknown_fields():
  base = {"model": {}, "rl": {}, "sft": {}}
  ExperimentConfig.from_dict(base)
  with pytest.raises(ValueError, match="Unknown config fields \\['bogus'\\]"):
    ExperimentConfig.from_dict({**base, "bogus": 1})
  with pytest.raises(ValueError, match="Unknown RLConfig fields \\['kappa'\\]"):
    ExperimentConfig.from_dict({**base, "rl": {"kappa": 2}})
  with pytest.raises(ValueError, match=r"SFTConfig.num_steps must be an int >= 0, got -1"):
    SFTConfig(num_steps=-1)
  with pytest.raises(ValueError, match=r"ExperimentConfig.seed must be an int >= 0, got 1.5"):
    ExperimentConfig.from_dict({**base, "seed": 1.5})
  # numpy's generators take seeds >= 0: -1 failed deep in the task's eval set, not naming seed.
  with pytest.raises(ValueError, match=r"ExperimentConfig.seed must be an int >= 0, got -1"):
    ExperimentConfig.from_dict({**base, "seed": -1})
  # The task and its options are checked with the config, before any model is built.
  with pytest.raises(ValueError, match=r"unknown task 'foo'"):
    ExperimentConfig.from_dict({**base, "task": "foo"})
  with pytest.raises(ValueError, match=r"Countdown.num_numbers must be a positive int, got 0"):
    ExperimentConfig.from_dict({**base, "task": "countdown", "task_kwargs": {"num_numbers": 0}})
  with pytest.raises(ValueError, match=r"ExperimentConfig.checkpoint_every must be an int >= 0, "
                     r"got 2.5"):
    ExperimentConfig.from_dict({**base, "checkpoint_every": 2.5})


@pytest.mark.parametrize("kwargs, message", [
    (dict(warmup_steps=-5), r"SFTConfig.warmup_steps must be an int >= 0, got -5"),
    (dict(num_steps=2.5), r"SFTConfig.num_steps must be an int >= 0, got 2.5"),
    (dict(batch_size=0), r"SFTConfig.batch_size must be a positive int, got 0"),
    (dict(learning_rate=float("nan")), r"SFTConfig.learning_rate must be a finite real .* nan"),
    (dict(learning_rate=0.0), r"SFTConfig.learning_rate must be > 0, got 0.0"),
])
def test_bad_sft_config(kwargs, message):
  with pytest.raises(ValueError, match=message):
    SFTConfig(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr_mult=float("nan")), r"PR2Config.lr_mult must be a finite real number, got nan"),
    (dict(lr_mult=0.0), r"PR2Config.lr_mult must be > 0, got 0.0"),
    (dict(adam_eps=0.0), r"PR2Config.adam_eps must be > 0, got 0.0"),
    (dict(feature_tokens=True), r"PR2Config.feature_tokens must be a positive int, got True"),
    (dict(feature_tokens=2.0), r"PR2Config.feature_tokens must be a positive int, got 2.0"),
])
def test_bad_pr2_config(kwargs, message):
  from pr2_jax.rl.config import PR2Config
  with pytest.raises(ValueError, match=message):
    PR2Config(**kwargs)


def test_valid_edge_values_are_kept():
  """Documented zeros stay valid (tis_cap 0 = off, eval_every 0 = never, greedy eval, no decay);
  a float field takes an int as a config file may write it."""
  c = RLConfig(tis_cap=0.0, eval_every=0, eval_temperature=0.0, weight_decay=0.0,
               redundant_slots=0, learning_rate=1, grad_clip=2)
  assert (c.tis_cap, c.eval_every, c.eval_temperature, c.learning_rate, c.grad_clip) == (
      0.0, 0, 0.0, 1, 2)
  s = SFTConfig(num_steps=0, warmup_steps=0)
  assert (s.num_steps, s.warmup_steps) == (0, 0)


def test_capacity_mode_auto_buckets_only_with_a_balance_mode():
  assert RLConfig().effective_capacity_mode == "model"
  assert RLConfig(balance_mode="foresight").effective_capacity_mode == "bucket"
  assert RLConfig(balance_mode="eplb_step").effective_capacity_mode == "bucket"
  assert RLConfig(balance_mode="foresight", capacity_mode="model").effective_capacity_mode == (
      "model")
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


def test_loss_names_match_the_losses():
  """Likewise the policy and predictor losses: a kind only the config knew passed validation
  and failed after the warm-up, at the first RL trace."""
  from pr2_jax.pr2 import predictor
  from pr2_jax.rl import config, losses
  assert config.LOSSES == losses.POLICY_LOSS_KINDS
  assert set(config.LOSS_DEFAULTS) == set(losses.LOSS_LEVELS)
  assert config.PREDICTOR_LOSSES == predictor.PREDICTOR_LOSSES


def test_the_losses_default_clip_ranges_are_the_configs():
  """DESIGN §3's ranges, held once (config.LOSS_DEFAULTS): the loss functions' keyword
  defaults and a default RLConfig of each loss agree on every value."""
  import inspect
  from pr2_jax.rl import losses
  want = {"dapo": (0.2, 0.28, "rollout"), "gspo": (3e-4, 4e-4, "old")}
  for name, fn in (("dapo", losses.dapo_loss), ("gspo", losses.gspo_loss)):
    params = inspect.signature(fn).parameters
    assert (params["clip_low"].default, params["clip_high"].default) == want[name][:2], name
    rl = RLConfig(loss=name)
    assert (rl.clip_low, rl.clip_high, rl.ratio_denominator) == want[name], name


def test_configs_that_cannot_describe_a_run_fail_naming_what_is_missing():
  """A model-only config used to fail with KeyError 'sft'; hf_pr2.py without a checkpoint
  silently trained ModelConfig's default (random) model."""
  import importlib
  qwen = importlib.import_module("configs.qwen3_30b_a3b").get_config().to_dict()
  with pytest.raises(ValueError, match=r"no \['sft', 'rl'\] section\(s\).*experiments.memory_plan"):
    ExperimentConfig.from_dict(qwen)
  hf = importlib.import_module("configs.hf_pr2").get_config().to_dict()
  with pytest.raises(ValueError, match=r"hf_checkpoint is empty.*--config.hf_checkpoint=DIR"):
    ExperimentConfig.from_dict(hf)
  tiny = importlib.import_module("configs.tiny").get_config().to_dict()
  assert ExperimentConfig.from_dict(tiny).model.num_experts == tiny["model"]["num_experts"]
  del tiny["sft"]
  with pytest.raises(ValueError, match=r"no \['sft'\] section"):
    ExperimentConfig.from_dict(tiny)


@pytest.mark.parametrize("kwargs, message", [
    (dict(tis_cap=2.0), r"RLConfig.tis_cap=2.0 has no effect with ratio_denominator='rollout' "
     r"\(.*\): set ratio_denominator='old' to use truncated IS, or tis_cap=0"),
    (dict(tis_cap=2.0, loss="gspo", ratio_denominator="rollout"),
     r"RLConfig.tis_cap=2.0 has no effect with ratio_denominator='rollout'"),
    (dict(eplb_ema=0.5), r"RLConfig.eplb_ema=0.5 is only read by balance_mode='eplb_step', not "
     r"balance_mode='none': set balance_mode='eplb_step' or eplb_ema=0"),
    (dict(eplb_ema=0.5, balance_mode="foresight"),
     r"eplb_ema=0.5 is only read by balance_mode='eplb_step', not balance_mode='foresight'"),
])
def test_settings_the_mode_never_reads_are_rejected(kwargs, message):
  """learner.micro_step applies tis_cap only against π_old, and only eplb_step reads eplb_ema:
  such a setting would otherwise be dropped without a word."""
  with pytest.raises(ValueError, match=message):
    RLConfig(**kwargs)


def test_settings_that_take_effect_stay_valid():
  assert RLConfig(tis_cap=2.0, ratio_denominator="old").tis_cap == 2.0
  assert RLConfig(tis_cap=0.0, ratio_denominator="old").tis_cap == 0.0  # 'old' without TIS
  assert RLConfig(eplb_ema=0.5, balance_mode="eplb_step").eplb_ema == 0.5
  assert RLConfig(tis_cap=2.0, loss="gspo").tis_cap == 2.0  # GSPO's ratio is against π_old


@pytest.mark.parametrize("mode", ["eplb_step", "foresight"])
def test_balance_mode_needs_an_expert_axis(mode):
  """One expert device: every layout is the same, the planner would run for nothing."""
  c = RLConfig(prompts_per_step=8, group_size=4, balance_mode=mode, eval_size=8)
  message = (rf"RLConfig.balance_mode='{mode}' needs expert parallelism, but the 'expert' mesh "
             r"axis has size 1: set mesh_expert > 1 .* or balance_mode='none'")
  with pytest.raises(ValueError, match=message):
    c.validate_mesh(4, expert_axis_size=1)
  c.validate_mesh(4, expert_axis_size=2)
  c.validate_mesh(4)  # the expert axis is optional: token shards only
  RLConfig(balance_mode="none").validate_mesh(1, expert_axis_size=1)
  # From a config file, mesh_expert is that axis (experiments.common.build_mesh): caught before
  # any device or mesh exists.
  import importlib
  tiny = importlib.import_module("configs.tiny").get_config().to_dict()
  tiny["rl"]["balance_mode"] = mode
  with pytest.raises(ValueError, match=message):
    ExperimentConfig.from_dict(tiny)
  tiny["mesh_expert"] = 4
  assert ExperimentConfig.from_dict(tiny).rl.balance_mode == mode


@pytest.mark.parametrize("name", ["tiny", "hf_pr2"])
def test_shipped_rl_sections_validate(name):
  """Both config files' rl sections build as shipped (the combination checks above included)."""
  import importlib
  cfg = importlib.import_module(f"configs.{name}").get_config()
  rl = RLConfig.from_dict(cfg.rl.to_dict())
  rl._check_expert_axis(cfg.mesh_expert)
  assert (rl.tis_cap, rl.balance_mode, rl.eplb_ema) == (0.0, "none", 0.0)


def test_clip_range_and_ratio_default_to_the_losses_own():
  """DESIGN §3: DAPO clips the token ratio π_θ/µ at 0.2 / 0.28; GSPO the sequence ratio against
  π_old at 3e-4 / 4e-4. Choosing a loss brings its own; a value given explicitly is kept."""
  def triple(r):
    return r.clip_low, r.clip_high, r.ratio_denominator
  assert triple(RLConfig()) == (0.2, 0.28, "rollout")
  assert triple(RLConfig(loss="gspo")) == (3e-4, 4e-4, "old")
  assert triple(RLConfig(loss="gspo", clip_high=1e-3)) == (3e-4, 1e-3, "old")
  assert triple(RLConfig(loss="dapo", ratio_denominator="old")) == (0.2, 0.28, "old")
  with pytest.raises(ValueError, match=r"RLConfig.loss='ppo' must be one of \('dapo', 'gspo'\)"):
    RLConfig(loss="ppo")


@pytest.mark.parametrize("name", ["tiny", "hf_pr2"])
def test_config_files_leave_the_clip_range_to_the_loss(name):
  """The shipped files hold placeholders, so `--config.rl.loss=gspo` alone gives GSPO's."""
  import importlib
  cfg = importlib.import_module(f"configs.{name}").get_config()
  cfg.rl.loss = "gspo"
  rl = RLConfig.from_dict(cfg.rl.to_dict())
  assert (rl.clip_low, rl.clip_high, rl.ratio_denominator) == (3e-4, 4e-4, "old")
  cfg.rl.clip_low = 0.1  # a typed placeholder: a flag can set it
  assert RLConfig.from_dict(cfg.rl.to_dict()).clip_low == 0.1


def test_sections_of_another_type_are_a_type_error_naming_the_field():
  """A dict for `model` was accepted and failed in loop.run as an AttributeError."""
  from pr2_jax.config import ModelConfig
  ok = dict(model=ModelConfig(), rl=RLConfig(), sft=SFTConfig())
  ExperimentConfig(**ok)
  for name, bad in (("model", {"vocab_size": 32}), ("rl", {}), ("sft", None), ("pr2", {})):
    with pytest.raises(TypeError, match=rf"ExperimentConfig.{name} is a \w+, expected a "
                                        rf"(ModelConfig|RLConfig|SFTConfig|PR2Config)"):
      ExperimentConfig(**{**ok, name: bad})


def test_default_predictor_rate_is_the_one_adam_suits():
  """α·η ~ 1e-3 (PR2Config's comment): the default α = 1e3 gave 0.1 at the default η, and the
  predictor's bias swamped the router (bias/logit 3.05, predicted top-k accuracy 0.63 after 2
  RL steps in a library user's run, against 0.025 and 1.00 at α = 10)."""
  from pr2_jax.rl.config import PR2Config
  assert PR2Config().lr_mult * RLConfig().learning_rate == pytest.approx(1e-3)


@pytest.mark.parametrize("mode,expected", [
    # uses_predictor, predicts_at_rollout, predicts_at_old_pass, old_pass_replays_rollout,
    # update_replays, update_replays_old_pass (DESIGN §2's table of modes)
    ("none", (False, False, False, False, False, False)),
    ("r2", (False, False, False, False, True, True)),
    ("r3", (False, False, False, True, True, False)),
    ("pr2", (True, True, False, True, True, False)),
    ("pr2_r2", (True, False, True, False, True, True)),
])
def test_replay_phases_by_hand(mode, expected):
  phases = replay_phases(mode)
  assert tuple(phases) == expected
  rl = RLConfig(replay_mode=mode)
  assert rl.phases == phases


def test_replay_phases_refuses_an_unknown_mode():
  with pytest.raises(ValueError, match=r"replay_mode='r4' is not one of \('none', 'r2'"):
    replay_phases("r4")


def test_temperatures_below_the_float32_limit_are_refused():
  for name in ("temperature", "eval_temperature"):
    with pytest.raises(ValueError, match=rf"RLConfig.{name}=1e-39 is below 1e-06"):
      RLConfig(**{name: 1e-39})
  assert RLConfig(eval_temperature=0.0).eval_temperature == 0.0  # greedy evaluation
  # The bound is MIN_TEMPERATURE = 1e-6 itself: just below it is refused, it is accepted.
  with pytest.raises(ValueError, match=r"RLConfig.temperature=5e-07 is below 1e-06"):
    RLConfig(temperature=5e-7)
  assert RLConfig(temperature=1e-6, eval_temperature=1e-6).temperature == 1e-6


def test_planner_and_bucket_settings_that_nothing_reads_are_refused():
  with pytest.raises(ValueError, match=r"planner_method='lpt' is only read by balance_mode="
                                       r"'foresight', not balance_mode='eplb_step'"):
    RLConfig(balance_mode="eplb_step", planner_method="lpt")
  with pytest.raises(ValueError, match=r"capacity_buckets=4 has no effect with capacity_mode="
                                       r"'auto' and balance_mode='none'"):
    RLConfig(capacity_buckets=4)
  assert RLConfig(balance_mode="foresight", planner_method="lpt").planner_method == "lpt"
  assert RLConfig(capacity_mode="bucket", capacity_buckets=4).capacity_buckets == 4
  assert RLConfig(capacity_mode="forecast", capacity_buckets=1).capacity_buckets == 1
