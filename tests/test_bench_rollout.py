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
    (["--out={file}/r.json"], "--out="),
])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, args, named):
  """Exit code 2 and one `error:` line naming the flag, at parse time or before any compile
  (a bad dtype used to fail after 9 s of work, an empty --dtypes wrote an empty table)."""
  _cli.fails_before_work("experiments.bench_rollout", args, tmp_path, named)
