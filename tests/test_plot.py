"""Tests for experiments/plot.py: PNGs from metrics.jsonl, clear error without one."""

import json

import pytest

from experiments import plot
from pr2_jax import viz


def test_writes_one_png_per_panel(tmp_path):
  rows = [{"phase": "sft", "step": 1, "loss": 1.0}] + [
      {"phase": "rl", "step": s, "reward_mean": 0.1 * s, "k3_kl": 1e-3, "topk_agreement": 0.9,
       "eval_reward": 0.5} for s in range(1, 4)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  paths = plot.plot([str(tmp_path)], str(tmp_path / "plots"))
  assert len(paths) == len(viz.PANELS) + 1
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert [r["step"] for r in plot.read_rows(str(tmp_path))] == [1, 2, 3]


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match="no metrics.jsonl"):
    plot.read_rows(str(tmp_path))
