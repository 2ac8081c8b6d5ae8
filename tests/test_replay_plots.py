"""experiments/replay_plots.py: the trailing mean of the train curves, what each of the three
figures draws from hand-worked aggregates (written as PNGs where the report links them), and
what `python -m experiments.replay_plots` says (it is a library, not a command). The sweep that
writes them end to end: tests/test_compare_replay.py."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from experiments import replay_plots, replay_report

import _cli


def _y(line):
  return np.asarray(line.get_ydata(), float)


def test_smooth_is_a_trailing_mean_that_skips_missing_values():
  ys = [1, None, 3, 5, 7, 9, 11]
  # i = 5 averages ys[1:6] = [None, 3, 5, 7, 9] -> 6; the first steps average what they have.
  assert replay_plots._smooth(ys) == [1, 1, 2, 3, 4, 6, 7]
  assert replay_plots._smooth(ys, window=2) == [1, 1, 3, 4, 6, 8, 10]
  assert replay_plots._smooth([None, None, 2]) == [None, None, 2]
  assert replay_plots._smooth([]) == []


def _row(step, reward, zd_M, eval_reward=None):
  row = {"phase": "rl", "step": step, "loss": 0.1, "reward_mean": reward, "k3_kl": 0.01 * step,
         "topk_agreement": zd_M[-1], "zero_dev_ratio_per_ministep": zd_M,
         "topk_agreement_per_ministep": zd_M, "k3_kl_per_ministep": [0.001 * step, 0.01],
         "dev_hist": [0.9, 0.08, 0.02, 0.0]}
  return row if eval_reward is None else {**row, "eval_reward": eval_reward}


def _aggregate(offset):
  """Two seeds of a two-step run at κ = 2, as compare_replay aggregates them."""
  runs = {seed: replay_report.summarise_run(
      [{"phase": "sft_eval", "step": 0, "eval_reward": 0.4},
       _row(1, 0.2 + offset, [1.0, 0.8]),
       _row(2, 0.4 + offset + 0.1 * seed, [1.0, 0.6], eval_reward=0.5)], 0.5) for seed in (0, 1)}
  return replay_report.aggregate(runs)


def test_write_plots_draws_each_mode_and_writes_three_pngs(tmp_path, monkeypatch):
  results = {"off2": {"r3": _aggregate(0.0), "pr2": _aggregate(0.1)}}
  figs = []
  monkeypatch.setattr(plt, "close", figs.append)  # keep the figures to look at what they draw
  try:
    paths = replay_plots.write_plots(str(tmp_path), results, top_k=2)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "replay_comparison_curves.png", "replay_comparison_horizon.png",
        "replay_comparison_dev_hist.png"]
    for p in paths:
      with open(p, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    curves, horizon, dev_hist = figs
    # Reward panel: the smoothed train reward (seed means) and the eval points, per mode.
    reward = curves.axes[0].get_lines()
    assert [line.get_label() for line in reward][1::2] == ["R3", "PR2"]
    np.testing.assert_allclose(_y(reward[0]), [0.2, (0.2 + 0.45) / 2])
    np.testing.assert_allclose(np.asarray(reward[1].get_xdata(), float), [2])
    np.testing.assert_allclose(_y(reward[1]), [0.5])
    # Zero-dev ratio, mini-steps >= 2: step 1's 0.8, then the mean of 0.8 and 0.6.
    np.testing.assert_allclose(_y(curves.axes[2].get_lines()[0]), [0.8, 0.7])
    assert curves.axes[1].get_yscale() == "log" and "off2: k3 KL" in curves.axes[1].get_title()
    # Horizon: the zero-dev ratio at mini-steps 1..κ, means over steps and seeds.
    line = horizon.axes[0].get_lines()[0]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), float), [1, 2])
    np.testing.assert_allclose(_y(line), [1.0, 0.7])
    # Deviation histogram: top-k 2 shows bins 0, 1, 2 of each mode (the ≥3 share is dropped).
    bars = [b.get_height() for b in dev_hist.axes[0].patches]
    assert bars == pytest.approx([0.9, 0.08, 0.02] * 2)
  finally:
    monkeypatch.undo()
    for fig in figs:
      plt.close(fig)


def test_run_as_a_command_it_says_it_is_a_library():
  _cli.says_it_is_a_library("experiments.replay_plots", "experiments.compare_replay")


def test_each_panel_plots_its_own_series(tmp_path, monkeypatch):
  """The top-k agreement, zero-dev and k3 series differ here, so a panel drawing another's
  series shows: the curves' top-k panel (step means of `topk_agreement`, trailing mean), the
  horizon's three rows with seed std as error bars, and the histogram's bars centred on their
  bins, one mode left and one right."""
  def run(seed):
    rows = [{"phase": "sft_eval", "step": 0, "eval_reward": 0.4}]
    for step, topk in ((1, 0.75 + 0.1 * seed), (2, 0.65)):
      rows.append({**_row(step, 0.3, [1.0, 0.6 - 0.2 * seed]), "topk_agreement": topk,
                   "topk_agreement_per_ministep": [0.9, 0.5 + 0.1 * step],
                   "k3_kl_per_ministep": [1e-3 * (1 + seed), 0.02]})
    return replay_report.summarise_run(rows, 0.5)
  agg = replay_report.aggregate({0: run(0), 1: run(1)})
  results = {"off2": {"r3": agg, "pr2": agg}}
  figs = []
  monkeypatch.setattr(plt, "close", figs.append)
  try:
    replay_plots.write_plots(str(tmp_path), results, top_k=2)
    curves, horizon, dev_hist = figs
    # Step means over seeds 0.8, 0.65; the trailing mean of those: 0.8, 0.725.
    np.testing.assert_allclose(_y(curves.axes[3].get_lines()[0]), [0.8, 0.725])
    zd_ax, topk_ax, k3_ax = horizon.axes
    # Per mini-step, mean over steps then over seeds: zero-dev [1, 0.5] (seeds 0.6, 0.4),
    # top-k [0.9, 0.65], k3 [1.5e-3 (seeds 1e-3, 2e-3), 0.02].
    np.testing.assert_allclose(_y(zd_ax.get_lines()[0]), [1.0, 0.5])
    np.testing.assert_allclose(_y(topk_ax.get_lines()[0]), [0.9, 0.65])
    np.testing.assert_allclose(_y(k3_ax.get_lines()[0]), [1.5e-3, 0.02])
    # Error bars: ± the sample std over the two seeds (0 where they agree).
    spans = lambda ax: [seg[1][1] - seg[0][1] for seg in ax.collections[0].get_segments()]
    np.testing.assert_allclose(spans(zd_ax), [0.0, 2 * np.std([0.6, 0.4], ddof=1)], atol=1e-12)
    np.testing.assert_allclose(spans(k3_ax), [2 * np.std([1e-3, 2e-3], ddof=1), 0.0],
                               atol=1e-12)
    centres = [b.get_x() + b.get_width() / 2 for b in dev_hist.axes[0].patches]
    np.testing.assert_allclose(centres, [-0.2, 0.8, 1.8, 0.2, 1.2, 2.2], atol=1e-12)
    assert [t.get_text() for t in dev_hist.axes[0].get_xticklabels()] == ["0", "1", "2"]
  finally:
    monkeypatch.undo()
    for fig in figs:
      plt.close(fig)


def test_top_k_above_3_shows_four_bins_and_the_horizon_axes(tmp_path, monkeypatch):
  """Top-k 8 (Qwen3-30B-A3B): the histogram keeps its 4 bins, 0, 1, 2 and ≥3 experts changed
  (K + 1 = 9 bins do not exist in `dev_hist`). The horizon panels of off2 tick mini-steps 1
  and 2, and only their k3 KL row is on a log scale."""
  results = {"off2": {"r3": _aggregate(0.0)}}
  figs = []
  monkeypatch.setattr(plt, "close", figs.append)
  try:
    replay_plots.write_plots(str(tmp_path), results, top_k=8)
    _, horizon, dev_hist = figs
    ax = dev_hist.axes[0]
    assert [b.get_height() for b in ax.patches] == pytest.approx([0.9, 0.08, 0.02, 0.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "≥3"]
    assert [ax.get_xticks().tolist() for ax in horizon.axes] == [[1, 2]] * 3
    assert [ax.get_yscale() for ax in horizon.axes] == ["linear", "linear", "log"]
  finally:
    monkeypatch.undo()
    for fig in figs:
      plt.close(fig)
