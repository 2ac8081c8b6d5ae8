"""Frozen, validated configuration of the RL phase.

Every field is checked at start-up with a message naming the field and its
allowed values: a bad flag must fail before any compilation.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

from pr2_jax.config import (RUNTIME_FIELDS, ModelConfig, check_int, check_real,
                             check_temperature)


class SetupError(ValueError):
  """A setup that cannot run (config against mesh, task, tokenizer or workdir): a user error,
  which the entry points report as one `error:` line, not a traceback."""

REPLAY_MODES = ("none", "r2", "r3", "pr2", "pr2_r2")
PR2_MODES = ("pr2", "pr2_r2")


class ReplayPhases(NamedTuple):
  """What a replay mode does in each phase of an RL step (DESIGN §2)."""
  uses_predictor: bool  # PR2's predictor W_p exists and is trained (pr2, pr2_r2)
  predicts_at_rollout: bool  # the rollout routes by the predicted distribution (pr2)
  predicts_at_old_pass: bool  # the old-log-prob pass does, and caches the features (pr2_r2)
  old_pass_replays_rollout: bool  # the old-log-prob pass replays the rollout's routes, else live
  update_replays: bool  # the update replays the micro-batch's replay_routes (all but none)
  update_replays_old_pass: bool  # ... and those are the old pass's routes (r2, pr2_r2)


def replay_phases(replay_mode: str) -> ReplayPhases:
  """The phases of `replay_mode`: one rule for the jitted learner and the host's balance
  planning (were they to disagree, the host would size capacity buckets for a layout the
  device does not run, and tokens would be dropped)."""
  if replay_mode not in REPLAY_MODES:
    raise ValueError(f"replay_mode={replay_mode!r} is not one of {REPLAY_MODES}")
  return ReplayPhases(
      uses_predictor=replay_mode in PR2_MODES, predicts_at_rollout=replay_mode == "pr2",
      predicts_at_old_pass=replay_mode == "pr2_r2",
      old_pass_replays_rollout=replay_mode in ("r3", "pr2"),
      update_replays=replay_mode != "none",
      update_replays_old_pass=replay_mode in ("r2", "pr2_r2"))
PREDICTOR_LOSSES = ("post", "delta", "l2")
FEATURE_RULES = ("random", "response")
BALANCE_MODES = ("none", "eplb_step", "foresight")
CAPACITY_MODES = ("auto", "model", "bucket", "forecast")
PLANNER_METHODS = ("lpt", "rounds")  # pr2_jax.balance.planner.METHODS (kept jax-free here)
LOSSES = ("dapo", "gspo")
RATIO_DENOMINATORS = ("rollout", "old")
TRAINABLE = ("all", "routers")
# Each loss's (clip_low, clip_high, ratio_denominator), DESIGN §3: DAPO's token ratio π_θ/µ,
# GSPO's sequence ratio against π_old with its tiny clip range.
LOSS_DEFAULTS = {"dapo": (0.2, 0.28, "rollout"), "gspo": (3e-4, 4e-4, "old")}
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class RLConfig:
  num_steps: int = 30              # RL steps (one rollout batch each)
  prompts_per_step: int = 16       # distinct prompts per rollout batch
  group_size: int = 8              # G samples per prompt (GRPO group)
  off_policy_k: int = 2            # κ mini-batches (optimizer steps) per rollout batch
  micro_steps: int = 2             # M micro-steps of gradient accumulation per mini-batch
  replay_mode: str = "r3"          # none | r2 | r3 | pr2 | pr2_r2 (DESIGN §2)
  loss: str = "dapo"               # dapo (token ratio) | gspo (sequence ratio)
  # None = the loss's own (LOSS_DEFAULTS), filled in at construction: ε_low/ε_high 0.2/0.28 and
  # π_θ/µ for dapo, 3e-4/4e-4 and π_θ/π_old for gspo.
  clip_low: float | None = None    # ε_low
  clip_high: float | None = None   # ε_high
  ratio_denominator: str | None = None  # ratio π_θ/µ ('rollout') or π_θ/π_old ('old')
  tis_cap: float = 0.0             # truncated IS weight cap for π_old/µ with 'old'; 0 = off
  learning_rate: float = 1e-4      # AdamW learning rate
  weight_decay: float = 0.0        # AdamW weight decay
  grad_clip: float = 1.0           # global-norm clip
  # which parameters RL updates: all | routers (each MoE layer's W_r only, the rest frozen: most
  # routing drift is then the routers' own, linear in h as PR2's predictor assumes)
  trainable: str = "all"
  temperature: float = 1.0         # rollout sampling temperature (and of π_θ in the loss)
  # rollout nucleus mass; the behaviour log-prob µ recorded is the tempered distribution's
  # before this filter (as vLLM reports it), so for top_p < 1 the ratio is not against the
  # filtered distribution a token was drawn from
  top_p: float = 1.0
  max_new_tokens: int = 8          # response budget including EOS
  rollout_dtype: str = "bfloat16"  # the inference engine's dtype
  # RL steps between held-out evaluations (0 = none during RL; the warm-up policy's reward,
  # the baseline, is always measured, so eval_size must fit the task either way)
  eval_every: int = 10
  eval_size: int = 128             # held-out problems per evaluation
  # evaluation sampling temperature (0 = greedy); evaluation keeps the rollout's top_p
  eval_temperature: float = 1.0
  # Updates skipped for non-finite loss/grads in a row before stopping.
  max_consecutive_skips: int = 10
  balance_mode: str = "none"       # none: static layout | eplb_step: one EPLB plan per RL step |
                                   # foresight: a plan per micro-step from its replayed routes
  redundant_slots: int = 1         # extra expert slots per device for foresight replicas
  # foresight placement (plan_placement's method): lpt = sequential greedy with home rules
  # (fewer transfers) | rounds = S rounds of D devices (faster planner, more transfers).
  planner_method: str = "rounds"
  # eplb_step: one EPLB plan per RL step from an EMA of step loads; 0 = this step's loads only.
  eplb_ema: float = 0.0            # weight of the past in that average, in [0, 1)
  # Per-slot token capacity of the learner (pr2_jax.rl.balancing): model = ModelConfig's
  # capacity_factor; bucket = planned max of phases that replay routes, rounded up to a
  # bucket (dropless); forecast = bucket also for live-routed phases, from the rollout's
  # routes (drops reported); auto = bucket with a balance mode, model without.
  capacity_mode: str = "auto"
  capacity_buckets: int = 2        # capacity buckets per doubling (1 = powers of two)
  # > 0: the learner applies the LM head to this many positions at a time and recomputes it in
  # the backward pass (rl.chunked_logprobs): [b, C, V] logits instead of [b, T, V]; 0 = off.
  logits_chunk: int = 0

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise ValueError(f"RLConfig.loss={self.loss!r} must be one of {LOSSES}")
    for name, default in zip(("clip_low", "clip_high", "ratio_denominator"),
                             LOSS_DEFAULTS[self.loss]):
      if getattr(self, name) is None:
        object.__setattr__(self, name, default)
    # Types first: a string or NaN must not reach the range checks (NaN passes every one).
    for name in ("num_steps", "prompts_per_step", "group_size", "off_policy_k", "micro_steps",
                 "max_new_tokens", "eval_size", "max_consecutive_skips", "capacity_buckets"):
      check_int("RLConfig", name, getattr(self, name))
    for name in ("eval_every", "redundant_slots", "logits_chunk"):
      check_int("RLConfig", name, getattr(self, name), minimum=0)
    for name in ("clip_low", "clip_high", "tis_cap", "learning_rate", "weight_decay",
                 "grad_clip", "temperature", "top_p", "eval_temperature", "eplb_ema"):
      check_real("RLConfig", name, getattr(self, name))
    choices = {"replay_mode": REPLAY_MODES, "loss": LOSSES,
               "ratio_denominator": RATIO_DENOMINATORS, "rollout_dtype": DTYPES,
               "balance_mode": BALANCE_MODES, "capacity_mode": CAPACITY_MODES,
               "planner_method": PLANNER_METHODS, "trainable": TRAINABLE}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"RLConfig.{name}={getattr(self, name)!r} must be one of {allowed}")
    if self.batch_size % (self.off_policy_k * self.micro_steps):
      raise ValueError(
          f"RLConfig batch prompts_per_step*group_size={self.batch_size} must be divisible by "
          f"off_policy_k*micro_steps={self.off_policy_k}*{self.micro_steps}")
    if self.group_size < 2:
      raise ValueError(f"RLConfig.group_size={self.group_size} must be >= 2 (group advantages)")
    # grad_clip <= 0 is no "off" switch: optax's clip_by_global_norm(-1) flips the gradient's
    # sign (ascent) and 0 zeroes every update.
    for name in ("clip_low", "clip_high", "learning_rate", "grad_clip"):
      check_real("RLConfig", name, getattr(self, name), 0, inclusive=False)
    if self.clip_low >= 1:
      raise ValueError(f"RLConfig.clip_low={self.clip_low} must be < 1")
    for name in ("tis_cap", "weight_decay"):
      check_real("RLConfig", name, getattr(self, name), 0)
    for name in ("temperature", "eval_temperature"):
      check_temperature("RLConfig", name, getattr(self, name))
    if not 0 <= self.eplb_ema < 1:
      raise ValueError(f"RLConfig.eplb_ema={self.eplb_ema} must be in [0, 1) (0 = this step's "
                       "loads only)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"RLConfig.top_p={self.top_p} must be in (0, 1]")
    if self.temperature == 0:
      raise ValueError("RLConfig.temperature=0 (greedy) leaves nothing to learn from: use > 0")
    self._check_no_dead_settings()

  def _check_no_dead_settings(self):
    """A non-default setting that the chosen mode never reads is a user mistake: fail naming
    the fields rather than run without it."""
    # learner.micro_step weights by min(π_old/µ, cap) only against π_old: with 'rollout' the
    # ratio is already π_θ/µ, so the cap would be silently ignored.
    if self.tis_cap > 0 and self.ratio_denominator != "old":
      raise ValueError(
          f"RLConfig.tis_cap={self.tis_cap} has no effect with ratio_denominator="
          f"{self.ratio_denominator!r} (the ratio π_θ/µ already corrects for the rollout "
          "engine): set ratio_denominator='old' to use truncated IS, or tis_cap=0")
    if self.eplb_ema > 0 and self.balance_mode != "eplb_step":
      raise ValueError(
          f"RLConfig.eplb_ema={self.eplb_ema} is only read by balance_mode='eplb_step', not "
          f"balance_mode={self.balance_mode!r}: set balance_mode='eplb_step' or eplb_ema=0")
    default = lambda name: RLConfig.__dataclass_fields__[name].default
    if self.planner_method != default("planner_method") and self.balance_mode != "foresight":
      raise ValueError(
          f"RLConfig.planner_method={self.planner_method!r} is only read by "
          f"balance_mode='foresight', not balance_mode={self.balance_mode!r}")
    if (self.capacity_buckets != default("capacity_buckets")
        and self.effective_capacity_mode == "model"):
      raise ValueError(
          f"RLConfig.capacity_buckets={self.capacity_buckets} has no effect with capacity_mode="
          f"{self.capacity_mode!r} and balance_mode={self.balance_mode!r} (the model's "
          "capacity_factor sizes every buffer): set capacity_mode='bucket' or a balance_mode")

  @property
  def batch_size(self) -> int:
    """B_global: sequences per rollout batch."""
    return self.prompts_per_step * self.group_size

  @property
  def effective_capacity_mode(self) -> str:
    """capacity_mode with 'auto' resolved: buckets when a balance mode plans, else the model's."""
    if self.capacity_mode != "auto":
      return self.capacity_mode
    return "model" if self.balance_mode == "none" else "bucket"

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // (self.off_policy_k * self.micro_steps)

  @property
  def phases(self) -> ReplayPhases:
    """What each phase of an RL step replays in this replay_mode (`replay_phases`: one rule
    for the jitted learner and the host)."""
    return replay_phases(self.replay_mode)

  def validate_mesh(self, token_shards: int, expert_axis_size: int | None = None) -> None:
    """Checks against the mesh: `token_shards` ('data' x 'expert' devices a batch splits
    over) and, when given, the 'expert' axis size."""
    if expert_axis_size is not None:
      self._check_expert_axis(expert_axis_size)
    if self.micro_batch_size % token_shards:
      raise SetupError(
          f"RLConfig micro-batch size {self.micro_batch_size} (= batch {self.batch_size} / "
          f"(off_policy_k*micro_steps)) must be divisible by the {token_shards} token shards")
    if self.eval_size % token_shards:
      raise SetupError(f"RLConfig.eval_size={self.eval_size} must be divisible by the "
                       f"{token_shards} token shards")

  def _check_expert_axis(self, expert_axis_size: int) -> None:
    """A balance mode moves experts between the devices of the 'expert' axis: with one device
    every layout is the same and the planner would run for nothing."""
    if self.balance_mode != "none" and expert_axis_size == 1:
      raise SetupError(
          f"RLConfig.balance_mode={self.balance_mode!r} needs expert parallelism, but the "
          "'expert' mesh axis has size 1: set mesh_expert > 1 (e.g. --cpu_devices=8 "
          "--config.mesh_expert=4) or balance_mode='none' (capacity_mode='bucket' still sizes "
          "the expert buffers from the replayed routes)")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "RLConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown RLConfig fields {unknown}; allowed: {sorted(known)}")
    return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class PR2Config:
  """The route evolution predictor (used when RLConfig.replay_mode is pr2 or pr2_r2)."""
  loss: str = "post"               # post | delta | l2 (DESIGN §3)
  lr_mult: float = 10.0            # α: predictor learning rate = α × RLConfig.learning_rate;
                                   # α·η ~ 1e-3 suits Adam (the paper's α = 1e3 is for its
                                   # η ~ 1e-6; at the default η = 1e-4 it swamped the router)
  adam_eps: float = 1e-3           # the predictor's Adam ε: Adam steps ~lr whatever the gradient's
                                   # size, so at 1e-8 the rounding noise of an undrifted router
                                   # (|g| ~ 1e-6-1e-4) moved W_p as far as real drift (~1e-3);
                                   # gradients below ε take proportionally smaller steps
                                   # (docs/results/replay_comparison.md, "Predictor Adam ε")
                                   # (Adam clipped at RLConfig.grad_clip like the policy's,
                                   # no weight decay: W_p should stay where its fit puts it)
  feature_tokens: int = 8          # cached (h_old, p_old) positions per sequence
  feature_rule: str = "random"     # random: uniform over all slots | response: first response slots
  feature_dtype: str = "bfloat16"  # dtype of the feature cache
  predicted_gates: bool = True     # rollout gates from q̂ (paper) instead of the router's ρ

  def __post_init__(self):
    choices = {"loss": PREDICTOR_LOSSES, "feature_rule": FEATURE_RULES, "feature_dtype": DTYPES}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(f"PR2Config.{name}={getattr(self, name)!r} must be one of {allowed}")
    check_real("PR2Config", "lr_mult", self.lr_mult, 0, inclusive=False)
    check_real("PR2Config", "adam_eps", self.adam_eps, 0, inclusive=False)
    check_int("PR2Config", "feature_tokens", self.feature_tokens)
    if not isinstance(self.predicted_gates, bool):
      raise ValueError(f"PR2Config.predicted_gates={self.predicted_gates!r} must be a bool")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """Supervised warm-up on task solutions: a starting policy with partial competence."""
  num_steps: int = 150             # optimizer steps (0 = start RL from the init/loaded params)
  batch_size: int = 64             # sequences per step
  learning_rate: float = 3e-3      # peak AdamW learning rate
  warmup_steps: int = 10           # linear warmup

  def __post_init__(self):
    check_int("SFTConfig", "num_steps", self.num_steps, minimum=0)
    check_int("SFTConfig", "batch_size", self.batch_size)
    check_int("SFTConfig", "warmup_steps", self.warmup_steps, minimum=0)
    check_real("SFTConfig", "learning_rate", self.learning_rate, 0, inclusive=False)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything one run needs; built from a `configs/*.py` ConfigDict by `from_dict`."""
  model: ModelConfig               # the policy's architecture and numerics
  rl: RLConfig                     # the RL phase: rollouts, replay mode, learner, evaluation
  sft: SFTConfig                   # the supervised warm-up before RL
  pr2: PR2Config = PR2Config()     # PR2's predictor (replay_mode pr2 / pr2_r2)
  task: str = "arithmetic"         # pr2_jax.rl.tasks registry name
  # the task's options (e.g. {"num_digits": 2}; pr2_jax.rl.tasks names each task's)
  task_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0                    # init, data and sampling seed
  checkpoint_every: int = 10       # RL steps between checkpoints (0 = only at the end)
  init_from: str = ""              # a warm-up checkpoint dir to start RL from (skips SFT)
  # A local Hugging Face checkpoint dir ('' = off): model, tokenizer and initial params come
  # from it (pr2_jax.hf.experiment); `model` then only sets run-time knobs, SFT defaults to off.
  hf_checkpoint: str = ""

  def __post_init__(self):
    for name, cls in (("model", ModelConfig), ("rl", RLConfig), ("sft", SFTConfig),
                      ("pr2", PR2Config)):  # a dict here failed later, as an AttributeError
      if not isinstance(getattr(self, name), cls):
        raise TypeError(f"ExperimentConfig.{name} is a {type(getattr(self, name)).__name__}, "
                        f"expected a {cls.__name__} (or build the whole config from a mapping "
                        "with ExperimentConfig.from_dict)")
    check_int("ExperimentConfig", "checkpoint_every", self.checkpoint_every, minimum=0)
    check_int("ExperimentConfig", "seed", self.seed, minimum=0)  # numpy's seeds are >= 0
    from pr2_jax.rl.tasks import make_task
    make_task(self.task, **self.task_kwargs)  # an unknown task or option fails here, by name

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ExperimentConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)} | {"mesh_data", "mesh_expert"}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown config fields {unknown}; allowed: {sorted(known)}")
    hf = str(d.get("hf_checkpoint", ""))
    _check_sections(d, hf)
    if hf:  # the architecture is the checkpoint's; RL starts from its weights (no SFT by default)
      from pr2_jax.hf.experiment import model_config
      model = model_config(hf, d.get("model"))
      sft = SFTConfig(**dict(d.get("sft", {"num_steps": 0})))
    else:
      model, sft = ModelConfig.from_dict(d["model"]), SFTConfig(**dict(d["sft"]))
    rl = RLConfig.from_dict(d["rl"])
    if "mesh_expert" in d:  # the 'expert' axis size experiments.common.build_mesh makes
      rl._check_expert_axis(d["mesh_expert"])
    return cls(model=model, rl=rl, sft=sft,
               pr2=PR2Config(**dict(d.get("pr2", {}))), hf_checkpoint=hf,
               task=d.get("task", "arithmetic"),
               task_kwargs=dict(d.get("task_kwargs", {})), seed=d.get("seed", 0),
               checkpoint_every=d.get("checkpoint_every", 10),
               init_from=str(d.get("init_from", "")))



def _check_sections(d: Mapping[str, Any], hf: str) -> None:
  """A config that cannot describe a run fails here, naming what is missing, instead of a
  KeyError or a silently random model."""
  needed = ("rl",) if hf else ("model", "sft", "rl")
  missing = [k for k in needed if k not in d]
  if missing:
    raise ValueError(f"the config has no {missing} section(s): an RL experiment needs model, sft "
                     "and rl (configs/tiny.py), or hf_checkpoint and rl (configs/hf_pr2.py). A "
                     "model-only config such as configs/qwen3_30b_a3b.py is for "
                     "experiments.memory_plan; RL from that model's checkpoint is "
                     "configs/hf_pr2.py --config.hf_checkpoint=DIR")
  if "hf_checkpoint" in d and not hf and set(d["model"]) <= set(RUNTIME_FIELDS):
    # hf_pr2.py's model section holds only run-time knobs: without a checkpoint there is no
    # architecture and no weights, and ModelConfig's defaults would train a random model.
    raise ValueError("hf_checkpoint is empty, and this config takes its model from a checkpoint "
                     f"(its model section only sets {sorted(d['model'])}): pass "
                     "--config.hf_checkpoint=DIR (a local Qwen3-MoE checkpoint dir)")
