"""A row shuffle of batch-sharded arrays that never holds the whole batch on one device.

Dimension legend: B rows of the batch, n token shards (devices along the
token axes), R = B / n rows per shard, C chunks, b = B / C rows per chunk,
c = b / n rows of a chunk per shard.

The learner cuts a rollout batch into C randomly composed micro-batches. Left
to the SPMD partitioner, `x[order]` on a row-sharded `x` becomes a masked
local gather plus an all-reduce of the full [B, ...] result (or an
all-gather): every device transiently holds the whole batch, which at scale
is the largest array of the step (routes [B, S, L, K], PR2's features
[B, F, L, D]). Here each shard passes its rows around a ring of n - 1
`ppermute`s and keeps the ones it needs: per device, one other shard's block
in flight, and the same bytes on the wire as an all-gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from pr2_jax.checks import is_concrete
from pr2_jax.config import check_int
from pr2_jax.parallel.mesh import TOKEN_AXES, num_token_shards


def _ring_take(xs_R, want_N, *, axes, n: int):
  """Inside shard_map: rows `want_N` (global row ids) of every array in the tuple `xs_R`,
  whose shard i holds global rows [i R, (i + 1) R); this shard's blocks are `xs_R`."""
  rows = xs_R[0].shape[0]
  me = lax.axis_index(axes)

  def keep(step, blocks, outs):  # `blocks` are shard (me + step)'s
    local_N = want_N - ((me + step) % n) * rows
    hit_N = (local_N >= 0) & (local_N < rows)
    index_N = jnp.clip(local_N, 0, rows - 1)
    return tuple(jnp.where(hit_N.reshape(hit_N.shape + (1,) * (b.ndim - 1)),
                           jnp.take(b, index_N, axis=0), o) for b, o in zip(blocks, outs))

  def hop(step, carry):  # receive the next shard's blocks, keep their wanted rows
    blocks, outs = carry
    blocks = lax.ppermute(blocks, axes, perm=[(i, (i - 1) % n) for i in range(n)])
    return blocks, keep(step, blocks, outs)

  # All leaves in one ring: n - 1 hops per step, not n - 1 per leaf, each a latency-bound
  # collective at scale. A loop, not unrolled hops: XLA keeps every unrolled hop's blocks alive.
  outs = keep(0, xs_R, tuple(jnp.zeros(want_N.shape + x.shape[1:], x.dtype) for x in xs_R))
  return lax.fori_loop(1, n, hop, (xs_R, outs))[1]


def shuffle_into_chunks(tree, order_B: jax.Array, *, num_chunks: int, mesh: Mesh):
  """Every [B, ...] leaf x of `tree` -> `x[order_B]` cut into C = `num_chunks` chunks,
  [C, B / C, ...], the B / C axis split over `mesh`'s token shards ('data', 'expert').

  Equal to `x[order_B].reshape(C, B // C, ...)` for any permutation (or other row ids in
  [0, B)) `order_B`, int [B]; B must divide into C chunks and every chunk over the token
  shards. An id outside [0, B) is refused where `order_B`'s values can be read (outside jit);
  under jit it gives a row of zeros, where numpy would raise or wrap. Besides its own input
  and output shards, a device holds one other shard's rows at a time (a ring of `ppermute`s).
  """
  check_int("shuffle_into_chunks", "num_chunks", num_chunks)  # 0 divided by zero below
  n = num_token_shards(mesh)
  leaves = jax.tree.leaves(tree)
  total = leaves[0].shape[0] if leaves else 0
  if any(x.shape[:1] != (total,) for x in leaves) or jnp.shape(order_B) != (total,):
    raise ValueError(f"every leaf and order_B must have the same number of rows; leaves "
                     f"{[x.shape[:1] for x in leaves]}, order_B {jnp.shape(order_B)}")
  if not jnp.issubdtype(jnp.result_type(order_B), jnp.integer):
    raise ValueError(f"order_B has dtype {jnp.result_type(order_B)}, expected integer row ids")
  if total % (num_chunks * n):
    raise ValueError(f"{total} rows do not split into num_chunks={num_chunks} chunks of "
                     f"whole rows on each of {n} token shards")
  if is_concrete(order_B):  # the jitted ring cannot raise on values: check them on the host
    ids = np.asarray(order_B)
    bad = np.flatnonzero((ids < 0) | (ids >= total))
    if bad.size:
      raise ValueError(f"order_B[{bad[0]}] = {ids[bad[0]]} is not a row id in [0, {total}) "
                       f"({bad.size} such ids)")
  return _shuffle_into_chunks(tree, order_B, num_chunks=num_chunks, mesh=mesh)


@functools.partial(jax.jit, static_argnames=("num_chunks", "mesh"))
def _shuffle_into_chunks(tree, order_B, *, num_chunks: int, mesh: Mesh):
  """The ring itself; `shuffle_into_chunks` has checked the arguments."""
  n = num_token_shards(mesh)
  leaves, treedef = jax.tree.flatten(tree)
  per_shard = order_B.shape[0] // num_chunks // n

  def body(xs_R, order_B):
    me = lax.axis_index(TOKEN_AXES)
    want_Cc = lax.dynamic_slice_in_dim(order_B.reshape(num_chunks, -1), me * per_shard,
                                       per_shard, axis=1)
    return _ring_take(xs_R, want_Cc, axes=TOKEN_AXES, n=n)

  outs = jax.shard_map(body, mesh=mesh, in_specs=(P(TOKEN_AXES), P()),
                       out_specs=P(None, TOKEN_AXES))(tuple(leaves), order_B)
  return jax.tree.unflatten(treedef, outs)
