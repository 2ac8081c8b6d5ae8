"""assign_replicas: hand-worked split, shares match the plan per source shard, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.balance import dispatch, loads as ld, planner as pl


def _layer(slot_expert, share, num_experts):
  slot_expert = jnp.asarray(slot_expert, jnp.int32)
  count = jnp.bincount(slot_expert.reshape(-1), length=num_experts)
  share = jnp.asarray(share, jnp.float32)
  return pl.Plan(slot_expert=slot_expert, replica_count=count, replica_share=share,
                 slot_load=share, device_load=share.sum(-1))


def test_hand_worked_split():
  """Expert 0 in slots 0 (share 1/4) and 3 (3/4); expert 1 in slot 1; expert 2 in slot 2.

  8 tokens pick expert 0 (k=0) and expert 1 or 2 (k=1). Ranks r=0..7 of expert 0 sit at
  (r + 1/2) / 8 = 1/16, 3/16, 5/16, ...: the first two fall below 1/4 -> slot 0, the rest
  -> slot 3.
  """
  plan = _layer([[0, 1], [2, 0]], [[0.25, 1.0], [1.0, 0.75]], 3)
  ids = np.stack([np.zeros(8), np.arange(8) % 2 + 1], axis=1).astype(np.int32)
  got = dispatch.assign_replicas(jnp.asarray(ids), None, plan)
  np.testing.assert_array_equal(got[:, 0], [0, 0, 3, 3, 3, 3, 3, 3])
  np.testing.assert_array_equal(got[:, 1], [1, 2, 1, 2, 1, 2, 1, 2])
  # Two source shards of 4 tokens: each splits its own 4 tokens 1 : 3.
  got2 = dispatch.assign_replicas(jnp.asarray(ids), None, plan, num_source_shards=2)
  np.testing.assert_array_equal(got2[:, 0], [0, 3, 3, 3, 0, 3, 3, 3])


def test_zero_share_replica_gets_nothing_and_padding_is_split_apart():
  plan = _layer([[0, 1], [0, 0]], [[0.5, 1.0], [0.0, 0.5]], 2)
  ids = jnp.asarray(np.array([[0, 1]] * 6, np.int32))
  valid = jnp.asarray([True, True, True, True, False, False])
  got = np.asarray(dispatch.assign_replicas(ids, valid, plan))
  np.testing.assert_array_equal(got[:4, 0], [0, 0, 3, 3])  # slot 2 has share 0
  np.testing.assert_array_equal(got[4:, 0], [0, 3])        # padding split on its own
  assert np.all(got[:, 1] == 1)


@pytest.mark.parametrize("shards", [1, 2, 4])
def test_counts_follow_the_plan(shards):
  """Random routes with hot experts: every slot gets its planned load to within one token
  per source shard, every assignment lands on a slot holding its expert."""
  rng = np.random.default_rng(shards)
  e, d, s, k, n = 16, 4, 6, 2, 512
  p = np.r_[np.full(4, 0.15), np.full(12, 0.4 / 12)]
  ids = np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(n)]).astype(np.int32)
  valid = rng.random(n) < 0.9
  loads = ld.loads_from_routes(jnp.asarray(ids)[None, :, None, :], jnp.asarray(valid)[None], e)
  layer = pl.plan_placement(loads, d, s).layer(0)
  fn = jax.jit(dispatch.assign_replicas, static_argnums=3)
  slots = np.asarray(fn(jnp.asarray(ids), jnp.asarray(valid), layer, shards))
  np.testing.assert_array_equal(np.asarray(layer.slot_expert).reshape(-1)[slots], ids)
  counts = np.bincount(slots[valid].reshape(-1), minlength=d * s)
  np.testing.assert_allclose(counts, np.asarray(layer.slot_load).reshape(-1), atol=shards + 1e-3)
  assert np.asarray(layer.replica_count).max() > 1  # the test exercises replicas


def test_per_shard_calls_equal_one_call_over_shards():
  """Blocks are split independently, so calling it on each shard's tokens (e.g. inside
  shard_map, num_source_shards=1) gives what one call over all shards gives."""
  rng = np.random.default_rng(7)
  ids = np.stack([rng.choice(16, 2, replace=False) for _ in range(64)]).astype(np.int32)
  valid = rng.random(64) < 0.8
  layer = pl.plan_placement(ld.loads_from_routes(jnp.asarray(ids)[None, :, None, :],
                                                 jnp.asarray(valid)[None], 16), 4, 6).layer(0)
  whole = dispatch.assign_replicas(jnp.asarray(ids), jnp.asarray(valid), layer, 4)
  parts = [dispatch.assign_replicas(jnp.asarray(ids[b:b + 16]), jnp.asarray(valid[b:b + 16]),
                                    layer) for b in range(0, 64, 16)]
  np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_slot_counts_give_the_dropless_capacity():
  """The hand-worked plan, 2 source shards: shard 0 sends slot 0 one token, slot 3 three,
  slots 1 and 2 two each; capacity = 3. With token 7 (slots 3 and 2) marked padding,
  shard 1 sends [1, 2, 1, 2]."""
  plan = _layer([[0, 1], [2, 0]], [[0.25, 1.0], [1.0, 0.75]], 3)
  ids = np.stack([np.zeros(8), np.arange(8) % 2 + 1], axis=1).astype(np.int32)
  slots = dispatch.assign_replicas(jnp.asarray(ids), None, plan, num_source_shards=2)
  counts = dispatch.slot_counts(slots, 4, 2)
  np.testing.assert_array_equal(counts, [[1, 2, 2, 3], [1, 2, 2, 3]])
  valid = jnp.asarray([True] * 7 + [False])
  np.testing.assert_array_equal(dispatch.slot_counts(slots, 4, 2, valid)[1], [1, 2, 1, 2])


def test_validation():
  plan = pl.plan_placement(jnp.ones((2, 4)), 2, 3)
  with pytest.raises(ValueError, match="one layer"):
    dispatch.assign_replicas(jnp.zeros((4, 1), jnp.int32), None, plan)
  with pytest.raises(ValueError, match="num_source_shards"):
    dispatch.assign_replicas(jnp.zeros((5, 1), jnp.int32), None, plan.layer(0), 2)
  with pytest.raises(ValueError, match=r"num_source_shards=0"):
    dispatch.assign_replicas(jnp.zeros((4, 1), jnp.int32), None, plan.layer(0), 0)
  with pytest.raises(ValueError, match=r"ids must be \[N, K\], got shape \(4,\)"):
    dispatch.assign_replicas(jnp.zeros((4,), jnp.int32), None, plan.layer(0))
  with pytest.raises(ValueError, match=r"valid has shape \(3,\), the 4 tokens need \(4,\)"):
    dispatch.assign_replicas(jnp.zeros((4, 1), jnp.int32), jnp.ones((3,), bool), plan.layer(0))


@pytest.mark.parametrize("bad", [20, 4, -1])
def test_assign_replicas_rejects_ids_outside_the_experts(bad):
  """Id 20 (of 4 experts) used to land in slot 0; padding is masked by `valid`, never by -1."""
  layer = pl.plan_placement(jnp.ones((1, 4)), 2, 3).layer(0)
  ids = jnp.array([[0, 1], [2, bad]], jnp.int32)
  with pytest.raises(ValueError, match=rf"expert_ids_NK\[1, 1\] = {bad} is outside "
                                       r"\[0, num_experts=4\)"):
    dispatch.assign_replicas(ids, None, layer)


def test_assign_replicas_rejects_a_plan_without_some_expert():
  plan = _layer([[0, 1], [1, 0]], [[0.5, 0.5], [0.5, 0.5]], 3)  # expert 2 has no slot
  with pytest.raises(ValueError, match=r"slot_expert_X has no slot for expert\(s\) \[2\]"):
    dispatch.assign_replicas(jnp.array([[0, 2]], jnp.int32), None, plan)


def test_slot_counts_validation():
  """A slot id >= num_slots used to count in the next shard's row (flat index)."""
  slots = jnp.array([[0, 1], [2, 3], [0, 4], [1, 2]], jnp.int32)
  with pytest.raises(ValueError, match=r"slot_ids_NK\[2, 1\] = 4 is outside \[0, num_slots=4\)"):
    dispatch.slot_counts(slots, 4, 2)
  with pytest.raises(ValueError, match=r"valid has shape \(2,\)"):
    dispatch.slot_counts(slots, 5, 2, jnp.ones((2,), bool))
  np.testing.assert_array_equal(dispatch.slot_counts(slots, 5, 2), [[1, 1, 1, 1, 0],
                                                                    [1, 1, 1, 0, 1]])


