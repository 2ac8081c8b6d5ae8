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
`ppermute`s and keeps the ones it needs: per device, two blocks of R rows in
flight, and the same bytes on the wire as an all-gather.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from pr2_jax.parallel.mesh import TOKEN_AXES, num_token_shards


def _ring_take(x_R, want_N, *, axes, n: int):
  """Inside shard_map: rows `want_N` (global row ids) of the array whose shard i holds global
  rows [i R, (i + 1) R); this shard's block is `x_R`."""
  rows = x_R.shape[0]
  me = lax.axis_index(axes)
  expand = lambda m_N: m_N.reshape(m_N.shape + (1,) * (x_R.ndim - 1))

  def keep(step, block, out):  # `block` is shard (me + step)'s
    local_N = want_N - ((me + step) % n) * rows
    hit_N = (local_N >= 0) & (local_N < rows)
    return jnp.where(expand(hit_N), jnp.take(block, jnp.clip(local_N, 0, rows - 1), axis=0), out)

  def hop(step, carry):  # receive the next shard's block, keep its wanted rows
    block, out = carry
    block = lax.ppermute(block, axes, perm=[(i, (i - 1) % n) for i in range(n)])
    return block, keep(step, block, out)

  # A loop, not n unrolled hops: XLA keeps every unrolled hop's block alive at once.
  out = keep(0, x_R, jnp.zeros(want_N.shape + x_R.shape[1:], x_R.dtype))
  return lax.fori_loop(1, n, hop, (x_R, out))[1]


@functools.partial(jax.jit, static_argnames=("num_chunks", "mesh"))
def shuffle_into_chunks(tree, order_B: jax.Array, *, num_chunks: int, mesh: Mesh):
  """Every [B, ...] leaf x of `tree` -> `x[order_B]` cut into C = `num_chunks` chunks,
  [C, B / C, ...], the B / C axis split over `mesh`'s token shards ('data', 'expert').

  Equal to `x[order_B].reshape(C, B // C, ...)` for any permutation (or any row ids)
  `order_B` [B]; B must divide into C chunks and every chunk over the token shards. No
  device holds more than two shards' rows at a time (a ring of `ppermute`s).
  """
  n = num_token_shards(mesh)

  def one(x):
    total = x.shape[0]
    if total % (num_chunks * n):
      raise ValueError(f"{total} rows do not split into num_chunks={num_chunks} chunks of "
                       f"whole rows on each of {n} token shards")
    per_shard = total // num_chunks // n

    def body(x_R, order_B):
      me = lax.axis_index(TOKEN_AXES)
      want_Cc = lax.dynamic_slice_in_dim(order_B.reshape(num_chunks, -1), me * per_shard,
                                         per_shard, axis=1)
      return _ring_take(x_R, want_Cc, axes=TOKEN_AXES, n=n)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(TOKEN_AXES), P()),
                         out_specs=P(None, TOKEN_AXES))(x, order_B)

  return jax.tree.map(one, tree)
