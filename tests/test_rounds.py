"""Placement in rounds (pr2_jax/balance/rounds.py): a hand-worked layer, the ranking against a
stable sort, no twins without the repair, and the planner's method="rounds" end to end."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.balance import loads as ld
from pr2_jax.balance import planner as pl
from pr2_jax.balance import rounds as rd

# E=6, D=3, S=3, loads [9, 6, 1, 3, 2, 6]. Replica counts (greedy, cap D=3): e0 (9 -> 4.5),
# then e1 and e5 tie at 6 (e1 first, then e5): counts [2, 2, 1, 1, 1, 2].
# Replicas by weight (stable): e0 4.5, e0 4.5, e1 3, e1 3, e3 3, e5 3, e5 3, e4 2, e2 1.
#   round 0 [e0, e0, e1], loads [0, 0, 0]: d0 <- e0, d1 <- e0, d2 <- e1 -> [4.5, 4.5, 3]
#   round 1 [e1, e3, e5]: d2 is lightest but holds e1, so it ranks last:
#           d0 <- e1, d1 <- e3, d2 <- e5 -> [7.5, 7.5, 6]
#   round 2 [e5, e4, e2]: d2 holds e5, last again: d0 <- e5, d1 <- e4, d2 <- e2
#           -> [10.5, 9.5, 7]   (static layout: [15, 4, 8])
# Slots: round s -> local slot s: d0 [e0, e1, e5], d1 [e0, e3, e4], d2 [e1, e5, e2]. Against
# the native layout (d0 [0, 1], d1 [2, 3], d2 [4, 5]) kept experts keep their slot: d0
# [0, 1, 5]; d1 keeps e3 in slot 1, e0 and e4 fill slots 0 and 2; d2 keeps e5 in slot 1.
# LPT on the same input (one replica at a time) reaches [9.5, 8.5, 9]: rounds is worse here.
LOADS = [9., 6., 1., 3., 2., 6.]


def test_hand_worked_rounds():
  load_E = jnp.array(LOADS)
  count_E = pl.replica_counts(load_E, 9, 3)
  np.testing.assert_array_equal(count_E, [2, 2, 1, 1, 1, 2])
  expert_X, slot_X = jax.jit(rd.place_in_rounds, static_argnums=(2, 3))(load_E, count_E, 3, 3)
  np.testing.assert_array_equal(expert_X, [0, 0, 1, 1, 3, 5, 5, 4, 2])
  np.testing.assert_array_equal(slot_X, [0, 3, 6, 1, 4, 7, 2, 5, 8])


def test_hand_worked_plan():
  loads = jnp.array([LOADS])
  plan = pl.plan_placement(loads, 3, 3, method="rounds", stickiness=0.0, split_iters=0).layer(0)
  np.testing.assert_array_equal(plan.slot_expert, [[0, 1, 5], [0, 3, 4], [1, 5, 2]])
  np.testing.assert_allclose(plan.device_load, [10.5, 9.5, 7.0])
  np.testing.assert_allclose(plan.slot_load, [[4.5, 3, 3], [4.5, 3, 2], [3, 3, 1]])
  lpt = pl.plan_placement(loads, 3, 3, method="lpt", stickiness=0.0, split_iters=0).layer(0)
  np.testing.assert_allclose(lpt.device_load, [9.5, 8.5, 9.0])
  # Water-filling then evens the rounds plan out (peak strictly lower, totals kept).
  filled = pl.plan_placement(loads, 3, 3, method="rounds", stickiness=0.0).layer(0)
  np.testing.assert_array_equal(filled.slot_expert, plan.slot_expert)
  assert float(filled.device_load.max()) < 10.5
  np.testing.assert_allclose(float(filled.device_load.sum()), 27.0, rtol=1e-6)


def test_rank_is_a_stable_argsort():
  rng = np.random.default_rng(0)
  for _ in range(20):
    key = rng.integers(0, 6, 40).astype(np.float32)  # many ties
    first = rng.random(40) < 0.3
    rank = np.asarray(rd._rank(jnp.asarray(key)))
    np.testing.assert_array_equal(np.argsort(rank), np.argsort(key, kind="stable"))
    rank = np.asarray(rd._rank(jnp.asarray(key), jnp.asarray(~first).astype(jnp.int32)))
    np.testing.assert_array_equal(np.argsort(rank), np.lexsort((key, ~first)))
    np.testing.assert_array_equal(rd._inverse(jnp.asarray(rank)), np.argsort(rank))



def test_prefix_sum_is_an_exact_cumsum():
  np.testing.assert_array_equal(rd.prefix_sum(jnp.array([2, 0, 3, 1])), [2, 2, 5, 6])
  np.testing.assert_array_equal(rd.prefix_sum(jnp.array([True, False, True])), [1, 1, 2])
  rng = np.random.default_rng(1)
  # Near float32's exact-integer limit (totals up to 2**24 - 1), batched as under the vmap.
  counts = rng.integers(0, 2**24 // 300, (5, 256)).astype(np.int32)
  np.testing.assert_array_equal(jax.vmap(rd.prefix_sum)(jnp.asarray(counts)),
                                np.cumsum(counts, axis=1))


def test_expand_runs_is_a_repeat():
  np.testing.assert_array_equal(rd.expand_runs(jnp.array([2, 1, 3]), 6), [0, 0, 1, 2, 2, 2])
  rng = np.random.default_rng(2)
  for _ in range(10):
    counts = rng.integers(1, 5, 40)
    np.testing.assert_array_equal(rd.expand_runs(jnp.asarray(counts), int(counts.sum())),
                                  np.repeat(np.arange(40), counts))


def assert_slots_once_no_twins(expert_X, slot_X, d, s):
  """Every one of the D*S slots holds one replica, and no device holds an expert twice."""
  expert_X, slot_X = np.asarray(expert_X), np.asarray(slot_X)
  assert sorted(slot_X) == list(range(d * s))
  layout = np.zeros(d * s, np.int64)
  layout[slot_X] = expert_X
  for dev in layout.reshape(d, s):
    assert len(set(dev)) == s, dev


@pytest.mark.parametrize("e,d,s", [(16, 4, 5), (128, 64, 3), (32, 8, 8), (8, 2, 6)])
def test_no_twins_and_s_per_device_without_repair(e, d, s):
  """With at most D replicas per expert, rounds alone never puts an expert twice on a device."""
  rng = np.random.default_rng(e + d + s)
  fn = jax.jit(lambda load: rd.place_in_rounds(load, pl.replica_counts(load, d * s, d), d, s))
  for t in range(12):
    load = [rng.lognormal(0, 2, e) * 100, rng.integers(0, 4, e).astype(float),
            np.zeros(e)][t % 3].astype(np.float32)
    assert_slots_once_no_twins(*fn(jnp.asarray(load)), d, s)


# The same layer with the home rule (stickiness 0.25: tol = 0.25 * 27 / 3 = 2.25), previous =
# native layout, so every expert's only home is its native device (e0, e1 -> d0; e2, e3 -> d1;
# e4, e5 -> d2). A replica claims its home if that device is at most tol heavier than the
# lightest device; the heaviest claimant wins; the rest match as before.
#   round 0 [e0, e0, e1], loads [0, 0, 0]: all three claim d0, the first e0 wins; the other e0
#           and e1 have no other home: d1 <- e0, d2 <- e1 -> [4.5, 4.5, 3]
#   round 1 [e1, e3, e5], lightest 3: e1 claims d0 (4.5 <= 3 + 2.25), e3 d1,
#           e5 d2: all win -> [7.5, 7.5, 6]
#   round 2 [e5, e4, e2], lightest 6: e5's home d2 holds e5 already; e4 claims
#           d2, e2 claims d1; e5 takes the free d0 -> [10.5, 8.5, 8]
# Slots kept against the native layout: d0 [0, 1, 5], d1 [2, 3, 0], d2 [4, 5, 1]: one fetch
# per device (3) where plain rounds fetch 5 ([0, 3, 4] and [1, 5, 2] bring two new each).


def test_hand_worked_sticky_plan():
  loads = jnp.array([LOADS])
  plan = pl.plan_placement(loads, 3, 3, method="rounds", stickiness=0.25, split_iters=0)
  np.testing.assert_array_equal(plan.slot_expert[0], [[0, 1, 5], [2, 3, 0], [4, 5, 1]])
  np.testing.assert_allclose(plan.device_load[0], [10.5, 8.5, 8.0])
  plain = pl.plan_placement(loads, 3, 3, method="rounds", stickiness=0.0, split_iters=0)
  native = np.broadcast_to(ld.native_layout(6, 3, 3), (1, 3, 3))
  assert int(ld.plan_stats(plan, native)["transfers"].sum()) == 3
  assert int(ld.plan_stats(plain, native)["transfers"].sum()) == 5


def test_sticky_rounds_move_fewer_experts_and_keep_the_invariants():
  """Chained over micro-steps, the home rule moves fewer experts than plain rounds, and every
  plan still has S experts per device, each expert at least once and no twins."""
  rng = np.random.default_rng(1)
  e, d, s = 32, 8, 6
  base = rng.lognormal(0, 1, e)
  prev = {st: None for st in (0.0, 0.25)}
  moved = {st: 0 for st in prev}
  for _ in range(6):
    loads = base * rng.lognormal(0, 0.5, (3, e)) * 40
    for st in prev:
      plan = pl.plan_placement(loads, d, s, previous=prev[st], method="rounds", stickiness=st)
      layout = np.asarray(plan.slot_expert)
      if prev[st] is not None:
        moved[st] += int(ld.plan_stats(plan, prev[st])["transfers"].sum())
      for layer in layout:
        assert set(layer.reshape(-1)) == set(range(e))
        for dev in layer:
          assert len(set(dev)) == s
      np.testing.assert_allclose(np.asarray(plan.device_load).sum(1), loads.sum(1), rtol=1e-5)
      prev[st] = layout
  assert moved[0.25] < 0.75 * moved[0.0], moved


def _rounds_oracle(load, count, d, s):
  """The plain rounds rule in numpy, loop by loop: replicas by decreasing load / count (ties:
  expert id) cut into S rounds of D; in round r the q-th heaviest replica goes to the q-th
  device in the order (last expert placed == the round's first expert, load, id)."""
  weight = np.asarray(load, np.float32) / np.asarray(count, np.float32)
  experts = np.repeat(np.arange(len(load)), count)
  experts = experts[np.argsort(-weight[experts], kind="stable")]
  dev_load, last = np.zeros(d, np.float32), np.full(d, -1)
  slot = np.zeros(d * s, np.int64)
  for r in range(s):
    round_e = experts[r * d:(r + 1) * d]
    order = sorted(range(d), key=lambda dev: (last[dev] == round_e[0], dev_load[dev], dev))
    for q, dev in enumerate(order):
      slot[r * d + q] = dev * s + r
      dev_load[dev] += weight[round_e[q]]
      last[dev] = round_e[q]
  return experts, slot


@pytest.mark.parametrize("e,d,s", [(8, 4, 3), (16, 4, 5), (12, 6, 4)])
def test_plain_rounds_match_a_numpy_oracle(e, d, s):
  """Heaviest replica to lightest device, on loads where it matters: the hand-worked layer above
  is decided by the 'holds the round's first expert' rule alone, so matching the heaviest replica
  to the *heaviest* device passed every test."""
  rng = np.random.default_rng(e * d + s)
  fn = jax.jit(rd.place_in_rounds, static_argnums=(2, 3))
  for _ in range(8):
    load = (rng.lognormal(0, 1.5, e) * 40).astype(np.float32)
    count = np.asarray(pl.replica_counts(jnp.asarray(load), d * s, d))
    want_e, want_slot = _rounds_oracle(load, count, d, s)
    got_e, got_slot = fn(jnp.asarray(load), jnp.asarray(count), d, s)
    np.testing.assert_array_equal(got_e, want_e)
    np.testing.assert_array_equal(got_slot, want_slot)


def test_home_rule_tolerance_is_stickiness_times_the_mean_device_load():
  """E=4, D=2, S=3, loads [6, 9, 0, 4], stickiness 0.1: tol = 0.1 x 19 / 2 = 0.95.

  Counts [2, 2, 1, 1]; replicas by weight e1 4.5, e1 4.5, e3 4, e0 3, e0 3, e2 0; homes native
  (e0, e1 -> d0; e2, e3 -> d1).
    round 0 [e1, e1]: both claim d0, the first wins, the other takes d1 -> [4.5, 4.5]
    round 1 [e3, e0]: e3 claims d1, e0 claims d0 (both at the lightest) -> [7.5, 8.5]
    round 2 [e0, e2], lightest 7.5: e0's home d0 holds e0; e2's home d1 (8.5) is 1.0 above,
            more than tol: no claims. e0 goes to d1 (d0 holds it), e2 to d0 -> [7.5, 11.5]
  Slots kept against native: d0 [0, 1, 2], d1 [1, 3, 0]. A tolerance of stickiness x the
  *total* load (1.9) let e2 claim d1, e0 land as a twin on d0 and the repair swap: [11.5, 7.5].
  """
  plan = pl.plan_placement(jnp.array([[6., 9., 0., 4.]]), 2, 3, stickiness=0.1,
                           split_iters=0).layer(0)
  np.testing.assert_array_equal(plan.slot_expert, [[0, 1, 2], [1, 3, 0]])
  np.testing.assert_allclose(plan.device_load, [7.5, 11.5])


def test_homes_hand_worked():
  """E=4 on D=4 (expert e native on device e), S=2, previous layout d0 [0, 1], d1 [1, 2],
  d2 [1, 2], d3 [0, 3]. Homes = [native, lowest other holder, highest other holder], D=4 for
  none: e0 [0, 3, 4] (one other holder: high is not low again), e1 [1, 0, 2] (its native d1
  is not an "other"), e2 [2, 1, 4], e3 [3, 4, 4]. Counting the native device as another
  holder gave e0 [0, 0, 3] and e1 [1, 0, 2] by luck; repeating low as high gave e0 [0, 3, 3]."""
  prev = jnp.array([[0, 1], [1, 2], [1, 2], [0, 3]], jnp.int32)
  homes = rd._homes(jnp.array([0, 1, 2, 3, 1], jnp.int32), prev, 4, 4)
  np.testing.assert_array_equal(homes, [[0, 3, 4], [1, 0, 2], [2, 1, 4], [3, 4, 4], [1, 0, 2]])


def test_home_rule_claims_at_exactly_the_tolerance():
  """tol = 0: a replica may still claim a home as light as the lightest device (the bound is
  inclusive). E=4, D=2, S=2, loads [1, 1, 4, 2], one replica each, previous = native (e0, e1
  on d0; e2, e3 on d1). Replicas by weight: e2 4, e3 2, e0 1, e1 1.
    round 0 [e2, e3], loads [0, 0]: both claim d1, e2 (heavier) wins; e3 takes d0 -> [2, 4]
    round 1 [e0, e1], lightest 2: both claim d0 (2 <= 2 + 0), e0 wins; e1 takes d1
  Slots: e2 -> d1 slot 0 (2), e3 -> 0, e0 -> d0 slot 1 (1), e1 -> 3. A strict bound made no
  claim at all and gave the plain rounds' [0, 2, 3, 1] (e2 on d0, e0 on d1: two moves more)."""
  load, count = jnp.array([1., 1., 4., 2.]), jnp.array([1, 1, 1, 1])
  native = jnp.asarray(ld.native_layout(4, 2, 2))
  expert_X, slot_X = rd.place_in_rounds(load, count, 2, 2, native, 0.0)
  np.testing.assert_array_equal(expert_X, [2, 3, 0, 1])
  np.testing.assert_array_equal(slot_X, [2, 0, 1, 3])
  np.testing.assert_array_equal(rd.place_in_rounds(load, count, 2, 2)[1], [0, 2, 3, 1])


def test_sticky_round_left_overs_avoid_the_first_left_overs_holders():
  """One sticky round, D=3, loads [1, 2, 1.5], tol 1; devices hold d0 [7], d1 [3], d2 [4].
  Replicas e5, e7, e8 (heaviest first); only e5 has a home, d2 (1.5 <= 1 + 1), and wins it.
  The left-overs e7, e8 go to the free devices lightest first, except that d0 holds e7, the
  first left-over, and ranks last: d1 <- e7, d0 <- e8, i.e. take = [2, 1, 0]. Ranking by the
  round's first replica (e5, already placed by its claim) put e7 on d0 beside its twin."""
  take = rd._sticky_round(jnp.array([1.0, 2.0, 1.5]), jnp.array([5, 7, 8], jnp.int32),
                          jnp.array([[2, 3, 3], [3, 3, 3], [3, 3, 3]], jnp.int32),
                          jnp.array([[7, -1], [3, -1], [4, -1]], jnp.int32), 1.0)
  np.testing.assert_array_equal(take, [2, 1, 0])
