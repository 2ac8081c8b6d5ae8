"""Tests for experiments/compare_replay.py (the --quick sweep, as a subprocess) and its
summaries in experiments/replay_report.py (run summary, collapse rule, seed aggregation, and
`plan_run`: which run directories the sweep reuses, resumes or deletes)."""

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


def test_summarise_run_final_eval_and_curves_hand_worked():
  """The run's eval_reward is its last evaluation (not its first); curves hold one value per RL
  step, the zero-dev curve averaging mini-steps 2..κ of each step; collapse needs a final eval
  strictly below collapse_fraction x warm-up (0.25 is not below 0.5 x 0.5)."""
  rows = [{"phase": "sft_eval", "step": 0, "eval_reward": 0.5},
          _rl_row(1, [1.0, 0.9, 0.7], eval_reward=0.35), _rl_row(2, [1.0, 0.6, 0.4]),
          _rl_row(3, [1.0, 0.5, 0.5], eval_reward=0.25)]
  s = cr.summarise_run(rows, collapse_fraction=0.5)
  assert s["eval_reward"] == 0.25 and s["steps"] == 3 and not s["collapsed"]
  c = s["curves"]
  assert c["step"] == [1, 2, 3] and c["eval_step"] == [1, 3] and c["eval_reward"] == [0.35, 0.25]
  assert c["zero_dev_ratio_ministep_ge2"] == pytest.approx([0.8, 0.5, 0.5])
  assert c["k3_kl"] == pytest.approx([0.01, 0.02, 0.03])
  assert c["topk_agreement"] == [None] * 3  # the rows have only its per-mini-step vector
  assert cr.summarise_run(rows, collapse_fraction=0.51)["collapsed"]  # 0.25 < 0.255


def test_aggregate_skips_a_seed_without_rl_rows_and_averages_curves():
  """A seed that stopped before its first RL step has no vectors: the vector means are over the
  seeds that have them (not divided by every seed), its eval_reward is None in per_seed, and the
  mean curves average the seeds step by step."""
  warm = {"phase": "sft_eval", "step": 0, "eval_reward": 0.4}
  runs = {0: cr.summarise_run([warm, _rl_row(1, [1.0, 0.8]), _rl_row(2, [1.0, 0.6],
                                                                     eval_reward=0.3)], 0.5),
          1: cr.summarise_run([warm, _rl_row(1, [1.0, 0.4]), _rl_row(2, [1.0, 0.2],
                                                                     eval_reward=0.5)], 0.5),
          2: cr.summarise_run([warm], 0.5, error="stopped")}
  agg = cr.aggregate(runs)
  assert agg["collapsed_runs"] == 1 and agg["errors"] == {"2": "stopped"}
  zd = agg["zero_dev_ratio_per_ministep"]
  assert zd["mean"] == pytest.approx([1.0, 0.5]) and zd["per_seed"][2] is None
  assert zd["std"] == pytest.approx([0.0, math.sqrt(0.08)])  # seeds 0, 1: 0.7 and 0.3
  assert agg["eval_reward"]["per_seed"] == [0.3, 0.5, None]
  assert agg["eval_reward"]["mean"] == pytest.approx(0.4)
  assert agg["eval_reward"]["std"] == pytest.approx(math.sqrt(0.02))
  # Curves of seeds 0 and 1 (seed 2 has none): zero-dev at mini-step 2 per step, eval at step 2.
  two = cr.aggregate({s: runs[s] for s in (0, 1)})
  assert two["curves"]["step"] == [1, 2] and two["curves"]["eval_step"] == [2]
  assert two["curves"]["zero_dev_ratio_ministep_ge2"] == pytest.approx([0.6, 0.4])
  assert two["curves"]["eval_reward"] == pytest.approx([0.4])


