"""Token log-probs and entropies without the whole [B, T, V] logits: the LM head chunk by chunk.

At a real vocabulary the learner's logits are the largest buffer of a micro-step: Qwen3's
151,936 float32 columns are 0.6 MB per token, 2.5 GB for one 4096-token sequence, and the
backward pass holds their gradient too. `chunked_token_stats` applies the LM head to C
positions at a time inside a `lax.map` whose body is rematerialised (`jax.checkpoint`): the
forward and the backward pass each hold one chunk's [B, C, V] logits, at the price of a second
LM-head matmul per chunk in the backward pass. The values are `token_logprobs` and
`token_entropies` of the full logits, up to float rounding.

Dimensions: B batch (b on one token shard), T positions, D model width, V vocabulary, C chunk,
N = ceil(T / C) chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pr2_jax.checks import check_ids, check_rank, check_shape, is_concrete
from pr2_jax.config import check_int, check_real
from pr2_jax.parallel.mesh import TOKEN_AXES, on_token_shards
from pr2_jax.rl.losses import token_entropies, token_logprobs


def chunked_token_stats(hidden_BTD: jax.Array, kernel_DV: jax.Array, targets_BT: jax.Array, *,
                        chunk: int, scale: float = 1.0, dtype=None, mesh: Mesh | None = None):
  """(log-probs, entropies), each float32 [B, T], of softmax(scale · hidden @ kernel).

  Args:
    hidden_BTD: the final normed hidden states (`MoETransformer(..., logits='none').hidden`);
      position t must predict `targets_BT[:, t]` (the caller shifts by one).
    kernel_DV: the LM head (`transformer.lm_head_kernel`).
    targets_BT: int token ids in [0, V).
    chunk: positions per LM-head call, C >= 1 (T need not be a multiple; C > T means T).
    scale: 1 / temperature, a finite number > 0 (ValueError otherwise: a negative one makes
      the least likely tokens the most likely, 0 all equally likely), applied to the float32
      logits as the learner does.
    dtype: the matmul's dtype, the model's compute dtype (default: hidden's), as the model's
      own LM head computes it. The head's gradient is summed over chunks in float32.
    mesh: the rows' mesh, B split over its token axes ('data' x 'expert'). Each device then
      loops over its own rows and the head's gradient is summed across devices once, after
      the loop: under plain jit XLA all-reduces it inside the loop, once per chunk.
  """
  check_rank("hidden_BTD", hidden_BTD, 3, "[B, T, D]")
  b, t, d = hidden_BTD.shape
  check_rank("kernel_DV", kernel_DV, 2, "[D, V]")
  if kernel_DV.shape[0] != d:  # check_shape's "expected (d, V)" read as hidden_BTD's shape
    raise ValueError(f"kernel_DV has shape {tuple(kernel_DV.shape)}, expected [D, V] with D = {d}, "
                     "hidden_BTD's last axis")
  check_shape("targets_BT", targets_BT, (b, t), "[B, T] of hidden_BTD")
  check_int("chunked_token_stats", "chunk", chunk)
  # A Python number, static for the jit below: XLA then drops a scale of 1, as it did when the
  # loop closed over it (a traced scale would be multiplied in at run time).
  check_real("chunked_token_stats", "scale", scale, 0, inclusive=False)
  # Static, before the int32 cast below, which would truncate float ids silently under jit.
  ids_dtype = targets_BT.dtype if hasattr(targets_BT, "dtype") else np.asarray(targets_BT).dtype
  if not jnp.issubdtype(ids_dtype, jnp.integer):
    raise ValueError(f"chunked_token_stats: targets_BT has dtype {ids_dtype}; token ids must "
                     "be integers")
  if is_concrete(targets_BT):  # inside the loop they are traced, and unchecked
    check_ids(targets_BT, "targets_BT", 0, kernel_DV.shape[1], "V")
  if t == 0:  # as token_logprobs: empty stats (chunks of min(chunk, T) = 0 positions divide by 0)
    empty_B0 = jnp.zeros((b, 0), jnp.float32)
    return empty_B0, empty_B0
  return _stats(hidden_BTD, kernel_DV, jnp.asarray(targets_BT, jnp.int32), chunk=min(chunk, t),
                scale=float(scale), dtype=hidden_BTD.dtype if dtype is None else jnp.dtype(dtype),
                mesh=None if mesh is None or mesh.size == 1 else mesh)


# Jitted at module level for eager callers: jax caches the traced body of a lax.map (and of
# on_token_shards' shard_map) by function identity, and the closures made per call are new each
# time, so every eager call traced and compiled the loop again. A jit traces once per shapes and
# static arguments; under an outer jit (the learner's) it is inlined, the same program as before.
@functools.partial(jax.jit, static_argnames=("chunk", "scale", "dtype", "mesh"))
def _stats(hidden_BTD, kernel_DV, targets_BT, *, chunk: int, scale: float, dtype,
           mesh: Mesh | None):
  local = functools.partial(_local_stats, chunk=chunk, scale=scale, dtype=dtype)
  if mesh is None:
    return local(hidden_BTD, kernel_DV, targets_BT)
  # The kernel turns device-varying before the loop, not at its use inside: the transpose of
  # that cast is the one psum of the head's gradient, after the loop.
  return on_token_shards(lambda h_bTD, t_bT: local(
      h_bTD, jax.lax.pcast(kernel_DV, TOKEN_AXES, to="varying"), t_bT), mesh)(
          hidden_BTD, targets_BT)


def _local_stats(hidden_BTD, kernel_DV, targets_BT, *, chunk: int, scale: float, dtype):
  b, t, d = hidden_BTD.shape
  n = -(-t // chunk)
  pad = n * chunk - t  # padded positions predict token 0 and are cut off below
  h_NBCD = jnp.pad(hidden_BTD, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  t_NBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(args):
    h_BCD, t_BC = args
    # The cast inside the loop: the kernel's gradient then adds up over chunks in float32.
    logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD.astype(dtype), kernel_DV.astype(dtype))
    logits_BCV = logits_BCV.astype(jnp.float32) * scale
    return token_logprobs(logits_BCV, t_BC), token_entropies(logits_BCV)

  logp_NBC, ent_NBC = jax.lax.map(one, (h_NBCD, t_NBC))
  unchunk = lambda x_NBC: x_NBC.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(logp_NBC), unchunk(ent_NBC)
