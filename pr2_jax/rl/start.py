"""How a run begins: it resumes from its newest RL checkpoint, or starts fresh from a warm-up.

What a run keeps in its workdir:
  * WORKDIR/checkpoints/rl: the RL state of some steps (step 0 = the warm-up policy),
    with the metadata a resume must match (`records.run_identity`);
  * WORKDIR/checkpoints/sft: the warm-up's parameters (`warmup_dir`);
  * WORKDIR/metrics.jsonl: the rows a resumed run rewrites are dropped here; the caller
    appends the rows (`experiments/common.MetricsWriter`).
`loop.run` calls `start_or_resume`, then runs the RL steps from the step it returns.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from pr2_jax.rl import balancing, records
from pr2_jax.rl.config import ExperimentConfig, SetupError
from pr2_jax.train.checkpoint import CheckpointError, Checkpointer, abstract_like

METRICS_FILE = "metrics.jsonl"
_START_OVER = ("rerun with --fresh (allow_fresh_start=True) to delete the unreadable checkpoints "
               "and start over, or use another workdir")


@dataclasses.dataclass(frozen=True)
class Start:
  """Where the RL steps begin: after `step` (0: none done yet), from `state`."""
  step: int
  state: Any  # the RL TrainState
  consecutive_skips: int  # skipped updates in a row at the end of `step` (the next ones add)
  resumed_from: int | None  # the RL checkpoint's step; None for a fresh start
  warmup_eval_reward: float | None  # the warm-up policy's eval reward (fresh starts only)


def rl_checkpoint_dir(workdir: str) -> str:
  """Where a run keeps its RL checkpoints."""
  return os.path.join(workdir, "checkpoints", "rl")


def warmup_dir(config: ExperimentConfig, workdir: str) -> str | None:
  """The directory of the run's warm-up checkpoint: `init_from` when set (another run's
  warm-up), else WORKDIR/checkpoints/sft; None when the run keeps none (a Hugging Face
  checkpoint with no SFT steps: RL starts from the checkpoint's own weights)."""
  if config.init_from:
    return config.init_from
  if config.sft.num_steps or not config.hf_checkpoint:
    return os.path.join(workdir, "checkpoints", "sft")
  return None


def rerun_plan(config: ExperimentConfig, workdir: str) -> str:
  """What rerunning an interrupted run's command does, from what its workdir holds: an
  interrupted run must not promise a resume it cannot make, nor a warm-up it will not run."""
  warmup = warmup_dir(config, workdir)
  if records.holds_checkpoint(rl_checkpoint_dir(workdir)):
    return f"rerun the same command to resume from the newest checkpoint in {workdir}"
  first = "no RL checkpoint yet; rerunning the same command "
  if warmup is None:  # RL starts from the Hugging Face checkpoint's own weights
    return first + f"starts RL from {config.hf_checkpoint} again"
  if records.holds_checkpoint(warmup):  # this run's, saved when done, or another's (init_from)
    return first + f"restores the warm-up from {warmup} and starts RL"
  return first + f"starts the warm-up again ({workdir})"


def save_rl_checkpoint(ckpt: Checkpointer, engine, step: int, state, consecutive_skips: int):
  """Saves RL `step` with what a resume needs besides the state: the identity it must match,
  the mesh (a resume on another one is reported), the balancer's state and the skip count."""
  ckpt.save(step, state, {"rl_step": step, **records.run_identity(engine.config),
                          "mesh": dict(engine.mesh.shape),
                          "balance_state": engine.balance_state.to_json(),
                          "consecutive_skips": consecutive_skips})


def start_or_resume(engine, rl_ckpt: Checkpointer, workdir: str, *, emit: Callable[[dict], None],
                    warn: Callable[[str], None], info: Callable[[str], None],
                    on_warmup_progress=None, allow_fresh_start: bool = False) -> Start:
  """Resumes from the newest readable RL checkpoint in `rl_ckpt` written by the same setup,
  or starts fresh: the warm-up (restored, or run and saved), its evaluation (an `sft_eval`
  row through `emit`) and an RL checkpoint of step 0. Problems go to `warn`, what happens to
  `info`. See `loop.run` for the refusals."""
  resumed = _resume(engine, rl_ckpt, workdir, warn, info, allow_fresh_start)
  if resumed is not None:
    return resumed
  return _start_fresh(engine, rl_ckpt, workdir, emit, warn, info, on_warmup_progress,
                      allow_fresh_start)


def _resume(engine, rl_ckpt, workdir, warn, info, allow_fresh_start) -> Start | None:
  config, mesh_shape = engine.config, dict(engine.mesh.shape)
  step, state, meta, problems = _restore(
      rl_ckpt, abstract_like(engine.state, engine.shardings), records.resume_identity(config),
      delete_unreadable=True, start_over=allow_fresh_start, legacy_meta=records.LEGACY_IDENTITY)
  for problem in problems:
    warn(problem)
  if step is None:
    return None
  info(f"resuming from the RL checkpoint of step {step} in {rl_ckpt.directory}"
       + (" (already complete)" if step >= config.rl.num_steps else
          f"; metrics rows after step {step} are rewritten"))
  if meta.get("mesh", mesh_shape) != mesh_shape:  # absent: an older checkpoint
    info(f"the checkpoint was written on the mesh {meta['mesh']}, this run's is "
         f"{mesh_shape}: its arrays were resharded to it")
  engine.balance_state = balancing.StepState.from_json(meta.get("balance_state"))
  records.truncate_metrics(os.path.join(workdir, METRICS_FILE), step)
  return Start(step, state, meta.get("consecutive_skips", 0), resumed_from=step,
               warmup_eval_reward=None)


def _start_fresh(engine, rl_ckpt, workdir, emit, warn, info, on_warmup_progress,
                 allow_fresh_start) -> Start:
  metrics_path = os.path.join(workdir, METRICS_FILE)
  if records.has_rl_rows(metrics_path) and not allow_fresh_start:
    raise SetupError(f"{workdir} holds RL metrics from an earlier run but no RL checkpoint to "
                     "resume; refusing to start over it (pass allow_fresh_start=True / "
                     "--fresh, or use another workdir)")
  records.truncate_metrics(metrics_path, -1, phases=("rl", "sft_eval"))
  params = _warmed_up(engine, workdir, emit, warn, info, on_warmup_progress, allow_fresh_start)
  state = engine.state.replace(params=params)
  warm_reward = engine.evaluate(state.params)
  emit({"phase": "sft_eval", "step": 0, "eval_reward": warm_reward})
  # Step 0 = the warm-up policy: a run killed before its first RL checkpoint resumes here.
  save_rl_checkpoint(rl_ckpt, engine, 0, state, 0)
  return Start(0, state, 0, resumed_from=None, warmup_eval_reward=warm_reward)


def _warmed_up(engine, workdir, emit, warn, info, on_warmup_progress, allow_fresh_start):
  """The warm-up's params: restored from `warmup_dir`, else trained (and saved there)."""
  config = engine.config
  directory = warmup_dir(config, workdir)
  if directory is None:
    return _warm_up(engine, workdir, emit, info, on_warmup_progress)
  # A warm-up of this workdir must match the run's warm-up settings; one named by init_from
  # is the user's choice (e.g. compare_replay's shared warm-up), checked for the model only,
  # and never deleted.
  own = not config.init_from
  if not own and not records.holds_checkpoint(directory):
    # Checked only here, when the warm-up is read (a resume never reads it and may outlive it),
    # and before its Checkpointer, which would create the mistyped dir and warm up from scratch.
    raise SetupError(f"init_from={config.init_from!r} holds no checkpoint (expected a warm-up "
                     "checkpoint dir such as WORKDIR/checkpoints/sft of an earlier run)")
  expect = (records.warmup_identity(config) if own
            else {"model": records.run_identity(config)["model"]})
  with Checkpointer(directory, max_to_keep=1) as ckpt:
    if not own:
      _refuse_rl_checkpoints(ckpt, config.init_from)
    _, params, _, problems = _restore(
        ckpt, abstract_like(engine.state.params, engine.shardings.params), expect,
        start_over=allow_fresh_start and own,
        hint=_START_OVER if own else f"init_from={config.init_from!r} is unusable")
    for problem in problems:
      warn(problem)
    if params is None:
      params = _warm_up(engine, workdir, emit, info, on_warmup_progress)
      ckpt.save(config.sft.num_steps, params, records.warmup_identity(config))
      ckpt.wait()
  return params


def _refuse_rl_checkpoints(ckpt: Checkpointer, init_from: str) -> None:
  """init_from naming an RL run's checkpoints (WORKDIR/checkpoints/rl): they hold a whole RL
  state, not a warm-up's params, and Orbax's tree mismatch was reported as "unreadable"."""
  step = ckpt.latest_step()
  try:
    meta = {} if step is None else ckpt.restore_meta(step)
  except (CheckpointError, OSError, ValueError):  # damaged: _restore reports it by name
    return
  if "rl_step" in meta:
    raise SetupError(f"init_from={init_from!r} holds RL checkpoints (step {meta['rl_step']}); "
                     "init_from takes a warm-up checkpoint dir such as WORKDIR/checkpoints/sft")


def _warm_up(engine, workdir, emit, info, on_warmup_progress):
  # An interrupted warm-up reruns whole: its rows go.
  records.truncate_metrics(os.path.join(workdir, METRICS_FILE), 0, phases=("sft",))
  if engine.config.sft.num_steps:
    info(f"warm-up: {engine.config.sft.num_steps} supervised steps (the first compiles)")
  return engine.warmup(emit, on_warmup_progress)


def _restore(ckpt: Checkpointer, abstract, expect: dict, hint: str = _START_OVER, **kwargs):
  """`restore_newest_good`, with `hint` (what to do) added to its error when none restores."""
  try:
    return ckpt.restore_newest_good(abstract, expect, **kwargs)
  except CheckpointError as e:
    raise CheckpointError(f"{e}; {hint}") from None
