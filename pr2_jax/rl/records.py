"""What a run keeps in its workdir besides checkpoints: the metrics rows, and the identities
its checkpoints record so that a resume (or a shared warm-up) is only ever taken up by the
same setup.

`metrics.jsonl` holds one JSON row per reported step; process 0 alone writes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os

from pr2_jax.parallel.distributed import is_main_process
from pr2_jax.rl.config import ExperimentConfig, SetupError

LOCK_FILE = ".lock"  # in the workdir: the pid of the run holding it


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds WORKDIR/.lock for a run (process 0's: the others share its workdir). Two runs in one
  workdir interleaved their metrics rows (steps 17, 1, 18, 2, ...) and wrote the same
  checkpoints, both exiting 0; the second is now a SetupError naming the first's pid. An OS
  file lock (`flock`): released when the process ends however it ends, so never stale."""
  if not is_main_process():
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise SetupError(f"workdir {workdir!r} is in use by another run (pid {holder}): wait for "
                       "it to finish, or use another workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the lock


def read_metrics_rows(path: str) -> list[dict]:
  """metrics.jsonl rows; a torn last line (killed mid-write) is dropped, not fatal, any other
  line that is not JSON a SetupError (a ValueError: the entry points' one error line) naming
  the file and line."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  for i, (n, line) in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i != len(lines) - 1:
        raise SetupError(f"{path} line {n} is not a JSON row ({e}); repair or delete "
                         "that line") from None
  return rows


def has_rl_rows(path: str) -> bool:
  return any(r.get("phase") == "rl" for r in read_metrics_rows(path))


def truncate_metrics(path: str, last_step: int, phases=("rl",)) -> None:
  """Drops rows of `phases` after `last_step`: a resumed run rewrites them identically."""
  if not is_main_process() or not os.path.exists(path):  # process 0 owns the metrics file
    return
  rows = read_metrics_rows(path)
  keep = [r for r in rows if not (r.get("phase") in phases and r.get("step", 0) > last_step)]
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in keep)
  os.replace(tmp, path)


# RL fields a resumed run may change: how long it runs, how it is evaluated and how much
# memory the learner's logits take, not what it computes (anything else would mix two setups
# in one metrics file and checkpoint).
RESUMABLE_RL_FIELDS = ("num_steps", "eval_every", "eval_size", "eval_temperature",
                       "max_consecutive_skips", "logits_chunk")


def run_identity(config: ExperimentConfig) -> dict:
  """What an RL checkpoint records and a resume must match, as JSON (tuples become lists)."""
  rl = {k: v for k, v in dataclasses.asdict(config.rl).items() if k not in RESUMABLE_RL_FIELDS}
  return json.loads(json.dumps({
      "model": dataclasses.asdict(config.model), "rl": rl, "sft": dataclasses.asdict(config.sft),
      "pr2": dataclasses.asdict(config.pr2),
      "task": config.task, "task_kwargs": dict(config.task_kwargs), "seed": config.seed,
      "hf_checkpoint": config.hf_checkpoint}))


# Identity fields added after checkpoints were written without them, with the value those runs
# used: a resume compares that value, so a refusal names what to set to resume as before.
LEGACY_IDENTITY = {"pr2.adam_eps": 1e-8, "rl.trainable": "all"}


def resume_identity(config: ExperimentConfig) -> dict:
  """`run_identity` as a resume compares it: without `pr2` in a replay mode that runs no
  predictor, whose settings (or a predictor field added since) change nothing there. (Runs
  from before 2026-12-07 also recorded `replay_mode` at the top level; only the keys named
  here are compared, so that copy is ignored.)"""
  identity = run_identity(config)
  if not config.rl.phases.uses_predictor:
    del identity["pr2"]
  return identity


def warmup_identity(config: ExperimentConfig) -> dict:
  """The part of `run_identity` that determines the warm-up: its checkpoint records this. The
  Hugging Face checkpoint is part of it: a warm-up starts from its weights, another run of the
  same model config from random ones."""
  identity = run_identity(config)
  return {k: identity[k] for k in ("model", "task", "task_kwargs", "seed", "sft", "hf_checkpoint")}


def holds_checkpoint(directory: str) -> bool:
  """Whether `directory` has at least one finished Orbax step (a numbered subdirectory)."""
  return os.path.isdir(directory) and any(
      name.isdigit() and os.path.isdir(os.path.join(directory, name))
      for name in os.listdir(directory))
