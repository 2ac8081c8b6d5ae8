"""Smoke test of experiments/bench_balance.py --quick: every part runs, the JSON is complete.

No assertions on timings; the imbalance checks are loose facts of the tiny trace (the
planner's guard makes foresight never worse than the static layout).
"""

import json
import subprocess
import sys

from experiments import common

KEYS = ("planner_ms", "planner_ms_warm", "planner_ms_lpt", "eplb_ms",
        "imbalance_none", "imbalance_eplb_step", "imbalance_foresight",
        "imbalance_foresight_sticky_lpt",
        "cpu_moe_speedup", "sim_speedup")


def test_bench_balance_quick(tmp_path):
  out = tmp_path / "b.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_balance", "--quick",
                         f"--out={out}"], check=True, capture_output=True, text=True, timeout=300)
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(KEYS) <= set(last)
  result = json.loads(out.read_text())
  assert result["summary"] == last and result["quick"]
  revision = common.source_revision()  # which code the numbers measured
  assert {k: result["machine"][k] for k in revision} == revision
  assert last["planner_ms"] > 0 and last["planner_ms_lpt"] > 0 and last["planner_ms_warm"] > 0
  assert last["eplb_ms"] > 0 and last["sim_speedup"] > 0
  assert 1.0 <= last["imbalance_foresight"] <= last["imbalance_none"]
  # (b) on a trace recorded from our own rollouts, at every micro-step size
  assert last["rollout_imbalance_foresight"] <= last["rollout_imbalance_none"] + 1e-6
  assert set(result["imbalance_rollout"]) == {"4", "8"}
  for row in result["imbalance"].values():
    assert set(row) == {"none", "eplb_step", "eplb_ema", "foresight", "foresight_lpt",
                        "foresight_sticky_lpt"}
    assert row["foresight"]["mean"] <= row["none"]["mean"] + 1e-6
    assert row["foresight_sticky_lpt"]["mean"] <= row["none"]["mean"] + 1e-6
