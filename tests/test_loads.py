"""Loads from routes, the native layout, imbalance and plan churn, by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.balance import loads as ld


def test_loads_from_routes_hand_worked():
  """2 sequences x 3 tokens, 2 layers, top-2, 4 experts; -1 and padding are not counted."""
  routes = np.array([
      [[[0, 1], [2, 3]], [[0, 2], [2, -1]], [[3, 1], [0, 1]]],
      [[[1, 0], [3, 2]], [[1, 1], [1, 1]], [[-1, -1], [0, 3]]],
  ], np.int32)
  valid = np.array([[True, True, True], [True, False, True]])
  got = ld.loads_from_routes(jnp.asarray(routes), jnp.asarray(valid), 4)
  # layer 0: (0,1) (0,2) (3,1) (1,0) [pad] (-1,-1)  -> e0:3 e1:3 e2:1 e3:1
  # layer 1: (2,3) (2,-1) (0,1) (3,2) [pad] (0,3)   -> e0:2 e1:1 e2:3 e3:3
  np.testing.assert_array_equal(got, [[3, 3, 1, 1], [2, 1, 3, 3]])
  assert got.dtype == jnp.float32
  all_valid = ld.loads_from_routes(jnp.asarray(routes), None, 4)
  np.testing.assert_array_equal(all_valid, [[3, 5, 1, 1], [2, 3, 3, 3]])


def test_loads_from_routes_jits_and_validates():
  routes = jnp.zeros((2, 3, 1, 2), jnp.int32)
  fn = jax.jit(ld.loads_from_routes, static_argnums=2)
  np.testing.assert_array_equal(fn(routes, jnp.ones((2, 3), bool), 3), [[12, 0, 0]])
  with pytest.raises(ValueError, match="B, T, L, K"):
    ld.loads_from_routes(routes[0], None, 3)
  with pytest.raises(ValueError, match="valid has shape"):
    ld.loads_from_routes(routes, jnp.ones((3, 2), bool), 3)


@pytest.mark.parametrize("bad", [4, 7, -2])
def test_loads_from_routes_rejects_ids_outside_minus_one_to_e(bad):
  """Ids >= E or < -1 used to go uncounted silently (ids up to 7 with E=4 counted only 0-3);
  -1 (live) stays legal, and under jit only the static checks run."""
  routes = np.zeros((2, 3, 1, 2), np.int32)
  routes[1, 2, 0, 1] = bad
  with pytest.raises(ValueError, match=rf"routes_BTLK\[1, 2, 0, 1\] = {bad} is outside "
                                       r"\[-1, num_experts=4\)"):
    ld.loads_from_routes(jnp.asarray(routes), None, 4)
  with pytest.raises(TypeError, match=r"routes_BTLK has dtype float32"):
    ld.loads_from_routes(routes.astype(np.float32), None, 4)
  routes[1, 2, 0, 1] = -1
  np.testing.assert_array_equal(ld.loads_from_routes(routes, None, 4), [[11, 0, 0, 0]])


def test_native_layout_and_static_load():
  np.testing.assert_array_equal(ld.native_layout(6, 3, 3), [[0, 1, -1], [2, 3, -1], [4, 5, -1]])
  loads = jnp.array([[1., 2., 3., 4., 5., 6.]])
  np.testing.assert_array_equal(ld.static_device_load(loads, 3), [[3, 7, 11]])
  with pytest.raises(ValueError, match="divisible"):
    ld.static_device_load(loads, 4)
  with pytest.raises(ValueError, match=r"loads must be \[L, E\], got shape \(6,\)"):
    ld.static_device_load(loads[0], 3)
  for bad in (0, -2, 2.0, True):  # 0 was a ZeroDivisionError (integer modulo by zero)
    with pytest.raises(ValueError, match=rf"static_device_load.num_devices must be a positive "
                                         rf"int, got {bad!r}"):
      ld.static_device_load(loads, bad)
  np.testing.assert_array_equal(ld.static_device_load(loads.tolist(), 2), [[6, 15]])
  with pytest.raises(ValueError, match=r"num_devices=4 must be >= 1 and divide num_experts=6"):
    ld.native_layout(6, 4, 2)
  with pytest.raises(ValueError, match=r"slots_per_device=1 is fewer than the 2 native experts"):
    ld.native_layout(6, 3, 1)


def test_imbalance():
  got = ld.imbalance(jnp.array([[3., 7., 11.], [2., 2., 2.], [0., 0., 0.]]))
  np.testing.assert_allclose(got, [11 / 7, 1.0, 1.0])


class _Plan:  # the two fields plan_stats reads
  def __init__(self, slot_expert, num_experts):
    self.slot_expert = np.asarray(slot_expert)
    self.replica_count = np.zeros((self.slot_expert.shape[0], num_experts))


def test_plan_stats_hand_worked():
  """4 experts, 2 devices x 3 slots; native [[0,1,-],[2,3,-]].

  New [[0,1,2],[3,2,0]]: device 0 keeps 0,1 and gains 2 in its spare slot (1 changed slot,
  1 transfer); device 1 swaps 2 and 3 (2 changed slots, no transfer) and gains 0 in its
  spare slot (1 changed, 1 transfer). Total: 4 changed, 2 transfers.
  """
  plan = _Plan([[[0, 1, 2], [3, 2, 0]]], 4)
  stats = ld.plan_stats(plan, None, bytes_per_expert=10.0)
  np.testing.assert_array_equal(stats["slots_changed"], [4])
  np.testing.assert_array_equal(stats["transfers"], [2])
  np.testing.assert_allclose(stats["bytes_moved"], [20.0])
  same = ld.plan_stats(plan, plan.slot_expert)
  np.testing.assert_array_equal(same["slots_changed"], [0])
  np.testing.assert_array_equal(same["transfers"], [0])
  with pytest.raises(ValueError, match="previous layout"):
    ld.plan_stats(plan, np.zeros((1, 3, 2), np.int32))


def test_fetched_experts_counts_new_experts_not_empty_slots():
  new_LDS = np.array([[[0, -1, 2], [3, 3, 1]]])
  prev_LDS = np.array([[[0, 1, 3], [1, -1, -1]]])
  # Device 0 fetches expert 2 (its emptied slot costs nothing); device 1 fetches 3 twice
  # (1 it had in another slot: no transfer).
  got = ld.fetched_experts(new_LDS, prev_LDS)
  assert isinstance(got, np.ndarray)
  np.testing.assert_array_equal(got, [[1, 2]])
  # jax in (also under jit), and leading micro-step axes broadcast against one previous.
  got = jax.jit(ld.fetched_experts)(jnp.stack([new_LDS, prev_LDS]), jnp.asarray(prev_LDS))
  np.testing.assert_array_equal(got, [[[1, 2]], [[0, 0]]])


def test_loads_from_routes_takes_nested_lists():
  routes = [[[[0, 1]], [[1, 2]]]]  # [B=1, T=2, L=1, K=2]
  np.testing.assert_array_equal(ld.loads_from_routes(routes, [[True, False]], 3), [[1, 1, 0]])


def test_loads_from_routes_refuses_float_routes_under_jit_too():
  """The dtype is static: under jit float ids were truncated (2.9 counted as expert 2)."""
  routes = jnp.asarray([[[[2.9, 0.2]], [[0.0, 1.0]]]])  # [1, 2, 1, 2]
  fn = jax.jit(ld.loads_from_routes, static_argnums=2)
  for call in (ld.loads_from_routes, fn):
    with pytest.raises(TypeError, match=r"routes_BTLK has dtype float32, expected an integer "
                                        r"dtype"):
      call(routes, None, 4)
  np.testing.assert_array_equal(fn(routes.astype(jnp.int32), None, 4), [[2, 1, 1, 0]])
