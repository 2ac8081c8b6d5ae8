"""experiments/replay_report.py: the 'higher / lower / within noise' verdicts of
docs/results/replay_comparison.md (summaries, aggregation and `plan_run`:
tests/test_compare_replay.py), and what `python -m experiments.replay_report` says (it is a
library, not a command)."""

import os
import subprocess
import sys

import pytest

from experiments import replay_report
from experiments.replay_report import _diff_verdict, expectation_checks


def _field(mean, std, per_seed):
  return {"mean": mean, "std": std, "per_seed": per_seed}


# Two seeds each with std 0.1: se = sqrt(0.1² / 2 + 0.1² / 2) = 0.1, so the threshold is 0.2.
def test_beyond_two_standard_errors_names_the_direction():
  a, b = _field(0.71, 0.1, [0.6, 0.82]), _field(0.5, 0.1, [0.4, 0.6])
  assert _diff_verdict(a, b, "higher") == "+0.21 (2·se 0.2): higher"
  assert _diff_verdict(b, a, "higher") == "-0.21 (2·se 0.2): lower"


def test_within_two_standard_errors_is_noise():
  # A None seed (a collapsed run) is not counted: n = 2 for a, so 2·se stays 0.2 (with n = 3
  # it would be 0.16 and 0.19 would read as higher).
  a, b = _field(0.69, 0.1, [0.6, None, 0.78]), _field(0.5, 0.1, [0.4, 0.6])
  assert _diff_verdict(a, b, "higher") == "+0.19 (2·se 0.2): within noise"
  assert _diff_verdict(b, a, "higher") == "-0.19 (2·se 0.2): within noise"


def test_unequal_seed_counts_and_stds():
  # se = sqrt(0.3² / 3 + 0.4² / 4) = sqrt(0.03 + 0.04) = 0.2646; 2·se = 0.529 < 0.6.
  a, b = _field(1.0, 0.3, [1, 1, 1]), _field(0.4, 0.4, [0, 0, 0, 0])
  assert _diff_verdict(a, b, "higher") == "+0.6 (2·se 0.53): higher"
  a["mean"] = 0.9  # d = 0.5 < 0.529
  assert _diff_verdict(a, b, "higher") == "+0.5 (2·se 0.53): within noise"


def test_the_word_flips_when_lower_is_expected():
  up, down = _field(0.71, 0.1, [0, 0]), _field(0.5, 0.1, [0, 0])
  assert _diff_verdict(up, down, "lower").endswith(": lower")  # d > 0 reads as `higher_is`
  assert _diff_verdict(down, up, "lower").endswith(": higher")


def test_one_seed_and_missing_means():
  a, b = _field(0.7, 0.0, [0.7]), _field(0.5, 0.1, [0.4, 0.6])
  assert _diff_verdict(a, b, "higher") == "+0.2 (one seed: no noise estimate)"
  two_with_none = _field(0.7, 0.0, [0.7, None])
  assert _diff_verdict(b, two_with_none, "higher") == "-0.2 (one seed: no noise estimate)"
  assert _diff_verdict(_field(None, None, [None, None]), b, "higher") == "n/a"
  assert _diff_verdict(b, _field(None, None, [None]), "higher") == "n/a"


def _mode(zd, kl1, kl, reward):
  seeds = [0, 0]
  return {"zero_dev_ratio_ministep_ge2": _field(zd, 0.1, seeds),
          "k3_kl_ministep1": _field(kl1, 0.1, seeds), "k3_kl": _field(kl, 0.1, seeds),
          "eval_reward": _field(reward, 0.1, seeds)}


def test_expectation_checks_hand_worked():
  # Every field has two seeds and std 0.1, so 2·se = 0.2 everywhere (see above).
  results = {"off4": {"none": _mode(zd=0.5, kl1=1.0, kl=1.0, reward=0.5),
                      "r3": _mode(zd=0.6, kl1=0.5, kl=0.9, reward=0.5),
                      "pr2": _mode(zd=0.9, kl1=0.7, kl=0.5, reward=0.6)},
             "off2": {"none": _mode(zd=0.5, kl1=1.0, kl=1.0, reward=0.5)}}
  assert expectation_checks(results) == [
      "- off4: zero-dev (mini-step ≥ 2) PR2 − R3: +0.3 (2·se 0.2): higher (expected: higher)",
      "- off4: zero-dev (mini-step ≥ 2) PR2 − vanilla (DAPO, no replay): +0.4 (2·se 0.2): "
      "higher (expected: higher)",
      "- off4: k3 KL (mini-step 1) R3 − vanilla: -0.5 (2·se 0.2): lower (expected: lower)",
      "- off4: k3 KL (all mini-steps) R3 − vanilla: -0.1 (2·se 0.2): within noise "
      "(expected: lower)",
      "- off4: k3 KL (mini-step 1) PR2 − vanilla: -0.3 (2·se 0.2): lower (expected: lower)",
      "- off4: k3 KL (all mini-steps) PR2 − vanilla: -0.5 (2·se 0.2): lower (expected: lower)",
      "- off4: final eval reward PR2 − R3: +0.1 (2·se 0.2): within noise",
  ]  # off2 has vanilla only: nothing to compare


