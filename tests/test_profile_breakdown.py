"""Tests for experiments/profile_breakdown.py: the HLO metadata map, the op classification, the
trace arithmetic (hand-worked), and a real profile of a small jitted function."""

import jax
import jax.numpy as jnp
import pytest

from experiments import profile_breakdown as pb

HLO = """
%fused_dot (param_0.3: f32[4,4]) -> f32[4] {
  %param_0.3 = f32[4,4]{1,0} parameter(0)
  %dot_general.0 = f32[4,4]{1,0} dot(%param_0.3, %param_0.3), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(step)/lm_head/dot_general"}
  ROOT %reduce_sum.0 = f32[4]{0} reduce(%dot_general.0, %c), dimensions={0}, to_apply=%add, metadata={op_name="jit(step)/reduce_sum"}
}

ENTRY %main.2 (p0: f32[4,4]) -> f32[4,8] {
  %ynn_fusion.3 = f32[4,8]{1,0} fusion(%p0, %p1), kind=kCustom, metadata={op_name="jit(step)/jvp(MoETransformer)/layers_0/self_attn/q_proj/dot_general" stack_frame_id=3}
  ROOT %copy.1 = f32[4,8]{1,0} copy(%ynn_fusion.3)
  %ynn_fusion.7 = f32[8]{0} fusion(%p0), kind=kCustom, calls=%fused_dot, metadata={op_name="jit(step)/reduce_sum"}
  %reduce_scatter.9 = f32[2]{0} reduce-scatter(%x), metadata={op_name="jit(step)/layers_1/mlp/shard_map/reduce_scatter"}
}
"""


def test_op_names_reads_each_instructions_metadata():
  names = pb.op_names(HLO)
  assert names["ynn_fusion.3"] == (
      "jit(step)/jvp(MoETransformer)/layers_0/self_attn/q_proj/dot_general")
  assert names["reduce_scatter.9"] == "jit(step)/layers_1/mlp/shard_map/reduce_scatter"
  assert names["reduce_sum.0"] == "jit(step)/reduce_sum"  # inside the fused computation
  # A fusion named after its root reduction but holding a matmul is labelled by its matmul.
  assert names["ynn_fusion.7"] == "jit(step)/lm_head/dot_general"
  assert "copy.1" not in names  # no metadata


@pytest.mark.parametrize("event, op_name, kind", [
    ("while.209", "jit(step)/layers_2/mlp/shard_map/cond/branch_0_fun/while", None),
    ("conditional.8", "jit(step)/layers_0/mlp/shard_map/cond", None),
    ("ThunkExecutor::Execute", "", None),
    ("Rendezvous", "", "  waiting for the other device"),
    ("Wait: pending_threads=1/2", "", "  waiting for the other device"),
    ("all-reduce.83", "jit(step)/jvp()/reduce_sum", "  collectives"),
    ("all_gather.49", "jit(step)/layers_0/mlp/shard_map/all_gather", "  collectives"),
    ("ynn_fusion.3", "jit(step)/layers_0/self_attn/q_proj/dot_general",
     "matmuls outside attention"),
    ("ynn_fusion.255", "jit(step)/layers_0/self_attn/bgrtz,bgzs->bgrts/dot_general",
     "  its two matmuls"),
    ("dot.7", "", "matmuls outside attention"),
    ("ynn_fusion.24", "jit(step)/layers_2/mlp/shard_map/cond/branch_0_fun/while/body/dot_general",
     "matmuls outside attention"),
    ("ynn_fusion.1", "jit(step)/jvp(MoETransformer)/layers_0/self_attn/reduce_max",
     "  softmax, mask, RoPE, layouts"),
    ("copy_bitcast_fusion.2", "jit(step)/layers_1/self_attn/q_norm/add_any", "  norms"),
    ("gather_bitcast_fusion.4", "jit(step)/layers_2/mlp/shard_map/cond/branch_0_fun/gather",
     "  MoE routing, dispatch, combine"),
    ("multiply_bitcast_fusion.1", "jit(step)/layers_0/input_layernorm/mul", "  norms"),
    ("multiply_add_fusion", "jit(step)/add", "  loss, optimizer, the rest"),
    ("copy.12", "", "  loss, optimizer, the rest"),
    ("ThreadpoolListener::StartRegion", "", None), ("end: ynn_fusion", "", None),
])
def test_classify(event, op_name, kind):
  assert pb.classify(event, op_name) == kind


def _event(tid, name, dur_us):
  return {"ph": "X", "pid": 1, "tid": tid, "name": name, "dur": dur_us, "ts": 0}


def test_summarize_trace_by_hand():
  names = {"ynn_fusion.3": "x/self_attn/q_proj/dot_general",
           "ynn_fusion.4": "x/self_attn/bgrtz/dot_general", "fusion.5": "x/self_attn/exp",
           "fusion.6": "x/mlp/gather"}
  events = [
      {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "tf_XLAEigen/1"}},
      {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name", "args": {"name": "tf_XLAEigen/2"}},
      {"ph": "M", "pid": 1, "tid": 12, "name": "thread_name", "args": {"name": "python"}},
      _event(10, "ynn_fusion.3", 4000), _event(11, "ynn_fusion.3", 4000),   # 8 ms of matmul
      _event(10, "ynn_fusion.4", 2000),                                      # 2 ms attention dot
      _event(11, "fusion.5", 1000),                                          # 1 ms softmax
      _event(10, "fusion.6", 3000),                                          # 3 ms dispatch
      _event(11, "Rendezvous", 2000),                                        # 2 ms waiting
      _event(10, "while.1", 50000),          # a loop: its body's events count instead
      _event(12, "ynn_fusion.3", 90000),     # not an XLA device thread
      {"ph": "i", "pid": 1, "tid": 10, "name": "ynn_fusion.3"},  # not a complete event
  ]
  # 2 calls on 2 devices: every figure is the sum / 4.
  out = pb.summarize_trace(events, names, calls=2, devices=2)
  assert out["matmuls outside attention"] == pytest.approx(2.0)
  assert out["  its two matmuls"] == pytest.approx(0.5)
  assert out["  softmax, mask, RoPE, layouts"] == pytest.approx(0.25)
  assert out["attention core"] == pytest.approx(0.75)
  assert out["  MoE routing, dispatch, combine"] == pytest.approx(0.75)
  assert out["  waiting for the other device"] == pytest.approx(0.5)
  assert out["other"] == pytest.approx(1.25)
  assert out["total"] == pytest.approx(4.0)  # (8 + 2 + 1 + 3 + 2) / 4


@pytest.mark.parametrize("op, kind", [
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention core"),
    ("aten::_grouped_mm", "matmuls outside attention"), ("aten::mm", "matmuls outside attention"),
    ("aten::mul", "other"), ("Optimizer.step#AdamW.step", "other")])
def test_classify_torch(op, kind):
  assert pb.classify_torch(op) == kind


def test_format_table_rows_and_blank_torch_details():
  ours = {"train": {k: 1.0 for k in pb.KINDS} | {"total": 3.0}}
  torch = {"train": {"matmuls outside attention": 2.0, "attention core": 0.5, "other": 0.25,
                     "total": 2.75}}
  lines = pb.format_table(ours, torch).splitlines()
  assert lines[0] == "| ms per call | ours train | torch train |"
  assert len(lines) == 2 + len(pb.KINDS) + 1
  assert lines[2] == "| matmuls outside attention | 1.0 | 2.0 |"
  assert lines[4] == "|   its two matmuls | 1.0 |  |"   # ours only
  assert lines[-1] == "| total | 3.0 | 2.8 |"


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
