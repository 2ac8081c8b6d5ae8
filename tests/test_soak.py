"""experiments/soak.py: --quick runs end to end and reports what docs/results/soak.md relies on;
check_metrics flags every kind of bad metrics.jsonl."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.soak import REQUIRED_KEYS, check_metrics

import _cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"rss_growth_frac", "recompiles_after_warmup", "steps", "metrics_ok", "skipped_updates",
        "rss_current_growth_frac", "seconds_per_step_after_warmup"}


@pytest.mark.slow
def test_soak_quick_reports_json(tmp_path):
  out = tmp_path / "soak.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.soak", "--quick", f"--out={out}",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(last) == KEYS
  assert last["steps"] == 6 and last["metrics_ok"] and last["skipped_updates"] == 0
  # Everything compiles in the 3 warm-up steps (an evaluation and a checkpoint included):
  # a recompilation in steps 4-6 is a real regression (a shape or a static argument that changes).
  assert last["recompiles_after_warmup"] == 0
  saved = json.loads(out.read_text())
  assert KEYS <= set(saved)
  assert [s["step"] for s in saved["per_step"]] == list(range(1, 7))
  assert saved["peak_rss_mb_end"] >= saved["peak_rss_mb_after_warmup"] > 0
  assert saved["compiles_in_warmup"] > 0, "the compile counter must see the warm-up compiles"
  assert saved["metrics"]["rl_rows"] == 6 and not saved["metrics"]["problems"]
  # The headline figures from their parts: peak RSS at the end over peak RSS after the 3 warm-up
  # steps, and seconds per step over the 3 steps after warm-up (from the end of step 3).
  assert saved["rss_growth_frac"] == pytest.approx(
      saved["peak_rss_mb_end"] / saved["peak_rss_mb_after_warmup"] - 1)
  assert saved["peak_rss_mb_after_warmup"] == saved["per_step"][2]["peak_rss_mb"]
  assert saved["seconds_per_step_after_warmup"] == pytest.approx(
      (saved["total_s"] - saved["per_step"][2]["t"]) / 3)
  # The current-RSS figures: growth from the end of warm-up to the end, and the slope of a
  # straight line through the steps after warm-up (4-6) only.
  assert saved["rss_mb_after_warmup"] == saved["per_step"][2]["rss_mb"]
  assert saved["rss_current_growth_frac"] == pytest.approx(
      saved["rss_mb_end"] / saved["rss_mb_after_warmup"] - 1)
  late = saved["per_step"][3:]
  assert saved["rss_slope_mb_per_step"] == pytest.approx(np.polyfit(
      [s["step"] for s in late], [s["rss_mb"] for s in late], 1)[0], abs=1e-9)
  # The functions compiled after warm-up, one per recompilation (none here).
  assert saved["recompiled_functions"] == []
  # Where it ran: the allocator changes the RSS figures (jemalloc keeps freed memory).
  machine = saved["machine"]
  assert machine["allocator"] in ("jemalloc", "tcmalloc", "mimalloc", "glibc")
  assert "git_commit" in machine


@pytest.mark.parametrize("args, named", [
    (["--config.rl.replay_mode=bogus"], "replay_mode='bogus'"),
    (["--out={file}/soak.json"], "--out="), (["--workdir={file}"], "--workdir="),
    (["--steps=3", "--warmup_steps=3"], "--warmup_steps=3"),
])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, args, named):
  """Exit code 2 and one `error:` line naming the flag or config value, before anything
  compiles (a bad --out used to fail only after the run)."""
  _cli.fails_before_work("experiments.soak", args, tmp_path, named, "--quick",
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _rows(steps, eval_every):
  """metrics.jsonl rows the soak accepts: a warm-up row, then one full RL row per step."""
  rows = [{"phase": "sft", "step": 1, "loss": 2.0}]
  for step in range(1, steps + 1):
    row = {k: 0.5 for k in REQUIRED_KEYS}
    row.update(step=step, phase="rl", skipped_updates=step % 2)
    if step % eval_every == 0 or step == steps:
      row["eval_reward"] = 0.25
    rows.append(row)
  return rows


def _write(tmp_path, rows):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # NaN is written as NaN
  return str(path)


def test_check_metrics_accepts_a_good_file(tmp_path):
  got = check_metrics(_write(tmp_path, _rows(5, 2)), steps=5, eval_every=2)
  # Steps 1, 3, 5 each skipped one update.
  assert got == {"rows": 6, "rl_rows": 5, "ok": True, "problems": [], "skipped_updates": 3}


def test_check_metrics_adds_up_the_skipped_updates(tmp_path):
  """A row counts the updates its step skipped (several with micro-batches): 2 + 0 + 3, not
  the 2 rows that skipped any."""
  rows = _rows(3, 2)
  for row, skipped in zip(rows[1:], (2, 0, 3)):
    row["skipped_updates"] = skipped
  assert check_metrics(_write(tmp_path, rows), steps=3, eval_every=2)["skipped_updates"] == 5


def test_check_metrics_reports_a_missing_step(tmp_path):
  rows = _rows(5, 2)
  del rows[3]  # RL step 3
  got = check_metrics(_write(tmp_path, rows), steps=5, eval_every=2)
  assert not got["ok"] and got["rl_rows"] == 4
  assert got["problems"] == ["RL steps [1, 2, 4, 5]... are not 1..5 once each"]


def test_check_metrics_reports_a_repeated_step(tmp_path):
  rows = _rows(3, 2)
  rows.insert(3, dict(rows[2]))  # step 2 written twice (a resumed run that redid it)
  got = check_metrics(_write(tmp_path, rows), steps=3, eval_every=2)
  assert got["problems"] == ["RL steps [1, 2, 2, 3]... are not 1..3 once each"]


def test_check_metrics_reports_nan_missing_keys_and_eval_rows(tmp_path):
  rows = _rows(4, 2)
  rows[1]["k3_kl"] = float("nan")
  rows[2]["grad_norm"] = float("inf")
  del rows[3]["entropy"], rows[3]["loss"]
  del rows[4]["eval_reward"]  # step 4: the last step always evaluates
  rows[1]["eval_reward"] = 0.1  # step 1 is not an evaluation step
  got = check_metrics(_write(tmp_path, rows), steps=4, eval_every=2)
  assert not got["ok"]
  assert got["problems"] == ["step 1: eval_reward unexpected", "step 1: non-finite ['k3_kl']",
                             "step 2: non-finite ['grad_norm']",
                             "step 3 lacks ['loss', 'entropy']", "step 4: eval_reward missing"]


def test_check_metrics_without_evaluation_wants_no_eval_rows(tmp_path):
  rows = _rows(2, 1)  # eval_reward on every row
  got = check_metrics(_write(tmp_path, rows), steps=2, eval_every=0)
  assert got["problems"] == ["step 1: eval_reward unexpected", "step 2: eval_reward unexpected"]


def test_check_metrics_counts_only_rl_rows_as_steps(tmp_path):
  """A real metrics.jsonl also holds the warm-up's rows: its loss rows (phase 'sft') and its
  evaluation (phase 'sft_eval', step 0, with an eval_reward). Neither is an RL step: 3 RL
  rows of 5, steps 1..3, no problem."""
  rows = _rows(3, 2)
  rows.insert(1, {"phase": "sft_eval", "step": 0, "eval_reward": 0.4})
  got = check_metrics(_write(tmp_path, rows), steps=3, eval_every=2)
  assert got == {"rows": 5, "rl_rows": 3, "ok": True, "problems": [], "skipped_updates": 2}
