"""The grouped expert path on one shard: each slot runs on its own tokens only, dropless.

Its own module because it is its own unit: block layout, a custom-VJP block loop and a
run-time choice of branch, built on `pr2_jax.models.experts`' `dispatch`, `swiglu` and
`combine`. Pure and shard-local like those; `pr2_jax.parallel.expert_parallel` wraps it in
`jax.shard_map` and adds the collectives.

Dimension legend:
  N tokens, D d_model, F expert hidden width, K top-k, S slots on this shard,
  M = N*K assignments, C per-slot capacity of the one-einsum branch,
  B blocks and R rows per block.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import is_concrete
from pr2_jax.config import storage_dtype
from pr2_jax.models.experts import ExpertWeights, combine, dispatch, rank_in_slot, swiglu


def block_rows(num_assignments: int, num_slots: int) -> int:
  """Rows per block of the grouped path: about a slot's even share, a power of 2 in [8, 64].

  Each slot's group is padded to whole blocks, so up to num_slots - 1 rows per
  block are wasted: small blocks waste less but make more, smaller matmuls.
  At 4096 assignments over 16 slots on XLA:CPU, forward + backward took 170 ms
  with 64 rows, 164 ms with 128 (within noise) and 232 ms with 32.
  """
  share = max(1, -(-num_assignments // max(num_slots, 1)))
  return int(min(64, max(8, 1 << (share - 1).bit_length())))


def grouped_positions(slot_ids_NK: jax.Array, num_slots: int, rows: int):
  """Row of every (token, k) in a buffer where each slot's group fills whole blocks of `rows`.

  Slot s's group starts at block Σ_{s'<s} ceil(size_s' / rows), so every block
  holds one slot's tokens. Returns (index_NK into the [B*rows] buffer, B*rows
  for ids outside [0, num_slots); keep_NK; block_slot_B the slot of every block;
  used, the int32 number of blocks the groups fill), with B = ceil(N*K / rows) +
  num_slots, a static bound (a group wastes < 1 block). Blocks from `used` on are
  empty (zeros) and labelled with the last slot.
  """
  n, k = slot_ids_NK.shape
  num_blocks = -(-(n * k) // rows) + num_slots
  keep_NK = (slot_ids_NK >= 0) & (slot_ids_NK < num_slots)
  onehot_NKS = jax.nn.one_hot(jnp.where(keep_NK, slot_ids_NK, num_slots), num_slots,
                              dtype=jnp.int32)
  onehot_MS = onehot_NKS.reshape(n * k, num_slots)
  pos_M = rank_in_slot(onehot_MS)
  blocks_S = (jnp.sum(onehot_MS, axis=0) + rows - 1) // rows
  block_end_S = jnp.cumsum(blocks_S)
  first_block_M = (block_end_S - blocks_S)[jnp.clip(slot_ids_NK.reshape(-1), 0, num_slots - 1)]
  row_M = first_block_M * rows + pos_M
  index_NK = jnp.where(keep_NK, row_M.reshape(n, k), num_blocks * rows)
  block_slot_B = jnp.searchsorted(block_end_S, jnp.arange(num_blocks), side="right")
  return (index_NK.astype(jnp.int32), keep_NK, jnp.minimum(block_slot_B, num_slots - 1),
          block_end_S[-1].astype(jnp.int32))


def slot_block_ranges(block_slot_B: jax.Array, used: jax.Array, num_slots: int):
  """[start_S, end_S): the blocks of each slot, for blocks sorted by slot (as
  `grouped_positions` lays them out) of which those from `used` on are padding.
  A slot without blocks gets start == end."""
  slots_S = jnp.arange(num_slots, dtype=block_slot_B.dtype)
  start_S = jnp.searchsorted(block_slot_B, slots_S, side="left").astype(jnp.int32)
  end_S = jnp.minimum(jnp.searchsorted(block_slot_B, slots_S, side="right"), used)
  return jnp.minimum(start_S, end_S), end_S.astype(jnp.int32)


def _over_slot_blocks(block_slot_B, used, w: ExpertWeights, block_body, init):
  """`carry = block_body(b, s, (gate_DF, up_DF, down_FD), carry)` for every used block b,
  slot s by slot, with slot s's weight slabs sliced out of `w` once for all its blocks."""
  num_slots = w.gate_SDF.shape[0]
  start_S, end_S = slot_block_ranges(block_slot_B, used, num_slots)

  def slot_body(s, carry):
    slabs = tuple(a[s] for a in w)
    return jax.lax.fori_loop(start_S[s], end_S[s], lambda b, c: block_body(b, s, slabs, c), carry)

  return jax.lax.fori_loop(0, num_slots, slot_body, init)


