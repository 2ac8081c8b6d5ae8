"""Tests for experiments/plot.py and pr2_jax/viz.py: what each figure draws (lines, bars,
titles) from hand-worked rows and plans, PNGs from metrics.jsonl, clear errors (no metrics, no
RL rows, bad command lines) that leave no directory behind, a torn last line tolerated."""

import json
import os
import subprocess
import sys
import warnings

import matplotlib.pyplot as plt
import numpy as np
import pytest
from absl import app

from experiments import plot
from pr2_jax import viz

# Per-mini-step zero-dev ratios of steps 1..3; their mean over steps is [1.0, 0.8, 0.5].
ZERO_DEV = {1: [1.0, 0.9, 0.6], 2: [1.0, 0.7, 0.5], 3: [1.0, 0.8, 0.4]}


def _write_run(workdir):
  rows = [{"phase": "sft", "step": 1, "loss": 1.0},
          {"phase": "sft_eval", "step": 0, "eval_reward": 0.4}] + [
      {"phase": "rl", "step": s, "reward_mean": 0.1 * s, "k3_kl": 1e-3 * s, "topk_agreement": 0.9,
       "zero_dev_ratio_per_ministep": ZERO_DEV[s], **({"eval_reward": 0.5} if s == 3 else {})}
      for s in range(1, 4)]
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(workdir)


def _xy(line):
  return np.asarray(line.get_xdata(), float).tolist(), np.asarray(line.get_ydata(), float)


def test_figures_draw_the_rows(tmp_path):
  runs = {"r3": plot.read_rows(_write_run(tmp_path / "r3"))}
  figs = dict(plot.figures(runs))
  try:
    assert list(figs) == [name for name, _ in viz.PANELS] + ["horizon"]
    reward_ax, eval_ax = figs["reward"].axes
    (line,) = reward_ax.get_lines()
    xs, ys = _xy(line)
    assert xs == [1, 2, 3] and ys == pytest.approx([0.1, 0.2, 0.3])
    assert line.get_label() == "r3" and reward_ax.get_title() == "reward_mean"
    xs, ys = _xy(eval_ax.get_lines()[0])  # the warm-up eval is step 0
    assert xs == [0, 3] and ys == pytest.approx([0.4, 0.5])
    xs, ys = _xy(figs["mismatch"].axes[0].get_lines()[0])
    assert xs == [1, 2, 3] and ys == pytest.approx([1e-3, 2e-3, 3e-3])
    assert not figs["mismatch"].axes[1].get_lines()  # no extreme_frac in the rows
    assert not any(ax.get_lines() for ax in figs["ratio"].axes)
    (horizon_ax,) = figs["horizon"].axes
    (line,) = horizon_ax.get_lines()
    xs, ys = _xy(line)
    assert xs == [1, 2, 3] and ys == pytest.approx([1.0, 0.8, 0.5])  # mean over the 3 steps
    assert line.get_label() == "r3" and horizon_ax.get_ylabel() == "zero_dev_ratio"
  finally:
    for fig in figs.values():
      plt.close(fig)


def test_horizon_curve_skips_runs_without_the_metric():
  runs = {"a": [{"step": 1, "k3_kl_per_ministep": [3.0, 1.0]},
                {"step": 2, "k3_kl_per_ministep": [1.0, 2.0]}],
          "b": [{"step": 1, "k3_kl": 0.1}]}
  fig = viz.horizon_curve(runs, key="k3_kl_per_ministep")
  (line,) = fig.axes[0].get_lines()
  assert line.get_label() == "a" and _xy(line)[1].tolist() == [2.0, 1.5]
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["a"]
  plt.close(fig)


def test_writes_one_png_per_panel(tmp_path):
  workdir = _write_run(tmp_path / "run")
  paths = plot.plot([workdir], str(tmp_path / "plots"))
  assert [p.rsplit("/", 1)[1] for p in paths] == [f"{name}.png" for name, _ in viz.PANELS] + [
      "horizon.png"]
  for p in paths:
    with open(p, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert [r["step"] for r in plot.read_rows(workdir)] == [0, 1, 2, 3]


def test_missing_metrics_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=f"no metrics.jsonl in '{tmp_path}'"):
    plot.read_rows(str(tmp_path))


def test_torn_last_line_is_skipped(tmp_path):
  """SIGKILL mid-write leaves half a JSON object as the last line: the rows before it count."""
  workdir = _write_run(tmp_path / "run")
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"phase": "rl", "step": 4, "reward_me')
  assert [r["step"] for r in plot.read_rows(workdir)] == [0, 1, 2, 3]
  assert len(plot.plot([workdir], str(tmp_path / "plots"))) == len(viz.PANELS) + 1


