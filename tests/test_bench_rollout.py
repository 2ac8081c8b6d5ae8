"""Smoke test of experiments/bench_rollout.py at a minuscule size (no timing assertions)."""

import json
import subprocess
import sys

import pytest

from experiments import common

import _cli


def test_bench_rollout_writes_json(tmp_path):
  out = tmp_path / "r.json"
  subprocess.run([sys.executable, "-m", "experiments.bench_rollout", "--batch=2",
                  "--prompt_len=3", "--new_tokens=2", "--repeats=1", "--dtypes=float32",
                  f"--out={out}"], check=True, capture_output=True, timeout=600)
  result = json.loads(out.read_text())
  row = result["results"]["float32"]
  assert row["decode_tokens_per_s"] > 0 and row["compile_s"] > 0
  assert result["config"]["new_tokens"] == 2
  revision = common.source_revision()
  assert {k: result["machine"][k] for k in revision} == revision


@pytest.mark.parametrize("args, named", [
    (["--dtypes=bogus"], "--dtypes"), (["--dtypes="], "--dtypes"),
    (["--dtypes=float32,float32"], "--dtypes"),  # would compile twice
    (["--num_experts=1"], "--num_experts"), (["--d_model=2"], "--d_model"),
    (["--d_model=12"], "--d_model must be a positive multiple of 8"),
    (["--out={file}/r.json"], "--out="),
])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, args, named):
  """Exit code 2 and one `error:` line naming the flag, at parse time or before any compile
  (a bad dtype used to fail after 9 s of work, an empty --dtypes wrote an empty table)."""
  _cli.fails_before_work("experiments.bench_rollout", args, tmp_path, named)


# main on a scripted clock (in a child, as a run is): each jax.block_until_ready of a timed
# generation advances it by the next duration. Round 0 warms caches (100 ms: it would move the
# median it leaked into); the timed rounds take 2, 6 and 3 ms.
_SCRIPTED = _cli.scripted_clock("bench_rollout", [100, 2, 6, 3]) + """
from absl import flags
flags.FLAGS(["bench_rollout", *sys.argv[1:]])
b.main([])
"""


def test_tokens_per_s_by_hand(tmp_path):
  """decode tokens/s = batch x NEW tokens (not the prompt's) / the median of the timed rounds
  (3 ms; not the mean, 3.7, nor with the warm-up round, 4.5): 2 x 5 / 3 ms."""
  out = tmp_path / "r.json"
  proc = subprocess.run([sys.executable, "-c", _SCRIPTED, "--batch=2", "--prompt_len=3",
                         "--new_tokens=5", "--repeats=3", "--dtypes=float32", f"--out={out}"],
                        capture_output=True, text=True, timeout=600, cwd=_cli.REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text())["results"]["float32"]
  assert row["median_s"] == pytest.approx(3e-3)
  assert row["decode_tokens_per_s"] == pytest.approx(2 * 5 / 3e-3)
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"float32": 3333}
