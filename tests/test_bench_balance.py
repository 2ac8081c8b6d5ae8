"""Smoke test of experiments/bench_balance.py --quick: every part runs, the JSON is complete.

No assertions on timings; the imbalance checks are loose facts of the tiny trace (the
planner's guard makes foresight never worse than the static layout).
"""

import json
import os
import subprocess
import sys

import pytest

from experiments import common

KEYS = ("planner_ms", "planner_ms_warm", "planner_ms_lpt", "eplb_ms",
        "imbalance_none", "imbalance_eplb_step", "imbalance_foresight",
        "imbalance_foresight_sticky_lpt",
        "cpu_moe_speedup", "sim_speedup")


def test_bench_balance_quick(tmp_path):
  """Also: rate flags given explicitly hold in --quick's cost model (its tiny CostModel replaced
  the one built from them, while the tables printed them), and the balance_moe subprocess's
  temporary directory is removed (one was left behind by every run)."""
  out, tmp = tmp_path / "new_dir" / "b.json", tmp_path / "tmp"
  tmp.mkdir()
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_balance", "--quick",
                         "--gpu_tflops=100", "--xfer_gbps=5", f"--out={out}"], check=True,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, TMPDIR=str(tmp)))
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(KEYS) <= set(last)
  result = json.loads(out.read_text())
  assert result["summary"] == last and result["quick"]
  assert result["cost_model"]["gpu_flops"] == 100e12
  assert result["cost_model"]["xfer_bytes_per_s"] == 5e9
  assert result["cost_model"]["a2a_bytes_per_s"] == 50e9 and result["cost_model"]["d_model"] == 64
  assert "100 TFLOP/s" in proc.stdout and "(transfers 5 GB/s)" in proc.stdout
  assert result["command"].startswith("python -m experiments.bench_balance --quick")
  assert os.listdir(tmp) == []
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
  _check_figures(result)


def _check_figures(result):
  """The derived figures are what their parts give: (d)'s speedups are none's modelled step time
  over the mode's (above 1: the mode is faster), the planner's serial time counts against
  foresight only, and the summary (the last line) quotes the headline micro-step size
  (--sim_micro_seqs, 2 in --quick; not the first of --micro_seqs), the largest rollout
  micro-step, means not maxima, medians not minimums, each under its own name."""
  for row in list(result["imbalance"].values()) + list(result["simulation_bandwidth"].values()):
    for mode, r in row.items():
      assert r["sim_speedup"] == pytest.approx(row["none"]["sim_step_s"] / r["sim_step_s"]), mode
      if mode != "foresight":
        assert r["sim_speedup_planner_serial"] == r["sim_speedup"], mode
    assert row["foresight"]["sim_speedup_planner_serial"] < row["foresight"]["sim_speedup"]
    assert row["none"]["sim_speedup"] == 1.0
  timing, summary = result["timing_ms"], result["summary"]
  for k in ("planner", "planner_warm", "planner_lpt", "planner_from_routes", "eplb"):
    # a median of 3 timings equals their minimum only if two are equal to the nanosecond
    assert timing[k + "_min"] < timing[k], k
  assert {k: summary[k] for k in ("planner_ms", "planner_ms_warm", "planner_ms_lpt",
                                  "planner_from_routes_ms", "eplb_ms")} == {
      "planner_ms": round(timing["planner"], 3),
      "planner_ms_warm": round(timing["planner_warm"], 3),
      "planner_ms_lpt": round(timing["planner_lpt"], 3),
      "planner_from_routes_ms": round(timing["planner_from_routes"], 3),
      "eplb_ms": round(timing["eplb"], 3)}
  assert summary["imbalance_micro_seqs"] == 2 and summary["rollout_micro_seqs"] == 8
  head, big = result["imbalance"]["2"], result["imbalance_rollout"]["8"]
  for mode in head:
    assert summary[f"imbalance_{mode}"] == round(head[mode]["mean"], 4), mode
    assert summary[f"rollout_imbalance_{mode}"] == round(big[mode]["mean"], 4), mode
  assert summary["sim_speedup"] == round(head["foresight"]["sim_speedup"], 4)
  assert summary["sim_speedup_eplb_step"] == round(head["eplb_step"]["sim_speedup"], 4)
  assert summary["sim_speedup_foresight_sticky_lpt"] == round(
      head["foresight_sticky_lpt"]["sim_speedup"], 4)
  assert summary["fetches_per_layer_device_foresight"] == round(
      head["foresight"]["fetches_per_layer_device"], 4)
  assert summary["cpu_moe_speedup"] == round(result["moe"]["train_speedup"], 4)
  assert summary["cpu_moe_forward_speedup"] == round(result["moe"]["forward_speedup"], 4)


@pytest.mark.parametrize("flags, named", [
    (["--micro_seqs=abc"], "--micro_seqs"), (["--micro_seqs=0,2"], "--micro_seqs"),
    (["--micro_seqs="], "--micro_seqs"), (["--rollout_model=8,2"], "--rollout_model"),
    (["--rollout_model=8,2,3,3,2"], "--rollout_model"), (["--experts=15"], "--experts"),
    (["--slots=1"], "--slots"), (["--cluster=100"], "--cluster"), (["--top_k=16"], "--top_k"),
    (["--gpu_tflops=0"], "--gpu_tflops"),
    # --quick: 4 sequences a trace step, rollouts of 4 prompts x 4 (dropped rows, numpy errors
    # or RLConfig's group-size refusal after minutes of work)
    (["--micro_seqs=3", "--sim_micro_seqs=3"], "--micro_seqs entries [3] must divide --trace_seqs"
                                                " = 4"),
    (["--micro_seqs=8", "--sim_micro_seqs=8"], "--micro_seqs entries [8] must divide"),
    (["--rollout_micro_seqs=4,32"], "--rollout_micro_seqs entries [32] must divide "
                                    "--rollout_batch's prompts x group = 16"),
    (["--rollout_batch=2,4,1"], "--rollout_batch's group size 1 must be >= 2"),
    # balance_moe's flags, checked with its own definitions before any work
    (["--moe_args=--experts=0"], "--moe_args: flag --experts=0"),
    (["--moe_args=--experts=12"], "--moe_args: --experts=12"),
    (["--moe_args=--bogus"], "--moe_args: Unknown command line flag 'bogus'"),
    (["--out=FILE/b.json"], "--out")])
def test_bad_flag_is_one_error_line_before_any_work(tmp_path, flags, named):
  """Each failed with a traceback (int(), range() of step 0, native_layout, numpy's choice, an
  unpacking error, a RuntimeError around balance_moe's own error line), some after the work."""
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  out = tmp_path / "b.json"
  args = [f.replace("FILE", str(a_file)) for f in flags]
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_balance", "--quick",
                         f"--out={out}", *args], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and named in line, line
  assert sorted(os.listdir(tmp_path)) == ["a_file"]