def _block_swiglu_loop(buf_BRD, block_slot_B, used, w):
  """Every used block through its slot's SwiGLU: a loop over slots around a loop over the
  slot's blocks.

  Slicing a slot's [D, F] slabs out of the stacked weights is a copy on XLA:CPU (~20 us
  each at 256 x 256); taken once per slot and kept through the slot's blocks, the copies
  no longer scale with the blocks (36 a layer on each device in the peer benchmark's train
  step, 8 slots), and a batched einsum would copy the slabs for every block (3 B D F
  floats; 2.3x slower at 4096 assignments). The loops stop at `used`, a run-time count:
  the buffer's static block count must hold the worst case (every assignment in this
  shard's slots), but the routed groups fill a few blocks fewer on one shard and about half
  on each of two expert shards, and an empty block costs a full block's matmuls. Returns
  (y_BRD, g_BRF, u_BRF), zero past `used`.
  """
  num_blocks, rows, d = buf_BRD.shape
  f = w.gate_SDF.shape[-1]
  dtype = jnp.result_type(buf_BRD, w.gate_SDF)
  # bfloat16 carries on CPU are float32 (`storage_dtype`): XLA:CPU converted a whole bf16
  # carry to f32 and back for every block's write, O(blocks^2) in a long bf16 prefill.
  store = storage_dtype(dtype)

  def block_body(b, s, slabs, carry):
    gate_DF, up_DF, down_FD = slabs
    x_RD = buf_BRD[b]
    g_RF, u_RF = x_RD @ gate_DF, x_RD @ up_DF
    y_RD = (jax.nn.silu(g_RF) * u_RF) @ down_FD
    return tuple(c.at[b].set(a.astype(store)) for c, a in zip(carry, (y_RD, g_RF, u_RF)))

  # The weights already vary over every axis the buffer does (_block_experts): so do the
  # products, and the loop carry must start with the type it ends with.
  init = _vary_like(tuple(jnp.zeros((num_blocks, rows, n), store) for n in (d, f, f)), w.gate_SDF)
  out = _over_slot_blocks(block_slot_B, used, w, block_body, init)
  return tuple(a.astype(dtype) for a in out)


@jax.custom_vjp
def block_swiglu(buf_BRD: jax.Array, block_slot_B: jax.Array, used: jax.Array,
                 w: ExpertWeights) -> jax.Array:
  """y_b = down_s(silu(x_b gate_s) * (x_b up_s)) for each block b < used of slot
  s = block_slot_B[b]. The blocks must be sorted by slot (`grouped_positions`' layout;
  checked when concrete), and those from `used` on empty: they give zeros."""
  if is_concrete(block_slot_B) and np.any(np.diff(np.asarray(block_slot_B)) < 0):
    raise ValueError("block_slot_B must be sorted by slot, got "
                     f"{np.asarray(block_slot_B).tolist()}")
  return _block_swiglu_loop(buf_BRD, block_slot_B, used, w)[0]


def _block_swiglu_fwd(buf_BRD, block_slot_B, used, w):
  y_BRD, g_BRF, u_BRF = _block_swiglu_loop(buf_BRD, block_slot_B, used, w)
  return y_BRD, (buf_BRD, block_slot_B, used, w, g_BRF, u_BRF)


