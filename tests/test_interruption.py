"""SIGKILL a real RL run at random moments, once in the middle of a checkpoint write; rerunning in
the same workdir ends bit-identical to an uninterrupted run (issue 9, item 1).

    .venv/bin/pytest tests/test_interruption.py     # about 2 minutes on 2 CPU cores

The run is `python -m experiments.main` in a subprocess (see `_rl_subprocess`).
Kill points, drawn from a seeded generator:
  1. a random moment of the warm-up (training, its checkpoint write, evaluation),
  2. while RL checkpoint s is being written (its `s.orbax-checkpoint-tmp`
     directory exists): the rerun must resume from s - 1, never from s,
  3. a random moment a step or two after that rerun resumed.
A last rerun finishes; its final RL checkpoint (params, optimizer state, step)
and metrics.jsonl (minus wall-clock times) must equal the uninterrupted run's.

Kill point 1 stops at the latest when the warm-up evaluation is logged: a kill
between the first RL row and the first RL checkpoint makes the rerun refuse to
start without --fresh (it sees RL metrics but no RL checkpoint; `loop.run`'s
guard against a silent fresh start), a different behaviour from the one tested here.
"""

import os
import re
import signal
import time

import jax
import numpy as np
import pytest

import _rl_subprocess as sub

SEED = 9
NUM_STEPS = sub.OVERRIDES["rl.num_steps"]
TMP = ".orbax-checkpoint-tmp"


def _wait_until(proc, condition, what, timeout=300.0, poll=0.001):
  """Polls `condition` every millisecond; fails if the run ends first."""
  t0 = time.monotonic()
  while not condition():
    if proc.poll() is not None:
      raise AssertionError(f"the run exited (code {proc.returncode}) before {what}")
    if time.monotonic() - t0 > timeout:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(poll)


def _listing(directory):
  try:
    return os.listdir(directory)
  except FileNotFoundError:
    return []


def _partial_steps(directory):
  """Steps whose checkpoint is still being written (Orbax's temporary directories)."""
  return sorted(int(n.split(".")[0]) for n in _listing(directory) if TMP in n)


def _complete_steps(directory):
  """Steps Orbax has committed (renamed from the temporary directory)."""
  return sorted(int(n) for n in _listing(directory) if n.isdigit())


def _rl_steps_logged(log: str) -> list[int]:
  return [int(s) for s in re.findall(r"\[rl (\d+)\]", log)]


