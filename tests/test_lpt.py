"""LPT placement (pr2_jax/balance/lpt.py): hand-worked layers for the plain greedy, the
reservation and the home rule, the duplicate repair's swap, and slots and twins on random
loads. The planner's method="lpt" end to end is tested in test_planner.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.balance import loads as ld
from pr2_jax.balance import lpt
from pr2_jax.balance import planner as pl
from test_rounds import assert_slots_once_no_twins

# E=4, D=2, S=3: native layout d0 [e0, e1], d1 [e2, e3], one spare slot each.
NATIVE = jnp.asarray(ld.native_layout(4, 2, 3))
_place = jax.jit(lpt.place_lpt, static_argnums=(3, 4, 6))


def test_hand_worked_plain_lpt():
  """Loads [3, 3, 4, 2], counts [2, 1, 2, 1]; replicas by load: e1 3, e2 2, e2 2, e3 2, e0 1.5,
  e0 1.5. e1 -> d0, e2 -> d1, e2 -> d0 (d1 holds e2), e3 -> d1, e0 -> d1 (4 < 5), e0 -> d0:
  global slot d * S + (d's replicas so far)."""
  load_E = jnp.array([3., 3., 4., 2.])
  count_E = jnp.array([2, 1, 2, 1], jnp.int32)
  expert_X, slot_X = _place(load_E, count_E, NATIVE, 2, 3, 0.0, False)
  np.testing.assert_array_equal(expert_X, [1, 2, 2, 3, 0, 0])
  np.testing.assert_array_equal(slot_X, [0, 3, 1, 4, 5, 2])


def test_reservation_keeps_a_light_native_home():
  """Loads [0, 1, 1, 3], counts [1, 2, 1, 2]; order e3 1.5, e3 1.5, e2 1, e1 .5, e1 .5, e0 0.

  Plain: e3 -> d0, e3 -> d1, e2 -> d0 (tie at 1.5), e1 -> d1, e1 -> d0, e0 -> d1 (d0 full):
  d0 [e3, e2, e1], d1 [e3, e1, e0]: e2 and the idle e0 both off their native device.
  Reserved (one slot per native expert, until its first replica is placed): e3 -> d0, e3
  -> d1; e2 -> d1, as d0's free slots are d0's natives'; e1 -> d0 (1.5 < 2.5); the second
  e1 -> d1, as d0 holds e1; e0 -> d0: d0 [e3, e1, e0], d1 [e3, e2, e1], every native at home.
  """
  load_E = jnp.array([0., 1., 1., 3.])
  count_E = pl.replica_counts(load_E, 6, 2)
  np.testing.assert_array_equal(count_E, [1, 2, 1, 2])
  expert_X, plain_X = _place(load_E, count_E, NATIVE, 2, 3, 0.0, False)
  np.testing.assert_array_equal(expert_X, [3, 3, 2, 1, 1, 0])
  np.testing.assert_array_equal(plain_X, [0, 3, 1, 4, 2, 5])
  expert_X, reserved_X = _place(load_E, count_E, NATIVE, 2, 3, 0.0, True)
  np.testing.assert_array_equal(expert_X, [3, 3, 2, 1, 1, 0])
  np.testing.assert_array_equal(reserved_X, [0, 3, 4, 1, 5, 2])


def test_home_rule_hand_worked():
  """Loads [5, 1, 1, 1], counts [2, 2, 1, 1]; order e0 2.5, e0 2.5, e2 1, e3 1, e1 .5, e1 .5.

  tol 0.2: e0 -> d0 (home), e0 -> d1; e2 -> d1 (home, the 2.5 tie broken by the bonus);
  e3 -> d0 (home d1 at 3.5 is more than tol above d0's 2.5); e1 -> d0 (home), e1 -> d1.
  tol 0: e2 takes d0 (lower id on the tie) and e3 then d1.
  """
  load_E = jnp.array([5., 1., 1., 1.])
  count_E = jnp.array([2, 2, 1, 1], jnp.int32)
  expert_X, sticky_X = _place(load_E, count_E, NATIVE, 2, 3, 0.2, False)
  np.testing.assert_array_equal(expert_X, [0, 0, 2, 3, 1, 1])
  np.testing.assert_array_equal(sticky_X, [0, 3, 4, 1, 2, 5])
  _, plain_X = _place(load_E, count_E, NATIVE, 2, 3, 0.0, False)
  np.testing.assert_array_equal(plain_X, [0, 3, 1, 4, 2, 5])


def test_within_a_tier_the_lightest_device_wins():
  """E=2, D=2, S=3, counts [5, 1], loads [50, 20]; order e1 20, then e0 10 five times.
  e1 -> d0, e0 -> d1, e0 -> d0 (d1 holds e0); the third e0 finds both devices holding e0
  and takes the lighter d1 (10 < 30), as does the fourth (20 < 30); the fifth fills d0.
  Additive penalties (load + 1e30 in float32) lost the loads and took d0 at the third."""
  native = jnp.asarray(ld.native_layout(2, 2, 3))
  expert_X, slot_X = _place(jnp.array([50., 20.]), jnp.array([5, 1], jnp.int32), native,
                            2, 3, 0.0, False)
  np.testing.assert_array_equal(expert_X, [1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(slot_X, [0, 3, 1, 4, 5, 2])


def test_a_full_device_never_ties_with_an_open_one():
  """S=2. d0 is full and lighter; d1 has one free slot, reserved for a native, and holds the
  expert. The old tiers put both in tier 3 (full = holds + reserved-only), and argmin took the
  lighter, full d0: its slot d0 * S + 2 is d1's slot 0. Full devices now rank last."""
  pick = jax.jit(lpt.pick_device, static_argnums=5)
  d = pick(jnp.array([1., 5.]), jnp.array([2, 1], jnp.int32), jnp.array([True, True]),
           jnp.array([True, True]), jnp.zeros(2), 2)
  assert int(d) == 1
  # The tiers in order, each beating the next, whatever the loads: load 9 wins over load 0.
  load_D, used_D = jnp.array([9., 0.]), jnp.array([0, 0], jnp.int32)
  for steal_D, holds_D in ((jnp.array([False, True]), jnp.array([False, False])),   # 0 < 1
                           (jnp.array([True, False]), jnp.array([False, True])),    # 1 < 2
                           (jnp.array([False, True]), jnp.array([True, True]))):    # 2 < 3
    assert int(pick(load_D, used_D, steal_D, holds_D, jnp.zeros(2), 2)) == 0
  assert int(pick(load_D, jnp.array([1, 2], jnp.int32), jnp.array([True, False]),
                  jnp.array([True, False]), jnp.zeros(2), 2)) == 0  # 3 < full


def test_repair_swaps_a_twin_away():
  """D=2, S=2: d0 [e0, e0], d1 [e1, e1]. The first twin (replica 0 of e0) swaps with the
  nearest-weight replica whose expert d0 lacks (replica 2, e1): d0 [e1, e0], d1 [e0, e1].
  With no partner (one expert everywhere) or no rounds, nothing moves."""
  expert_X = jnp.array([0, 0, 1, 1], jnp.int32)
  slot_X = jnp.arange(4, dtype=jnp.int32)
  np.testing.assert_array_equal(
      lpt.repair_duplicates(expert_X, slot_X, jnp.ones(4), 2, 2, 2, 4), [2, 1, 0, 3])
  np.testing.assert_array_equal(
      lpt.repair_duplicates(jnp.zeros(4, jnp.int32), slot_X, jnp.ones(4), 2, 2, 1, 4), slot_X)
  np.testing.assert_array_equal(
      lpt.repair_duplicates(expert_X, slot_X, jnp.ones(4), 2, 2, 2, 0), slot_X)



def test_repair_partner_is_the_nearest_weight_whose_expert_the_twins_device_lacks():
  """D=2, S=3: d0 [e0, e0, e1], d1 [e1, e2, e3], replica weights [1, 1, 1, 1, .1, 1.5].

  The twin (replica 0, e0 on d0) may only swap with a replica on a device without e0 (d1)
  whose expert d0 lacks: e1 (weight 1, the nearest) would make d0 hold e1 twice, so of e2
  (|.1 - 1| = .9) and e3 (|1.5 - 1| = .5) the nearer e3 wins, not the lighter e2:
  d0 [e3, e0, e1], d1 [e1, e2, e0], no twin left."""
  expert_X = jnp.array([0, 0, 1, 1, 2, 3], jnp.int32)
  weight_X = jnp.array([1., 1., 1., 1., .1, 1.5])
  got = lpt.repair_duplicates(expert_X, jnp.arange(6, dtype=jnp.int32), weight_X, 2, 3, 4, 4)
  np.testing.assert_array_equal(got, [5, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("e,d,s", [(16, 4, 5), (32, 8, 8), (8, 2, 6)])
def test_every_slot_once_and_no_twins_after_repair(e, d, s):
  """Each slot gets one replica, and with at most D replicas per expert the repair leaves
  no device holding an expert twice."""
  rng = np.random.default_rng(e + d + s)

  @jax.jit
  def fn(load_E):
    count_E = pl.replica_counts(load_E, d * s, d)
    expert_X, slot_X = lpt.place_lpt(load_E, count_E, jnp.asarray(ld.native_layout(e, d, s)),
                                     d, s, 0.1 * jnp.sum(load_E) / d, True)
    weight_X = load_E[expert_X] / count_E[expert_X]
    return expert_X, lpt.repair_duplicates(expert_X, slot_X, weight_X, d, s, e, 4)

  for t in range(9):
    load = [rng.lognormal(0, 2, e) * 100, rng.integers(0, 4, e).astype(float),
            np.zeros(e)][t % 3].astype(np.float32)
    assert_slots_once_no_twins(*fn(jnp.asarray(load)), d, s)
