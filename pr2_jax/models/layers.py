"""Qwen3 building blocks: RMSNorm, rotary embeddings, GQA attention, SwiGLU MLP, greedy argmax.

Dimension legend:
  B batch, T query length, S key length, D d_model, H query heads,
  G kv heads, R = H/G query heads per kv head, Z head_dim, z = Z/2 (rotary
  frequencies), F MLP hidden, V vocabulary.

Numerics follow Hugging Face's Qwen3-MoE so real checkpoints compute the
same thing: norms in float32 then cast back, rotate-half RoPE, q/k RMSNorm
per head before RoPE, softmax in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pr2_jax.config import ModelConfig
from pr2_jax.parallel.mesh import constrain, partitioned

INIT = nn.initializers.normal(stddev=0.02)  # HF initializer_range
NEG_INF = -1e30
# Causal query blocks are at least this long: shorter ones save little work and add matmuls
# (bench_peer's T=256 train step: 4 blocks of 64 took the attention core's forward and backward
# from 34 to 19 ms a layer, 8 blocks of 32 no less; tests' short sequences stay one block).
MIN_BLOCK_QUERIES = 64


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  """x / rms(x) * weight over the last axis; statistics in float32, the result in x's dtype."""
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def first_argmax(x_BV: jax.Array) -> jax.Array:
  """`jnp.argmax(x, axis=-1)` as two plain reductions: per row of the last axis (any leading
  axes), the first index of the maximum (of the first NaN, if any), int32.

  XLA:CPU runs argmax as a (value, index) pair reduce that it does not vectorise: in the tiny
  config's rollout ([64, 256] a decode step) it took ~9 ms of a ~70 ms `generate`. A max, then
  the smallest index that reaches it, give the same index (`bench_rollout`: docs/benchmarks.md).
  """
  max_B1 = jnp.max(x_BV, axis=-1, keepdims=True)
  index_BV = jax.lax.broadcasted_iota(jnp.int32, x_BV.shape, x_BV.ndim - 1)
  # A NaN makes the max NaN, which equals nothing: the first NaN wins, as in jnp.argmax.
  hit_BV = (x_BV == max_B1) | jnp.isnan(x_BV)
  return jnp.min(jnp.where(hit_BV, index_BV, x_BV.shape[-1]), axis=-1)


class RMSNorm(nn.Module):
  eps: float
  axis_name: str = "embed"

  @nn.compact
  def __call__(self, x):
    w = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)),
                   (x.shape[-1],), jnp.float32)
    return rms_norm(x, w, self.eps)