def _has_phase(workdir, phase):
  path = os.path.join(workdir, "metrics.jsonl")
  return os.path.exists(path) and f'"phase": "{phase}"' in open(path).read()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_is_bit_identical(tmp_path):
  rng = np.random.default_rng(SEED)
  env = sub.environment(compile_cache=sub.suite_cache() or str(tmp_path / "jax_cache"))
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "interrupted")
  rl_dir = os.path.join(workdir, "checkpoints", "rl")
  with sub.processes(str(tmp_path)) as procs:
    # The uninterrupted run (it also fills the compilation cache for the reruns).
    ref = procs.start("reference", sub.command(reference), env)
    assert ref.wait(timeout=900) == 0, procs.stderr("reference")[-3000:]

    # 1. A random moment of the warm-up: its training, checkpoint write or evaluation.
    run = procs.start("kill1", sub.command(workdir), env)
    _wait_until(run, lambda: "[sft 25]" in procs.stderr("kill1"), "warm-up step 25", poll=0.005)
    deadline = time.monotonic() + rng.uniform(0.0, 3.0)
    _wait_until(run, lambda: time.monotonic() > deadline or _has_phase(workdir, "sft_eval"),
                "the warm-up kill point")
    procs.kill(run)
    assert not _has_phase(workdir, "rl")

    # 2. In the middle of writing RL checkpoint `target` or a later one.
    target = int(rng.integers(2, 4))
    run = procs.start("kill2", sub.command(workdir), env)
    _wait_until(run, lambda: any(s >= target for s in _partial_steps(rl_dir)),
                f"a checkpoint write of step >= {target}")
    procs.kill(run)
    partial = [s for s in _partial_steps(rl_dir) if s >= target]
    assert partial, "the kill must land while the checkpoint is being written"
    torn = partial[0]
    assert torn not in _complete_steps(rl_dir), "a torn checkpoint must not look committed"

    # 3. The rerun resumes from torn - 1 (never the torn step); kill it a little later.
    run = procs.start("kill3", sub.command(workdir), env)
    after = int(rng.integers(1, 3))
    _wait_until(run, lambda: len(_rl_steps_logged(procs.stderr("kill3"))) >= after,
                f"{after} RL steps after resuming", poll=0.005)
    time.sleep(rng.uniform(0.0, 0.3))
    procs.kill(run)
    assert _rl_steps_logged(procs.stderr("kill3"))[0] == torn, (
        f"the rerun must redo step {torn} from checkpoint {torn - 1}, not use the torn write")
    resume_from = max(_complete_steps(rl_dir))

    # 4. Rerun until it completes.
    run = procs.start("final", sub.command(workdir), env)
    assert run.wait(timeout=900) == 0, procs.stderr("final")[-3000:]
    logged = _rl_steps_logged(procs.stderr("final"))
    assert logged == list(range(resume_from + 1, NUM_STEPS + 1)), logged
    assert "unreadable" not in procs.stderr("final"), (
        "no fallback: every committed checkpoint reads")

  rows, ref_rows = sub.metrics_rows(workdir), sub.metrics_rows(reference)
  assert [r["step"] for r in rows if r["phase"] == "rl"] == list(range(1, NUM_STEPS + 1))
  assert rows == ref_rows
  got, meta = sub.restore_rl_state(workdir, NUM_STEPS)
  want, ref_meta = sub.restore_rl_state(reference, NUM_STEPS)
  assert meta == ref_meta
  leaves = jax.tree.leaves_with_path(got)
  assert len(leaves) == len(jax.tree.leaves(want)) > 0
  for (path, a), b in zip(leaves, jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  # RL moved the parameters: identical-because-untouched would prove nothing.
  assert any(r["grad_norm"] > 0 for r in rows if r["phase"] == "rl")


@pytest.mark.slow
def test_sigterm_finishes_the_checkpoint_being_written(tmp_path):
  """A scheduler's SIGTERM unwinds like Ctrl-C: the RL checkpoint being written when it arrives
  is committed (SIGTERM used to kill the run on the spot, losing that save), exit code 143."""
  workdir = str(tmp_path / "run")
  rl_dir = os.path.join(workdir, "checkpoints", "rl")
  with sub.processes(str(tmp_path)) as procs:
    proc = procs.start("run", sub.command(workdir), sub.environment(sub.suite_cache()))
    _wait_until(proc, lambda: [s for s in _partial_steps(rl_dir) if s >= 2],
                "RL checkpoint 2's write")
    writing = _partial_steps(rl_dir)[-1]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = procs.stderr("run")
  assert "interrupted; rerun the same command to resume" in err, err[-2000:]
  assert writing in _complete_steps(rl_dir) and not _partial_steps(rl_dir), _listing(rl_dir)


@pytest.mark.slow
def test_ctrl_c_while_the_first_step_compiles_exits_130(tmp_path):
  """Ctrl-C during the warm-up's first compile: the run says it starts over and exits 130. The
  interpreter's teardown after it segfaulted in jaxlib (SIGSEGV, 'Fatal Python error') every
  time under these conditions; the entry point now skips the teardown (cli.exit_interrupted)."""
  workdir = str(tmp_path / "run")
  # The conditions it crashed in: glibc's plain malloc, JAX probing its other backends, and
  # XLA's default flags (not the suite's faster -O0 compiles, which it did not crash with).
  env = sub.environment(PR2_JAX_MALLOC="off")
  for name in ("JAX_PLATFORMS", "XLA_FLAGS"):
    env.pop(name, None)
  with sub.processes(str(tmp_path)) as procs:
    proc = procs.start("run", sub.command(workdir), env)
    _wait_until(proc, lambda: "supervised steps (the first compiles)" in procs.stderr("run"),
                "the warm-up's first compile")
    time.sleep(1.5)
    assert not _has_phase(workdir, "sft"), "the first warm-up step had already compiled"
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    err = procs.stderr("run")
  assert code == 130 and "Fatal Python error" not in err, (code, err[-2000:])
  # No checkpoint yet (the warm-up saves when done): no resume is promised.
  assert ("interrupted; no RL checkpoint yet; rerunning the same command starts the warm-up "
          "again") in err, err[-2000:]


def _failed_run_errors(tmp_path, overrides: dict) -> tuple[list[str], str]:
  """(`error:` lines, stderr) of a run in tmp_path/run with `overrides` that must exit 1
  without a traceback."""
  with sub.processes(str(tmp_path)) as procs:
    cmd = sub.command(str(tmp_path / "run"), {**sub.OVERRIDES, **overrides})
    proc = procs.start("run", cmd, sub.environment(sub.suite_cache()))
    assert proc.wait(timeout=600) == 1
    err = procs.stderr("run")
  assert "Traceback" not in err, err[-3000:]
  return [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.slow
def test_a_diverged_warm_up_stops_with_one_error_line_saying_what_to_do(tmp_path):
  """A warm-up whose loss turns NaN stops before RL (no checkpoint was written, so the advice
  is to change the warm-up and rerun, not to resume or reuse it)."""
  errors, err = _failed_run_errors(tmp_path, {"sft.num_steps": 25, "sft.learning_rate": 1e30})
  assert errors == ["error: the warm-up diverged: supervised loss nan at step 25 "
                    "(SFTConfig.learning_rate=1e+30); none of it was checkpointed. Change the "
                    "warm-up (e.g. a lower --config.sft.learning_rate) and rerun"], err[-3000:]


@pytest.mark.slow
def test_a_diverged_run_stops_with_one_error_line_saying_what_to_do(tmp_path):
  """Non-finite updates beyond rl.max_consecutive_skips stop the run (its last good state
  checkpointed): one `error:` line that says a rerun would resume into the same failure, not a
  FloatingPointError traceback."""
  workdir = str(tmp_path / "run")
  errors, err = _failed_run_errors(tmp_path, {"rl.num_steps": 3, "rl.learning_rate": 1e30,
                                              "rl.max_consecutive_skips": 2})
  assert len(errors) == 1, err[-3000:]
  assert re.fullmatch(
      r"error: \d+ consecutive updates had a non-finite loss or gradient \(limit "
      r"RLConfig.max_consecutive_skips=2\); stopped at RL step \d with the last good state "
      rf"checkpointed in {re.escape(workdir)}/checkpoints/rl\. Rerunning resumes from there, "
      r"likely into the same failure: change the setup \(e\.g\. a lower "
      r"--config\.rl\.learning_rate\) and use a new "
      rf"--workdir \(--config\.init_from={re.escape(workdir)}/checkpoints/sft reuses this run's "
      r"warm-up\)", errors[0]), errors[0]
