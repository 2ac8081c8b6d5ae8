"""Smoke test of experiments/drift_probe.py at a minuscule size (numbers in range, JSON shape)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_drift_probe_writes_scores(tmp_path):
  out = tmp_path / "d.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.drift_probe", "--off=2", "--steps=3", "--probe_size=16",
       "--config.sft.num_steps=5", f"--out={out}"],
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["mini_steps"] == [2]
  for name, scores in result["zero_dev_by_ministep"].items():
    assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0, name
  assert result["router_weight_share_of_drift"] > 0
