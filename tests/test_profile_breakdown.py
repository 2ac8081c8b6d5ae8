"""Tests for experiments/profile_breakdown.py: the HLO metadata map, the op classification, the
trace arithmetic (hand-worked), and a real profile of a small jitted function."""

import types

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_breakdown as pb

import _cli

# A backslash at the end of a line continues it: one instruction per line, as XLA prints them.
HLO = """
%fused_dot (param_0.3: f32[4,4]) -> f32[4] {
  %param_0.3 = f32[4,4]{1,0} parameter(0)
  %dot_general.0 = f32[4,4]{1,0} dot(%param_0.3, %param_0.3), lhs_contracting_dims={1}, \
rhs_contracting_dims={0}, metadata={op_name="jit(step)/lm_head/dot_general"}
  ROOT %reduce_sum.0 = f32[4]{0} reduce(%dot_general.0, %c), dimensions={0}, to_apply=%add, \
metadata={op_name="jit(step)/reduce_sum"}
}

ENTRY %main.2 (p0: f32[4,4]) -> f32[4,8] {
  %ynn_fusion.3 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kCustom, \
metadata={op_name="jit(step)/jvp(MoETransformer)/layers_0/self_attn/q_proj/dot_general" \
stack_frame_id=3}
  ROOT %copy.1 = f32[4,8]{1,0} copy(%ynn_fusion.3)
  %copy.2 = f32[8,4]{0,1} copy(%p1), metadata={op_name="jit(step)/lm_head/dot_general"}
  %ynn_fusion.7 = f32[8]{0} fusion(%p0), kind=kCustom, calls=%fused_dot, \
metadata={op_name="jit(step)/reduce_sum"}
  %reduce_scatter.9 = f32[2]{0} reduce-scatter(%x), \
metadata={op_name="jit(step)/layers_1/mlp/shard_map/reduce_scatter"}
}
"""


def test_parse_hlo_reads_metadata_and_finds_matmuls_by_opcode():
  names, matmuls = pb.parse_hlo(HLO)
  assert names["ynn_fusion.3"] == (
      "jit(step)/jvp(MoETransformer)/layers_0/self_attn/q_proj/dot_general")
  assert names["reduce_scatter.9"] == "jit(step)/layers_1/mlp/shard_map/reduce_scatter"
  assert names["reduce_sum.0"] == "jit(step)/reduce_sum"  # inside the fused computation
  # A fusion named after its root reduction but holding a matmul is labelled by its matmul.
  assert names["ynn_fusion.7"] == "jit(step)/lm_head/dot_general"
  assert "copy.1" not in names  # no metadata
  # Matmuls by opcode: the dot, the fusion calling it; not a copy carrying a dot's op_name,
  # nor a fusion whose op_name says dot_general but holds none.
  assert matmuls == {"dot_general.0", "ynn_fusion.7"}


@pytest.mark.parametrize("event, op_name, is_matmul, kind", [
    ("while.209", "jit(step)/layers_2/mlp/shard_map/cond/branch_0_fun/while", False,
     "  MoE routing, dispatch, combine"),   # a loop's own time, outside its body's ops
    ("ThunkExecutor::Execute", "", False, None),
    ("ThreadpoolListener::StartRegion", "", False, None), ("end: ynn_fusion", "", False, None),
    ("Rendezvous", "", False, "  waiting for the other device"),
    ("Wait: pending_threads=1/2", "", False, "  waiting for the other device"),
    ("all-reduce.83", "jit(step)/jvp()/reduce_sum", False, "  collectives"),
    ("all_gather.49", "jit(step)/layers_0/mlp/shard_map/all_gather", False, "  collectives"),
    ("ynn_fusion.3", "jit(step)/layers_0/self_attn/q_proj/dot_general", True,
     "matmuls outside attention"),
    ("ynn_fusion.255", "jit(step)/layers_0/self_attn/bgrtz,bgzs->bgrts/dot_general", True,
     "  its two matmuls"),
    ("copy.5", "jit(step)/layers_0/self_attn/bgrtz,bgzs->bgrts/dot_general", False,
     "  softmax, mask, RoPE, layouts"),     # a layout copy for a matmul is not one
    ("ynn_fusion.24", "jit(step)/layers_2/mlp/shard_map/cond/branch_0_fun/while/body/dot_general",
     True, "matmuls outside attention"),
    ("ynn_fusion.1", "jit(step)/jvp(MoETransformer)/layers_0/self_attn/reduce_max", False,
     "  softmax, mask, RoPE, layouts"),
    ("copy_bitcast_fusion.2", "jit(step)/layers_1/self_attn/q_norm/add_any", False, "  norms"),
    ("gather_bitcast_fusion.4", "jit(step)/layers_2/mlp/shard_map/cond/branch_0_fun/gather",
     False, "  MoE routing, dispatch, combine"),
    ("multiply_bitcast_fusion.1", "jit(step)/layers_0/input_layernorm/mul", False, "  norms"),
    ("multiply_add_fusion", "jit(step)/add", False, "  loss, optimizer, the rest"),
    ("copy.12", "", False, "  loss, optimizer, the rest"),
])
def test_classify(event, op_name, is_matmul, kind):
  assert pb.classify(event, op_name, is_matmul) == kind


