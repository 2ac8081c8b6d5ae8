"""The grouped expert path: block layout by hand, the block loop's gradients and bfloat16
carries, block rows, the one-einsum capacity and the run-time choice between them."""

import contextlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.models import experts as ex
from pr2_jax.models import grouped as gp
from test_experts import _random_problem, _weights


def test_grouped_positions_hand_worked():
  """Each slot's group fills whole blocks: sizes 3, 0, 1 with 2 rows -> blocks [0, 0, 2] + 2 empty.

  Slot 0 holds (t0,k0) (t1,k0) (t3,k0) at rows 0, 1, 2 (blocks 0-1); slot 2 holds
  (t2,k0) at row 4 (block 2); the k=1 picks of slot 1 are out of range (-1 -> dropped).
  """
  ids = jnp.array([[0, -1], [0, -1], [2, -1], [0, -1]], jnp.int32)
  index, keep, block_slot, used = gp.grouped_positions(ids, 3, 2)
  # B = ceil(8 / 2) + 3 = 7 blocks; 14 = B * rows marks "not placed".
  np.testing.assert_array_equal(index, [[0, 14], [1, 14], [4, 14], [2, 14]])
  np.testing.assert_array_equal(keep, [[True, False]] * 4)
  np.testing.assert_array_equal(block_slot, [0, 0, 2, 2, 2, 2, 2])
  assert int(used) == 3  # blocks 0-1 (slot 0) and 2 (slot 2); the loop stops there


def test_slot_block_ranges_hand_worked():
  """The layout above: slot 0 owns blocks [0, 2), slot 1 none, slot 2 [2, 3); the padding
  blocks 3-6 carry slot 2's label but lie past `used`."""
  start, end = gp.slot_block_ranges(jnp.array([0, 0, 2, 2, 2, 2, 2]), jnp.int32(3), 3)
  np.testing.assert_array_equal(start, [0, 2, 2])
  np.testing.assert_array_equal(end, [2, 2, 3])
  # Nothing used: every slot empty, the last one too.
  start, end = gp.slot_block_ranges(jnp.array([2, 2, 2]), jnp.int32(0), 3)
  np.testing.assert_array_equal(end - start, [0, 0, 0])


def test_block_swiglu_rejects_unsorted_blocks():
  w = _weights(jax.random.PRNGKey(0), 3, 4, 5)
  with pytest.raises(ValueError, match=r"sorted by slot, got \[1, 0, 2\]"):
    gp.block_swiglu(jnp.ones((3, 2, 4)), jnp.array([1, 0, 2]), jnp.int32(3), w)


