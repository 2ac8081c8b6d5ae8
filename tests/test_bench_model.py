"""Tests for experiments/bench_model.py: a minuscule run writes a complete JSON.

No assertions on timings: only that every figure exists and is positive, and that the figures
are what the recorded times give (by hand on made-up times: medians, ratios, the table).
"""

import json

import numpy as np
import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import bench_model, common
from pr2_jax.config import ModelConfig

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
    # tokens/s of this run: 8 x 4 tokens over the median recorded time (by hand: below)
    assert r["forward_tokens_per_s"] == pytest.approx(32 / np.median(r["forward_s_all"]))
    assert r["train_tokens_per_s"] == pytest.approx(32 / np.median(r["train_step_s_all"]))
  base = result["results"]["capacity"]
  assert base["forward_vs_baseline"] == base["train_vs_baseline"] == 1.0
  assert base["dropped_fraction"] == 0.0  # factor 0 = dropless
  assert result["results"]["capacity:0.5"]["capacity_factor"] == 0.5
  assert result["results"]["capacity:0.5"]["dropped_fraction"] > 0


@pytest.mark.parametrize("impls, match", [("capacity,capacity", "repeats"),
                                          ("capacity:x", "capacity factor"),
                                          ("capacity,dense:2", "only the capacity path"),
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


def _path(impl, forward_ms, train_ms, dropped=0, **config):
  """A PathBench with recorded times (ms) and no model: what `result` reads."""
  b = object.__new__(bench_model.PathBench)
  b.impl, b.dropped = impl, np.asarray(dropped)
  b.config = ModelConfig(vocab_size=32, num_layers=3, d_model=16, num_heads=2, num_kv_heads=1,
                         head_dim=8, expert_d_ff=16, num_experts=4, top_k=2, **config)
  b.compile_forward_s, b.compile_train_s, b.forward_flops, b.train_flops = 1.5, 2.5, 10.0, 30.0
  b.forward_times = [t / 1e3 for t in forward_ms]
  b.train_times = [t / 1e3 for t in train_ms]
  return b


def test_result_ratios_and_table_by_hand():
  """tokens/s = tokens per step / the MEDIAN time, ratios = path / baseline tokens/s (above 1:
  faster than capacity), the dropped fraction of tokens x top_k x MoE layers (not all layers),
  and each table column shows its own figure."""
  results = {
      "ragged": _path("ragged", [10, 40, 20], [50, 80, 100]).result(tokens=64),
      # 2 of its 3 layers are MoE (layer 0 dense): 64 tokens x top-2 x 2 layers = 256
      # assignments, 32 dropped
      "capacity": _path("capacity", [10, 80, 40], [200, 50, 100], dropped=[20, 12],
                        capacity_factor=0.5, dense_layers=(0,), dense_d_ff=16).result(tokens=64)}
  ragged, cap = results["ragged"], results["capacity"]
  assert ragged["forward_s_median"] == pytest.approx(0.020)  # not the mean, 0.0233
  assert ragged["forward_tokens_per_s"] == pytest.approx(64 / 0.020)
  assert ragged["train_tokens_per_s"] == pytest.approx(64 / 0.080)
  assert cap["forward_tokens_per_s"] == pytest.approx(64 / 0.040)
  assert cap["train_tokens_per_s"] == pytest.approx(64 / 0.100)
  assert cap["dropped_fraction"] == pytest.approx(32 / 256) and ragged["dropped_fraction"] == 0
  assert (cap["compile_forward_s"], cap["compile_train_step_s"]) == (1.5, 2.5)
  assert (cap["xla_flops_forward"], cap["xla_flops_train_step"]) == (10.0, 30.0)
  assert cap["capacity_factor"] == 0.5 and cap["expert_impl"] == "capacity"
  # 'capacity' is the baseline even when it is not the first path
  assert bench_model.add_ratios(results) == "capacity"
  assert ragged["forward_vs_baseline"] == pytest.approx(2.0)   # 20 ms against 40 ms
  assert ragged["train_vs_baseline"] == pytest.approx(1.25)    # 80 ms against 100 ms
  assert cap["forward_vs_baseline"] == cap["train_vs_baseline"] == 1.0
  lines = bench_model.format_table(results, "capacity").splitlines()
  assert lines[0] == ("| impl | compile fwd (s) | compile train (s) | fwd tok/s | train tok/s "
                      "| fwd vs capacity | train vs capacity | dropped |")
  assert lines[2] == "| ragged | 1.5 | 2.5 | 3,200 | 800 | 2.00x | 1.25x | 0.0% |"
  assert lines[3] == "| capacity | 1.5 | 2.5 | 1,600 | 640 | 1.00x | 1.00x | 12.5% |"
  # Without 'capacity', the first path is the baseline.
  del results["capacity"]
  assert bench_model.add_ratios(results) == "ragged" and ragged["forward_vs_baseline"] == 1.0


class _Recorder:
  """Stands in for PathBench in bench_paths: records which rounds it was asked to record."""
  rounds = []

  def __init__(self, entry, mesh):
    self.impl, self.compile_forward_s, self.compile_train_s = entry, 0.0, 0.0

  def time_round(self, record: bool):
    _Recorder.rounds.append((self.impl, record))

  def result(self, tokens: int) -> dict:
    return {"tokens": tokens}


def test_bench_paths_rounds_are_round_robin_after_the_warm_up(monkeypatch):
  """--warmup rounds unrecorded, then --steps recorded ones, each round over every path in
  turn (so load changes hit all paths alike); tokens per step = batch x seq_len."""
  monkeypatch.setattr(bench_model, "PathBench", _Recorder)
  monkeypatch.setattr(_Recorder, "rounds", [])
  with flagsaver.flagsaver():
    flags.FLAGS(["bench_model", "--impls=capacity,dense", "--warmup=2", "--steps=3", "--batch=8",
                 "--seq_len=4"])
    got = bench_model.bench_paths(mesh=None)
  assert got == {"capacity": {"tokens": 32}, "dense": {"tokens": 32}}
  assert _Recorder.rounds == [(impl, i >= 2) for i in range(5) for impl in ("capacity", "dense")]
