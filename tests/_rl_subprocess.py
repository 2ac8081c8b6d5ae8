"""Helpers for tests that run `python -m experiments.main` in subprocesses (interruption,
determinism).

A tiny run: a 1-layer, 4-expert, d=32 model warmed up for 50 steps (enough
that some rewards are non-zero, so RL updates really move the parameters), then 6 RL steps
of 16 sequences with a checkpoint after every step; evaluations on 16 problems reuse
the rollout's compiled sampler. One layer: nothing these tests check has a layer axis, and
every layer is compiled anew (both files' CPU 153 -> 137 s from an empty compile cache).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {
    "sft.num_steps": 50, "rl.num_steps": 6, "rl.prompts_per_step": 4, "rl.group_size": 4,
    "rl.eval_size": 16, "rl.eval_every": 3, "checkpoint_every": 1, "model.d_model": 32,
    "model.num_experts": 4, "model.expert_d_ff": 32, "model.num_layers": 1,
}


def command(workdir: str, overrides: dict = OVERRIDES, extra: tuple = ()) -> list[str]:
  return [sys.executable, "-m", "experiments.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in overrides.items()), *extra]


def suite_cache() -> str | None:
  """The suite's persistent compilation cache (tests/conftest.py), None if turned off."""
  return os.environ.get("JAX_COMPILATION_CACHE_DIR") or None


def environment(compile_cache: str | None = None, **extra) -> dict:
  """The child's environment; `compile_cache` turns on JAX's persistent compilation cache
  (`suite_cache()` to share the suite's: runs of OVERRIDES in several tests compile once)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # only the cache asked for
  if compile_cache:
    # Reruns then skip most of their ~30 s of compiling; the programs are the same.
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


class Processes:
  """Starts runs in their own process groups; `close()` SIGKILLs whatever is still alive."""

  def __init__(self, log_dir: str):
    self.log_dir, self.procs = log_dir, []

  def start(self, name: str, cmd: list[str], env: dict) -> subprocess.Popen:
    out = open(os.path.join(self.log_dir, f"{name}.out"), "w")
    err = open(os.path.join(self.log_dir, f"{name}.err"), "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
    proc.log_files = (out, err)
    self.procs.append(proc)
    return proc

  @staticmethod
  def kill(proc: subprocess.Popen) -> None:
    """SIGKILL to the run's process group (only ours: it was started in a new session)."""
    with contextlib.suppress(ProcessLookupError):
      os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

  def stderr(self, name: str) -> str:
    with open(os.path.join(self.log_dir, f"{name}.err")) as f:
      return f.read()

  def close(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        self.kill(proc)
      for f in proc.log_files:
        f.close()


@contextlib.contextmanager
def processes(log_dir: str):
  procs = Processes(log_dir)
  try:
    yield procs
  finally:
    procs.close()


def metrics_rows(workdir: str, drop=("elapsed_s",)) -> list[dict]:
  """metrics.jsonl rows without wall-clock fields (a torn last line would raise here)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in f]


def count_rl_rows(workdir: str) -> int:
  """RL rows written so far (safe to poll while the run appends)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  return sum('"phase": "rl"' in line for line in lines)


def experiment_config(overrides: dict = OVERRIDES):
  import importlib.util
  from pr2_jax.rl.config import ExperimentConfig
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                os.path.join(REPO, "configs", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  cfg = tiny.get_config()
  cfg.update_from_flattened_dict(overrides)
  return ExperimentConfig.from_dict(cfg.to_dict())


def restore_rl_state(workdir: str, step: int, overrides: dict = OVERRIDES):
  """The full train state of RL checkpoint `step` (params, optimizer, step), on one device."""
  from pr2_jax.parallel.mesh import make_mesh
  from pr2_jax.rl.loop import Engine
  from pr2_jax.train.checkpoint import Checkpointer, abstract_like
  engine = Engine(experiment_config(overrides), make_mesh(1, 1, devices=jax.devices()[:1]))
  with Checkpointer(os.path.join(workdir, "checkpoints", "rl")) as ck:
    state, meta = ck.restore(step, abstract_like(engine.state, engine.shardings))
  return state, meta