def rotary(x_BTHZ: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
  """Rotate-half rotary embedding (HF `apply_rotary_pos_emb`), computed in float32."""
  z = x_BTHZ.shape[-1]
  inv_freq_z = 1.0 / (theta ** (jnp.arange(0, z, 2, dtype=jnp.float32) / z))
  angles_BTz = positions_BT.astype(jnp.float32)[..., None] * inv_freq_z
  # The barrier makes cos and sin one [B, T, Z/2] table each (shared by every layer: XLA merges
  # the identical calls). Left to itself XLA fuses them into each consumer and evaluates them
  # per element of q and k, in every layer, forward and backward: 44 cos and 44 sin loops in
  # bench_peer's train step, ~3-7 % of its time on XLA:CPU (docs/benchmark_rounds.md, 14th
  # round).
  # [B, T, 1, Z]: one table for every head H.
  cos_BT1Z, sin_BT1Z = (jnp.concatenate([t_BTz, t_BTz], axis=-1)[:, :, None, :] for t_BTz in
                        jax.lax.optimization_barrier((jnp.cos(angles_BTz), jnp.sin(angles_BTz))))
  x32_BTHZ = x_BTHZ.astype(jnp.float32)
  x1_BTHz, x2_BTHz = jnp.split(x32_BTHZ, 2, axis=-1)
  rotated_BTHZ = jnp.concatenate([-x2_BTHz, x1_BTHz], axis=-1)
  return (x32_BTHZ * cos_BT1Z + rotated_BTHZ * sin_BT1Z).astype(x_BTHZ.dtype)


def query_blocks(length: int, max_blocks: int) -> list[tuple[int, int]]:
  """[start, end) of up to `max_blocks` near-equal query blocks of >= MIN_BLOCK_QUERIES each."""
  n = max(1, min(max_blocks, length // MIN_BLOCK_QUERIES))
  bounds = [round(i * length / n) for i in range(n + 1)]
  return list(zip(bounds[:-1], bounds[1:]))


def attend(q_BTHZ, k_BGZS, v_BGSZ, mask_BTS, causal_blocks: int = 1) -> jax.Array:
  """Grouped-query softmax attention; `mask_BTS` True where a query may see a key.

  Keys come (b, g)-leading and transposed, values (b, g)-leading: the layouts the
  KV cache is kept in. Both einsums are then plain batched [M, K] x [K, N]
  matmuls over (b, g). With keys as [S, Z] the score matmul contracts both
  operands' minor dimension: at B=64 decode XLA:CPU took 0.62 ms a layer for it
  (0.11 for the value matmul), 0.25 ms with the keys transposed.

  `causal_blocks` > 1 (T == S, and `mask_BTS` hides every key after its query, as
  `causal_mask`'s does): the queries split into up to that many blocks (`query_blocks`),
  each scoring only the keys up to its last query, which skips ~(n-1)/2n of the score,
  softmax and value work that the mask would throw away. Same result to float rounding.
  """
  t, s = q_BTHZ.shape[1], k_BGZS.shape[3]
  if causal_blocks <= 1 or t != s:
    return _attend(q_BTHZ, k_BGZS, v_BGSZ, mask_BTS)
  return jnp.concatenate(
      [_attend(q_BTHZ[:, a:e], k_BGZS[..., :e], v_BGSZ[:, :, :e], mask_BTS[:, a:e, :e])
       for a, e in query_blocks(t, causal_blocks)], axis=1)


def _attend(q_BTHZ, k_BGZS, v_BGSZ, mask_BTS) -> jax.Array:
  b, t, h, z = q_BTHZ.shape
  g = k_BGZS.shape[1]
  # Both products are rounded to the queries' dtype: with a cache stored wider than that
  # (`pr2_jax.config.storage_dtype(dtype)`) the einsums run on the wider type, and the rounding
  # gives what the narrow dots gave. Without a cache, or where storage is the compute dtype:
  # no-ops.
  dtype = q_BTHZ.dtype
  q_BGRTZ = jnp.transpose(q_BTHZ.reshape(b, t, g, h // g, z), (0, 2, 3, 1, 4))
  scores_BGRTS = jnp.einsum("bgrtz,bgzs->bgrts", q_BGRTZ, k_BGZS).astype(dtype).astype(jnp.float32)
  probs_BGRTS = jax.nn.softmax(
      jnp.where(mask_BTS[:, None, None], scores_BGRTS * z ** -0.5, NEG_INF), axis=-1).astype(dtype)
  out_BGRTZ = jnp.einsum("bgrts,bgsz->bgrtz", probs_BGRTS, v_BGSZ).astype(dtype)
  return jnp.transpose(out_BGRTZ, (0, 3, 1, 2, 4)).reshape(b, t, h, z)


def causal_mask(positions_BT: jax.Array, valid_BT: jax.Array | None) -> jax.Array:
  """Query t sees key s when s is after t neither in the sequence nor by position and s is a
  real token. Index order is what a causal LM (and transformers' mask) means; positions
  matter too where they are not increasing (left padding repeats one)."""
  t = positions_BT.shape[1]
  mask_BTS = (positions_BT[:, :, None] >= positions_BT[:, None, :]) & jnp.tri(t, dtype=bool)[None]
  if valid_BT is not None:
    mask_BTS &= valid_BT[:, None, :].astype(bool)
  # A padding query that sees nothing would softmax over -inf: let it see itself.
  return mask_BTS | jnp.eye(t, dtype=bool)[None]


def cache_mask(index: jax.Array, length: int, key_valid_BS: jax.Array) -> jax.Array:
  """Decode mask: query slot index+t sees cache slots s <= index+t that hold real tokens."""
  query_T = index + jnp.arange(length)
  slots_S = jnp.arange(key_valid_BS.shape[1])
  mask_BTS = (slots_S[None, None, :] <= query_T[None, :, None]) & key_valid_BS[:, None, :]
  return mask_BTS | (slots_S[None, None, :] == query_T[None, :, None])


class Attention(nn.Module):
  """GQA attention; returns (out_BTD, new_kv). With `kv` = (k_BGZS, v_BGSZ, index) (this
  layer's cache) it writes the new keys and values at slot `index`, attends over the whole
  cache (decode) and new_kv is the updated (k_BGZS, v_BGSZ); without a cache, None."""
  config: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, kv=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    def proj(name, heads, axes):
      return nn.DenseGeneral((heads, cfg.head_dim), use_bias=False, dtype=dtype, name=name,
                             kernel_init=partitioned(INIT, ("embed",) + axes))(x_BTD)
    q_BTHZ = proj("q_proj", cfg.num_heads, ("heads", "head_dim"))
    k_BTGZ = proj("k_proj", cfg.num_kv_heads, ("kv_heads", "head_dim"))
    v_BTGZ = proj("v_proj", cfg.num_kv_heads, ("kv_heads", "head_dim"))
    q_BTHZ = RMSNorm(cfg.rms_norm_eps, "head_dim", name="q_norm")(q_BTHZ)
    k_BTGZ = RMSNorm(cfg.rms_norm_eps, "head_dim", name="k_norm")(k_BTGZ)
    q_BTHZ = rotary(q_BTHZ, positions_BT, cfg.rope_theta)
    k_BTGZ = rotary(k_BTGZ, positions_BT, cfg.rope_theta)
    q_BTHZ = constrain(q_BTHZ, self.mesh, ("batch", "length", "heads", "head_dim"))
    # attend's layouts, which are also the cache's; XLA fuses the transposes into the
    # projections. At B=64 decode over a [B, S, G, Z] cache the score and value
    # reductions took ~3 ms a layer, as batched matmuls ~0.8 ms (see attend).
    k_BGZT = jnp.transpose(k_BTGZ, (0, 2, 3, 1))
    v_BGTZ = jnp.transpose(v_BTGZ, (0, 2, 1, 3))
    # The keys attended to: these tokens' (S = T), or with a cache the whole cache.
    k_BGZS, v_BGSZ, new_kv = k_BGZT, v_BGTZ, None
    if kv is not None:
      # This layer's cache only (one array per layer): the in-place write comes first and
      # the attention reads its result. Writing after the read, or slicing the layer out of
      # a stacked [L, ...] cache, made XLA copy whole caches every decode step.
      cache_k_BGZS, cache_v_BGSZ, index = kv
      write = lambda c, a, axis: jax.lax.dynamic_update_slice_in_dim(
          c, a.astype(c.dtype), index, axis)
      new_kv = (write(cache_k_BGZS, k_BGZT, 3), write(cache_v_BGSZ, v_BGTZ, 2))
      k_BGZS, v_BGSZ = new_kv
    # Without a cache the mask is causal_mask's: causal query blocks skip the masked keys.
    # The cache as stored (`pr2_jax.config.storage_dtype(dtype)`): attend rounds its products
    # to q's dtype.
    out_BTHZ = attend(q_BTHZ, k_BGZS, v_BGSZ, mask_BTS,
                      causal_blocks=cfg.attention_blocks if kv is None else 1)
    o_proj = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype,
                             name="o_proj",
                             kernel_init=partitioned(INIT, ("heads", "head_dim", "embed")))
    out_BTD = o_proj(out_BTHZ)
    return out_BTD, new_kv


class MLP(nn.Module):
  """Dense SwiGLU MLP for the layers listed in `dense_layers`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    def dense(name, features, axes):
      return nn.Dense(features, use_bias=False, dtype=dtype, name=name,
                      kernel_init=partitioned(INIT, axes))
    h_BTF = nn.silu(dense("gate_proj", cfg.dense_d_ff, ("embed", "mlp"))(x_BTD))
    h_BTF = h_BTF * dense("up_proj", cfg.dense_d_ff, ("embed", "mlp"))(x_BTD)
    return dense("down_proj", cfg.d_model, ("mlp", "embed"))(h_BTF)
