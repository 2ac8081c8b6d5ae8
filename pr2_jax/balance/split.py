"""Token split among an expert's replicas: water-filling over the devices holding it.

Dimension legend:
  E experts, D devices, S slots per device, X = D*S replicas (one per slot, in
  placement order), Y = the same X replicas in slot order (d * S + s), R = rows
  of per-expert sums taken at once (1 or 2).
  D here is moe_experts' P (the 'expert' axis size), not the models' d_model.

With a placement fixed, the split decides how many of expert e's n_e
assignments each of its replicas takes. The ideal for one expert, holding
every other load fixed, is water-filling: with o_i the rest of the load on
replica i's device, pick the level λ with Σ_i max(0, λ - o_i) = n_e and give
replica i max(0, λ - o_i). `water_fill` does that for all experts at once
(Jacobi), damped by `step`, and keeps a round only if the busiest device got
lighter; a rejected round halves the step. So the busiest device never gets
busier than under the starting split, and every expert's total is kept.

Cost, not maths, shapes the code: the planner runs inside every micro-step,
and on XLA:CPU its time is the number of small kernels launched. Rounds work
in slot order (a device's load is a reshape-sum) and per-expert sums are one
scatter-add and one gather by expert id: `jnp.cumsum` lowers to an O(X^2)
reduce-window on CPU and was 2-3x slower per round at X = 192.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Active-set steps per water level (1 matched 2, and 2 matched 4, on the bench traces).
_LEVEL_STEPS = 1


def water_fill(n_X: jax.Array, expert_X: jax.Array, slot_X: jax.Array, x_X: jax.Array,
               num_devices: int, slots: int, iters: int, step: float = 0.5) -> jax.Array:
  """float32 [X]: refined replica loads of one layer (each expert's replicas keep their sum).

  Args:
    n_X: float32 [X] load of each replica's expert.
    expert_X: int [X] expert of each replica (ids < X, any order).
    slot_X: int [X] global slot (d * S + s) of each replica, a permutation.
    x_X: float32 [X] starting split (e.g. n / replica count).
    num_devices, slots: D and S.
    iters: Jacobi rounds (static).
    step: starting damping in (0, 1].
  """
  if iters <= 0:
    return x_X
  # The rounds run in slot order, where a device's load is a reshape-sum and the
  # rest of each replica's device a repeat: no gathers. Per-expert sums are one
  # scatter-add and one gather by expert id (XLA:CPU lowers cumsum to an O(X^2)
  # reduce-window, several times slower at these sizes).
  to_slots = lambda a_X: jnp.zeros_like(a_X).at[slot_X].set(a_X)  # noqa: E731
  n_Y, expert_Y = to_slots(n_X.astype(jnp.float32)), to_slots(expert_X)

  def per_expert(v_RY):
    """Σ of each row of v over each slot's expert, for every slot: [R, Y] -> [R, Y]."""
    # Indexed by expert id (< X), so Y long too: entry e holds expert e's sum.
    sums_RY = jnp.zeros(v_RY.shape, v_RY.dtype).at[:, expert_Y].add(v_RY)
    return sums_RY[:, expert_Y]

  def device_load(v_Y):
    v_DS = v_Y.reshape(num_devices, slots)
    # S static adds: XLA:CPU ran the reduce-sum as a separate, slower kernel in the loop.
    return sum(v_DS[:, s] for s in range(1, slots)) + v_DS[:, 0]

  def targets(v_Y):
    other_Y = jnp.repeat(device_load(v_Y), slots) - v_Y
    # Active-set iteration from "all replicas active": the level only falls and
    # reaches λ once no active replica sits above it. Stopping after a few
    # steps can leave λ a little high, so the fill is rescaled to sum to n_e.
    active_Y = jnp.ones_like(v_Y)
    for _ in range(_LEVEL_STEPS):
      sums_2Y = per_expert(jnp.stack([active_Y * other_Y, active_Y]))
      level_Y = (n_Y + sums_2Y[0]) / jnp.maximum(sums_2Y[1], 1.0)
      active_Y = (other_Y < level_Y).astype(v_Y.dtype)
    fill_Y = jnp.maximum(level_Y - other_Y, 0.0)
    total_Y = per_expert(fill_Y[None])[0]
    return jnp.where(total_Y > 0, fill_Y * (n_Y / jnp.where(total_Y > 0, total_Y, 1.0)), v_Y)

  def round_(_, state):
    v_Y, alpha, peak = state
    cand_Y = v_Y + alpha * (targets(v_Y) - v_Y)
    cand_peak = jnp.max(device_load(cand_Y))
    better = cand_peak < peak
    return (jnp.where(better, cand_Y, v_Y), jnp.where(better, alpha, alpha / 2),
            jnp.where(better, cand_peak, peak))

  v_Y = to_slots(x_X.astype(jnp.float32))
  init = (v_Y, jnp.float32(step), jnp.max(device_load(v_Y)))
  return jax.lax.fori_loop(0, iters, round_, init)[0][slot_X]
