"""Targeted replica-weight fetch: the hand-worked send plan, the bound, and slot weights (values
and gradients) equal to gathering every expert, on fitting and non-fitting maps."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from pr2_jax.models import experts as ex
from pr2_jax.parallel import replica_fetch as rf
from pr2_jax.parallel.mesh import EXPERT, make_mesh

E, D, F = 8, 4, 3


def test_fetch_plan_hand_worked():
  """E=4 over 2 shards (L=2: experts 0,1 on shard 0; 2,3 on shard 1), S=3 slots, bound 1."""
  fits_map = jnp.array([0, 1, 3, 2, 3, 0])  # each shard: its own two plus one copy
  remote, rank, local, need = rf.fetch_plan(fits_map, 4, 2)
  np.testing.assert_array_equal(remote, [[False, False, True], [False, False, True]])
  np.testing.assert_array_equal(local, [[0, 1, 1], [0, 1, 0]])
  np.testing.assert_array_equal(rank, [[0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(need, [[0, 1], [1, 0]])  # need[p, q]: slabs q sends p
  # bounds: B = S - L = 1 (2 slabs received, of E = 4); 2B would move all 4: not compiled
  assert rf.fetch_bounds(4, 2, 3) == (1,)
  assert int(rf.fetch_slabs(fits_map, 4, 2)) == 2
  moved = jnp.array([2, 3, 0, 2, 3, 1])  # shard 0 holds both of shard 1's experts
  remote, rank, local, need = rf.fetch_plan(moved, 4, 2)
  np.testing.assert_array_equal(remote, [[True, True, False], [False, False, True]])
  np.testing.assert_array_equal(rank[0, :2], [0, 1])  # first and second slab from shard 1
  np.testing.assert_array_equal(need, [[0, 2], [1, 0]])
  assert int(rf.fetch_slabs(moved, 4, 2)) == 4  # too many for the bound: all_gather
  np.testing.assert_array_equal(rf.fetch_slabs(jnp.stack([fits_map, moved]), 4, 2), [2, 4])
  assert int(rf.fetch_slabs(fits_map, 4, 1)) == 0  # one shard: nothing moves
  assert rf.fetch_bounds(8, 4, 2) == (1,)  # no redundant slots: room for one moved expert
  assert rf.fetch_bounds(128, 8, 20) == (4, 8)  # 32 or 64 slabs instead of 128
  assert rf.fetch_bounds(128, 64, 3) == (1,)  # 2B = 2 would move 128: the all_gather's size
  with pytest.raises(ValueError, match="num_shards=3 must divide num_experts=4"):
    rf.fetch_slabs(fits_map, 4, 3)


@pytest.mark.parametrize("bad", [4, 9, -1])
def test_fetch_slabs_refuses_expert_ids_outside_the_experts(bad):
  """[0, 1, 0, 2, 3, 9] on E=4 counted 2 slabs, silently (expert 9's owner, shard 4, does not
  exist); a runnable map has no EMPTY slot either. A valid map still counts 2, under jit too."""
  with pytest.raises(ValueError, match=rf"slot_expert_X\[5\] = {bad} is outside "
                                       r"\[0, num_experts=4\)"):
    rf.fetch_slabs(jnp.array([0, 1, 0, 2, 3, bad]), 4, 2)
  with pytest.raises(ValueError, match=rf"slot_expert_X\[1, 5\] = {bad} is outside"):
    rf.fetch_slabs(jnp.array([[0, 1, 3, 2, 3, 0], [0, 1, 0, 2, 3, bad]]), 4, 2)
  good = jnp.array([0, 1, 0, 2, 3, 1])
  assert int(rf.fetch_slabs(good, 4, 2)) == 2
  assert int(jax.jit(rf.fetch_slabs, static_argnums=(1, 2))(good, 4, 2)) == 2


def _swapped(num_shards, count):
  """Each shard's first `count` own experts swapped for its right neighbour's first `count`,
  plus a copy of its own first expert: every shard needs `count` slabs from one owner."""
  per = E // num_shards
  rows = []
  for p in range(num_shards):
    q = (p + 1) % num_shards
    own = np.arange(p * per, (p + 1) * per)
    rows.append(np.r_[np.arange(q * per, q * per + count), own[count:], own[0]])
  return np.concatenate(rows)


def _maps(num_shards):
  """name -> (slot map, slabs a shard receives): E=8, one redundant slot per shard (B=1)."""
  per = E // num_shards
  hot = np.concatenate([np.r_[np.arange(p * per, (p + 1) * per), 0] for p in range(num_shards)])
  expected = {2: (2, 4, 8), 4: (4, 8, 8), 8: (8, 8, 8)}[num_shards]  # bounds (1, 2), (1,), ()
  maps = {"hot copies": (hot, expected[0]), "two swapped": (_swapped(num_shards, min(2, per)),
          expected[1]), "rolled": (_swapped(num_shards, per), expected[2])}
  # On 4 shards, shard 0 takes expert 3 (owner 1's local 1) and 4 (owner 2's local 0), both
  # at rank 0; shard 1 keeps the expert 1 shard 0 gave up. Every map above takes from one
  # owner a shard, so an owner sending the slabs shard r needs from *any* owner passed every
  # test (with one expert an owner, on 8 shards, every local index is 0 and it cannot show).
  if num_shards == 4:
    maps["two owners"] = (np.array([3, 4, 0, 2, 3, 1, 4, 5, 4, 6, 7, 6]), 4)
  return maps


@functools.lru_cache(maxsize=None)
def _weights():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return ex.ExpertWeights(jax.random.normal(ks[0], (E, D, F)), jax.random.normal(ks[1], (E, D, F)),
                          jax.random.normal(ks[2], (E, F, D)))


def _slot_value_and_grads(fetch, slot_map, mesh):
  """<slot weights, cotangent> and its gradient w.r.t. the owners' weights, under shard_map."""
  num_shards = mesh.shape[EXPERT]
  slots = len(slot_map) // num_shards
  cots = [jax.random.normal(jax.random.PRNGKey(i + 1), (len(slot_map),) + w.shape[1:])
          for i, w in enumerate(_weights())]

  def body(w, slot_map, *cots):
    got = fetch(w, slot_map, num_shards, slots)
    return jax.lax.psum(sum(jnp.sum(g * c) for g, c in zip(got, cots)), EXPERT), got

  w_spec = ex.ExpertWeights(P(EXPERT), P(EXPERT), P(EXPERT))
  fn = jax.shard_map(body, mesh=mesh, in_specs=(w_spec, P()) + (P(EXPERT),) * 3,
                     out_specs=(P(), w_spec))
  loss = lambda w: fn(w, jnp.asarray(slot_map, jnp.int32), *cots)
  (value, got), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(_weights())
  return got, value, grads