def test_rows_of_two_runs_interleaved_are_refused(tmp_path):
  """Two runs writing one metrics.jsonl drew zig-zag curves without a word."""
  workdir = _write_run(tmp_path / "run")
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write(json.dumps({"phase": "rl", "step": 1, "reward_mean": 0.5}) + "\n")
  with pytest.raises(ValueError, match=r"has RL step 1 after step 3: two runs wrote it at once"):
    plot.load_runs([workdir])


def test_bad_workdirs_leave_no_directory(tmp_path):
  """Every workdir is read and checked before the output directory is made."""
  good, out = _write_run(tmp_path / "good"), tmp_path / "plots"
  nope = tmp_path / "nope"
  with pytest.raises(ValueError, match=f"no metrics.jsonl in '{nope}'"):
    plot.plot([good, str(nope)], str(nope / "plots"))
  assert not nope.exists()
  warm = tmp_path / "warm"  # warm-up rows only: no RL step finished yet
  warm.mkdir()
  (warm / "metrics.jsonl").write_text('{"phase": "sft", "step": 1, "loss": 1.0}\n'
                                      '{"phase": "sft_eval", "step": 0, "eval_reward": 0.4}\n')
  with pytest.raises(ValueError, match=f"metrics.jsonl in '{warm}' has no RL rows"):
    plot.plot([good, str(warm)], str(out))
  assert not out.exists() and sorted(os.listdir(warm)) == ["metrics.jsonl"]


def test_main_errors(tmp_path, capsys):
  with pytest.raises(app.UsageError, match="give one or more WORKDIRs"):
    plot.main(["plot"])
  with pytest.raises(SystemExit) as exit_:  # one `error:` line, exit 2, like every entry point
    plot.main(["plot", str(tmp_path)], str(tmp_path / "out"))
  assert exit_.value.code == 2
  assert capsys.readouterr().err == (f"error: experiments.plot: no metrics.jsonl in "
                                     f"'{tmp_path}' (expected a run's workdir, e.g. runs/tiny)\n")
  assert os.listdir(tmp_path) == []
  workdir = _write_run(tmp_path / "run")
  plot.main(["plot", workdir])
  assert sorted(os.listdir(tmp_path / "run" / "plots")) == sorted(
      [f"{name}.png" for name, _ in viz.PANELS] + ["horizon.png"])


def _cli(args, cwd):
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo)
  return subprocess.run([sys.executable, "-m", "experiments.plot", *args], capture_output=True,
                        text=True, timeout=120, cwd=cwd, env=env)


