"""Expert computation on one shard: the slot weights and map, the capacity path's
pieces, and the dense and ragged paths.

The grouped path, built on `dispatch`, `swiglu` and `combine` here, is
`pr2_jax.models.grouped`. All functions are pure and shard-local;
`pr2_jax.parallel.expert_parallel` wraps them in `jax.shard_map` and adds the collectives.

Dimension legend:
  N tokens, D d_model, F expert hidden width, K top-k, E experts,
  P expert-parallel shards, S slots per shard, X = P*S global slots,
  C per-(source shard, slot) token capacity, M = N*K assignments.

Experts live in *slots*: a slot holds the weights of one expert and a
`slot_expert [X]` map says which (identity by default: slot x = expert x).
Routing picks experts; `expert_to_slot` turns them into slots, so replicas
in extra slots need no change here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import check_ids, check_int_dtype, is_concrete


def validate_slot_expert(slot_expert_X, num_experts: int) -> None:
  """A concrete slot map (no-op otherwise): every slot holds an expert in [0, E) and every
  expert has a slot (`expert_to_slot` would send an expert without one to slot 0's weights)."""
  if not is_concrete(slot_expert_X):
    return
  check_ids(slot_expert_X, "slot_expert_X", 0, num_experts, "num_experts")
  missing = np.setdiff1d(np.arange(num_experts), np.asarray(slot_expert_X))
  if missing.size:
    raise ValueError(f"slot_expert_X has no slot for expert(s) {missing.tolist()} of "
                     f"num_experts={num_experts}; every expert needs at least one slot")


class ExpertWeights(NamedTuple):
  gate_SDF: jax.Array  # SwiGLU gate projection per slot
  up_SDF: jax.Array    # SwiGLU up projection per slot
  down_SFD: jax.Array  # output projection per slot

  def take(self, slot_expert_S: jax.Array) -> "ExpertWeights":
    """Slot weights from per-expert weights (replicas share their expert's weights). Ids
    outside [0, E) are an error when concrete (`jnp.take` would give NaN or wrap -1)."""
    check_int_dtype("slot_expert_S", slot_expert_S)
    check_ids(slot_expert_S, "slot_expert_S", 0, self.gate_SDF.shape[0], "number of experts")
    return ExpertWeights(*(jnp.take(w, slot_expert_S, axis=0) for w in self))

  def astype(self, dtype) -> "ExpertWeights":
    return ExpertWeights(*(w.astype(dtype) for w in self))


def swiglu(x_SCD: jax.Array, w: ExpertWeights) -> jax.Array:
  """down(silu(x gate) * (x up)) for every slot's buffer of tokens."""
  g_SCF = jnp.einsum("...scd,sdf->...scf", x_SCD, w.gate_SDF)
  u_SCF = jnp.einsum("...scd,sdf->...scf", x_SCD, w.up_SDF)
  return jnp.einsum("...scf,sfd->...scd", jax.nn.silu(g_SCF) * u_SCF, w.down_SFD)


def expert_to_slot(expert_ids_NK: jax.Array, slot_expert_X: jax.Array,
                   num_experts: int) -> jax.Array:
  """Slot of each chosen expert: the first slot holding it (a planner can do better).

  Every expert must have a slot and ids be in [0, E); checked when the inputs are concrete.
  """
  if slot_expert_X.ndim != 1:
    raise ValueError(f"slot_expert_X must be one layer's map [X], got shape {slot_expert_X.shape}")
  validate_slot_expert(slot_expert_X, num_experts)
  check_ids(expert_ids_NK, "expert_ids_NK", 0, num_experts, "num_experts")
  holds_EX = slot_expert_X[None, :] == jnp.arange(num_experts, dtype=slot_expert_X.dtype)[:, None]
  first_slot_E = jnp.argmax(holds_EX, axis=1).astype(jnp.int32)
  return first_slot_E[expert_ids_NK]


def rank_in_slot(onehot_MX: jax.Array) -> jax.Array:
  """Each assignment's place in its slot's queue, int [M]: how many earlier rows of the one-hot
  [M, X] chose the same slot (-1 for an all-zero row, an assignment to no slot here)."""
  return jnp.sum(jnp.cumsum(onehot_MX, axis=0) * onehot_MX, axis=1) - 1


def capacity_positions(slot_ids_NK: jax.Array, num_slots: int, capacity: int):
  """Position of every (token, k) in its slot's buffer, first choices first.

  Assignments are ordered k-major (all tokens' 1st choice, then 2nd, ...) as in
  GShard/Switch, so a token loses its lower-ranked experts before anyone loses
  a first choice. An id outside [0, num_slots) (`moe_experts`' "no slot" for padding)
  takes no place and is not kept. Returns (buffer_index_NK into a [X*C] buffer, keep_NK bool).
  """
  n, k = slot_ids_NK.shape
  ids_M = slot_ids_NK.T.reshape(-1)
  onehot_MX = jax.nn.one_hot(ids_M, num_slots, dtype=jnp.int32)
  pos_NK = rank_in_slot(onehot_MX).reshape(k, n).T
  # pos -1: no slot (an all-zero one-hot row), which `pos < capacity` alone kept, at place -1
  # of the index below, the last slot's last place.
  keep_NK = (pos_NK >= 0) & (pos_NK < capacity)
  index_NK = jnp.where(keep_NK, slot_ids_NK * capacity + pos_NK, num_slots * capacity)
  return index_NK, keep_NK


def dispatch(x_ND: jax.Array, index_NK: jax.Array, buffer_size: int) -> jax.Array:
  """Gathers tokens into a [buffer_size, D] buffer (empty places are zeros).

  An int scatter of token ids followed by a row gather keeps the heavy data
  movement a gather, whose transpose (a scatter-add) is the backward pass.
  """
  n, k = index_NK.shape
  token_M = jnp.repeat(jnp.arange(n, dtype=jnp.int32), k)
  src_X = jnp.full((buffer_size,), n, jnp.int32).at[index_NK.reshape(-1)].set(token_M, mode="drop")
  x_pad = jnp.concatenate([x_ND, jnp.zeros((1, x_ND.shape[1]), x_ND.dtype)], axis=0)
  return x_pad[src_X]


def combine(y_XD: jax.Array, index_NK: jax.Array, keep_NK: jax.Array,
            gates_NK: jax.Array) -> jax.Array:
  """Σ_k gate_k · y[buffer place of (token, k)]; dropped assignments contribute 0."""
  y_NKD = jnp.take(y_XD, jnp.minimum(index_NK, y_XD.shape[0] - 1), axis=0)
  w_NK = jnp.where(keep_NK, gates_NK, 0.0).astype(jnp.float32)
  # A multiply and a sum over k, not einsum("nkd,nk->nd"): that is N batched [1, K] x [K, D]
  # matmuls, which XLA:CPU runs one by one.
  return jnp.sum(y_NKD.astype(jnp.float32) * w_NK[:, :, None], axis=1)


def dense_experts(x_ND: jax.Array, slot_ids_NK: jax.Array, gates_NK: jax.Array,
                  w: ExpertWeights, slot_offset=0) -> jax.Array:
  """Reference: every local slot runs on every token, weighted by its gate (0 if unchosen).

  Returns float32 [N, D]: the contribution of slots [slot_offset, slot_offset+S).
  """
  num_local = w.gate_SDF.shape[0]
  local_NK = slot_ids_NK - slot_offset
  onehot_NKS = jax.nn.one_hot(local_NK, num_local, dtype=jnp.float32)
  weight_NS = jnp.einsum("nks,nk->ns", onehot_NKS, gates_NK.astype(jnp.float32))
  y_SND = swiglu(jnp.broadcast_to(x_ND, (num_local,) + x_ND.shape), w)
  return jnp.einsum("snd,ns->nd", y_SND.astype(jnp.float32), weight_NS)


def ragged_experts(x_ND: jax.Array, slot_ids_NK: jax.Array, gates_NK: jax.Array,
                   w: ExpertWeights, slot_offset=0) -> jax.Array:
  """Ragged path: sort assignments by slot and run `lax.ragged_dot` (dropless; a grouped
  matmul on GPU/TPU, a masked dense one on XLA:CPU, where `grouped.grouped_experts` is the
  fast dropless path).

  Assignments to slots outside [slot_offset, slot_offset+S) sort to the end,
  beyond Σ group_sizes, where ragged_dot yields zeros. Returns float32 [N, D].
  """
  n, k = slot_ids_NK.shape
  num_local = w.gate_SDF.shape[0]
  local_M = (slot_ids_NK - slot_offset).reshape(-1)
  local_M = jnp.where((local_M >= 0) & (local_M < num_local), local_M, num_local)
  order_M = jnp.argsort(local_M, stable=True)
  token_M = order_M // k
  sizes_S = jnp.bincount(local_M, length=num_local + 1)[:num_local].astype(jnp.int32)
  x_MD = x_ND[token_M]
  g_MF = jax.lax.ragged_dot(x_MD, w.gate_SDF, sizes_S)
  u_MF = jax.lax.ragged_dot(x_MD, w.up_SDF, sizes_S)
  y_MD = jax.lax.ragged_dot(jax.nn.silu(g_MF) * u_MF, w.down_SFD, sizes_S)
  gate_M = gates_NK.reshape(-1)[order_M].astype(jnp.float32)
  return jnp.zeros((n, x_ND.shape[1]), jnp.float32).at[token_M].add(
      y_MD.astype(jnp.float32) * gate_M[:, None])



def capacity_for(tokens_per_shard: int, top_k: int, num_slots: int, capacity_factor: float) -> int:
  """Static per-(source shard, slot) capacity; factor 0 means dropless (= tokens_per_shard).

  A slot holds one expert and a token picks distinct experts, so one shard can
  send at most `tokens_per_shard` assignments to a slot: that bound is dropless.
  """
  if capacity_factor <= 0:
    return max(tokens_per_shard, 1)
  even_share = tokens_per_shard * top_k / num_slots
  return int(min(tokens_per_shard, max(1, math.ceil(capacity_factor * even_share))))
