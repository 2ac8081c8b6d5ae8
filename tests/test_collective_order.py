"""Tests for pr2_jax.parallel.collective_order: collectives a program may start out of order."""

import glob
import subprocess

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pr2_jax.parallel import collective_order as co

import _rl_subprocess as sub

# A hand-written module: a loop that runs an all-reduce, an all-gather beside it, a second loop
# that reads both (ordered after them) and a gather with a control edge from that loop. Types with tuples, ROOT and a control
# edge as XLA prints them.
HLO = """HloModule m, entry_computation_layout={(f32[4]{0})->f32[8]{0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %p = (s32[], f32[4]{0}) parameter(0)
  %v = f32[4]{0} get-tuple-element((s32[], f32[4]{0}) %p), index=1
  %ar = f32[4]{0} all-reduce(f32[4]{0} %v), replica_groups={{0,1}}, to_apply=%add
  %i = s32[] get-tuple-element((s32[], f32[4]{0}) %p), index=0
  ROOT %t = (s32[], f32[4]{0}) tuple(s32[] %i, f32[4]{0} %ar)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  %p = (s32[], f32[4]{0}) parameter(0)
  ROOT %c = pred[] constant(false)
}

ENTRY %main (x: f32[4]) -> f32[8] {
  %x = f32[4]{0} parameter(0)
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(s32[] %zero, f32[4]{0} %x)
  %loop = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init), condition=%cond, body=%body
  %ag = f32[8]{0} all-gather(f32[4]{0} %x), replica_groups={{0,1}}, dimensions={0}
  %ag4 = f32[4]{0} slice(f32[8]{0} %ag), slice={[0:4]}
  %i2 = s32[] get-tuple-element((s32[], f32[4]{0}) %loop), index=0
  %init2 = (s32[], f32[4]{0}) tuple(s32[] %i2, f32[4]{0} %ag4)
  %after = (s32[], f32[4]{0}) while((s32[], f32[4]{0}) %init2), condition=%cond, body=%body
  %ordered = f32[8]{0} all-gather(f32[4]{0} %x), replica_groups={{0,1}}, dimensions={0}, control-predecessors={%after}
  ROOT %out = f32[8]{0} add(f32[8]{0} %ag, f32[8]{0} %ordered)
}
"""


def test_parse_hlo_reads_operands_calls_and_control_edges():
  comps = co.parse_hlo(HLO)
  assert list(comps) == ["add", "body", "cond", "main"]
  main = {i.name: i for i in comps["main"]}
  assert main["loop"] == co.Instruction("loop", "while", ("init",), ("cond", "body"))
  assert main["ordered"].operands == ("x", "after")
  assert main["ag"].opcode == "all-gather" and main["out"].operands == ("ag", "ordered")
  assert {i.name: i.opcode for i in comps["body"]}["t"] == "tuple"


def test_a_loop_beside_an_independent_collective_is_reported_a_dependence_is_not():
  """`loop` and `ag` can start in either order; `after` reads both, `ordered` waits for
  `after` by a control edge, and the all-reduce inside the body is alone in its computation."""
  assert co.unordered_collectives(HLO) == [co.UnorderedPair("main", "loop", "ag")]


def test_text_without_a_computation_is_refused():
  with pytest.raises(ValueError, match="no HLO computation"):
    co.unordered_collectives("not an HLO module")


def _compiled_text(body, mesh):
  fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("a", "b"),) * 2, out_specs=P(),
                             check_vma=False))
  x = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("a", "b")))
  return fn.lower(x, x).compile().as_text()


def _loop(y, n=3):
  def step(c):
    k, acc = c
    return k + 1, acc + jax.lax.psum(y * k, ("a", "b"))
  return jax.lax.while_loop(lambda c: c[0] < n, step, (0, jnp.zeros_like(y)))[1]


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_compiled_loop_beside_a_gather_is_reported(mesh):
  """The program that aborted 4 runs in 9 on 8 fake devices (jaxlib 0.10.2, 300 calls a
  run): a gather and a loop's psum over the same 8 devices, neither needing the other."""
  def body(x, y):
    return jax.lax.all_gather(x, ("a", "b"), tiled=True).sum() + _loop(y).sum()
  pairs = co.unordered_collectives(_compiled_text(body, mesh))
  assert len(pairs) == 1 and any(name.startswith("while") for name in pairs[0][1:])


def test_compiled_loop_that_reads_the_gather_is_ordered(mesh):
  def body(x, y):
    gathered = jax.lax.all_gather(x, ("a", "b"), tiled=True).sum()
    return gathered + _loop(y + gathered).sum()
  assert co.unordered_collectives(_compiled_text(body, mesh)) == []


def test_collectives_outside_loops_are_left_to_xla(mesh):
  """XLA:CPU keeps one computation's collectives and branches in program order: two psums of
  different groups and a switch over psums ran 300 calls in each of 3 runs without a hang."""
  def body(x, y):
    branch = jax.lax.switch(jnp.int32(0), [lambda v: jax.lax.psum(v, "b"),
                                           lambda v: jax.lax.psum(2 * v, "b")], y)
    return jax.lax.psum(x, "a").sum() + jax.lax.psum(y, "b").sum() + branch.sum()
  assert co.unordered_collectives(_compiled_text(body, mesh)) == []


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"rl.replay_mode": "r2", "rl.balance_mode": "eplb_step"},
    {"rl.replay_mode": "pr2", "rl.balance_mode": "foresight", "model.fsdp": True},
], ids=["r2-eplb_step", "pr2-foresight-fsdp"])
def test_every_program_of_an_rl_step_on_8_devices_is_ordered(tmp_path, overrides):
  """One RL step of the balance modes on 8 devices, experts split 4 ways: XLA dumps every
  program it compiles, and none holds a loop of collectives beside an unordered collective.
  Before the balance analysis gathered its inputs up front, `_analyse` had two."""
  dump = tmp_path / "dump"
  settings = {"sft.num_steps": 1, "rl.num_steps": 1, "rl.prompts_per_step": 4,
              "rl.eval_every": 0, "rl.eval_size": 32, "mesh_expert": 4, **overrides}
  env = sub.environment(XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_as_text")
  proc = subprocess.run(sub.command(str(tmp_path / "run"), settings, ("--cpu_devices=8",)),
                        cwd=sub.REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  modules = sorted(glob.glob(str(dump / "*after_optimizations.txt")))
  names = " ".join(modules)
  assert "update_step" in names and "_analyse" in names and "generate" in names
  found = {m.rsplit("/", 1)[1]: co.unordered_collectives(open(m).read()) for m in modules}
  assert {m: pairs for m, pairs in found.items() if pairs} == {}
