"""Expert loads from replayed routes, the static layout and balance metrics.

Dimension legend:
  B batch, T sequence length, L MoE layers, K top-k, E experts,
  D expert-parallel devices, S slots per device, X = D*S global slots.
  D here is moe_experts' P (the 'expert' axis size), not the models' d_model.

A *load* is a count of (token, k) assignments: `loads_LE[l, e]` is how many
valid tokens chose expert e at layer l. The static (native) layout puts
expert e on device e // (E/D) in slot e % (E/D); slots beyond E/D are empty
there (-1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import check_ids, check_int_dtype
from pr2_jax.config import check_int

EMPTY = -1  # slot_expert value of a slot that holds no expert


def loads_from_routes(routes_BTLK: jax.Array, valid_BT: jax.Array | None,
                      num_experts: int) -> jax.Array:
  """float32 [L, E]: (token, k) pairs routed to each expert, padding and -1 excluded.

  Args:
    routes_BTLK: integer [B, T, L, K] expert ids (dtype checked, also under jit) in [-1, E)
      (checked when concrete); -1 (live router) is not counted, since its expert is unknown
      before the forward pass.
    valid_BT: bool [B, T] real-token mask, or None (all valid).
    num_experts: E.
  """
  routes_BTLK = jnp.asarray(routes_BTLK)  # a nested list or numpy array works too
  if valid_BT is not None:
    valid_BT = jnp.asarray(valid_BT)
  if routes_BTLK.ndim != 4:
    raise ValueError(f"routes must be [B, T, L, K], got shape {routes_BTLK.shape}")
  b, t, num_layers, _ = routes_BTLK.shape
  if valid_BT is not None and tuple(valid_BT.shape) != (b, t):
    raise ValueError(f"valid has shape {valid_BT.shape}, routes need {(b, t)}")
  # A float id would be truncated by the int32 cast (static: also under jit); ids outside
  # [-1, E) would silently go uncounted (values: only when concrete).
  check_int_dtype("routes_BTLK", routes_BTLK)
  check_ids(routes_BTLK, "routes_BTLK", -1, num_experts, "num_experts")
  routes_BTLK = jnp.asarray(routes_BTLK, jnp.int32)
  keep_BTLK = (routes_BTLK >= 0) & (routes_BTLK < num_experts)
  if valid_BT is not None:
    keep_BTLK &= jnp.asarray(valid_BT, bool)[:, :, None, None]
  # One scatter-add into L*E bins: a one-hot would be B*T*L*K*E elements.
  bin_BTLK = jnp.arange(num_layers, dtype=jnp.int32)[:, None] * num_experts + routes_BTLK
  bin_BTLK = jnp.where(keep_BTLK, bin_BTLK, num_layers * num_experts)  # dropped bin
  counts = jnp.zeros(num_layers * num_experts + 1, jnp.float32).at[bin_BTLK.reshape(-1)].add(1.0)
  return counts[:-1].reshape(num_layers, num_experts)


def native_layout(num_experts: int, num_devices: int, slots_per_device: int) -> np.ndarray:
  """int32 [D, S]: expert e in device e // (E/D), slot e % (E/D); extra slots EMPTY."""
  if num_devices < 1 or num_experts % num_devices:
    raise ValueError(f"num_devices={num_devices} must be >= 1 and divide num_experts={num_experts}")
  if slots_per_device < num_experts // num_devices:
    raise ValueError(f"slots_per_device={slots_per_device} is fewer than the "
                     f"{num_experts // num_devices} native experts of each device")
  per = num_experts // num_devices
  layout = np.full((num_devices, slots_per_device), EMPTY, np.int32)
  layout[:, :per] = np.arange(num_experts, dtype=np.int32).reshape(num_devices, per)
  return layout


