"""EPLB baseline: the DESIGN §4 oracle, a hand-worked global-policy case, invariants, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.balance.eplb import eplb_device_load, eplb_rebalance

# DESIGN §4 (DeepSeek EPLB's own example): hierarchical, 4 groups on 2 nodes, 8 GPUs.
WEIGHT = [[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]]
PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def _check_invariants(weight, phy2log, log2phy, logcnt, num_replicas, num_gpus):
  num_layers, num_experts = np.asarray(weight).shape
  assert phy2log.shape == (num_layers, num_replicas)
  assert log2phy.shape == (num_layers, num_experts, num_replicas - num_experts + 1)
  assert np.all(logcnt >= 1) and np.all(logcnt.sum(-1) == num_replicas)
  for l in range(num_layers):
    np.testing.assert_array_equal(np.bincount(phy2log[l], minlength=num_experts), logcnt[l])
    for e in range(num_experts):
      phys = log2phy[l, e]
      assert np.all(phys[:logcnt[l, e]] >= 0) and np.all(phys[logcnt[l, e]:] == -1)
      assert np.all(phy2log[l, phys[:logcnt[l, e]]] == e)
  np.testing.assert_allclose(eplb_device_load(weight, phy2log, logcnt, num_gpus).sum(-1),
                             np.asarray(weight, np.float64).sum(-1), rtol=1e-9)


def test_design_example_exactly():
  phy2log, log2phy, logcnt = eplb_rebalance(WEIGHT, 16, 4, 2, 8)
  np.testing.assert_array_equal(phy2log, PHY2LOG)
  np.testing.assert_array_equal(logcnt, [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1],
                                         [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]])
  # Replica rank order: expert 1 of layer 0 has its original copy at 15, the new one at 13.
  np.testing.assert_array_equal(log2phy[0, 1], [15, 13, -1, -1, -1])
  # The reference's fixed width X - E + 1 = 5, whatever the loads.
  assert log2phy.shape == (2, 12, 5) and (log2phy[0, 0, 1:] == -1).all()
  _check_invariants(WEIGHT, phy2log, log2phy, logcnt, 16, 8)


def test_global_policy_hand_worked():
  """groups % nodes != 0 -> global policy. weight [10, 4, 6, 2], 6 replicas, 3 GPUs.

  Replication: expert 0 (10 -> 5 per copy), then expert 2 (6 -> 3); per-copy
  loads of physical [0,1,2,3,0',2'] = [5,4,3,2,5,3]. Packing (2 per GPU,
  heaviest first, stable): 0->g0, 0'->g1, 1->g2, 2->g2 (lightest open, 4),
  2'->g0 (g0 = g1 = 5, first), 3->g1.
  """
  phy2log, log2phy, logcnt = eplb_rebalance([[10, 4, 6, 2]], 6, 1, 2, 3)
  np.testing.assert_array_equal(phy2log, [[0, 2, 0, 3, 1, 2]])
  np.testing.assert_array_equal(logcnt, [[2, 1, 2, 1]])
  np.testing.assert_array_equal(log2phy, [[[0, 2, -1], [4, -1, -1], [5, 1, -1], [3, -1, -1]]])
  np.testing.assert_allclose(eplb_device_load([[10, 4, 6, 2]], phy2log, logcnt, 3), [[8, 7, 7]])


def test_global_policy_ignores_groups_hand_worked():
  """3 groups on 2 nodes (3 % 2 != 0) falls back to the global policy: groups and nodes play no
  part. 6 experts, 8 replicas, 4 GPUs of 2; two layers worked by hand.

  Layer 0, weight [30, 12, 9, 20, 6, 3]: replicate e0 (30 -> 15), then e3 (20 -> 10). Per-copy
  loads of physical [0..5, 0', 3'] = [15, 12, 9, 10, 6, 3, 15, 10]. Packing, heaviest first
  (stable): 0->g0, 0'->g1, 1->g2, 3->g3, 3'->g3 (10, lightest; full), 2->g2 (12; full),
  4->g0 (15 = g1, first; full), 5->g1. GPUs: [0, 4], [0', 5], [1, 2], [3, 3'].

  Layer 1, weight [12, 3, 24, 9, 6, 21]: replicate e2 (24 -> 12), then e5 (21 -> 10.5). Loads of
  [0..5, 2', 5'] = [12, 3, 12, 9, 6, 10.5, 12, 10.5]. Packing: 0->g0, 2->g1, 2'->g2, 5->g3,
  5'->g3 (full), 3->g0 (three-way tie at 12: first; full), 4->g1 (full), 1->g2. GPUs: [0, 3],
  [2, 4], [2', 1], [5, 5']. A group-aware placement (group loads 15, 33, 27) would number
  group 1's experts first and place them differently.
  """
  weight = [[30, 12, 9, 20, 6, 3], [12, 3, 24, 9, 6, 21]]
  phy2log, log2phy, logcnt = eplb_rebalance(weight, 8, 3, 2, 4)
  np.testing.assert_array_equal(phy2log, [[0, 4, 0, 5, 1, 2, 3, 3], [0, 3, 2, 4, 2, 1, 5, 5]])
  np.testing.assert_array_equal(logcnt, [[2, 1, 1, 2, 1, 1], [1, 1, 2, 1, 1, 2]])
  # The original copy (rank 0) is listed before the replica made from it.
  np.testing.assert_array_equal(log2phy[..., :2], [
      [[0, 2], [4, -1], [5, -1], [6, 7], [1, -1], [3, -1]],
      [[0, -1], [5, -1], [2, 4], [1, -1], [3, -1], [6, 7]]])
  assert log2phy.shape == (2, 6, 3) and (log2phy[..., 2] == -1).all()
  np.testing.assert_allclose(eplb_device_load(weight, phy2log, logcnt, 4),
                             [[21, 18, 21, 20], [21, 18, 15, 21]])


@pytest.mark.parametrize("groups,nodes,gpus,experts,replicas", [
    (4, 2, 8, 16, 24), (3, 2, 4, 12, 16), (1, 1, 8, 32, 48), (8, 4, 8, 64, 64)])
def test_invariants_random(groups, nodes, gpus, experts, replicas):
  rng = np.random.default_rng(groups * 100 + experts)
  for _ in range(5):
    weight = rng.integers(0, 500, (3, experts))
    out = eplb_rebalance(weight, replicas, groups, nodes, gpus)
    _check_invariants(weight, *out, replicas, gpus)


def test_hierarchical_keeps_groups_on_one_node():
  """Hierarchical policy: every replica of a group's experts sits on the node the group went to."""
  rng = np.random.default_rng(3)
  weight = rng.integers(1, 300, (4, 16))
  phy2log, _, _ = eplb_rebalance(weight, 24, 4, 2, 4)
  for l in range(4):
    node_of = phy2log[l].reshape(2, -1)  # 2 nodes x 12 physical experts
    for n in range(2):
      groups = set(node_of[n] // 4)
      assert len(groups) == 2, groups  # 4 groups / 2 nodes


def test_replication_lowers_peak_load():
  """Skewed loads: 8 redundant replicas over 8 GPUs cut the mean peak GPU load by > 20 %."""
  rng = np.random.default_rng(0)
  weight = rng.lognormal(0, 1, (8, 32)) * 100
  peak = [eplb_device_load(weight, p, c, 8).max(-1).mean()
          for p, _, c in (eplb_rebalance(weight, r, 1, 1, 8) for r in (32, 40))]
  assert peak[1] < 0.8 * peak[0]


@pytest.mark.parametrize("args,match", [
    (dict(num_replicas=10), "multiple of num_gpus"),
    # >= E but not a multiple of U: GPU u holds [u * X//U, (u + 1) * X//U), the rest nowhere.
    (dict(num_replicas=20), "num_replicas=20 must be >= num_experts=12 and a multiple of "
                            "num_gpus=8"),
    (dict(num_replicas=8), ">= num_experts"),
    (dict(num_replicas=24, num_gpus=6, num_nodes=4), "multiple of num_nodes"),
    (dict(num_groups=5, num_nodes=1), "multiple of num_groups"),
    (dict(num_gpus=0), "eplb_rebalance.num_gpus must be a positive int, got 0"),
])
def test_bad_arguments(args, match):
  kwargs = dict(num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8) | args
  with pytest.raises(ValueError, match=match):
    eplb_rebalance(WEIGHT, **kwargs)
  with pytest.raises(ValueError, match="layers, experts"):
    eplb_rebalance(WEIGHT[0], 16, 4, 2, 8)


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_loads_that_are_not_finite_and_non_negative_are_refused(bad):
  """A NaN expert took 6 of 12 replicas, and the plan's device loads came out NaN."""
  weight = np.array(WEIGHT, np.float32)
  weight[1, 3] = bad
  with pytest.raises(ValueError, match=r"weight\[1, 3\] = .* is not a finite number >= 0"):
    eplb_rebalance(weight, 16, 4, 2, 8)


def test_complex_loads_are_refused():
  with pytest.raises(TypeError, match="weight has dtype complex128, expected real numbers"):
    eplb_rebalance(np.asarray(WEIGHT) + 1j, 16, 4, 2, 8)


def test_loads_beyond_float32_are_refused():
  """The reference computes in float32: 1e39 is finite in float64 but inf there."""
  weight = np.array(WEIGHT, np.float64)
  weight[0, 2] = 1e39
  with pytest.raises(ValueError, match=r"weight\[0, 2\] = inf is not a finite number >= 0"):
    eplb_rebalance(weight, 16, 4, 2, 8)


def test_eplb_is_host_only_and_says_so_under_jit():
  """Under jit a traced weight raised TracerArrayConversionError from inside np.asarray; now a
  TypeError names the function. Eagerly a jax array works like numpy (the design example)."""
  with pytest.raises(TypeError, match=r"eplb_rebalance is host-only \(numpy; do not jit\)"):
    jax.jit(lambda w: eplb_rebalance(w, 16, 4, 2, 8)[0])(jnp.asarray(WEIGHT, jnp.float32))
  phy2log, _, logcnt = eplb_rebalance(jnp.asarray(WEIGHT, jnp.float32), 16, 4, 2, 8)
  np.testing.assert_array_equal(phy2log, PHY2LOG)
  with pytest.raises(TypeError, match=r"eplb_device_load is host-only \(numpy; do not jit\)"):
    jax.jit(lambda w: eplb_device_load(w, phy2log, logcnt, 8))(jnp.asarray(WEIGHT, jnp.float32))


def test_counts_must_be_ints_and_shapes_consistent():
  """16.0 failed in numpy ("'float' object cannot be interpreted as an integer"), True passed
  as 1, an empty weight and a num_gpus that does not divide the replicas failed in a reshape."""
  weight = np.arange(1, 9, dtype=np.float32).reshape(1, 8)
  for args, message in (((16.0, 1, 1, 4), r"num_replicas must be a positive int, got 16.0"),
                        ((16, 1, 1, True), r"num_gpus must be a positive int, got True")):
    with pytest.raises(ValueError, match="eplb_rebalance." + message):
      eplb_rebalance(weight, *args)
  with pytest.raises(ValueError, match=r"\[layers, experts\], both >= 1, got shape \(0, 4\)"):
    eplb_rebalance(np.zeros((0, 4)), 4, 1, 1, 1)
  phy2log, _, logcnt = eplb_rebalance(weight, 12, 1, 1, 4)
  assert eplb_device_load(weight, phy2log, logcnt, 4).shape == (1, 4)
  with pytest.raises(ValueError, match=r"phy2log \(1, 12\) \[L, X\] with X a multiple of "
                                       r"num_gpus=5"):
    eplb_device_load(weight, phy2log, logcnt, 5)


def test_device_load_refuses_counts_and_ids_that_do_not_match_the_layout():
  """A logcnt of ones split every replicated expert's load as if it had one replica (row 0
  summed to 1617, not 1033); a -1 in phy2log read the last expert."""
  phy2log, _, logcnt = eplb_rebalance(WEIGHT, 16, 4, 2, 8)
  np.testing.assert_allclose(eplb_device_load(WEIGHT, phy2log, logcnt, 8).sum(1),
                             np.asarray(WEIGHT).sum(1))
  with pytest.raises(ValueError, match=r"logcnt\[0, \d+\] = 1, but phy2log holds expert \d+ 2"):
    eplb_device_load(WEIGHT, phy2log, np.ones_like(logcnt), 8)
  with pytest.raises(ValueError, match=r"phy2log\[0, \d+\] = -1 is outside \[0, num_experts=12\)"):
    eplb_device_load(WEIGHT, np.where(phy2log == 0, -1, phy2log), logcnt, 8)