def _event(tid, name, ts_us, dur_us):
  return {"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts_us, "dur": dur_us}


def test_self_times_subtract_nested_events():
  """A collective holds its rendezvous, which holds the wait: each keeps only its own time."""
  events = [_event(1, "all-reduce.2", 0, 500), _event(1, "Rendezvous", 100, 300),
            _event(1, "Wait", 120, 270), _event(1, "fusion.1", 600, 50),
            _event(2, "fusion.2", 100, 40)]  # another thread: not inside anything
  got = {e["name"]: t for e, t in pb.self_times(events)}
  assert got == {"all-reduce.2": 200, "Rendezvous": 30, "Wait": 270, "fusion.1": 50,
                 "fusion.2": 40}


TRACE = [  # two XLA threads and a Python one; µs
    {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
    {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "tf_XLAEigen/2"}},
    {"ph": "M", "pid": 1, "tid": 12, "name": "thread_name", "args": {"name": "python"}},
    _event(10, "ynn_fusion.3", 0, 4000), _event(11, "ynn_fusion.3", 0, 4000),  # 8 ms matmul
    _event(10, "while.1", 5000, 6000),       # a loop: 1 ms of its own around its body's 5 ms
    _event(10, "ynn_fusion.4", 5000, 2000),                                # 2 ms attention dot
    _event(10, "fusion.6", 7000, 3000),                                    # 3 ms dispatch
    _event(11, "fusion.5", 5000, 1000),                                    # 1 ms softmax
    _event(11, "all-reduce.1", 7000, 3000),  # 1 ms of its own around 2 ms of waiting
    _event(11, "Rendezvous", 7500, 2000),
    _event(10, "ThunkExecutor::Execute", 0, 20000),  # bookkeeping: not counted
    _event(12, "ynn_fusion.3", 0, 90000),     # not an XLA device thread
    {"ph": "i", "pid": 1, "tid": 10, "name": "ynn_fusion.3", "ts": 0},  # not a complete event
]


def test_summarize_trace_by_hand():
  names = {"ynn_fusion.3": "x/self_attn/q_proj/dot_general",
           "ynn_fusion.4": "x/self_attn/bgrtz/dot_general", "fusion.5": "x/self_attn/exp",
           "fusion.6": "x/mlp/gather", "while.1": "x/mlp/while"}
  matmuls = {"ynn_fusion.3", "ynn_fusion.4"}
  # 2 calls on 2 devices: every figure is the sum / 4.
  out = pb.summarize_trace(TRACE, names, matmuls, calls=2, devices=2)
  assert out["matmuls outside attention"] == pytest.approx(2.0)
  assert out["  its two matmuls"] == pytest.approx(0.5)
  assert out["  softmax, mask, RoPE, layouts"] == pytest.approx(0.25)
  assert out["attention core"] == pytest.approx(0.75)
  assert out["  MoE routing, dispatch, combine"] == pytest.approx(1.0)   # (3 + 1) / 4
  assert out["  collectives"] == pytest.approx(0.25)
  assert out["  waiting for the other device"] == pytest.approx(0.5)
  assert out["other"] == pytest.approx(1.75)
  assert out["total"] == pytest.approx(4.5)  # (8 + 2 + 1 + 3 + 1 + 1 + 2) / 4


def test_concurrency_by_hand():
  """Thread 10 runs ops over [0, 4] and [5, 10] ms (the loop around them is no op of its own),
  thread 11 over [0, 4], [5, 6] and [7, 10] less its rendezvous [7.5, 9.5]: nothing runs over
  [4, 5]; one thread alone over [6, 7] and [7.5, 9.5]. Per call of 2."""
  assert pb.concurrency(TRACE, calls=2) == pytest.approx(
      {"no op running": 0.5, "one op running": 1.5})


@pytest.mark.parametrize("op, kind", [
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention core"),
    ("aten::_grouped_mm", "matmuls outside attention"), ("aten::mm", "matmuls outside attention"),
    # the projections with a bias and the batched ones are matmuls too
    ("aten::addmm", "matmuls outside attention"), ("aten::bmm", "matmuls outside attention"),
    ("aten::baddbmm", "matmuls outside attention"),
    ("aten::mul", "other"), ("Optimizer.step#AdamW.step", "other")])
def test_classify_torch(op, kind):
  assert pb.classify_torch(op) == kind


def test_torch_breakdown_by_hand(monkeypatch):
  """The profiler's self CPU µs of each op, summed by kind and divided by the calls (2), and
  the wall time per call, from a fake profiler and clock: each call takes 5 ms."""
  import torch.profiler
  averages = [("aten::mm", 3000), ("aten::addmm", 1000), ("aten::mul", 500),
              ("aten::_scaled_dot_product_flash_attention_for_cpu", 2000),
              ("Optimizer.step#AdamW.step", 1500)]

  class Profile:
    def __init__(self, activities):
      pass

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      return False

    def key_averages(self):
      return [types.SimpleNamespace(key=k, self_cpu_time_total=us) for k, us in averages]

  now = [0.0]
  monkeypatch.setattr(torch.profiler, "profile", Profile)
  monkeypatch.setattr(pb, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
  out = pb.torch_breakdown(lambda: now.__setitem__(0, now[0] + 5e-3), calls=2)
  assert out == pytest.approx({"matmuls outside attention": 2.0, "attention core": 1.0,
                               "other": 1.0, "total": 4.0, "wall": 5.0})


def test_format_table_rows_and_blank_torch_details():
  ours = {"train": {k: 1.0 for k in pb.KINDS} | {"total": 3.0, "wall": 4.0}}
  torch = {"train": {"matmuls outside attention": 2.0, "attention core": 0.5, "other": 0.25,
                     "total": 2.75, "wall": 3.5}}
  lines = pb.format_table(ours, torch).splitlines()
  assert lines[0] == "| ms per call | ours train | torch train |"
  assert len(lines) == 2 + len(pb.KINDS) + 2
  assert lines[2] == "| matmuls outside attention | 1.0 | 2.0 |"
  assert lines[4] == "|   its two matmuls | 1.0 |  |"   # ours only
  assert lines[-2] == "| op time, all kinds | 3.0 | 2.8 |"
  assert lines[-1] == "| wall time of a profiled call | 4.0 | 3.5 |"
  ours["train"].update({"no op running": 0.5, "one op running": 1.5})  # ours only
  lines = pb.format_table(ours, torch).splitlines()
  assert lines[-3:] == ["| wall time of a profiled call | 4.0 | 3.5 |",
                        "| &nbsp;&nbsp;of it with no op running | 0.5 |  |",
                        "| &nbsp;&nbsp;of it with exactly one op running | 1.5 |  |"]


def test_jax_breakdown_of_a_real_profile():
  """A jitted matmul then a reduction, profiled on one device: the matmul's time is found by its
  HLO metadata, and the kinds add up to the total."""
  x = jnp.ones((256, 256), jnp.float32)
  f = jax.jit(lambda a: jnp.sum(jnp.tanh(a @ a), axis=0)).lower(x).compile()
  f(x).block_until_ready()
  out = pb.jax_breakdown(lambda: f(x).block_until_ready(), f, calls=3, devices=1)
  assert out["matmuls outside attention"] > 0
  assert out["total"] == pytest.approx(
      out["matmuls outside attention"] + out["attention core"] + out["other"])
  assert out["  collectives"] == out["  waiting for the other device"] == 0.0
  assert out["wall"] > 0
  # One device: at most one op at a time, and idle time only inside the profiled span.
  assert 0 <= out["no op running"] and 0 < out["one op running"] <= out["wall"]


def test_run_as_a_command_it_says_it_is_a_library():
  _cli.says_it_is_a_library("experiments.profile_breakdown", "experiments.bench_peer")
