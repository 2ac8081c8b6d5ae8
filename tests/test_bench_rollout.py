"""Smoke test of experiments/bench_rollout.py at a minuscule size (no timing assertions)."""

import json
import os
import subprocess
import sys
import time

import pytest

from experiments import common

# Failing runs: no allocator re-exec (allocator.py), which would start the interpreter twice.
NO_REEXEC = {"PR2_JAX_MALLOC": "off"}


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
  (tmp_path / "file").write_text("")
  out = tmp_path / "out.json"
  argv = [a.format(file=tmp_path / "file") for a in args]
  argv += [] if any(a.startswith("--out=") for a in argv) else [f"--out={out}"]
  start = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_rollout", *argv],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, **NO_REEXEC))
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert named in errors[0] and "Traceback" not in proc.stderr
  assert time.monotonic() - start < 60 and not out.exists()  # nothing compiled or written
