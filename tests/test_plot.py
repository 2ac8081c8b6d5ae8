"""Tests for experiments/plot.py: PNGs from metrics.jsonl, clear error without one."""

import json
import warnings

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


def test_legend_goes_on_the_first_panel_with_data():
  """A run without a panel's first metric still gets a legend, on the next subplot, and no
  empty-legend warning."""
  runs = {"a": [{"step": 1, "k3_kl": 0.1}], "b": [{"step": 1, "k3_kl": 0.2}]}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fig = viz.metric_panel(runs, ["eval_reward", "k3_kl"])
  first, second = fig.axes[:2]
  assert first.get_legend() is None
  assert [t.get_text() for t in second.get_legend().get_texts()] == ["a", "b"]
