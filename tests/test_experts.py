"""Shard-local expert paths: capacity dropping by hand, the three paths agree, slot maps,
capacity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.models import experts as ex
from pr2_jax.models import grouped as gp


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _np_expert(x_D, w: ex.ExpertWeights, s):
  """numpy SwiGLU of one slot: down(silu(x gate) * (x up))."""
  gate, up, down = (np.asarray(a, np.float64)[s] for a in w)
  return (_silu(x_D @ gate) * (x_D @ up)) @ down


def _weights(key, slots, d, f, scale=0.3):
  k1, k2, k3 = jax.random.split(key, 3)
  return ex.ExpertWeights(jax.random.normal(k1, (slots, d, f)) * scale,
                          jax.random.normal(k2, (slots, d, f)) * scale,
                          jax.random.normal(k3, (slots, f, d)) * scale)


def _capacity_path(x, slot_ids, gates, w, capacity):
  """capacity_positions -> dispatch -> swiglu -> combine on one shard; returns (y, keep)."""
  num_slots = w.gate_SDF.shape[0]
  index, keep = ex.capacity_positions(slot_ids, num_slots, capacity)
  buf = ex.dispatch(x, index, num_slots * capacity).reshape(num_slots, capacity, -1)
  y = ex.swiglu(buf, w).reshape(num_slots * capacity, -1)
  return ex.combine(y, index, keep, gates), keep


# Hand-worked example: 4 tokens, 2 slots, k=2, capacity 2.
# k-major order: 1st choices t0->0, t1->0, t2->1, t3->0,
# then 2nd choices t0->1, t1->1, t2->0, t3->1.
# slot 0 fills with (t0,k0) pos 0, (t1,k0) pos 1; (t3,k0) and (t2,k1) are dropped.
# slot 1 fills with (t2,k0) pos 0, (t0,k1) pos 1; (t1,k1) and (t3,k1) are dropped.
HAND_SLOTS = np.array([[0, 1], [0, 1], [1, 0], [0, 1]], np.int32)
HAND_KEEP = np.array([[True, True], [True, False], [True, False], [False, False]])
HAND_INDEX = np.array([[0, 3], [1, 4], [2, 4], [4, 4]], np.int32)  # 4 = X*C means "dropped"


def test_capacity_positions_hand_worked():
  """First choices take priority: which (token, k) pairs are kept and where they go."""
  index, keep = ex.capacity_positions(jnp.asarray(HAND_SLOTS), 2, 2)
  np.testing.assert_array_equal(keep, HAND_KEEP)
  np.testing.assert_array_equal(index, HAND_INDEX)
  assert int(jnp.sum(~keep)) == 4


def test_capacity_positions_dropless_when_capacity_is_tokens():
  """Capacity = tokens never drops (a token picks distinct slots) and places are unique."""
  rng = np.random.default_rng(0)
  ids = np.stack([rng.permutation(8)[:3] for _ in range(10)]).astype(np.int32)
  index, keep = ex.capacity_positions(jnp.asarray(ids), 8, 10)
  assert bool(jnp.all(keep))
  assert len(np.unique(np.asarray(index))) == ids.size
  np.testing.assert_array_equal(np.asarray(index) // 10, ids)


# "No slot" (moe_experts' id for padding): id 2 = num_slots. Capacity 2, k-major arrival:
# 1st choices t1 -> slot 0 pos 0, t3 -> slot 1 pos 0; 2nd choices t1 -> slot 1 pos 1,
# t3 -> slot 0 pos 1. Tokens 0 and 2 take no place: their rank is -1, which was kept at
# index 2 * 2 - 1 = 3, t1's 2nd-choice place.
NO_SLOT_IDS = np.array([[2, 2], [0, 1], [2, 2], [1, 0]], np.int32)


def test_capacity_positions_give_no_slot_ids_no_place():
  index, keep = ex.capacity_positions(jnp.asarray(NO_SLOT_IDS), 2, 2)
  np.testing.assert_array_equal(keep, [[False, False], [True, True], [False, False], [True, True]])
  np.testing.assert_array_equal(index, [[4, 4], [0, 3], [4, 4], [2, 1]])
  x = jnp.arange(1.0, 5.0)[:, None] * jnp.ones((1, 3))  # row t = t+1
  np.testing.assert_array_equal(ex.dispatch(x, index, 4)[:, 0], [2.0, 4.0, 4.0, 2.0])
  key = jax.random.PRNGKey(5)
  w = _weights(key, 2, 3, 4)
  gates = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
  y, _ = _capacity_path(jax.random.normal(key, (4, 3)), jnp.asarray(NO_SLOT_IDS), gates, w, 2)
  xn = np.asarray(jax.random.normal(key, (4, 3)), np.float64)
  expected = np.stack([np.zeros(3),
                       0.6 * _np_expert(xn[1], w, 0) + 0.4 * _np_expert(xn[1], w, 1),
                       np.zeros(3),
                       0.5 * _np_expert(xn[3], w, 1) + 0.5 * _np_expert(xn[3], w, 0)])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_every_path_skips_the_no_slot_id():
  """Id 8 of 8 slots (no slot) contributes nothing on every path: the output is the numpy
  sum over the other assignments only."""
  x, ids, gates, w = _random_problem(seed=3)
  ids = np.asarray(ids).copy()
  ids[:5] = 8
  ids[6, 1] = 8
  xn, gn = np.asarray(x, np.float64), np.asarray(gates, np.float64)
  expected = np.stack([sum(gn[t, j] * _np_expert(xn[t], w, ids[t, j]) for j in range(2)
                           if ids[t, j] < 8) + np.zeros(8) for t in range(16)])
  for name, fn in _paths(16).items():
    y = jax.jit(fn)(x, jnp.asarray(ids), gates, w)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(y[:5], 0.0, err_msg=name)


def test_dispatch_fills_buffers_hand_worked():
  """Slot 0's buffer holds x0, x1; slot 1's holds x2, x0 (order of arrival)."""
  x = jnp.arange(4, dtype=jnp.float32)[:, None] * jnp.ones((1, 3)) + 1.0  # row t = t+1
  buf = ex.dispatch(x, jnp.asarray(HAND_INDEX), 4)
  np.testing.assert_array_equal(buf[:, 0], [1.0, 2.0, 3.0, 1.0])
  # Capacity 3: slot 0 gets x0, x1, x3 (t2's 2nd choice is dropped); slot 1 gets x2, x0, x1.
  index, _ = ex.capacity_positions(jnp.asarray(HAND_SLOTS), 2, 3)
  np.testing.assert_array_equal(ex.dispatch(x, index, 6)[:, 0], [1.0, 2.0, 4.0, 3.0, 1.0, 2.0])
  # Unfilled places stay zero: tokens 0 and 1 alone fill 2 of each slot's 3 places.
  index, _ = ex.capacity_positions(jnp.asarray(HAND_SLOTS[:2]), 2, 3)
  np.testing.assert_array_equal(ex.dispatch(x[:2], index, 6)[:, 0], [1.0, 2.0, 0.0, 1.0, 2.0, 0.0])


def test_capacity_combine_hand_worked():
  """Output = Σ over kept (token, k) of gate · expert(x); token 3 (all dropped) gets zeros."""
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (4, 6))
  w = _weights(jax.random.PRNGKey(1), 2, 6, 5)
  gates = jnp.array([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.5, 0.5]])
  y, keep = _capacity_path(x, jnp.asarray(HAND_SLOTS), gates, w, capacity=2)
  np.testing.assert_array_equal(keep, HAND_KEEP)
  xn = np.asarray(x, np.float64)
  expected = np.stack([
      0.7 * _np_expert(xn[0], w, 0) + 0.3 * _np_expert(xn[0], w, 1),
      0.6 * _np_expert(xn[1], w, 0),
      0.9 * _np_expert(xn[2], w, 1),
      np.zeros(6),
  ])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_swiglu_matches_numpy():
  """swiglu over [S, C, D] buffers = per-slot numpy SwiGLU."""
  w = _weights(jax.random.PRNGKey(2), 3, 4, 6)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 4))
  y = ex.swiglu(x, w)
  xn = np.asarray(x, np.float64)
  expected = np.stack([np.stack([_np_expert(xn[s, c], w, s) for c in range(5)]) for s in range(3)])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def _random_problem(n=16, d=8, f=12, e=8, k=2, seed=0):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.permutation(e)[:k] for _ in range(n)]).astype(np.int32)
  x = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  gates = jnp.asarray(rng.uniform(0.1, 1.0, size=(n, k)).astype(np.float32))
  return x, jnp.asarray(ids), gates, _weights(jax.random.PRNGKey(seed), e, d, f)


def _paths(n):
  return {
      "capacity": lambda x, ids, g, w: _capacity_path(x, ids, g, w, capacity=n)[0],
      "dense": ex.dense_experts,
      "ragged": ex.ragged_experts,
      "grouped": gp.grouped_experts,             # capacity 12 = fast_capacity(16, 2, 8) < 16
      "grouped:4": lambda x, ids, g, w: gp.grouped_experts(x, ids, g, w, rows=4, capacity=0),
      # capacity 1 never fits: the run-time choice takes the blocks (of 8 rows) instead
      "grouped:fallback": lambda x, ids, g, w: gp.grouped_experts(x, ids, g, w, capacity=1),
  }


def test_three_paths_agree_forward_and_oracle():
  """Dropless capacity, dense and ragged give the same output, equal to a numpy loop."""
  x, ids, gates, w = _random_problem()
  xn, idn, gn = np.asarray(x, np.float64), np.asarray(ids), np.asarray(gates, np.float64)
  expected = np.stack([sum(gn[t, j] * _np_expert(xn[t], w, idn[t, j]) for j in range(2))
                       for t in range(16)])
  for name, fn in _paths(16).items():
    y = jax.jit(fn)(x, ids, gates, w)
    assert y.dtype == jnp.float32, name
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_three_paths_agree_gradients():
  """Gradients w.r.t. x, gates and all expert weights agree across the three paths."""
  x, ids, gates, w = _random_problem(seed=1)
  cot = jax.random.normal(jax.random.PRNGKey(7), x.shape)
  grads = {}
  for name, fn in _paths(16).items():
    loss = lambda x, g, w, fn=fn: jnp.sum(fn(x, ids, g, w) * cot)
    grads[name] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gates, w)
  ref = jax.tree.leaves(grads["dense"])
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in ref)
  for name in ("capacity", "ragged", "grouped", "grouped:4", "grouped:fallback"):
    for a, b in zip(jax.tree.leaves(grads[name]), ref):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("fn", [ex.dense_experts, ex.ragged_experts, gp.grouped_experts])
def test_slot_offset_splits_the_work(fn):
  """Running slots [0,4) and [4,8) with slot_offset and summing equals running all 8."""
  x, ids, gates, w = _random_problem(seed=2)
  lo = ex.ExpertWeights(*(a[:4] for a in w))
  hi = ex.ExpertWeights(*(a[4:] for a in w))
  full = fn(x, ids, gates, w)
  parts = fn(x, ids, gates, lo, slot_offset=0) + fn(x, ids, gates, hi, slot_offset=4)
  np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-6)
  # An assignment outside the shard's slots contributes nothing.
  only_hi = fn(x, jnp.full_like(ids, 1), gates, hi, slot_offset=4)
  np.testing.assert_array_equal(only_hi, jnp.zeros_like(only_hi))


def test_capacity_dropping_loses_only_dropped_contributions():
  """With a small capacity the output equals the dense path with dropped gates zeroed."""
  x, ids, gates, w = _random_problem(n=16, seed=3)
  y, keep = _capacity_path(x, ids, gates, w, capacity=2)
  assert 0 < int(jnp.sum(~keep)) < ids.size
  ref = ex.dense_experts(x, ids, jnp.where(keep, gates, 0.0), w)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_expert_to_slot_with_replicas():
  """Each expert maps to the first slot holding it, replicas are ignored by default."""
  slot_expert = jnp.array([2, 0, 1, 0, 3, 2], jnp.int32)  # expert 0 in slots 1,3; 2 in 0,5
  ids = jnp.array([[0, 1], [2, 3], [3, 0]], jnp.int32)
  np.testing.assert_array_equal(ex.expert_to_slot(ids, slot_expert, 4), [[1, 2], [0, 4], [4, 1]])
  identity = jnp.arange(4, dtype=jnp.int32)
  np.testing.assert_array_equal(ex.expert_to_slot(ids, identity, 4), ids)


def test_expert_to_slot_rejects_bad_maps_and_ids():
  """Concrete inputs are checked: argmax over an all-False row used to send an expert
  without a slot to slot 0; under jit (tracers) only the static rank check runs."""
  ids = jnp.array([[0, 1], [2, 3]], jnp.int32)
  with pytest.raises(ValueError, match=r"slot_expert_X has no slot for expert\(s\) \[1, 3\] of "
                                       r"num_experts=4"):
    ex.expert_to_slot(ids, jnp.array([0, 2, 0, 2], jnp.int32), 4)
  with pytest.raises(ValueError, match=r"slot_expert_X\[2\] = 7 is outside \[0, num_experts=4\)"):
    ex.expert_to_slot(ids, jnp.array([0, 1, 7, 2, 3], jnp.int32), 4)
  with pytest.raises(ValueError, match=r"slot_expert_X\[1\] = -1 is outside"):
    ex.expert_to_slot(ids, jnp.array([0, -1, 1, 2, 3], jnp.int32), 4)
  with pytest.raises(ValueError, match=r"expert_ids_NK\[1, 1\] = 4 is outside "
                                       r"\[0, num_experts=4\)"):
    ex.expert_to_slot(jnp.array([[0, 1], [2, 4]], jnp.int32), jnp.arange(4, dtype=jnp.int32), 4)
  with pytest.raises(ValueError, match=r"one layer's map \[X\], got shape \(1, 4\)"):
    ex.expert_to_slot(ids, jnp.arange(4, dtype=jnp.int32)[None], 4)
  with pytest.raises(TypeError, match=r"slot_expert_X has dtype float32"):
    ex.expert_to_slot(ids, jnp.arange(4, dtype=jnp.float32), 4)
  jitted = jax.jit(ex.expert_to_slot, static_argnums=2)
  np.testing.assert_array_equal(jitted(ids, jnp.array([3, 2, 1, 0], jnp.int32), 4),
                                [[3, 2], [1, 0]])


def test_expert_weights_take_and_replica_slots_compute_the_same():
  """ExpertWeights.take copies the owner's weights into replica slots, which compute the same."""
  w = _weights(jax.random.PRNGKey(4), 4, 5, 6)
  slot_expert = jnp.array([0, 1, 2, 3, 1, 1], jnp.int32)
  ws = w.take(slot_expert)
  for a, b in zip(ws, w):
    assert a.shape[0] == 6
    np.testing.assert_array_equal(a[4], b[1])
    np.testing.assert_array_equal(a[5], b[1])
  x = jax.random.normal(jax.random.PRNGKey(5), (3, 5))
  gates = jnp.ones((3, 1))
  via_owner = ex.dense_experts(x, jnp.full((3, 1), 1, jnp.int32), gates, ws)
  via_replica = ex.dense_experts(x, jnp.full((3, 1), 5, jnp.int32), gates, ws)
  np.testing.assert_allclose(via_replica, via_owner, rtol=1e-6)
  assert ws.astype(jnp.bfloat16).gate_SDF.dtype == jnp.bfloat16