def test_command_line(tmp_path):
  """--help prints the usage (absl's exit status 1) and creates nothing; a bare --out is a flag
  error, not an IndexError; a good command writes the PNGs where --out says."""
  proc = _cli(["--help"], tmp_path)
  assert "Draws PNG plots of a run's metrics.jsonl" in proc.stdout and "--out" in proc.stdout
  assert os.listdir(tmp_path) == []
  workdir = _write_run(tmp_path / "run")
  proc = _cli([workdir, "--out"], tmp_path)
  assert proc.returncode != 0 and "Missing value for flag --out" in proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(workdir) == ["metrics.jsonl"]
  proc = _cli([workdir, f"--out={tmp_path / 'out'}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == [str(tmp_path / "out" / f"{name}.png")
                                 for name, _ in viz.PANELS] + [str(tmp_path / "out/horizon.png")]


def test_bad_command_lines_are_one_error_line(tmp_path, capsys):
  """No WORKDIR printed the whole help (exit 1); a missing workdir was a bare SystemExit text; an
  --out that is a file failed after every figure was drawn. Each is one `error:` line, exit 2,
  and nothing is written."""
  workdir = _write_run(tmp_path / "run")
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for argv, out, want in ((["plot", workdir], str(a_file), f"error: --out={a_file} is a file"),
                          (["plot", str(tmp_path / "nope")], None,
                           "error: experiments.plot: no metrics.jsonl in"),
                          # Was "--out=.../metrics.jsonl/plots cannot be created", no --out given.
                          (["plot", f"{workdir}/metrics.jsonl"], None,
                           f"error: experiments.plot: {workdir}/metrics.jsonl is a file, not a "
                           f"run's workdir (give the directory holding metrics.jsonl, e.g. "
                           f"{workdir})")):
    with pytest.raises(SystemExit) as exit_:
      plot.main(argv, out)
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and line.startswith(want), line
  proc = _cli([], tmp_path)  # app.UsageError, as cli.run reports it
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
  assert proc.stderr == "error: give one or more WORKDIRs (run directories holding metrics.jsonl)\n"
  assert sorted(os.listdir(tmp_path)) == ["a_file", "run"] and os.listdir(workdir) == [
      "metrics.jsonl"]


@pytest.mark.parametrize("workdirs, labels", [
    (["runs/r3", "runs/none"], ["r3", "none"]),
    # compare_replay's layout: equal basenames, each run keeps its own line
    (["A/off2/r3/seed0", "A/off2/pr2/seed0", "A/off4/r3/seed0"],
     ["off2/r3/seed0", "pr2/seed0", "off4/r3/seed0"]),
    (["runs/x", "other/runs/x", "runs/x/"], ["runs/x", "other/runs/x", "runs/x (2)"]),
    (["/abs/runs/x", "x"], ["runs/x", "x"]),
    # the same run twice: its copy is no other run, so the label stays short
    (["a/b/x", "a/b/x"], ["x", "x (2)"])])
def test_run_labels_are_the_shortest_distinct_path_ends(workdirs, labels):
  assert plot.run_labels(workdirs) == labels


def test_runs_with_equal_basenames_each_get_a_line(tmp_path):
  """`plot A/off2/r3/seed0 A/off2/pr2/seed0` drew one line: runs were keyed by basename."""
  workdirs = []
  for mode in ("r3", "pr2"):
    (tmp_path / "off2" / mode).mkdir(parents=True)
    workdirs.append(_write_run(tmp_path / "off2" / mode / "seed0"))
  runs = plot.load_runs(workdirs)
  assert list(runs) == ["r3/seed0", "pr2/seed0"]
  fig = viz.metric_panel(runs, ["reward_mean"])
  assert [line.get_label() for line in fig.axes[0].get_lines()] == ["r3/seed0", "pr2/seed0"]
  plt.close(fig)


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


def test_plan_figure_bars_and_imbalance():
  """One layer of 4 experts on 2 devices. Static: device 0 holds experts 0, 1 (6 + 2 = 8),
  device 1 experts 2, 3 (2 + 2 = 4): max / mean = 8 / 6. The plan moves 2 of expert 0's load to
  a replica on device 1 (slot 2) and leaves device 0's slot 2 empty: 6 and 6."""
  loads_E = [6, 2, 2, 2]
  slot_expert_DS = [[0, 1, -1], [2, 3, 0]]
  slot_load_DS = [[4, 2, 0], [2, 2, 2]]
  fig = viz.plan_figure(loads_E, slot_expert_DS, slot_load_DS, title="layer 0")
  static_ax, plan_ax = fig.axes
  assert static_ax.get_title() == "static (no replicas): imbalance 1.33"
  assert plan_ax.get_title() == "planned (replicas + split): imbalance 1.00"
  assert fig.get_suptitle() == "layer 0"
  # Bars slot by slot, devices 0 and 1 in each: (x, bottom, height).
  bars = lambda ax: np.array([(p.get_x() + p.get_width() / 2, p.get_y(), p.get_height())
                              for p in ax.patches])
  np.testing.assert_allclose(bars(static_ax), [(0, 0, 6), (1, 0, 2), (0, 6, 2), (1, 2, 2)],
                             atol=1e-12)
  np.testing.assert_allclose(bars(plan_ax), [(0, 0, 4), (1, 0, 2), (0, 4, 2), (1, 2, 2),
                                             (0, 6, 0), (1, 4, 2)], atol=1e-12)
  # Expert ids label every non-empty slot; a replica has its expert's colour.
  assert [t.get_text() for t in plan_ax.texts] == ["0", "2", "1", "3", "0"]
  assert plan_ax.patches[5].get_facecolor() == plan_ax.patches[0].get_facecolor()
  assert plan_ax.patches[5].get_facecolor() != plan_ax.patches[1].get_facecolor()
  # The dashed line is the perfect balance: total load / devices.
  assert _xy(static_ax.get_lines()[0])[1].tolist() == [6.0, 6.0]
  plt.close(fig)


def test_horizon_curve_is_the_mean_over_steps():
  """Three steps of [0, 0, 3] at mini-step 2: the mean 1.0 (a median would read 0.0)."""
  runs = {"a": [{"step": s, "k3_kl_per_ministep": [1.0, v]} for s, v in ((1, 0.0), (2, 0.0),
                                                                          (3, 3.0))]}
  fig = viz.horizon_curve(runs, key="k3_kl_per_ministep")
  assert _xy(fig.axes[0].get_lines()[0])[1].tolist() == [1.0, 1.0]
  assert fig.axes[0].get_xticks().tolist() == [1, 2]  # whole mini-steps, not 1.2, 1.4, ...
  plt.close(fig)


def test_panel_keys_are_metrics_the_rl_loop_writes():
  """A misspelt key draws an empty panel without an error: every panel metric is one of the
  keys test_loop pins in a real run's RL rows (eval_reward: on evaluation steps), and the
  horizon's default is the per-mini-step vector of one of them."""
  from test_loop import REQUIRED_KEYS
  keys = {key for _, panel in viz.PANELS for key in panel}
  assert keys - {"eval_reward"} <= REQUIRED_KEYS, keys - REQUIRED_KEYS
  default = viz.horizon_curve.__defaults__[0]
  assert default.endswith("_per_ministep") and default[:-len("_per_ministep")] in REQUIRED_KEYS


def test_plan_figure_static_layout_is_contiguous_blocks_of_experts():
  """The static layout shards experts [E] over 'expert' in contiguous blocks: 4 experts on 2
  devices put experts 0, 1 on device 0 (5 + 1) and 2, 3 on device 1 (3 + 2), imbalance
  6 / 5.5; a strided layout (0, 2 | 1, 3) drew 8 and 3. Labels sit mid-bar on the stack."""
  loads_E = [5, 1, 3, 2]
  slot_expert_DS, slot_load_DS = [[0, 1, 3], [2, 0, -1]], [[3, 1, 2], [3, 2, 0]]
  fig = viz.plan_figure(loads_E, slot_expert_DS, slot_load_DS)
  static_ax, plan_ax = fig.axes
  bars = lambda ax: np.array([(p.get_x() + p.get_width() / 2, p.get_y(), p.get_height())
                              for p in ax.patches])
  np.testing.assert_allclose(bars(static_ax), [(0, 0, 5), (1, 0, 3), (0, 5, 1), (1, 3, 2)],
                             atol=1e-12)
  assert static_ax.get_title() == "static (no replicas): imbalance 1.09"
  labels = lambda ax: [(t.get_text(), *t.get_position()) for t in ax.texts]
  assert labels(static_ax) == [("0", 0, 2.5), ("2", 1, 1.5), ("1", 0, 5.5), ("3", 1, 4.0)]
  # The empty slot (device 1, slot 2) gets no label.
  assert labels(plan_ax) == [("0", 0, 1.5), ("2", 1, 1.5), ("1", 0, 3.5), ("0", 1, 4.0),
                             ("3", 0, 5.0)]
  plt.close(fig)


def test_horizon_curve_ticks_cover_the_longest_run():
  """Runs of different off-policy depth (κ = 3 and 2) share the axis: ticks 1..3 for the
  longer one whichever comes last; each run's line has its own κ points."""
  runs = {"k3": [{"step": 1, "k3_kl_per_ministep": [1.0, 2.0, 3.0]}],
          "k2": [{"step": 1, "k3_kl_per_ministep": [4.0, 5.0]}]}
  fig = viz.horizon_curve(runs, key="k3_kl_per_ministep")
  assert fig.axes[0].get_xticks().tolist() == [1, 2, 3]
  assert [_xy(line)[0] for line in fig.axes[0].get_lines()] == [[1, 2, 3], [1, 2]]
  plt.close(fig)


def test_metric_panel_draws_int_values():
  """JSON gives back 12 for a metric written as an int (a response length, a count): it is a
  point like 14.5, not a gap in the line."""
  rows = [{"step": 1, "response_len": 12}, {"step": 2, "response_len": 14.5},
          {"step": 3, "response_len": None}]
  fig = viz.metric_panel({"a": rows}, ["response_len"])
  xs, ys = _xy(fig.axes[0].get_lines()[0])
  assert xs == [1, 2] and ys.tolist() == [12.0, 14.5]
  plt.close(fig)


def test_a_repeated_rl_step_is_refused(tmp_path):
  """Two runs started at once in one workdir write steps 1, 1, 2, 2, ...: no step goes back,
  but a repeated one draws the same zig-zag (a resume trims the rows past its checkpoint, so
  one run never writes a step twice)."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  rows = [{"phase": "rl", "step": s, "reward_mean": r} for s, r in ((1, 0.1), (1, 0.5), (2, 0.2),
                                                                    (2, 0.6))]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  with pytest.raises(ValueError, match=r"has RL step 1 after step 1: two runs wrote it at once"):
    plot.load_runs([str(workdir)])


def test_default_output_is_under_the_first_workdir(tmp_path):
  """Without --out the PNGs go to the first WORKDIR's plots/ (the flag's help), none under the
  others."""
  first, second = _write_run(tmp_path / "a"), _write_run(tmp_path / "b")
  plot.main(["plot", first, second])
  assert sorted(os.listdir(first)) == ["metrics.jsonl", "plots"]
  assert len(os.listdir(os.path.join(first, "plots"))) == len(viz.PANELS) + 1
  assert os.listdir(second) == ["metrics.jsonl"]