def static_device_load(loads_LE: jax.Array, num_devices: int) -> jax.Array:
  """float32 [L, D]: device loads of the native layout without replicas. Raises ValueError
  unless loads_LE is [L, E] and num_devices a positive int dividing E."""
  check_int("static_device_load", "num_devices", num_devices)  # 0 was a ZeroDivisionError
  loads_LE = jnp.asarray(loads_LE)  # a nested list or numpy array works too
  if jnp.ndim(loads_LE) != 2:
    raise ValueError(f"loads must be [L, E], got shape {jnp.shape(loads_LE)}")
  num_layers, num_experts = loads_LE.shape
  if num_experts % num_devices:
    raise ValueError(f"num_experts={num_experts} must be divisible by num_devices={num_devices}")
  return jnp.asarray(loads_LE, jnp.float32).reshape(num_layers, num_devices, -1).sum(-1)


def imbalance(device_load_LD: jax.Array) -> jax.Array:
  """max / mean device load over the last axis, float32: [L, D] gives [L] per layer, [M, L, D]
  [M, L] (1 = perfect; an empty layer counts 1)."""
  load = jnp.asarray(device_load_LD, jnp.float32)
  mean = jnp.mean(load, axis=-1)
  return jnp.where(mean > 0, jnp.max(load, axis=-1) / jnp.where(mean > 0, mean, 1.0), 1.0)


def fetched_experts(new_LDS, prev_LDS):
  """int [..., L, D]: experts each device fetches going from layout prev_LDS to new_LDS.

  A slot costs a transfer when its device held its expert in no slot before: a move between
  a device's own slots needs none, an EMPTY slot fetches nothing. Leading axes broadcast
  (micro-steps [M, L, D, S]). numpy in, numpy out; jax arrays (or tracers, under jit) give
  jax. The one definition of a transfer: `plan_stats`, the RL loop's churn and the balance
  benchmark count with it.
  """
  xp = jnp if isinstance(new_LDS, jax.Array) or isinstance(prev_LDS, jax.Array) else np
  new_LDS, prev_LDS = xp.asarray(new_LDS), xp.asarray(prev_LDS)
  held_LDS = xp.any(new_LDS[..., :, None] == prev_LDS[..., None, :], axis=-1)
  return xp.sum((new_LDS >= 0) & ~held_LDS, axis=-1)  # >= 0: EMPTY (-1) holds nothing


def plan_stats(plan, previous=None, bytes_per_expert: float = 0.0) -> dict:
  """Churn of a plan against the previous one.

  Args:
    plan: a `Plan` (anything with `slot_expert [L, D, S]` and `replica_count [L, E]`).
    previous: a `Plan`, an int [L, D, S] layout (EMPTY = -1 allowed) or None
      for the native layout.
    bytes_per_expert: weight bytes of one expert.
  Returns a dict of [L] arrays:
    slots_changed: slots whose expert differs from the previous plan's;
    transfers: slots whose expert the device did not hold anywhere before
      (an expert moved between slots of one device needs no network transfer);
    bytes_moved: transfers * bytes_per_expert (weights in; the backward pass
      sends as many gradient bytes back to the owners).
  """
  new_LDS = jnp.asarray(plan.slot_expert, jnp.int32)
  num_layers, num_devices, slots = new_LDS.shape
  if previous is None:
    previous = np.broadcast_to(native_layout(plan.replica_count.shape[-1], num_devices, slots),
                               new_LDS.shape)
  prev_LDS = jnp.asarray(getattr(previous, "slot_expert", previous), jnp.int32)
  if prev_LDS.shape != new_LDS.shape:
    raise ValueError(f"previous layout has shape {prev_LDS.shape}, the plan {new_LDS.shape}")
  changed_L = jnp.sum(new_LDS != prev_LDS, axis=(1, 2))
  transfers_L = jnp.sum(fetched_experts(new_LDS, prev_LDS), axis=-1)
  return {"slots_changed": changed_L.astype(jnp.int32), "transfers": transfers_L.astype(jnp.int32),
          "bytes_moved": transfers_L.astype(jnp.float32) * bytes_per_expert}