def _run_cfg(num_steps=6, lr=2e-3, seed=0, **extra):
  """A run_config.json as compare_replay writes it (nested, JSON round-tripped)."""
  return {"seed": seed, "init_from": "/w/warmup/checkpoints/sft", "checkpoint_every": 20,
          "model": {"num_experts": 8, "top_k": 2, "layer_types": []},
          "rl": {"num_steps": num_steps, "learning_rate": lr, "replay_mode": "r3",
                 "off_policy_k": 4, **extra}}


def _steps(last):
  return [{"phase": "sft_eval", "step": 0, "eval_reward": 0.4}] + [
      _rl_row(s, [1.0, 0.9]) for s in range(1, last + 1)]


def test_config_differences_names_nested_and_missing_fields():
  stored = {"a": 1, "b": {"c": 2, "e": [1, 2]}, "f": {}}
  wanted = {"a": 1, "b": {"c": 3, "e": [1, 2]}, "d": None, "f": {}}
  assert cr.config_differences(stored, wanted) == ["b.c", "d"]
  assert cr.config_differences(wanted, wanted) == []


@pytest.mark.parametrize("stored, last, want", [
    # Unchanged config: complete -> reuse; interrupted (or never started) -> resume.
    (_run_cfg(), 6, ("reuse", "complete")),
    (_run_cfg(), 3, ("resume", "at step 3 of 6")),
    (_run_cfg(), 0, ("resume", "at step 0 of 6")),
    # rl.num_steps raised from 4: a complete 4-step run (or a partial one) continues to 6.
    (_run_cfg(num_steps=4), 4, ("resume", "rl.num_steps 4 -> 6, at step 4")),
    (_run_cfg(num_steps=4), 2, ("resume", "rl.num_steps 4 -> 6, at step 2")),
    # Lowered from 10: a run still short of 6 continues to 6; one at or past 6 has no
    # checkpoint (nor final evaluation) at step 6, so it starts over.
    (_run_cfg(num_steps=10), 5, ("resume", "rl.num_steps 10 -> 6, at step 5")),
    (_run_cfg(num_steps=10), 6,
     ("restart", "rl.num_steps lowered from 10 to 6, the run is at step 6")),
    (_run_cfg(num_steps=10), 8,
     ("restart", "rl.num_steps lowered from 10 to 6, the run is at step 8")),
    # Another field changed: deleted, the field (not rl.num_steps) named with both values.
    (_run_cfg(lr=1e-3), 6, ("restart", "config changed: rl.learning_rate 0.001 -> 0.002")),
    (_run_cfg(num_steps=4, lr=1e-3, seed=1), 2,
     ("restart", "config changed: rl.learning_rate 0.001 -> 0.002, seed 1 -> 0")),
    (_run_cfg(clip_low=0.2), 6,
     ("restart", "config changed: rl.clip_low 0.2 -> '(absent)'")),
    (None, 0, ("restart", "no run_config.json")),
    # The checkpoint cadence changes no number: not a reason to rerun. Another warm-up is.
    ({**_run_cfg(), "checkpoint_every": 0}, 6, ("reuse", "complete")),
    ({**_run_cfg(), "checkpoint_every": 0}, 3, ("resume", "at step 3 of 6")),
    # Nor does the learner's LM-head chunking (memory only), or its absence from older runs.
    (_run_cfg(logits_chunk=256), 6, ("reuse", "complete")),
    ({**_run_cfg(), "warmup": {"seed": 1}}, 6, ("restart", "config changed: warmup.seed 1 -> 0")),
])
def test_plan_run(stored, last, want):
  wanted = _run_cfg()
  if stored and "warmup" in stored:
    wanted["warmup"] = {"seed": 0}
  assert cr.plan_run(stored, wanted, _steps(last)) == want