def test_expectation_checks_skips_absent_modes():
  results = {"off8": {"pr2": _mode(zd=0.4, kl1=1.0, kl=1.0, reward=0.5),
                      "none": _mode(zd=0.5, kl1=1.0, kl=1.0, reward=0.5)}}
  lines = expectation_checks(results)
  assert lines[0] == ("- off8: zero-dev (mini-step ≥ 2) PR2 − vanilla (DAPO, no replay): "
                      "-0.1 (2·se 0.2): within noise (expected: higher)")
  assert len(lines) == 3 and not any("R3" in line for line in lines)


def test_main_says_it_is_a_library_and_names_the_command(capsys):
  assert replay_report.main(["replay_report", "--help"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("Summaries and report of the routing-replay comparison")
  assert "A library module, not a command" in out
  assert "python -m experiments.compare_replay" in out
  # Any other argument: one `error:` line (it printed the whole usage, without `error:`).
  assert replay_report.main(["replay_report", "--out=x"]) == 2
  assert capsys.readouterr().err == (
      "error: experiments.replay_report is a library module and takes no arguments (got --out=x);"
      " the report is written by python -m experiments.compare_replay\n")


def test_module_run_as_a_command_is_not_silent():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "experiments.replay_report", "--help"],
                        capture_output=True, text=True, timeout=60, cwd=repo)
  assert proc.returncode == 0 and "A library module, not a command" in proc.stdout
  proc = subprocess.run([sys.executable, "-m", "experiments.replay_report", "--bogus"],
                        capture_output=True, text=True, timeout=60, cwd=repo)
  assert proc.returncode == 2 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
  assert proc.stderr.startswith("error: experiments.replay_report is a library module")



