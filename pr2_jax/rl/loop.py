"""The experiment loop: warm-up, then RL steps of rollout -> rewards -> old-log-prob -> κ updates.

A thin host shell around the jitted phases. Everything random is derived from
(seed, step), so a run resumed from a checkpoint draws exactly the prompts and
samples the uninterrupted run would have: the checkpoint only needs the state
and the step. Metrics rows and progress go to callbacks, which the caller
(`experiments/main.py`) logs and appends to WORKDIR/metrics.jsonl; `run` keeps the
checkpoints in WORKDIR and drops the rows of that file that a resume rewrites
(`pr2_jax.rl.start`).

Dimension legend: B rollout sequences, P prompt slots, N response slots,
M micro-steps, κ mini-batches.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pr2_jax.hf import experiment as hf_experiment
from pr2_jax.models.transformer import validate_tokens
from pr2_jax.parallel import shuffle
from pr2_jax.parallel.distributed import gather_rows, local_rows, to_global, to_host
from pr2_jax.parallel.mesh import EXPERT, axis_size, logical_sharding, num_token_shards
from pr2_jax.rl import advantages, balancing, data, metrics, programs, records, start
from pr2_jax.rl.config import ExperimentConfig, SetupError
from pr2_jax.rl.tasks import make_task
from pr2_jax.train.checkpoint import Checkpointer, check_directory

Callback = Callable[[dict], None]
Progress = Callable[[int, int, "float | None"], None]  # (step, total, seconds per step)

# Host RNG streams, np.random.default_rng([seed, stream, step]): one per use, so drawing more
# or fewer numbers in one (a batch size, a feature rule) never shifts what another draws.
SFT_STREAM = 1  # the warm-up's problems
RL_STREAM = 2  # the RL step's problems and mini-batch split
# PR2's feature slots: with W_p = 0, PR2 then draws exactly R3's prompts, samples and split.
FEATURE_STREAM = 3
# Sampling keys are fold_in(key, step); evaluation folds in a step no run reaches, so it
# never shares a rollout's key.
EVAL_KEY = 2**31 - 1
# Warm-up steps between metrics rows: each row waits for the device (a float of the loss).
_WARMUP_REPORT_EVERY = 25


class Diverged(FloatingPointError):
  """Training stopped on non-finite values; `phase` is 'sft' (the warm-up, not checkpointed)
  or 'rl' (the last good state is checkpointed)."""

  def __init__(self, message: str, phase: str):
    super().__init__(message)
    self.phase = phase


class Engine:
  """The compiled pieces of one experiment: models, sampler, learner steps."""

  def __init__(self, config: ExperimentConfig, mesh: Mesh):
    rl = config.rl
    self.config, self.mesh = config, mesh
    self.task = make_task(config.task, **config.task_kwargs)
    try:  # before any compiling: a small task may not have eval_size distinct problems
      self.eval_problems = self.task.eval_set(rl.eval_size, seed=config.seed)
    except ValueError as e:
      raise SetupError(f"RLConfig.eval_size={rl.eval_size} is too large: {e}") from None
    # Either one checked against the task and the model's vocabulary, before any compiling.
    self.tok = (hf_experiment.task_tokenizer(config.hf_checkpoint, self.task,
                                             config.model.vocab_size) if config.hf_checkpoint
                else data.char_tokenizer(self.task, config.model.vocab_size))
    self.prompt_slots, self.response_slots = data.layout(self.task, rl.max_new_tokens)
    self.pr2_mode = rl.phases.uses_predictor
    if self.pr2_mode:
      self._check_feature_tokens()
    shards = num_token_shards(mesh)
    rl.validate_mesh(shards, axis_size(mesh, EXPERT))
    if config.sft.batch_size % shards:
      raise SetupError(f"SFTConfig.batch_size={config.sft.batch_size} must be divisible by the "
                       f"{shards} token shards")
    # Shared with earlier Engines of the same programs (other seeds, a resumed run).
    self.programs = programs.programs_for(config, mesh, self.tok.stop_ids, self.tok.pad_id)
    self.model = self.programs.model
    self.sample, self.eval_sample = self.programs.sample, self.programs.eval_sample
    self.key = jax.random.key(config.seed)
    if config.hf_checkpoint:  # the checkpoint's weights, read into their shardings
      self.state, self.shardings = hf_experiment.create_state(config.hf_checkpoint, self.model,
                                                              self.programs.tx, mesh)
    else:
      self.state, self.shardings = self.programs.init_state(self.key)
    if self.pr2_mode:
      self._add_predictor()
    # Host-side balance planning (capacity buckets, eplb_step's plan, balance metrics); its
    # state (EMA of loads, last layout) rides in the RL checkpoint's metadata.
    self.balancer = balancing.StepBalancer.create(rl, config.model, mesh,
                                                  self.prompt_slots + self.response_slots)
    self.balance_state = balancing.StepState()
    self.seq_sharding = logical_sharding(mesh, ("batch", "length"))
    self.row_sharding = logical_sharding(mesh, ("batch",))  # [B, ...], trailing axes whole
    self.replicated = logical_sharding(mesh, ())

  def _check_feature_tokens(self):
    """Distinct feature slots: none cached (and weighted in the predictor loss) twice."""
    pr2 = self.config.pr2
    if pr2.feature_rule == "random":
      slots, of = (self.prompt_slots + self.response_slots,
                   f"prompt {self.prompt_slots} + max_new_tokens {self.response_slots}")
    else:
      slots, of = self.response_slots, f"max_new_tokens {self.response_slots}"
    if pr2.feature_tokens > slots:
      raise SetupError(f"PR2Config.feature_tokens={pr2.feature_tokens} exceeds the {slots} "
                       f"slots feature_rule={pr2.feature_rule!r} draws from ({of})")

  def _add_predictor(self):
    """W_p [L, D, E] = 0 and its optimizer state (split like the parameters under fsdp)."""
    init, (w_sharding, opt_shardings) = self.programs.pred_init
    w, opt = init()
    self.state = self.state.replace(predictor=w, pred_opt_state=opt)
    self.shardings = self.shardings.replace(predictor=w_sharding, pred_opt_state=opt_shardings)

  def feature_slots(self, rng: np.random.Generator, batch: int) -> np.ndarray | None:
    """Slots whose router features PR2 caches, int32 [B, F] (by `pr2.feature_rule`)."""
    if not self.pr2_mode:
      return None
    f, s = self.config.pr2.feature_tokens, self.prompt_slots + self.response_slots
    if self.config.pr2.feature_rule == "response":  # f <= response_slots (checked at init)
      return np.broadcast_to(self.prompt_slots + np.arange(f), (batch, f)).astype(np.int32)
    return np.sort(np.argsort(rng.random((batch, s)), axis=1)[:, :f], axis=1).astype(np.int32)

  # -- warm-up --------------------------------------------------------------
  def warmup(self, on_metrics: Callback | None = None, on_progress: Progress | None = None):
    """Supervised training on task solutions; returns the warmed-up params. Every
    `_WARMUP_REPORT_EVERY` (25) steps `on_metrics` gets a row and `on_progress(step, total,
    seconds_per_step)` the rate (None at the first report, whose steps include compiling)."""
    sft = self.config.sft
    if self.config.hf_checkpoint and not sft.num_steps:
      return self.state.params  # RL starts from the checkpoint's weights
    init, shardings, step_fn = self.programs.warmup(self.key, sft)
    state = init(self.key)
    if self.config.hf_checkpoint:  # SFT from the checkpoint's weights (a copy: the step donates)
      state = state.replace(params=jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                                           out_shardings=shardings.params)(self.state.params))
    t_first = first = None
    for step in range(1, sft.num_steps + 1):
      rng = np.random.default_rng([self.config.seed, SFT_STREAM, step])
      batch = data.sft_batch(self.tok, self.task.sample(rng, sft.batch_size), self.prompt_slots,
                             self.response_slots)
      state, m = step_fn(state, to_global(batch, self.seq_sharding))
      if step % _WARMUP_REPORT_EVERY == 0 or step == sft.num_steps:
        row = {"phase": "sft", "step": step, **{k: float(v) for k, v in m.items()}}  # waits
        if not np.isfinite(row["loss"]):  # a NaN warm-up would only show as RL's zero reward
          raise Diverged(f"the warm-up diverged: supervised loss {row['loss']} at step {step} "
                         f"(SFTConfig.learning_rate={sft.learning_rate}); none of it was "
                         "checkpointed", "sft")
        now = time.perf_counter()
        if on_metrics:
          on_metrics(row)
        if on_progress:
          on_progress(step, sft.num_steps, t_first and (now - t_first) / (step - first))
        t_first, first = t_first or now, first or step
    return state.params

  # -- evaluation -----------------------------------------------------------
  def rewards(self, problems, tokens_BS) -> np.ndarray:
    ids_BN = np.asarray(tokens_BS)[:, self.prompt_slots:]
    # A sampled id that is not text makes the answer malformed ('?' never parses): an id the
    # tokenizer lacks (the model's vocabulary may be larger) would crash decode, and a
    # sampled PAD or BOS would be skipped by it ('4 PAD 6' scored as '46'). Stop ids still
    # end the response, and the padding after them is never read.
    skipped = [i for i in (self.tok.pad_id, self.tok.bos_id)
               if i is not None and i not in self.tok.stop_ids]
    not_text = (ids_BN >= self.tok.vocab_size) | np.isin(ids_BN, skipped)
    ids_BN = np.where(not_text, self.tok.encode("?")[0], ids_BN)
    completions = self.tok.decode_batch(ids_BN)
    return np.array([self.task.reward(p, c) for p, c in zip(problems, completions)], np.float32)

  def score(self, problems, roll) -> tuple[np.ndarray, np.ndarray]:
    """(rewards [B], response lengths [B]) on every process. Each process decodes and scores
    only the rows its devices hold (a reward may be costly: a verifier, a sandbox), and only
    these two numbers a row cross hosts; routes and features stay on the devices."""
    rows, tokens_BS = local_rows(roll.tokens)
    mask_rows, mask_BS = local_rows(roll.response_mask)
    if mask_rows != rows:  # both come from the sampler; a layout change must not misalign them
      raise ValueError(f"rollout tokens and response mask hold rows {rows} and {mask_rows} here")
    per_row = np.stack([self.rewards(problems[rows], tokens_BS), mask_BS.sum(1)], axis=1)
    both = gather_rows(rows, per_row.astype(np.float32), len(problems))
    return both[:, 0], both[:, 1]

  def evaluate(self, params) -> float:
    """Mean held-out reward at `eval_temperature` (a fixed sampling key: comparable across
    steps)."""
    prompts, valid = data.encode_prompts(self.tok, self.eval_problems, self.prompt_slots)
    validate_tokens(prompts, self.config.model.vocab_size)
    # The rollout's keyword arguments too: the same call signature hits its jit cache entry.
    roll = self.eval_sample(params, *to_global((prompts, valid), self.seq_sharding),
                            jax.random.fold_in(self.key, EVAL_KEY), predictor=None,
                            feature_slots_BF=None)
    return float(self.score(self.eval_problems, roll)[0].mean())

  # -- one RL step ----------------------------------------------------------
  def rl_step(self, state, step: int):
    rl = self.config.rl
    rng = np.random.default_rng([self.config.seed, RL_STREAM, step])
    problems = [p for p in self.task.sample(rng, rl.prompts_per_step) for _ in range(rl.group_size)]
    prompts, valid = data.encode_prompts(self.tok, problems, self.prompt_slots)
    validate_tokens(prompts, self.config.model.vocab_size)  # the jitted sampler cannot check
    slots = self.feature_slots(np.random.default_rng([self.config.seed, FEATURE_STREAM, step]),
                               rl.batch_size)
    in_rollout = rl.phases.predicts_at_rollout  # PR2-R3: predicts (caches features) at rollout
    roll = self.sample(state.params, *to_global((prompts, valid), self.seq_sharding),
                       jax.random.fold_in(self.key, step),
                       predictor=state.predictor if in_rollout else None,
                       feature_slots_BF=slots if in_rollout else None)
    rewards, response_len = self.score(problems, roll)
    batch = {"tokens": roll.tokens, "valid": roll.valid, "positions": roll.positions,
             "response_mask": roll.response_mask, "rollout_logp": roll.logp,
             "rollout_routes": roll.routes,
             "adv": np.asarray(advantages.grpo_advantages(jnp.asarray(rewards), rl.group_size))}
    if self.pr2_mode:
      batch["feature_slots"] = slots
    if in_rollout:
      batch.update(feature_h=roll.feature_h, feature_p=roll.feature_p)
    batch = {k: to_global(v, self.row_sharding) if isinstance(v, np.ndarray) else v
             for k, v in batch.items()}
    order = to_global(rng.permutation(rl.batch_size), self.replicated)
    micro = shuffle.shuffle_into_chunks(batch, order, num_chunks=rl.off_policy_k * rl.micro_steps,
                                        mesh=self.mesh)
    del roll, batch  # the [B, ...] rollout: only its shuffled copy is needed from here on
    old_fn, update_fn = self.learner_fns(micro)
    bal = self.balancer
    plan, old_phase, self.balance_state, eplb_ms = bal.plan_old_pass(micro, self.balance_state)
    old = old_fn(state.params, state.predictor, micro, bal.step_plan_arg(plan),
                 capacity=old_phase.capacity)
    micro["old_logp"] = old.logp
    micro["replay_routes"] = (old.routes if rl.phases.update_replays_old_pass
                              else micro["rollout_routes"])
    if rl.phases.predicts_at_old_pass:  # PR2-R2: the features come from the old pass
      micro["feature_h"], micro["feature_p"] = old.feats
    phase = bal.plan_update(micro, plan, old_phase)
    per_mini = []
    for i in range(rl.off_policy_k):
      mini = jax.tree.map(lambda x: x[i * rl.micro_steps:(i + 1) * rl.micro_steps], micro)
      state, m = update_fn(state, mini, jnp.asarray(i > 0), bal.step_plan_arg(plan),
                           phase.capacity)
      per_mini.append(m)
    summary = self._summarise(per_mini, rewards, response_len)
    old_dropped, old_mismatch = to_host((old.dropped, old.mismatch))  # one transfer
    balance, self.balance_state = bal.summary(old_phase, phase, eplb_ms,
                                              float(old_dropped.sum()), self.balance_state)
    summary.update(balance)
    summary.update(metrics.flatten_for_json(old_mismatch))
    if self.pr2_mode:
      summary["feature_cache_bytes"] = int(micro["feature_h"].nbytes + micro["feature_p"].nbytes)
    return state, summary

  def learner_fns(self, micro):
    """(old_fn, update_fn) of `learner.make_learner_fns`, as `rl_step` calls them on the
    step's shuffled micro-batches `micro` [κ·M, b, ...]; built (and jitted) on the first call.

    The hook for code that watches the updates: an instance attribute of the same name
    wrapping the original (e.g. experiments/drift_probe.py snapshots the router before each
    update) is what `rl_step` calls."""
    return self.programs.learner_fns(self.shardings, lambda: self._example_batch(micro))

  def _example_batch(self, micro) -> dict:
    """A mini-batch [M, b, ...] with the keys and shapes the update step sees (the learner
    takes its shardings from it)."""
    example = jax.tree.map(lambda x: x[: self.config.rl.micro_steps], micro)
    example["old_logp"] = jnp.zeros(example["tokens"].shape[:2] + (example["tokens"].shape[2] - 1,))
    example["replay_routes"] = example["rollout_routes"]
    if self.pr2_mode and "feature_h" not in example:  # pr2_r2: the old pass adds them
      lead_MbF = example["feature_slots"].shape
      m = self.config.model
      dtype = jnp.dtype(self.config.pr2.feature_dtype)
      example["feature_h"] = jnp.zeros(lead_MbF + (m.num_moe_layers, m.d_model), dtype)
      example["feature_p"] = jnp.zeros(lead_MbF + (m.num_moe_layers, m.num_experts), dtype)
    return example

  @staticmethod
  def _summarise(per_mini, rewards, response_len) -> dict:
    """The step's metrics row (plain Python), plus `skipped_flags` (which mini-steps skipped
    their update, in order), which `run` pops."""
    per_mini = [to_host(m) for m in per_mini]
    out = metrics.flatten_for_json({k: np.mean([m[k] for m in per_mini], axis=0)
                                    for k in per_mini[0] if k != "skipped"})
    out["skipped_flags"] = [bool(m["skipped"]) for m in per_mini]
    out["skipped_updates"] = sum(out["skipped_flags"])
    # Per mini-step: k3/extreme at mini-step 1 are the pure train-inference mismatch
    # (π_θ = π_old); later mini-steps add the policy's own movement since the rollout.
    for key in ("topk_agreement", "zero_dev_ratio", "replayed_topk_agreement",
                "replayed_zero_dev_ratio", "pred_loss", "pred_topk_acc", "k3_kl", "extreme_frac"):
      if key in per_mini[0]:
        out[f"{key}_per_ministep"] = [float(m[key]) for m in per_mini]
    out.update(reward_mean=float(rewards.mean()),
               response_len=float(response_len.mean()))
    return out


def skip_run(skipped: list[bool], before: int) -> tuple[int, int]:
  """(longest run of skipped updates in a row that takes in one of this RL step's, the run
  still going at the step's end), from the step's updates in order (True = skipped) and the
  `before` skips that ended the steps before it: a run across a step boundary counts whole.
  E.g. [True, False] after 2 -> (3, 0); [False, True, True, False] after 5 -> (2, 0)."""
  longest, run = 0, before
  for s in skipped:
    run = run + 1 if s else 0
    if s:
      longest = max(longest, run)
  return longest, run


def run(config: ExperimentConfig, mesh: Mesh, workdir: str, *, on_metrics: Callback | None = None,
        on_progress: Progress | None = None, on_warmup_progress: Progress | None = None,
        warn: Callable[[str], None] = print, info: Callable[[str], None] = print,
        allow_fresh_start: bool = False) -> dict:
  """Warm-up (or resume), then RL; returns a summary dict. Resumable from `workdir`.

  Resumes from the newest readable RL checkpoint (a damaged newest one is
  reported through `warn` and an older one used; the resume point through
  `info`, as is a mesh other than the checkpoint's) if it was written by the same
  setup (`run_identity`). Refuses to start from scratch over a workdir that already
  has metrics, or whose checkpoints are all unreadable (CheckpointError), unless
  `allow_fresh_start`: that deletes the unreadable ones and starts over. A workdir another
  run is using is a SetupError (`records.workdir_lock`).
  `on_progress(step, total, seconds_per_step)` gets None as the rate for the first
  step after a start or resume (it includes compiling); `on_warmup_progress` the same for
  the warm-up (see `Engine.warmup`). After `RLConfig.max_consecutive_skips` skipped
  updates in a row (across RL steps too) it checkpoints the last state and raises Diverged.
  """
  for name, path in (("workdir", workdir), ("init_from", config.init_from)):
    try:
      check_directory(path or "")  # before any work: Orbax would write unreadable checkpoints
    except ValueError as e:
      raise SetupError(f"{name}: {e}") from None
  emit = on_metrics or (lambda m: None)
  with records.workdir_lock(workdir):  # one run per workdir (a second is a SetupError)
    engine = Engine(config, mesh)
    rl_ckpt = Checkpointer(start.rl_checkpoint_dir(workdir))
    try:
      begun = start.start_or_resume(engine, rl_ckpt, workdir, emit=emit, warn=warn, info=info,
                                    on_warmup_progress=on_warmup_progress,
                                    allow_fresh_start=allow_fresh_start)
      state, last = _rl_steps(engine, rl_ckpt, begun, emit, warn, info, on_progress)
      return {"state": state, "warmup_eval_reward": begun.warmup_eval_reward, "final": last,
              "resumed_from": begun.resumed_from}
    finally:
      # Ctrl-C or an error must not lose a checkpoint: Orbax commits saves in the background,
      # and an interpreter exiting mid-commit leaves only a tmp directory. close() waits.
      rl_ckpt.close()


def _rl_steps(engine: Engine, rl_ckpt: Checkpointer, begun: start.Start, emit: Callback,
              warn, info, on_progress: Progress | None):
  """The RL steps after `begun.step`: (final state, last metrics row)."""
  config, rl = engine.config, engine.config.rl
  state, consecutive, last = begun.state, begun.consecutive_skips, {}
  if begun.step < rl.num_steps:  # else the loop below is silent while the first step compiles
    info(f"RL: steps {begun.step + 1}..{rl.num_steps} (the first compiles)")
  t0, t_first = time.perf_counter(), None  # t_first: the end of the first step (its compiling)
  for step in range(begun.step + 1, rl.num_steps + 1):
    state, last = engine.rl_step(state, step)
    last.update(phase="rl", step=step)
    in_a_row, consecutive = skip_run(last.pop("skipped_flags"), consecutive)
    if in_a_row >= rl.max_consecutive_skips:
      emit(last)
      start.save_rl_checkpoint(rl_ckpt, engine, step, state, consecutive)  # skips left it good
      raise Diverged(
          f"{in_a_row} consecutive updates had a non-finite loss or gradient (limit "
          f"RLConfig.max_consecutive_skips={rl.max_consecutive_skips}); stopped at RL step "
          f"{step} with the last good state checkpointed in {rl_ckpt.directory}", "rl")
    if last["skipped_updates"]:
      warn(f"RL step {step}: {last['skipped_updates']} of {rl.off_policy_k} updates skipped "
           f"(non-finite loss or gradient), {in_a_row} in a row; the run stops at "
           f"RLConfig.max_consecutive_skips={rl.max_consecutive_skips}")
    if rl.eval_every and (step % rl.eval_every == 0 or step == rl.num_steps):
      last["eval_reward"] = engine.evaluate(state.params)
    last["elapsed_s"] = time.perf_counter() - t0
    emit(last)
    if on_progress:
      now = time.perf_counter()
      on_progress(step, rl.num_steps,
                  None if t_first is None else (now - t_first) / (step - begun.step - 1))
      t_first = t_first or now
    if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == rl.num_steps:
      start.save_rl_checkpoint(rl_ckpt, engine, step, state, consecutive)
  return state, last