@pytest.mark.parametrize("args, expected", [
    ((16, 2, 8, 0.0), 16),    # dropless: every token may pick the same slot
    ((16, 2, 8, 1.0), 4),     # even share 16*2/8 = 4
    ((16, 2, 8, 1.25), 5),    # ceil(1.25 * 4)
    ((16, 2, 8, 100.0), 16),  # never above the dropless bound
    ((10, 1, 64, 0.5), 1),    # at least 1
    ((0, 2, 8, 0.0), 1),
    ((12, 3, 8, 1.0), 5),     # ceil(12*3/8 = 4.5)
])
def test_capacity_for(args, expected):
  """Static per-slot capacity values."""
  assert ex.capacity_for(*args) == expected


def test_take_refuses_slot_ids_outside_the_experts():
  """jnp.take gave NaN weights for id 9 and wrapped -1 to the last expert, silently."""
  w = ex.ExpertWeights(*(jnp.arange(4.0)[:, None, None] * jnp.ones((4, 2, 2)),) * 3)
  np.testing.assert_array_equal(w.take(jnp.array([3, 0, 3])).gate_SDF[:, 0, 0], [3, 0, 3])
  for ids, message in (([0, 9], r"slot_expert_S\[1\] = 9 is outside \[0, number of experts=4\)"),
                       ([0, -1], r"slot_expert_S\[1\] = -1 is outside")):
    with pytest.raises(ValueError, match=message):
      w.take(jnp.array(ids))
  with pytest.raises(TypeError, match="slot_expert_S has dtype float32"):
    jax.jit(w.take)(jnp.array([0.0, 1.0]))  # static: a float id would be truncated under jit