def test_block_path_gradients_with_empty_slots():
  """Slots 1, 3, 4, 6 and 7 receive no token (and slot 0 three blocks of 2 rows): the block
  loop's weight gradients are zero for them and equal the dense path's for the others."""
  x, _, gates, w = _random_problem(n=6, seed=5)
  ids = jnp.array([[0, 2], [0, 5], [2, 0], [0, 5], [5, 0], [0, 2]], jnp.int32)
  cot = jax.random.normal(jax.random.PRNGKey(8), x.shape)
  grads = {}
  for name, fn in {"dense": ex.dense_experts, "blocks": lambda x, i, g, w: gp.grouped_experts(
      x, i, g, w, rows=2, capacity=0)}.items():
    loss = lambda x, g, w, fn=fn: jnp.sum(fn(x, ids, g, w) * cot)
    grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gates, w)
  for a, b in zip(jax.tree.leaves(grads["blocks"]), jax.tree.leaves(grads["dense"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for dw in grads["blocks"][2]:
    assert float(jnp.max(jnp.abs(dw[jnp.array([0, 2, 5])]))) > 0
    np.testing.assert_array_equal(dw[jnp.array([1, 3, 4, 6, 7])], 0.0)


def _whole_carry_converts_in_loops(hlo: str, dims: set) -> int:
  """`convert`s inside while-loop bodies (and what they call) whose result has one of `dims`."""
  comps, name = {}, None
  for line in hlo.splitlines():
    if line and not line[0].isspace() and "{" in line:
      name = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      comps[name] = []
    elif name:
      comps[name].append(line)
  called = lambda c: re.findall(r"(?:body|calls|to_apply|branch_computations)"  # noqa: E731
                                r"=\{?%?([\w.\-]+)",
                                "\n".join(comps.get(c, [])))
  todo = [b for c in comps for b in re.findall(r"body=%?([\w.\-]+)", "\n".join(comps[c]))]
  seen = set()
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo += called(c)
  shape = re.compile(r"= (?:f32|bf16)\[([\d,]+)\]\S* convert\(")
  return sum(1 for c in seen for line in comps.get(c, [])
             if (m := shape.search(line)) and tuple(map(int, m.group(1).split(","))) in dims)


def test_block_loop_keeps_bfloat16_carries_in_float32_on_cpu(monkeypatch):
  """On CPU the block loop of a bfloat16 problem carries its per-block outputs (and the
  backward's input gradient) in float32 (`config.storage_dtype`). Oracle: the same loop with
  bfloat16 carries (`storage_dtype` patched to keep the dtype): bit-equal outputs and input,
  gate and weight gradients. With bfloat16 carries XLA:CPU converted a whole carry to float32
  and back inside the loop at every block's write; now no loop converts a whole carry."""
  x, ids, gates, w = _random_problem(n=64, d=16, f=24, seed=7)
  x, gates = x.astype(jnp.bfloat16), gates.astype(jnp.bfloat16)
  w = ex.ExpertWeights(*(a.astype(jnp.bfloat16) for a in w))
  cot = jax.random.normal(jax.random.PRNGKey(9), x.shape).astype(jnp.bfloat16)
  blocks = 64 * 2 // 8 + 8  # the static bound: N*K/rows + S
  carries = {(blocks, 8, 16), (blocks, 8, 24)}

  def run():
    fn = lambda x, g, w: gp.grouped_experts(x, ids, g, w, rows=8, capacity=0)  # noqa: E731
    loss = lambda x, g, w: jnp.sum(fn(x, g, w) * cot)  # noqa: E731
    step = jax.jit(lambda x, g, w: (fn(x, g, w), jax.grad(loss, argnums=(0, 1, 2))(x, g, w)))
    hlo = step.lower(x, gates, w).compile().as_text()
    return step(x, gates, w), _whole_carry_converts_in_loops(hlo, carries)

  new, new_converts = run()
  monkeypatch.setattr(gp, "storage_dtype", jnp.dtype)
  # The module-level jit keeps its traces: drop those made with either storage_dtype.
  gp._grouped_experts.clear_cache()
  try:
    old, old_converts = run()
  finally:
    gp._grouped_experts.clear_cache()
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  assert new_converts == 0 and old_converts >= 4, (new_converts, old_converts)


@pytest.mark.parametrize("args, expected", [((4096, 16), 64), ((32, 16), 8), ((512, 16), 32)])
def test_block_rows(args, expected):
  assert gp.block_rows(*args) == expected


@pytest.mark.parametrize("args, expected", [
    ((64, 2, 16), 20),     # B=64 decode: mean 8 + 4 * sqrt(8) = 19.3
    ((2048, 2, 16), 320),  # the benchmark's train batch: 256 + 64
    ((4, 2, 16), 4),       # never more than N: then the one-einsum branch always runs
])
def test_fast_capacity(args, expected):
  assert gp.fast_capacity(*args) == expected


def test_grouped_chooses_by_the_largest_group():
  """Fits: the one-einsum branch; one slot over capacity: the blocks. Same sums either way."""
  x, ids, gates, w = _random_problem(n=16, seed=4)
  largest = int(np.bincount(np.asarray(ids).reshape(-1)).max())
  ref = ex.dense_experts(x, ids, gates, w)
  for capacity in (largest, largest - 1, 0):
    fn = jax.jit(lambda x, g, w, c=capacity: gp.grouped_experts(x, ids, g, w, capacity=c))
    y = fn(x, gates, w)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5, err_msg=str(capacity))
  jaxpr = str(jax.make_jaxpr(lambda x: gp.grouped_experts(x, ids, gates, w, capacity=largest))(x))
  assert "cond" in jaxpr and "while" in jaxpr  # chosen at run time
  jaxpr = str(jax.make_jaxpr(lambda x: gp.grouped_experts(x, ids, gates, w, capacity=16))(x))
  assert "cond" not in jaxpr and "while" not in jaxpr  # capacity N: always fits, no blocks


@contextlib.contextmanager
def count_lowerings():
  """The XLA programs built inside the block (a list that fills up). It counts lowerings, not
  compilations: a persistent compilation cache hit skips the compile but not the lowering, so a
  retrace shows even with the suite's cache warm."""
  built = []
  def listener(event, duration_secs, **kwargs):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      built.append(duration_secs)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield built
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("capacity", [0, 3, 16])  # blocks, run-time choice, one einsum
def test_eager_calls_with_the_same_shapes_compile_once(capacity):
  """Outside jit, a second call with other values builds no program: the lax.cond's branches
  and the loops' bodies were closures made per call, traced and compiled anew every time
  (1 compilation, ~1 s a call; 2 and ~3.5 s for an eager `model.apply`)."""
  x, ids, gates, w = _random_problem(n=16, seed=4)
  call = lambda x, g: gp.grouped_experts(x, ids, g, w, capacity=capacity)  # noqa: E731
  jax.block_until_ready(call(x, gates))
  x2, gates2 = x * 2, gates * 0.5  # other values, outside the count
  with count_lowerings() as built:
    y = jax.block_until_ready(call(x2, gates2))
  assert built == []
  np.testing.assert_allclose(y, ex.dense_experts(x2, ids, gates2, w), rtol=1e-4, atol=1e-5)


def test_a_group_of_every_token_overflows_capacity_n_minus_1():
  """Slot 3 takes all 6 tokens (k=0), so capacity N - 1 = 5 does not fit it: the block branch
  must run and y equal a numpy sum of g * down(silu(x gate) * (x up)). Only capacity >= N
  always fits; running the one-einsum branch at N - 1 put slot 3's sixth token at place 5,
  i.e. slot 4's place 0, mixing it into slot 4's output."""
  x, _, gates, w = _random_problem(n=6, seed=9)
  ids = jnp.array([[3, 4], [3, 0], [3, 4], [3, 7], [3, 1], [3, 4]], jnp.int32)
  y = gp.grouped_experts(x, ids, gates, w, capacity=5)
  xs, gs = np.asarray(x, np.float64), np.asarray(gates, np.float64)
  wg, wu, wd = (np.asarray(a, np.float64) for a in w)
  want = np.zeros_like(xs)
  for t, row in enumerate(np.asarray(ids)):
    for j, s in enumerate(row):
      g = xs[t] @ wg[s]
      want[t] += gs[t, j] * ((g / (1 + np.exp(-g)) * (xs[t] @ wu[s])) @ wd[s])
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