def _tiny_config():
  """configs/tiny.py's ConfigDict (the report's setting lines read it)."""
  import importlib.util
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("tiny_config",
                                                os.path.join(repo, "configs", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  return tiny.get_config()


def _report_mode(zd_ge2):
  """Every TABLE field with its own value, so a cell that reads another field shows."""
  two = [0, 0, 0]  # three seeds, one of them collapsed
  return {"seeds": [0, 1, 2], "collapsed_runs": 1,
          "eval_reward": _field(0.5, 0.1, two),
          "zero_dev_ratio_ministep_ge2": _field(zd_ge2, 0.01, two),
          "zero_dev_ratio_ministep1": _field(0.99, 0.001, two),
          "k3_kl_ministep1": _field(1e-3, 2e-4, two), "k3_kl": _field(3e-3, None, two),
          "extreme_frac_ministep1": _field(None, None, [None, None]),
          "extreme_frac": _field(2e-2, 1e-2, two), "clip_frac_low": _field(0.05, 0.01, two),
          "clip_frac_high": _field(0.07, 0.02, two), "pred_loss": _field(4e-5, 1e-5, two),
          "pred_topk_acc": _field(0.875, 0.0125, two), "bias_logit_ratio": _field(0.25, 0.5, two),
          "feature_cache_bytes": _field(51200.0, 0.0, two)}


def test_write_markdown_tables_and_kept_analysis(tmp_path):
  """Each table column shows its own field (mean ± std, its format; a missing mean is '–', a
  None std 0), the collapsed column counts seeds, PR2 gets its predictor line, and the
  hand-written analysis between the markers survives a rewrite while the numbers change."""
  meta = {"command": "python -m experiments.compare_replay --quick", "sweep_minutes": 12.0,
          "wall_minutes": 3.0, "devices": "8 cpu device(s), 2 cores", "runs": 6, "reused_runs": 1,
          "seeds": [0, 1, 2], "collapse_fraction": 0.5}
  path = str(tmp_path / "replay_comparison.md")
  results = {"off4": {"r3": _report_mode(0.8), "pr2": _report_mode(0.91)}}
  replay_report.write_markdown(path, results, meta, [str(tmp_path / "p_curves.png")],
                               _tiny_config())
  lines = open(path).read().splitlines()
  assert lines[3] == meta["command"]
  assert lines[lines.index("## off4") + 2] == (
      "| mode | final eval reward | zero-dev (mini-step ≥ 2) | zero-dev (mini-step 1) | "
      "k3 KL (mini-step 1) | k3 KL (all) | extreme (mini-step 1) | extreme (all) | clip low | "
      "clip high | collapsed |")
  assert ("| PR2 | 0.500 ± 0.100 | 0.9100 ± 0.0100 | 0.9900 ± 0.0010 | 1.00e-03 ± 2.00e-04 | "
          "3.00e-03 ± 0.00e+00 | – | 2.0e-02 ± 1.0e-02 | 0.0500 ± 0.0100 | 0.0700 ± 0.0200 | "
          "1/3 |") in lines
  assert "| R3 | 0.500 ± 0.100 | 0.8000 ± 0.0100 |" in "\n".join(lines)
  assert ("PR2 predictor: pred_loss 4.00e-05 ± 1.00e-05, pred_topk_acc 0.8750 ± 0.0125, "
          "bias_logit_ratio 0.250 ± 0.500, feature cache 50 KiB per step.") in lines
  assert "![p_curves.png](p_curves.png)" in lines
  rl_line = next(line for line in lines if line.startswith("- RL: "))
  assert rl_line.endswith("at temperature 1.0"), rl_line  # every parameter trains: not said
  routers = _tiny_config()
  routers.rl.trainable = "routers"
  replay_report.write_markdown(str(tmp_path / "routers.md"), results, meta, [], routers)
  assert ("at temperature 1.0; RL trains only the routers (`rl.trainable`), the other parameters "
          "stay as the warm-up left them") in open(tmp_path / "routers.md").read()
  assert ("- off4: zero-dev (mini-step ≥ 2) PR2 − R3: +0.11 (2·se 0.016): higher "
          "(expected: higher)") in lines
  assert lines[-3:] == ["<!-- BEGIN analysis -->", "(not written yet)", "<!-- END analysis -->"]
  # Someone writes the analysis; the sweep reruns with new numbers.
  text = open(path).read().replace("(not written yet)", "PR2 wins at κ = 4.\n\nSee the plots.")
  open(path, "w").write(text)
  results["off4"]["pr2"]["zero_dev_ratio_ministep_ge2"] = _field(0.95, 0.01, [0, 0, 0])
  replay_report.write_markdown(path, results, meta, [], _tiny_config())
  text = open(path).read()
  assert text.endswith("<!-- BEGIN analysis -->\nPR2 wins at κ = 4.\n\nSee the plots.\n"
                       "<!-- END analysis -->\n")
  assert "| PR2 | 0.500 ± 0.100 | 0.9500 ± 0.0100 |" in text and "0.9100" not in text
  # One seed: its value alone, and the text says there is no spread ("± 0.000" claimed one).
  one = {"off4": {"r3": _report_mode(0.8)}}
  for field in one["off4"]["r3"].values():
    if isinstance(field, dict) and field.get("per_seed"):
      field["per_seed"] = field["per_seed"][:1]
  replay_report.write_markdown(str(tmp_path / "one.md"), one, {**meta, "seeds": [0]}, [],
                               _tiny_config())
  text = open(tmp_path / "one.md").read()
  assert "Numbers are one seed's (0): no spread is estimated." in text
  assert "| R3 | 0.500 | 0.8000 |" in text and "±" not in text.split("## off4")[1]


def _rl_row(step, reward, **extra):
  return {"phase": "rl", "step": step, "loss": 0.1, "reward_mean": reward, "k3_kl": 0.01,
          "topk_agreement": 0.9, "zero_dev_ratio_per_ministep": [1.0, 0.8],
          "topk_agreement_per_ministep": [1.0, 0.8], "k3_kl_per_ministep": [1e-3, 1e-2],
          "dev_hist": [0.9, 0.1, 0.0, 0.0], **extra}


def test_mean_curves_keep_every_step_when_a_seed_stopped_early(tmp_path):
  """A seed the non-finite guard stopped after step 1: the curves were zipped to its length
  but kept the first seed's x-axis, so the plots raised 'x and y must have same first
  dimension' after the whole sweep (or, with the short seed first, were cut silently)."""
  from experiments import replay_plots
  warm = {"phase": "sft_eval", "step": 0, "eval_reward": 0.4}
  full = replay_report.summarise_run(
      [warm, _rl_row(1, 0.2), _rl_row(2, 0.4, eval_reward=0.5), _rl_row(3, 0.6, eval_reward=0.7)],
      0.5)
  stopped = replay_report.summarise_run([warm, _rl_row(1, 0.0)], 0.5, error="non-finite")
  for runs in ({0: full, 1: stopped}, {0: stopped, 1: full}):
    curves = replay_report.aggregate(runs)["curves"]
    assert curves["step"] == [1, 2, 3] and curves["eval_step"] == [2, 3]
    assert curves["reward_mean"] == [0.1, 0.4, 0.6]  # step 1 over both seeds, then one
    assert curves["eval_reward"] == [0.5, 0.7]
    replay_plots.write_plots(str(tmp_path), {"off2": {"r3": replay_report.aggregate(runs)}},
                             top_k=2)


def test_summarise_run_reads_rows_without_per_ministep_vectors():
  """Every field is optional in a row (a run of another version, or metrics that omit them);
  the horizon curve alone read zero_dev_ratio_per_ministep unguarded: a KeyError."""
  out = replay_report.summarise_run([{"phase": "rl", "step": 1, "loss": 0.1}], 0.5)
  assert out["curves"]["step"] == [1]
  assert out["curves"]["zero_dev_ratio_ministep_ge2"] == [None]
  assert out["zero_dev_ratio_ministep_ge2"] is None and out["steps"] == 1


def test_write_markdown_header_and_setting_hand_worked(tmp_path):
  """The lines above the tables: the sweep's time and run counts from `meta` (sweep time is the
  runs' own compute, not this invocation's wall time), every setting from the config as run
  (the clip range the loss resolves, the predictor lr α·η), the seeds and the collapse rule."""
  cfg = _tiny_config()
  cfg.task_kwargs.num_numbers = 4
  cfg.model.num_layers, cfg.model.d_model, cfg.model.num_experts, cfg.model.top_k = 3, 48, 6, 3
  cfg.sft.num_steps, cfg.sft.batch_size, cfg.sft.learning_rate = 30, 16, 5e-3
  rl = cfg.rl
  rl.num_steps, rl.prompts_per_step, rl.group_size, rl.micro_steps = 40, 16, 4, 4
  rl.learning_rate, rl.eval_every, rl.eval_size, rl.eval_temperature = 2e-3, 10, 128, 0.5
  rl.rollout_dtype = "float32"
  cfg.pr2.loss, cfg.pr2.lr_mult, cfg.pr2.feature_tokens = "delta", 3.0, 5
  cfg.pr2.feature_rule, cfg.pr2.predicted_gates = "response", False
  meta = {"command": "python -m experiments.compare_replay", "sweep_minutes": 42.26,
          "wall_minutes": 7.0, "devices": "8 cpu device(s), 2 cores", "runs": 9, "reused_runs": 4,
          "seeds": [3, 1, 7], "collapse_fraction": 0.25}
  path = tmp_path / "r.md"
  replay_report.write_markdown(str(path), {}, meta, [], cfg)
  lines = path.read_text().splitlines()
  assert lines[6] == ("Sweep time 42.3 min on 8 cpu device(s), 2 cores: the shared warm-up and 9 "
                      "runs, each timed when it ran (4 were reused from an earlier invocation; "
                      "this one took 7.0 min).")
  assert lines[8:15] == [
      "## Setting", "",
      "- task `countdown` {'max_number': 9, 'num_numbers': 4}; model: 3 MoE layers, d_model 48, "
      "6 experts top-3, rollout dtype float32",
      "- warm-up: 30 supervised steps (batch 16, lr 0.005), trained once and shared by every run",
      "- RL: 40 steps of 16 prompts × 4 samples, off-κ mini-batches of 4 micro-steps, AdamW lr "
      "0.002, DAPO clip 0.2/0.28 (GSPO: 3e-4/4e-4 against π_old), eval every 10 steps on 128 "
      "held-out problems at temperature 0.5",
      "- PR2: loss `delta`, α = 3.0 (predictor lr α·η = 0.006), 5 cached positions per sequence "
      "(response), predicted gates at rollout: False", ""]
  assert lines[15].startswith("Numbers are mean ± sample std over seeds 3, 1, 7. Per-step")
  meta["reused_runs"] = 1  # was "(1 were reused"
  replay_report.write_markdown(str(path), {}, meta, [], cfg)
  assert "(1 was reused from an earlier invocation;" in path.read_text().splitlines()[6]
  assert lines[17].startswith("**Collapse**: a run counts as collapsed if its final eval reward "
                              "is below 25% of its own warm-up eval reward")


def test_aggregate_leaves_out_a_non_finite_seed_value():
  """A seed whose k3 KL averaged to NaN or inf (a diverged run that kept logging) is None in
  per_seed and left out of the mean and std, which it would otherwise turn into NaN."""
  runs = {s: {"collapsed": False, "error": None, "curves": {"step": [], "eval_step": []},
              "k3_kl": kl} for s, kl in ((0, 0.25), (1, float("nan")), (2, 0.75),
                                         (3, float("inf")))}
  for key in replay_report.CURVES:
    for run in runs.values():
      run["curves"][key] = []
  for run in runs.values():
    run["curves"]["eval_reward"] = []
  agg = replay_report.aggregate(runs)
  assert agg["k3_kl"] == {"mean": 0.5, "std": pytest.approx(0.5 ** 0.5 * 0.5),
                          "per_seed": [0.25, None, 0.75, None]}


def test_summarise_run_adds_up_the_skipped_updates_of_every_step():
  """Each RL row counts the updates skipped at that step (loop.py: sum of its skipped_flags):
  the run's total is their sum, 1 + 0 + 2 = 3, not the largest nor the last."""
  rows = [{"phase": "sft_eval", "step": 0, "eval_reward": 0.5}] + [
      {"phase": "rl", "step": s, "loss": 0.1, "skipped_updates": n,
       "zero_dev_ratio_per_ministep": [1.0, 0.9]} for s, n in ((1, 1), (2, 0), (3, 2))]
  summary = replay_report.summarise_run(rows, 0.5)
  assert summary["skipped_updates"] == 3 and summary["collapsed"]


def test_plan_run_restarts_a_run_config_without_a_step_count():
  """A run_config.json without rl.num_steps (or with a non-integer one) cannot be compared with
  the wanted step count: the run starts over, named, instead of a TypeError ending the sweep
  (rl.num_steps is resumable, so the config difference alone does not restart it)."""
  wanted = {"seed": 0, "rl": {"num_steps": 6, "learning_rate": 2e-3}}
  rows = [{"phase": "rl", "step": 3}]
  assert replay_report.plan_run({"seed": 0, "rl": {"learning_rate": 2e-3}}, wanted, rows) == (
      "restart", "rl.num_steps None in run_config.json is not a step count")
  stored = {"seed": 0, "rl": {"num_steps": "6", "learning_rate": 2e-3}}
  assert replay_report.plan_run(stored, wanted, rows) == (
      "restart", "rl.num_steps '6' in run_config.json is not a step count")


def test_final_eval_reward_verdict_reads_higher_as_better():
  """PR2 − R3 final eval reward: a difference beyond noise is named as it is, 'higher' for
  PR2 above R3 (a reward is better higher; with 'lower' as the expected word it read backwards).
  At exactly 2·se the difference is still noise (the rule is |d| ≤ 2·se)."""
  pr2, r3 = _mode(zd=0.5, kl1=1.0, kl=1.0, reward=0.8), _mode(zd=0.5, kl1=1.0, kl=1.0, reward=0.5)
  assert expectation_checks({"off2": {"r3": r3, "pr2": pr2}})[-1] == (
      "- off2: final eval reward PR2 − R3: +0.3 (2·se 0.2): higher")
  assert expectation_checks({"off2": {"r3": pr2, "pr2": r3}})[-1] == (
      "- off2: final eval reward PR2 − R3: -0.3 (2·se 0.2): lower")
  # std 0.5 over two seeds each: se = sqrt(0.25 / 2 + 0.25 / 2) = 0.5 exactly, 2·se = 1 = d.
  edge = _diff_verdict(_field(1.0, 0.5, [0, 0]), _field(0.0, 0.5, [0, 0]), "higher")
  assert edge == "+1 (2·se 1): within noise"


def test_a_mean_of_zero_is_a_number_not_a_dash():
  """No extreme token or no high clip in any step is a mean of 0.0, a result: the cell shows
  it ('–' is for a field no seed has)."""
  assert replay_report._fmt(_field(0.0, 0.0, [0.0, 0.0]), "{:.1e}") == "0.0e+00 ± 0.0e+00"
  assert replay_report._fmt(_field(0.0, None, [0.0, None]), "{:.4f}") == "0.0000"
  assert replay_report._fmt(_field(None, None, [None, None]), "{:.4f}") == "–"
  assert replay_report._fmt(None, "{:.4f}") == "–"