def _targeted(bound):
  """The all_to_all alone with a given bound (compiled in slot_weights or not)."""
  def targeted(w, slot_map, num_shards, slots):
    plan = rf.fetch_plan(slot_map, E, num_shards)
    return rf._targeted(w, plan, slot_map, E, num_shards, bound)
  return targeted


def _gathered(w, slot_map, num_shards, slots):
  p = jax.lax.axis_index(EXPERT)
  mine = jax.lax.dynamic_slice_in_dim(slot_map, p * slots, slots)
  return ex.ExpertWeights(*(jax.lax.all_gather(a, EXPERT, tiled=True) for a in w)).take(mine)


@pytest.mark.parametrize("shape", [(1, 2), (2, 4), (1, 8)])
def test_slot_weights_equal_the_gathered_experts(shape):
  """Every slot gets its expert's weights and the gradient of a function of the slots reaches
  the owners' weights, against gathering every expert (itself checked against a numpy take):
  the all_to_all alone on every map, and `slot_weights`, whichever branch the map takes
  (B = 1, 2B = 2 or the all_gather fallback, per `fetch_slabs`)."""
  mesh = make_mesh(*shape, jax.devices()[:shape[0] * shape[1]])
  for name, (slot_map, slabs) in _maps(shape[1]).items():
    assert sorted(set(slot_map)) == list(range(E)), name  # every expert has a slot
    assert int(rf.fetch_slabs(jnp.asarray(slot_map), E, shape[1])) == slabs, name
    ref_slots, ref_value, ref_grads = _slot_value_and_grads(_gathered, slot_map, mesh)
    for a, w in zip(ref_slots, _weights()):
      np.testing.assert_array_equal(a, np.asarray(w)[slot_map], err_msg=name)
    need = int(jnp.max(rf.fetch_plan(jnp.asarray(slot_map), E, shape[1])[3]))
    for fetch in (rf.slot_weights, _targeted(max(need, 1))):
      got, value, grads = _slot_value_and_grads(fetch, slot_map, mesh)
      what = f"{name} on {shape} via {fetch.__name__}"
      for a, b in zip(got, ref_slots):
        np.testing.assert_array_equal(a, b, err_msg=what)
      np.testing.assert_allclose(value, ref_value, rtol=1e-6, err_msg=what)
      for a, b in zip(grads, ref_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=what)


def test_targeted_moves_only_the_bound():
  """The compiled targeted fetch is three all_to_alls (one per weight) of P x B slabs (E=8
  over 4 shards, 3 slots: B=1, 4 slabs of D x F) and no all-gather; gathering every expert
  would receive 8 slabs per weight."""
  mesh = make_mesh(1, 4, jax.devices()[:4])
  slot_map = jnp.asarray(_maps(4)["hot copies"][0], jnp.int32)
  w_spec = ex.ExpertWeights(P(EXPERT), P(EXPERT), P(EXPERT))
  fn = jax.jit(jax.shard_map(lambda w, m: rf._targeted(w, rf.fetch_plan(m, E, 4), m, E, 4, 1),
                             mesh=mesh, in_specs=(w_spec, P()), out_specs=w_spec))
  hlo = fn.lower(_weights(), slot_map).compile().as_text()
  assert "all-gather" not in hlo
  lines = [line for line in hlo.splitlines() if "all-to-all(" in line]
  assert len(lines) == 3, lines
  for line in lines:
    result = line.split("=", 1)[1].split("all-to-all(")[0]
    moved = sum(int(np.prod([int(d) for d in dims.split(",")]))
                for dims in re.findall(r"f32\[([\d,]+)\]", result))
    assert moved == 4 * D * F, line


def test_fetch_slabs_refuses_a_plans_unflattened_layout():
  """A plan's [L, D, S] read S as the map's X: [[8, 8, 8, 8]] * 3 where [16, 16, 16] is right."""
  from pr2_jax.balance.planner import plan_placement
  loads = np.random.default_rng(0).integers(0, 100, (3, 16)).astype(np.float32)
  layout_LDS = plan_placement(loads, 4, 8).slot_expert
  flat = rf.fetch_slabs(layout_LDS.reshape(3, -1), 16, 4)
  assert flat.shape == (3,)
  with pytest.raises(ValueError, match=r"last axis has 8 slots, fewer than num_experts=16"):
    rf.fetch_slabs(layout_LDS, 16, 4)
