"""Smoke test of experiments/bench_rollout.py at a minuscule size (no timing assertions)."""

import json
import subprocess
import sys

from experiments import common


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
