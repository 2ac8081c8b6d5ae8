"""Smoke test for experiments/bench_model.py: a minuscule run writes a complete JSON.

No assertions on timings: only that every figure exists and is positive.
"""

import json

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import bench_model, common

import _cli


TINY = dict(d_model=16, num_layers=1, num_experts=4, top_k=2, expert_d_ff=16, num_heads=2,
            num_kv_heads=1, head_dim=8, vocab_size=32, seq_len=4, batch=8, steps=2, warmup=0)
PER_PATH_POSITIVE = ("compile_forward_s", "compile_train_step_s", "forward_s_median",
                     "train_step_s_median", "forward_tokens_per_s", "train_tokens_per_s",
                     "forward_vs_baseline", "train_vs_baseline")


def _run(tmp_path, **overrides):
  out = tmp_path / "bench.json"
  argv = ["bench_model"] + [f"--{k}={v}" for k, v in {**TINY, **overrides}.items()]
  with flagsaver.flagsaver():
    flags.FLAGS(argv + [f"--out={out}"])
    bench_model.main([])
  return json.loads(out.read_text())


def test_main_writes_expected_json(tmp_path):
  """Dropless capacity (the baseline) and a dropping capacity entry, on the 8 fake devices.

  Two entries keep it quick (compiling dominates); the paths' agreement is tested elsewhere.
  """
  result = _run(tmp_path, impls="capacity,capacity:0.5")
  assert set(result) >= {"command", "flags", "config", "machine", "baseline", "results"}
  assert result["baseline"] == "capacity"
  assert set(result["results"]) == {"capacity", "capacity:0.5"}
  assert result["config"]["tokens_per_step"] == 8 * 4
  assert result["config"]["model"]["d_model"] == 16
  machine = result["machine"]
  assert machine["cpu_count"] > 0 and machine["device_count"] == 8
  assert machine["jax"] and machine["device_kind"] and "cpu_model" in machine
  assert machine["mesh"] == result["config"]["mesh"]
  revision = common.source_revision()  # which code the numbers measured
  assert {k: machine[k] for k in revision} == revision
  for name, r in result["results"].items():
    for key in PER_PATH_POSITIVE:
      assert r[key] > 0, (name, key, r[key])
    assert len(r["forward_s_all"]) == len(r["train_step_s_all"]) == 2
  base = result["results"]["capacity"]
  assert base["forward_vs_baseline"] == base["train_vs_baseline"] == 1.0
  assert base["dropped_fraction"] == 0.0  # factor 0 = dropless
  assert result["results"]["capacity:0.5"]["capacity_factor"] == 0.5
  assert result["results"]["capacity:0.5"]["dropped_fraction"] > 0


@pytest.mark.parametrize("impls, match", [("capacity,capacity", "repeats"),
                                          ("capacity:x", "capacity factor"),
                                          ("sparse", "expert_impl")])
def test_bad_impls_fail_before_compiling(tmp_path, impls, match):
  with pytest.raises((app.UsageError, flags.ValidationError), match=match):
    _run(tmp_path, impls=impls)


@pytest.mark.parametrize("args, named", [
    (["--impls=capacity,capacity"], "--impls=capacity,capacity"),
    (["--top_k=99"], "top_k=99"),
    (["--mesh_expert=3"], "--mesh_expert=3"),
    (["--cpu_devices=3", "--mesh_expert=3", "--batch=3", "--num_experts=4"],
     "--mesh_expert=3 must divide the 3 devices and --num_experts=4"),  # was a traceback
    (["--out={file}/bench.json"], "--out="),
])
def test_bad_flags_are_one_error_line_before_any_compile(tmp_path, args, named):
  """Exit code 2 and one `error:` line naming the flag, not a traceback or the whole help; a
  --out under a file fails at once (it used to fail after the ~2 min benchmark)."""
  _cli.fails_before_work("experiments.bench_model", args, tmp_path, named)
