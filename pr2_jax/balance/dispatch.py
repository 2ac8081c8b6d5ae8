"""Per-assignment replica choice for dispatch: which slot each (token, k) pair goes to.

Dimension legend:
  N tokens, K top-k, M = N*K assignments, E experts, D devices, S slots per
  device, X = D*S global slots, P source shards (token blocks).
  D here is moe_experts' P (the 'expert' axis size), not d_model; P here is token shards.

`assign_replicas` turns expert ids into global slot ids (indices into the
flat [D*S] slot array, slot x = d * S + s) so that every replica receives its
planned share of its expert's tokens; the result is the `slot_ids_NK` of
`moe_experts`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import check_ids
from pr2_jax.models.experts import validate_slot_expert


def runs(expert_X: jax.Array):
  """(first_X, last_X): bounds of the run of equal experts each replica is in."""
  idx_X = jnp.arange(expert_X.shape[0])
  starts_X = jnp.concatenate([jnp.ones((1,), bool), expert_X[1:] != expert_X[:-1]])
  ends_X = jnp.concatenate([expert_X[1:] != expert_X[:-1], jnp.ones((1,), bool)])
  first_X = jax.lax.cummax(jnp.where(starts_X, idx_X, 0))
  last_X = jax.lax.cummin(jnp.where(ends_X, idx_X, expert_X.shape[0] - 1), reverse=True)
  return first_X, last_X


def _check_tokens(ids_NK, valid_N, num_source_shards: int) -> None:
  """Static checks of [N, K] ids, a [N] mask and the token blocks."""
  if jnp.ndim(ids_NK) != 2:
    raise ValueError(f"ids must be [N, K], got shape {jnp.shape(ids_NK)}")
  n = jnp.shape(ids_NK)[0]
  if valid_N is not None and tuple(jnp.shape(valid_N)) != (n,):
    raise ValueError(f"valid has shape {jnp.shape(valid_N)}, the {n} tokens need ({n},)")
  if num_source_shards < 1 or n % num_source_shards:
    raise ValueError(f"{n} tokens do not split into num_source_shards={num_source_shards}")


def assign_replicas(expert_ids_NK: jax.Array, valid_N: jax.Array | None, plan_layer,
                    num_source_shards: int = 1) -> jax.Array:
  """int32 [N, K]: the global slot (index into the flat [D*S] slots) of every assignment.

  Tokens are cut into `num_source_shards` contiguous blocks (the token shards
  of `moe_experts`). Within each block, the assignments of expert e, in token
  order, are divided among e's replicas by the planned shares: the one of
  rank r among c goes to the replica whose cumulative-share interval holds
  (r + 1/2) / c. So every replica gets its share of every block's tokens, to
  within one, and per-(block, slot) buffers shrink with the plan. Padding
  tokens (valid False) are split the same way among themselves, apart from
  the real ones, so they never shift a real token's replica.

  Args:
    expert_ids_NK: int [N, K] expert ids in [0, E).
    valid_N: bool [N] or None.
    plan_layer: one layer of a `Plan` (`plan.layer(l)`).
    num_source_shards: token blocks (must divide N).
  Ids outside [0, E), or a slot map without a slot for some expert, raise ValueError when
  concrete (else such an id would silently land in another expert's slot).
  """
  if plan_layer.replica_count.ndim != 1:
    raise ValueError("assign_replicas takes one layer of a plan: use plan.layer(l)")
  _check_tokens(expert_ids_NK, valid_N, num_source_shards)
  n, k = expert_ids_NK.shape
  slot_X = plan_layer.slot_expert.reshape(-1)
  share_X = plan_layer.replica_share.reshape(-1).astype(jnp.float32)
  num_experts = plan_layer.replica_count.shape[-1]
  validate_slot_expert(slot_X, num_experts)
  check_ids(expert_ids_NK, "expert_ids_NK", 0, num_experts, "num_experts")
  # Integer keys expert * Q + position in [0, Q) make one exact searchsorted
  # across all experts (float keys would lose the position to rounding).
  q = 1 << int(np.floor(np.log2((2**31 - 1) / (num_experts + 1))))
  order_X = jnp.argsort(slot_X, stable=True)
  expert_X, frac_X = slot_X[order_X], share_X[order_X]
  first_X, last_X = runs(expert_X)
  cs_X = jnp.cumsum(frac_X)
  cum_X = cs_X - cs_X[first_X] + frac_X[first_X]
  total_X = cum_X[last_X]
  # Normalised so an expert's last replica closes its interval at exactly 1;
  # an expert without any share splits evenly.
  rank_X = (jnp.arange(slot_X.shape[0]) - first_X + 1).astype(jnp.float32)
  cum_X = jnp.where(total_X > 0, cum_X / jnp.where(total_X > 0, total_X, 1.0),
                    rank_X / (last_X - first_X + 1).astype(jnp.float32))
  edge_X = jnp.where(jnp.arange(slot_X.shape[0]) == last_X, q,
                     jnp.minimum(jnp.round(cum_X * q), q)).astype(jnp.int32)
  key_X = expert_X * q + edge_X

  ids_M = jnp.asarray(expert_ids_NK, jnp.int32).reshape(-1)
  block_M = jnp.repeat(jnp.arange(n, dtype=jnp.int32) // (n // num_source_shards), k)
  if valid_N is not None:
    block_M += jnp.repeat(~jnp.asarray(valid_N, bool), k).astype(jnp.int32) * num_source_shards
  group_M = block_M * num_experts + ids_M
  order_M = jnp.argsort(group_M, stable=True)
  first_M, last_M = runs(group_M[order_M])
  pos_M = (jnp.arange(ids_M.shape[0]) - first_M).astype(jnp.float32)
  size_M = (last_M - first_M + 1).astype(jnp.float32)
  u_M = jnp.floor((pos_M + 0.5) / size_M * q).astype(jnp.int32)
  want_M = ids_M[order_M] * q + jnp.minimum(u_M, q - 1)
  slot_M = order_X[jnp.searchsorted(key_X, want_M, side="right")]
  return jnp.zeros_like(ids_M).at[order_M].set(slot_M.astype(jnp.int32)).reshape(n, k)


def slot_counts(slot_ids_NK: jax.Array, num_slots: int, num_source_shards: int = 1,
                valid_N: jax.Array | None = None) -> jax.Array:
  """int32 [P, X]: assignments each source shard sends to each slot.

  Its max is the smallest dropless per-(source shard, slot) capacity of
  `moe_experts`' capacity path. Pass the `valid_N` given to `moe_experts` (which
  keeps padding out of the buffers); without it, as `moe_experts` without one,
  every token counts. Slot ids must be in
  [0, num_slots) (checked when concrete: one outside would count in another shard's row).
  """
  _check_tokens(slot_ids_NK, valid_N, num_source_shards)
  check_ids(slot_ids_NK, "slot_ids_NK", 0, num_slots, "num_slots")
  n, k = slot_ids_NK.shape
  block_NK = jnp.broadcast_to((jnp.arange(n) // (n // num_source_shards))[:, None], (n, k))
  weight_NK = jnp.ones((n, k), jnp.int32)
  if valid_N is not None:
    weight_NK = weight_NK * jnp.asarray(valid_N, jnp.int32)[:, None]
  flat = (block_NK * num_slots + slot_ids_NK).reshape(-1)
  return jnp.zeros((num_source_shards * num_slots,), jnp.int32).at[flat].add(
      weight_NK.reshape(-1)).reshape(num_source_shards, num_slots)