def test_runs():
  first, last = dispatch.runs(jnp.array([4, 4, 1, 7, 7, 7, 2]))
  np.testing.assert_array_equal(first, [0, 0, 2, 3, 3, 3, 6])
  np.testing.assert_array_equal(last, [1, 1, 2, 5, 5, 5, 6])


def test_ranks_split_at_their_midpoints():
  """Expert 0 in slots 0 (share 0.1) and 2 (share 0.9), 3 tokens: ranks sit at 1/6, 1/2, 5/6,
  all above 0.1, so slot 2 takes all three (0.3 of a token is nearer 0 than 1). Placing rank r
  at r / c instead (0, 1/3, 2/3) gave the 10% replica a third of the tokens: [0, 2, 2].
  Expert 1 (slots 1 and 3, shares 0.3 and 0.7) with one token: midpoint 1/2 -> slot 3, the
  larger share (r / c = 0 put every lone token on the first replica)."""
  plan = _layer([[0, 1], [0, 1]], [[0.1, 0.3], [0.9, 0.7]], 2)
  ids = jnp.array([[0], [0], [0], [1]], jnp.int32)
  np.testing.assert_array_equal(dispatch.assign_replicas(ids, None, plan)[:, 0], [2, 2, 2, 3])


def test_expert_without_any_share_splits_evenly_among_its_replicas():
  """Expert 0 in slots 0 and 3, both with share 0 (the plan expected no load for it), 4 tokens:
  its cumulative intervals fall back to rank / count = 1/2, 1, so ranks at 1/8, 3/8, 5/8, 7/8
  split [0, 0, 3, 3]. Dividing by count - 1 instead put the first edge at 1: every token on
  slot 0. Expert 1 (one replica, share 0 too) keeps all of its tokens in slot 1."""
  plan = _layer([[0, 1], [2, 0]], [[0.0, 0.0], [1.0, 0.0]], 3)
  ids = jnp.array([[0, 1], [0, 2], [0, 1], [0, 2]], jnp.int32)
  got = np.asarray(dispatch.assign_replicas(ids, None, plan))
  np.testing.assert_array_equal(got[:, 0], [0, 0, 3, 3])
  np.testing.assert_array_equal(got[:, 1], [1, 2, 1, 2])
