"""Token split among an expert's replicas: water-filling over the devices holding it.

Dimension legend:
  E experts, D devices, S slots per device, X = D*S replicas (one per slot).

With a placement fixed, the split decides how many of expert e's n_e
assignments each of its replicas takes. The ideal for one expert, holding
every other load fixed, is water-filling: with o_i the rest of the load on
replica i's device, pick the level λ with Σ_i max(0, λ - o_i) = n_e and give
replica i max(0, λ - o_i). `water_fill` does that for all experts at once
(Jacobi), damped by `step`, and keeps a round only if the busiest device got
lighter; a rejected round halves the step. So the busiest device never gets
busier than under the starting split, and every expert's total is kept.

The replicas come in placement order, where one expert's replicas are
adjacent (a run), so per-expert sums are differences of one cumulative sum:
at these sizes far cheaper on XLA:CPU than sorting, scattering or one-hot
products.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_LEVEL_STEPS = 2  # active-set steps per water level (2 matched 4 on the bench traces)


def runs(expert_X: jax.Array):
  """(first_X, last_X): bounds of the run of equal experts each replica is in."""
  idx_X = jnp.arange(expert_X.shape[0])
  starts_X = jnp.concatenate([jnp.ones((1,), bool), expert_X[1:] != expert_X[:-1]])
  ends_X = jnp.concatenate([expert_X[1:] != expert_X[:-1], jnp.ones((1,), bool)])
  first_X = jax.lax.cummax(jnp.where(starts_X, idx_X, 0))
  last_X = jax.lax.cummin(jnp.where(ends_X, idx_X, expert_X.shape[0] - 1), reverse=True)
  return first_X, last_X


def water_fill(n_X: jax.Array, expert_X: jax.Array, slot_X: jax.Array, x_X: jax.Array,
               num_devices: int, slots: int, iters: int, step: float = 0.5) -> jax.Array:
  """float32 [X]: refined replica loads of one layer (each expert's replicas keep their sum).

  Args:
    n_X: float32 [X] load of each replica's expert.
    expert_X: int [X] expert of each replica; one expert's replicas adjacent.
    slot_X: int [X] global slot (d * S + s) of each replica, a permutation.
    x_X: float32 [X] starting split (e.g. n / replica count).
    num_devices, slots: D and S.
    iters: Jacobi rounds (static).
    step: starting damping in (0, 1].
  """
  if iters <= 0:
    return x_X
  num_slots = num_devices * slots
  first_X, last_X = runs(expert_X)
  device_X = slot_X // slots
  replica_of_slot = jnp.zeros((num_slots,), jnp.int32).at[slot_X].set(
      jnp.arange(num_slots, dtype=jnp.int32))

  def per_expert(v_KX):
    """Σ of each row of v over each replica's run, for every replica: [K, X] -> [K, X]."""
    cs_KX = jnp.cumsum(v_KX, axis=-1)
    return cs_KX[:, last_X] - cs_KX[:, first_X] + v_KX[:, first_X]

  def device_load(v_X):
    return jnp.sum(v_X[replica_of_slot].reshape(num_devices, slots), axis=1)

  def targets(v_X):
    other_X = device_load(v_X)[device_X] - v_X
    # Active-set iteration from "all replicas active": the level only falls and
    # reaches λ once no active replica sits above it. Stopping after a few
    # steps can leave λ a little high, so the fill is rescaled to sum to n_e.
    active_X = jnp.ones_like(v_X)
    for _ in range(_LEVEL_STEPS):
      sums_2X = per_expert(jnp.stack([active_X * other_X, active_X]))
      level_X = (n_X + sums_2X[0]) / jnp.maximum(sums_2X[1], 1.0)
      active_X = (other_X < level_X).astype(v_X.dtype)
    fill_X = jnp.maximum(level_X - other_X, 0.0)
    total_X = per_expert(fill_X[None])[0]
    return jnp.where(total_X > 0, fill_X * (n_X / jnp.where(total_X > 0, total_X, 1.0)), v_X)

  def round_(_, state):
    v_X, alpha, peak = state
    cand_X = v_X + alpha * (targets(v_X) - v_X)
    cand_peak = jnp.max(device_load(cand_X))
    better = cand_peak < peak
    return (jnp.where(better, cand_X, v_X), jnp.where(better, alpha, alpha / 2),
            jnp.where(better, cand_peak, peak))

  x_X = x_X.astype(jnp.float32)
  init = (x_X, jnp.float32(step), jnp.max(device_load(x_X)))
  return jax.lax.fori_loop(0, iters, round_, init)[0]