def _block_swiglu_bwd(res, dy_BRD):
  """Hand-written: autodiff of the loops would add whole [S, D, F] weight gradients every
  iteration. Here each block's weight gradients are added into its slot's slab of the
  loop-carried sums, in place (`.at[s].add`: one [D, F] slab read and written, fused with
  the add). Emitting per-block [B, D, F] gradients and summing per slot after the loop
  wrote and re-read 3 B D F floats (15% slower forward + backward at 4096 assignments on
  XLA:CPU); summing a slot's blocks in [D, F] carries and writing each slab once measured
  no faster, the add no longer fused and the write copying the whole [S, D, F] sums."""
  buf_BRD, block_slot_B, used, w, g_BRF, u_BRF = res

  def block_body(b, s, slabs, carry):
    dw, dx_BRD = carry
    gate_DF, up_DF, down_FD = slabs
    x_RD, dy_RD, g_RF, u_RF = buf_BRD[b], dy_BRD[b], g_BRF[b], u_BRF[b]
    sig_RF = jax.nn.sigmoid(g_RF)
    silu_RF = g_RF * sig_RF
    dh_RF = dy_RD @ down_FD.T
    du_RF = dh_RF * silu_RF
    dg_RF = dh_RF * u_RF * sig_RF * (1 + g_RF * (1 - sig_RF))
    dx_RD = dg_RF @ gate_DF.T + du_RF @ up_DF.T
    add = lambda d_S, d: d_S.at[s].add(d.astype(d_S.dtype))
    dw = ExpertWeights(add(dw.gate_SDF, x_RD.T @ dg_RF), add(dw.up_SDF, x_RD.T @ du_RF),
                       add(dw.down_SFD, (silu_RF * u_RF).T @ dy_RD))
    return dw, dx_BRD.at[b].set(dx_RD.astype(dx_BRD.dtype))

  dw0 = ExpertWeights(*(jnp.zeros_like(a) for a in w))
  dx0 = _vary_like(jnp.zeros(buf_BRD.shape, storage_dtype(buf_BRD.dtype)), g_BRF)  # as forward
  dw, dx_BRD = _over_slot_blocks(block_slot_B, used, w, block_body, (dw0, dx0))
  return dx_BRD.astype(buf_BRD.dtype), None, None, dw


block_swiglu.defvjp(_block_swiglu_fwd, _block_swiglu_bwd)


def _varying_axes(a) -> frozenset:
  """Mesh axes a value varies over inside shard_map (empty outside; `vma` in older jax)."""
  aval = jax.typeof(a)
  mat = getattr(aval, "manual_axis_type", None)
  return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def _vary_like(tree, ref_array):
  """Inside shard_map: marks `tree` as varying over every mesh axis `ref_array` varies over.

  The custom VJP's weight gradients are per-token-shard partial sums; with the
  weights cast to varying first, the cast's transpose adds them up over the
  token axes (the psum autodiff would insert). Outside shard_map: no-op.
  """
  want = _varying_axes(ref_array)
  def cast(a):
    missing = tuple(sorted(want - _varying_axes(a)))
    return jax.lax.pcast(a, missing, to="varying") if missing else a
  return jax.tree.map(cast, tree)


def fast_capacity(num_tokens: int, top_k: int, num_slots: int) -> int:
  """Static per-slot capacity of the grouped path's one-einsum branch: an even share plus
  four standard deviations of a uniform router's count (mean + 4 sqrt(mean)), at most N.

  At B=64 decode (128 assignments, 16 slots, mean 8) it is 20; the benchmark's decode
  steps had at most 19. At N <= the bound it is N: the branch then always runs.
  """
  mean = num_tokens * top_k / max(num_slots, 1)
  return int(max(1, min(num_tokens, math.ceil(mean + 4 * math.sqrt(mean)))))


def _slot_capacity_experts(x_ND, local_NK, gates_NK, w, capacity):
  """Every (token, k) at its slot's buffer place in [S, capacity] (all must fit): one
  batched einsum that reads each slot's weights in place. Returns float32 [N, D]."""
  num_local = w.gate_SDF.shape[0]
  keep_NK = (local_NK >= 0) & (local_NK < num_local)
  onehot_NKS = jax.nn.one_hot(jnp.where(keep_NK, local_NK, num_local), num_local, dtype=jnp.int32)
  onehot_MS = onehot_NKS.reshape(-1, num_local)
  pos_NK = rank_in_slot(onehot_MS).reshape(local_NK.shape)
  index_NK = jnp.where(keep_NK, local_NK * capacity + pos_NK, num_local * capacity)
  buf_SCD = dispatch(x_ND, index_NK, num_local * capacity).reshape(num_local, capacity, -1)
  y_SCD = swiglu(buf_SCD, w)
  return combine(y_SCD.reshape(num_local * capacity, -1), index_NK, keep_NK, gates_NK)


