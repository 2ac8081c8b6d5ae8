"""The same seed and config give identical metrics.jsonl on two runs (issue 9, item 6).

    .venv/bin/pytest tests/test_determinism.py     # about 1.5 minutes on 2 CPU cores

Two `experiments.main` processes run one after the other with different
PYTHONHASHSEEDs (so nothing may depend on set/dict-of-str iteration order) on
2 fake CPU devices with the experts split over them (the all_to_all path).
Every metrics row except wall-clock time must match exactly, and so must the
final RL checkpoint.

The second run reads the executables the first one compiled from a private
compilation cache, as a user's rerun would. That still tests the tracing: the
cache key is a hash of the lowered program, so a program that came out
differently in the second process (an op order that followed a set's order,
say) would miss the cache, be compiled anew, and could differ. It saves the
second run's ~20 s of compiling (on 2 cores, the suite's time is CPU time).
"""

import jax
import numpy as np
import pytest

import _rl_subprocess as sub

SHARDED = ("--cpu_devices=2", "--config.mesh_expert=2")


@pytest.mark.slow
def test_same_seed_and_config_give_identical_metrics(tmp_path):
  workdirs = [str(tmp_path / f"run{i}") for i in range(2)]
  cache = str(tmp_path / "jax_cache")
  with sub.processes(str(tmp_path)) as procs:
    for i, w in enumerate(workdirs):
      run = procs.start(f"run{i}", sub.command(w, extra=SHARDED),
                        sub.environment(compile_cache=cache, PYTHONHASHSEED=str(i + 1)))
      assert run.wait(timeout=900) == 0, procs.stderr(f"run{i}")[-3000:]
  first, second = (sub.metrics_rows(w) for w in workdirs)
  rl_rows = [r for r in first if r["phase"] == "rl"]
  assert [r["step"] for r in rl_rows] == list(range(1, sub.OVERRIDES["rl.num_steps"] + 1))
  assert any(r["grad_norm"] > 0 for r in rl_rows), "RL must have moved the parameters"
  assert first == second
  steps = sub.OVERRIDES["rl.num_steps"]
  (a, _), (b, _) = (sub.restore_rl_state(w, steps) for w in workdirs)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
