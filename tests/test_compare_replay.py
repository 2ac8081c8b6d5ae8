"""Tests for experiments/compare_replay.py (the --quick sweep, as a subprocess) and its
summaries in experiments/replay_report.py (run summary, collapse rule, seed aggregation)."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments import replay_report as cr


def _rl_row(step, zd, loss=0.1, eval_reward=None, skipped=0):
  row = {"phase": "rl", "step": step, "loss": loss, "k3_kl": 0.01 * step, "extreme_frac": 0.0,
         "clip_frac_low": 0.1, "clip_frac_high": 0.2, "reward_mean": 0.5,
         "zero_dev_ratio_per_ministep": zd, "topk_agreement_per_ministep": zd,
         "dev_hist": [0.9, 0.1, 0.0, 0.0], "skipped_updates": skipped,
         "k3_kl_per_ministep": [0.001 * step] + [0.01] * (len(zd) - 1)}
  if eval_reward is not None:
    row["eval_reward"] = eval_reward
  return row


def test_summarise_run_hand_worked():
  rows = [{"phase": "sft_eval", "step": 0, "eval_reward": 0.4},
          _rl_row(1, [1.0, 0.9, 0.8]), _rl_row(2, [1.0, 0.7, 0.6], eval_reward=0.3)]
  s = cr.summarise_run(rows, collapse_fraction=0.5)
  assert s["eval_reward"] == 0.3 and s["warmup_eval_reward"] == 0.4
  assert math.isclose(s["k3_kl"], 0.015)
  # Mini-steps 2..κ of each step, then the mean over steps: (0.85 + 0.65) / 2.
  assert math.isclose(s["zero_dev_ratio_ministep_ge2"], 0.75)
  assert s["zero_dev_ratio_ministep1"] == 1.0
  assert math.isclose(s["k3_kl_ministep1"], 0.0015) and math.isclose(s["k3_kl_ministep_ge2"], 0.01)
  assert s["zero_dev_ratio_per_ministep"] == pytest.approx([1.0, 0.8, 0.7])
  assert not s["collapsed"]  # 0.3 >= 0.5 * 0.4


def test_collapse_rule():
  warm = {"phase": "sft_eval", "step": 0, "eval_reward": 0.4}
  low = [warm, _rl_row(1, [1.0, 0.9], eval_reward=0.19)]
  assert cr.summarise_run(low, 0.5)["collapsed"]
  skipped = [warm, _rl_row(1, [1.0, 0.9], eval_reward=0.4, skipped=1)]
  assert cr.summarise_run(skipped, 0.5)["collapsed"]
  nan = [warm, _rl_row(1, [1.0, 0.9], loss=float("nan"), eval_reward=0.4)]
  assert cr.summarise_run(nan, 0.5)["collapsed"]
  assert cr.summarise_run([warm, _rl_row(1, [1.0, 0.9], eval_reward=0.4)], 0.5,
                          error="stopped")["collapsed"]


def test_aggregate_mean_std_over_seeds():
  warm = {"phase": "sft_eval", "step": 0, "eval_reward": 0.4}
  runs = {s: cr.summarise_run([warm, _rl_row(1, [1.0, 0.9], eval_reward=r)], 0.5)
          for s, r in ((0, 0.3), (1, 0.5), (2, 0.1))}
  agg = cr.aggregate(runs)
  assert agg["eval_reward"]["per_seed"] == [0.3, 0.5, 0.1]
  assert math.isclose(agg["eval_reward"]["mean"], 0.3)
  assert math.isclose(agg["eval_reward"]["std"], 0.2)  # sample std
  assert agg["collapsed_runs"] == 1  # 0.1 < 0.2
  assert agg["zero_dev_ratio_per_ministep"]["mean"] == pytest.approx([1.0, 0.9])


FIELDS = ("eval_reward", "zero_dev_ratio_ministep_ge2", "zero_dev_ratio_ministep1", "k3_kl",
          "k3_kl_ministep1", "extreme_frac", "extreme_frac_ministep1", "clip_frac_low", "clip_frac_high", "topk_agreement_per_ministep",
          "zero_dev_ratio_per_ministep", "dev_hist")


@pytest.mark.slow
def test_quick_sweep_writes_report(tmp_path):
  """The --quick variant end to end (a few minutes on 2 cores): JSON structure, report, plots."""
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      # Shorter than --quick's own defaults (one κ, not two: the runs of each κ are alike) and
      # 32 rollouts a step, not tiny.py's 256 (8 warm-up sequences, not 64): this checks the
      # plumbing, not the numbers. 32 = 8 prompts x 4 samples still splits into κ x M = 8.
      [sys.executable, "-m", "experiments.compare_replay", "--quick", "--offs=4", "--rl_steps=2",
       "--eval_every=2", "--sft_steps=4", "--eval_size=32", "--config.rl.prompts_per_step=8",
       "--config.rl.group_size=4", "--config.sft.batch_size=8",
       f"--workdir={tmp_path / 'work'}", f"--out_dir={out}"],
      capture_output=True, text=True, timeout=900, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / "replay_comparison.json").read_text())
  assert set(result) >= {"off4"} and "off2" not in result
  for off in ("off4",):
    kappa = int(off[3:])
    assert set(result[off]) == {"r3", "pr2"}
    for mode, agg in result[off].items():
      assert agg["seeds"] == [0, 1]
      assert isinstance(agg["collapsed_runs"], int)
      for field in FIELDS:
        values = agg[field]["mean"]
        values = values if isinstance(values, list) else [values]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), (off, mode, field)
        assert len(agg[field]["per_seed"]) == 2
      assert len(agg["zero_dev_ratio_per_ministep"]["mean"]) == kappa
    pr2 = result[off]["pr2"]
    assert math.isfinite(pr2["pred_loss"]["mean"]) and pr2["feature_cache_bytes"]["mean"] > 0
  md = (out / "replay_comparison.md").read_text()
  assert "python -m experiments.compare_replay --quick" in md.splitlines()[3]
  assert "## off4" in md and "## off2" not in md and "collapsed" in md.lower()
  for name in ("curves", "horizon", "dev_hist"):
    png = out / f"replay_comparison_{name}.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.name in md