def _block_experts(x_ND, local_NK, gates_NK, w, rows):
  """Each slot's group padded to whole blocks of `rows`, each block one loop iteration."""
  num_local, d = w.gate_SDF.shape[0], x_ND.shape[1]
  index_NK, keep_NK, block_slot_B, used = grouped_positions(local_NK, num_local, rows)
  num_blocks = block_slot_B.shape[0]
  buf_BRD = dispatch(x_ND, index_NK, num_blocks * rows).reshape(num_blocks, rows, d)
  y_BRD = block_swiglu(buf_BRD, block_slot_B, used, _vary_like(w, buf_BRD))
  return combine(y_BRD.reshape(num_blocks * rows, d), index_NK, keep_NK, gates_NK)


def grouped_experts(x_ND: jax.Array, slot_ids_NK: jax.Array, gates_NK: jax.Array,
                    w: ExpertWeights, slot_offset=0, rows: int | None = None,
                    capacity: int | None = None) -> jax.Array:
  """Dropless grouped path: each slot runs on its own tokens only. Two branches, chosen
  at run time by the largest group (same sums either way, nothing is ever dropped):

  * every group fits `capacity` (default `fast_capacity`; 0 = never): one batched einsum
    over [S, capacity, D] buffers. Decode and balanced batches land here: the weights are
    read in place, where the block loop copies each slot's [D, F] slabs (once a slot now;
    at B=64 decode, when it copied them for every block, the copies were most of the
    expert time), and a capacity near the even share pads less than blocks of `rows`.
  * otherwise blocks of `rows`: the work is Σ_s ceil(size_s / rows) blocks (at most
    N*K + S*(rows-1) rows), where the dropless capacity buffer needs S*N rows (S/K times
    more); unlike `ragged_dot`, which XLA:CPU expands to every group over every row,
    each block is one small dense matmul against its slot's weights.
  Returns float32 [N, D]: the contribution of slots [slot_offset, slot_offset+S).
  """
  n, k = slot_ids_NK.shape
  num_local = w.gate_SDF.shape[0]
  rows = rows or block_rows(n * k, num_local)
  capacity = fast_capacity(n, k, num_local) if capacity is None else min(capacity, n)
  return _grouped_experts(x_ND, slot_ids_NK, gates_NK, w, slot_offset, rows=rows,
                          capacity=capacity)


# Jitted at module level for eager callers (`model.apply` outside jit): jax caches the traced
# branches of a lax.cond and bodies of a fori_loop by function identity, and the closures made
# here are new on every call, so each eager call traced and compiled them again (2 compilations,
# ~3.5 s a call of the default model). A jit traces once per shapes and static arguments; under
# an outer jit it is inlined, the same program as before.
@functools.partial(jax.jit, static_argnames=("rows", "capacity"))
def _grouped_experts(x_ND, slot_ids_NK, gates_NK, w, slot_offset, *, rows: int, capacity: int):
  n = slot_ids_NK.shape[0]
  num_local = w.gate_SDF.shape[0]
  local_NK = slot_ids_NK - slot_offset
  blocks = lambda: _block_experts(x_ND, local_NK, gates_NK, w, rows)
  if capacity <= 0:
    return blocks()
  fast = lambda: _slot_capacity_experts(x_ND, local_NK, gates_NK, w, capacity)
  if capacity >= n:  # a slot holds an expert and a token picks distinct ones: always fits
    return fast()
  in_range = (local_NK >= 0) & (local_NK < num_local)
  sizes_S = jnp.bincount(jnp.where(in_range, local_NK, num_local).reshape(-1),
                         length=num_local + 1)[:num_local]
  return jax.lax.cond(jnp.max(sizes_S) <= capacity, fast, blocks)