def test_plan_run_reuses_a_stopped_run_unless_its_config_changed():
  """A run the loop stopped (non-finite updates) would stop again: resuming it would train past
  the stop from its last good state, a different run."""
  rows, error = _steps(3), "3 consecutive updates had a non-finite loss"
  assert cr.plan_run(_run_cfg(), _run_cfg(), rows, error) == (
      "reuse", f"stopped at step 3: {error}")
  assert cr.plan_run(_run_cfg(num_steps=4), _run_cfg(), rows, error)[0] == "reuse"
  assert cr.plan_run(_run_cfg(lr=1e-3), _run_cfg(), rows, error)[0] == "restart"


FIELDS = ("eval_reward", "zero_dev_ratio_ministep_ge2", "zero_dev_ratio_ministep1", "k3_kl",
          "k3_kl_ministep1", "extreme_frac", "extreme_frac_ministep1", "clip_frac_low",
          "clip_frac_high", "topk_agreement_per_ministep", "zero_dev_ratio_per_ministep",
          "dev_hist")


@pytest.mark.slow
def test_quick_sweep_writes_report(tmp_path):
  """The --quick variant end to end (a few minutes on 2 cores): JSON structure, report, plots."""
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # Shorter than --quick's own defaults (one κ, not two: the runs of each κ are alike) and
  # 32 rollouts a step, not tiny.py's 256 (8 warm-up sequences, not 64), on one layer, not
  # two: this checks the plumbing, not the numbers. 32 = 8 prompts x 4 samples still splits
  # into κ x M = 8.
  args = ["--quick", "--offs=4", "--rl_steps=2", "--eval_every=2", "--sft_steps=4",
          "--eval_size=32", "--config.rl.prompts_per_step=8", "--config.rl.group_size=4",
          "--config.sft.batch_size=8", "--config.model.num_layers=1",
          f"--workdir={tmp_path / 'work'}", f"--out_dir={out}"]

  def sweep(*extra):
    proc = subprocess.run([sys.executable, "-m", "experiments.compare_replay", *args, *extra],
                          capture_output=True, text=True, timeout=900, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr

  log = sweep()
  assert "warm-up into" in log and "reused" not in log
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

  # Rerun: the warm-up and all runs are reused. With another warm-up seed (the runs keep their
  # own seeds) the warm-up is trained again and a run that started from the old one restarts.
  log = sweep()
  assert "warm-up checkpoint" in log and log.count("complete in") == 4, log[-3000:]
  log = sweep("--config.seed=5", "--seeds=0", "--modes=r3")
  assert "was trained with other settings (seed): training it again" in log, log[-3000:]
  assert "starting over (config changed: warmup.seed 0 -> 5)" in log, log[-3000:]


def test_bad_setting_fails_in_one_line_before_any_work(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compare_replay", "--quick", "--learning_rate=-1",
       f"--workdir={tmp_path / 'work'}"], capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr == "error: bad config: RLConfig.learning_rate must be > 0, got -1.0\n"
  assert not (tmp_path / "work").exists()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("flag, named", [
    ("--seeds=abc", "--seeds"), ("--seeds=", "--seeds"), ("--offs=", "--offs"),
    ("--offs=0", "--offs"), ("--modes=", "--modes"), ("--modes=r3,bogus", "--modes"),
    ("--workdir=FILE", "--workdir"), ("--out_dir=FILE", "--out_dir"),
    # A repeated seed ran once while the report claimed both; a run never evaluated during RL
    # (eval_every=0) counted as collapsed.
    ("--seeds=0,0", "--seeds lists a value twice"), ("--eval_every=0", "--eval_every")])
def test_bad_flag_is_one_error_line_before_any_work(tmp_path, flag, named):
  """A bad list (a non-integer, empty, or unknown value) failed as int() or IndexError, or after
  the warm-up in matplotlib; a --workdir or --out_dir that is a file at the first run or after
  the whole sweep."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.compare_replay", "--quick",
       f"--workdir={tmp_path / 'work'}", flag.replace("FILE", str(a_file))],
      capture_output=True, text=True, timeout=120, cwd=REPO, env=dict(os.environ,
                                                                        JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and named in line
  assert not (tmp_path / "work").exists()


def test_sweep_progress_counts_only_the_steps_still_to_run():
  """Raising --rl_steps 3 -> 4 resumes a finished run at step 4: one step to run, not four (the
  log read 'step 4/4 | sweep 1/4 steps'). compare_replay defines flags: imported in a child."""
  code = """
from experiments import compare_replay
lines = []
progress = compare_replay.Progress(2 * 4, log=lambda fmt, *args: lines.append(fmt % args))
resumed = progress.callback("resumed")
resumed(4, 4, None)  # resumed from the checkpoint of step 3
fresh = progress.callback("fresh")
for step in range(1, 5):
  fresh(step, 4, None if step == 1 else 0.1)
print(lines[0].split(' ETA')[0])
print(lines[-1].split(' ETA')[0])
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == ["[resumed] step 4/4 | sweep 1/5 steps,",
                                      "[fresh] step 4/4 | sweep 5/5 steps,"]


def test_run_configs_of_the_sweep():
  """Each (κ, mode, seed) run's config: the GSPO baseline is DESIGN §3's (sequence ratio against
  π_old, clip 3e-4/4e-4, no replay), the replay modes are DAPO with that replay mode, κ, seed and
  warm-up are the run's own and the shared base is left alone; NaN/inf anywhere in the results
  become JSON nulls. compare_replay defines flags: imported in a child."""
  code = """
import json
from absl import flags
from experiments import compare_replay as c
from pr2_jax.rl.config import ExperimentConfig
flags.FLAGS(["compare_replay", "--num_experts=4", "--top_k=1", "--learning_rate=0.005",
             "--pr2_lr_mult=7"])
base = c.base_config()
before = base.to_dict()
out = {}
for mode in ("gspo", "pr2"):
  cfg = ExperimentConfig.from_dict(c.run_config(base, mode, 4, 3, "/w/sft").to_dict())
  out[mode] = [cfg.rl.loss, cfg.rl.replay_mode, cfg.rl.clip_low, cfg.rl.clip_high,
               cfg.rl.ratio_denominator, cfg.rl.off_policy_k, cfg.seed, cfg.init_from,
               cfg.model.num_experts, cfg.model.top_k, cfg.rl.learning_rate, cfg.pr2.lr_mult]
out["base_kept"] = base.to_dict() == before
nan = float("nan")
out["safe"] = c._json_safe({"a": [1.0, nan, {"b": float("inf")}], "c": nan, "d": "x"})
print(json.dumps(out))
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  got = json.loads(proc.stdout)
  shared = [4, 3, "/w/sft", 4, 1, 0.005, 7.0]
  assert got["gspo"] == ["gspo", "none", 3e-4, 4e-4, "old"] + shared
  assert got["pr2"] == ["dapo", "pr2", 0.2, 0.28, "rollout"] + shared
  assert got["base_kept"], "run_config changed the shared base config"
  assert got["safe"] == {"a": [1.0, None, {"b": None}], "c": None, "d": "x"}


def test_an_interrupted_runs_compute_time_is_kept_and_its_resume_adds_to_it(tmp_path):
  """The time was recorded only when loop.run returned: a Ctrl-C'd run's minutes were lost, and
  the report's sweep time counted only the resumed part. Imported in a child (flags)."""
  code = f"""
import json, time
from experiments import compare_replay
run = {str(tmp_path)!r}
try:
  with compare_replay.timed(run):
    time.sleep(0.2)
    raise KeyboardInterrupt
except KeyboardInterrupt:
  pass
first = json.load(open(run + "/timing.json"))["seconds"]
with compare_replay.timed(run):
  time.sleep(0.1)
print(first, json.load(open(run + "/timing.json"))["seconds"] - first)
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  interrupted, resumed = map(float, proc.stdout.split())
  assert 0.2 <= interrupted < 5 and 0.1 <= resumed < 5
