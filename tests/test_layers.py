"""Qwen3 building blocks against numpy formulas and hand computations."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax import ModelConfig
from pr2_jax.models import layers
from pr2_jax.rl.data import positions_of


# ----------------------------------------------------------------------------- numpy oracles

def np_rms_norm(x, w, eps):
  x = np.asarray(x, np.float64)
  return np.asarray(w, np.float64) * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps)


def np_rotary(x_BTHZ, pos_BT, theta):
  """Rotate-half RoPE, written pair by pair: dims (i, i+Z/2) rotate by pos * theta^(-2i/Z)."""
  x = np.asarray(x_BTHZ, np.float64)
  out = np.empty_like(x)
  half = x.shape[-1] // 2
  for i in range(half):
    ang = np.asarray(pos_BT, np.float64)[:, :, None] * theta ** (-2.0 * i / x.shape[-1])
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * np.cos(ang) - b * np.sin(ang)
    out[..., i + half] = b * np.cos(ang) + a * np.sin(ang)
  return out


def np_attend(q, k, v, mask):
  """Naive GQA: query head h uses kv head h // (H/G); masked softmax over keys."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, z = q.shape
  rep = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi // rep].T / np.sqrt(z)
      s = np.where(mask[bi], s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[bi, :, hi] = p @ v[bi, :, hi // rep]
  return out


# ----------------------------------------------------------------------------- rms_norm

def test_rms_norm_matches_numpy():
  """x / sqrt(mean(x²) + eps) * w, in float32."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 5, 16)).astype(np.float32) * 3
  w = rng.normal(size=(16,)).astype(np.float32)
  np.testing.assert_allclose(layers.rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-6),
                             np_rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_hand_worked_and_eps():
  """[3, 4] has rms sqrt(12.5); a zero vector stays zero thanks to eps."""
  out = layers.rms_norm(jnp.array([[3.0, 4.0], [0.0, 0.0]]), jnp.array([1.0, 2.0]), 0.0 + 1e-12)
  r = np.sqrt(12.5)
  np.testing.assert_allclose(out[0], [3 / r, 8 / r], rtol=1e-6)
  np.testing.assert_array_equal(out[1], [0.0, 0.0])
  big_eps = layers.rms_norm(jnp.array([[3.0, 4.0]]), jnp.ones(2), 12.5)
  np.testing.assert_allclose(big_eps, [[3 / 5, 4 / 5]], rtol=1e-6)


def test_rms_norm_bfloat16_keeps_dtype():
  """A bfloat16 input is normalised in float32 and returned in bfloat16."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 8)), jnp.bfloat16)
  out = layers.rms_norm(x, jnp.ones(8), 1e-6)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32),
                             np_rms_norm(x.astype(jnp.float32), np.ones(8), 1e-6),
                             rtol=2e-2, atol=2e-2)


def test_rms_norm_module_scale_starts_at_one():
  """RMSNorm's 'scale' parameter is initialised to ones, so the module equals rms_norm."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
  mod = layers.RMSNorm(1e-6)
  params = nn.unbox(mod.init(jax.random.PRNGKey(1), x))
  np.testing.assert_array_equal(params["params"]["scale"], np.ones(8))
  np.testing.assert_allclose(mod.apply(params, x), np_rms_norm(x, np.ones(8), 1e-6),
                             rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- rotary

def test_rotary_two_dim_hand_worked():
  """Z=2: a single pair rotated by the position in radians:
  [a, b] -> [a cos p - b sin p, b cos p + a sin p]."""
  x = jnp.array([1.0, 2.0]).reshape(1, 1, 1, 2)
  for p in (0, 1, 3):
    out = layers.rotary(x, jnp.array([[p]]), 10_000.0)[0, 0, 0]
    np.testing.assert_allclose(out, [np.cos(p) - 2 * np.sin(p), 2 * np.cos(p) + np.sin(p)],
                               rtol=1e-5, atol=1e-6)


def test_rotary_four_dim_frequencies():
  """Z=4, theta=100: pair (0, 2) turns at 1 rad/position, pair (1, 3) at 0.1."""
  x = jnp.array([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
  out = layers.rotary(x, jnp.array([[2]]), 100.0)[0, 0, 0]
  np.testing.assert_allclose(out, [np.cos(2.0), np.cos(0.2), np.sin(2.0), np.sin(0.2)],
                             rtol=1e-5, atol=1e-6)


def test_rotary_identity_norm_relative_and_numpy():
  """Position 0 is the identity; norms are kept; q·k depends only on the offset; equals numpy."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 3, 16)).astype(np.float32))
  pos = jnp.asarray(np.array([[0, 1, 2, 3, 4, 5], [7, 3, 0, 11, 2, 100]], np.int32))
  out = layers.rotary(x, pos, 10_000.0)
  np.testing.assert_allclose(out, np_rotary(x, pos, 10_000.0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out[0, 0], x[0, 0], rtol=1e-6)  # position 0
  np.testing.assert_allclose(out[1, 2], x[1, 2], rtol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  q, k = x[0, 0, 0], x[0, 1, 0]
  def dot(m, n):
    rq = layers.rotary(q.reshape(1, 1, 1, -1), jnp.array([[m]]), 10_000.0)
    rk = layers.rotary(k.reshape(1, 1, 1, -1), jnp.array([[n]]), 10_000.0)
    return float(jnp.sum(rq * rk))
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)
  assert abs(dot(5, 2) - dot(5, 4)) > 1e-3  # and it does depend on the offset


def test_rotary_evaluates_cos_and_sin_once_for_all_heads_layers_and_the_backward():
  """Two layers' q and k rotations and their gradients share one cos and one sin table: XLA
  would otherwise evaluate them inside every consumer, per head, forward and backward."""
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.normal(size=(2, 8, 4, 16)).astype(np.float32))
  k = jnp.asarray(rng.normal(size=(2, 8, 2, 16)).astype(np.float32))
  pos = jnp.asarray(rng.integers(0, 50, (2, 8)).astype(np.int32))
  def two_layers(q, k):
    total = 0.0
    for scale in (1.0, 2.0):  # two "layers" with different inputs, the same positions
      rq, rk = layers.rotary(q * scale, pos, 1e4), layers.rotary(k * scale, pos, 1e4)
      total += jnp.sum(rq[:, :, :2] * rk) ** 2
    return total
  hlo = jax.jit(jax.grad(two_layers, argnums=(0, 1))).lower(q, k).compile().as_text()
  assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1
  np.testing.assert_allclose(layers.rotary(q, pos, 1e4), np_rotary(q, pos, 1e4),
                             rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- attention

def test_causal_mask_hand_worked_with_padding():
  """Causal by position; padding keys hidden; a padding query still sees itself."""
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  valid = jnp.array([[0, 1, 1, 1], [1, 1, 0, 0]], bool)  # left padding, right padding
  mask = layers.causal_mask(pos, valid)
  np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]])
  np.testing.assert_array_equal(mask[1], [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]])
  np.testing.assert_array_equal(layers.causal_mask(pos[:1], None)[0], np.tril(np.ones((4, 4))))


def test_causal_mask_uses_positions_and_index_order():
  """A key is seen when it is after the query neither by position nor in the sequence: with
  left-padding positions [0,0,1,2] the padding query (position 0) does not see the real
  token after it at position 0 (transformers' mask is by index too); with positions that fall
  back (two packed sequences) a query never sees a later one's keys, nor an earlier one's
  keys at higher positions."""
  mask = layers.causal_mask(jnp.array([[0, 0, 1, 2]]), jnp.array([[0, 1, 1, 1]], bool))[0]
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]])
  mask = layers.causal_mask(jnp.array([[0, 1, 2, 0, 1]]), None)[0]
  np.testing.assert_array_equal(mask, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                       [1, 0, 0, 1, 0], [1, 1, 0, 1, 1]])


def test_causal_mask_index_order_changes_only_padding_queries_of_our_layout():
  """With the data's positions (rl.data.positions_of: padding repeats a neighbour's), adding
  index order leaves every real query's row as position order alone had it."""
  valid = np.ones((3, 9), bool)
  valid[0, :3] = valid[1, 6:] = False
  valid[2, :2] = valid[2, 7:] = False
  pos = jnp.asarray(positions_of(valid))
  by_position = (pos[:, :, None] >= pos[:, None, :]) & valid[:, None, :] | np.eye(9, dtype=bool)
  mask = np.asarray(layers.causal_mask(pos, jnp.asarray(valid)))
  np.testing.assert_array_equal(mask[valid], np.asarray(by_position)[valid])
  assert (mask[~valid] != np.asarray(by_position)[~valid]).any()  # left padding's rows did change



def test_cache_mask_hand_worked_with_padding_keys():
  """Decode step writing 2 tokens at cache index 2 (S = 5): query t sits in slot 2 + t and sees
  the slots up to its own that hold real tokens, and always itself (a padding query must not
  softmax over nothing). Row 0's slot 1 is padding; row 1's slot 3 (the 2nd new token) too."""
  valid = jnp.array([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
  mask = np.asarray(layers.cache_mask(jnp.int32(2), 2, valid))
  np.testing.assert_array_equal(mask[0], [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0]])
  np.testing.assert_array_equal(mask[1], [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
  # One token at index 0 of an empty cache: only itself.
  np.testing.assert_array_equal(layers.cache_mask(jnp.int32(0), 1, jnp.zeros((1, 3), bool)),
                                [[[1, 0, 0]]])


@pytest.mark.parametrize("length, max_blocks, want", [
    (256, 4, [(0, 64), (64, 128), (128, 192), (192, 256)]),
    (200, 4, [(0, 67), (67, 133), (133, 200)]),  # 200 // 64 = 3 blocks, near-equal
    (127, 4, [(0, 127)]),                          # a second block would be < 64 queries
    (256, 1, [(0, 256)]),
])
def test_query_blocks_hand_worked(length, max_blocks, want):
  assert layers.query_blocks(length, max_blocks) == want


def test_attend_causal_blocks_match_one_block_values_and_gradients():
  """Causal query blocks skip only keys the mask hides: same outputs and gradients at T=200
  (3 uneven blocks) with left padding, to float rounding."""
  rng = np.random.default_rng(7)
  b, t, h, g, z = 2, 200, 4, 2, 8
  q, k, v, w = (jnp.asarray(rng.normal(size=s).astype(np.float32))
                for s in [(b, t, h, z), (b, g, z, t), (b, g, t, z), (b, t, h, z)])
  valid = jnp.arange(t)[None] >= jnp.array([[0], [37]])
  mask = layers.causal_mask(jnp.asarray(np.maximum(np.cumsum(valid, 1) - 1, 0)), valid)

  def loss(q, k, v, blocks):
    return jnp.sum(layers.attend(q, k, v, mask, causal_blocks=blocks) * w)

  one = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 1)
  three = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v, 4)
  np.testing.assert_allclose(three[0], one[0], rtol=1e-5)
  for got, want in zip(three[1], one[1]):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  out = layers.attend(q, k, v, mask, causal_blocks=4)
  np.testing.assert_allclose(out, np_attend(np.asarray(q), np.asarray(k).transpose(0, 3, 1, 2),
                                            np.asarray(v).transpose(0, 2, 1, 3), np.asarray(mask)),
                             rtol=1e-4, atol=1e-5)


def test_attend_matches_naive_gqa():
  """attend equals a per-head numpy softmax attention with kv head h // (H/G)."""
  rng = np.random.default_rng(3)
  q = rng.normal(size=(2, 5, 4, 8)).astype(np.float32)
  k = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  v = rng.normal(size=(2, 5, 2, 8)).astype(np.float32)
  mask = np.asarray(layers.causal_mask(jnp.broadcast_to(jnp.arange(5), (2, 5)),
                                       jnp.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], bool)))
  bgzs = jnp.asarray(k.transpose(0, 2, 3, 1))  # attend takes (b, g)-leading k^T and v
  bgsz = jnp.asarray(v.transpose(0, 2, 1, 3))
  out = layers.attend(jnp.asarray(q), bgzs, bgsz, jnp.asarray(mask))
  np.testing.assert_allclose(out, np_attend(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_attend_one_key_returns_its_value():
  """A query that may see only key s returns v[s] exactly."""
  v_BGSZ = jnp.arange(3 * 1 * 2, dtype=jnp.float32).reshape(1, 1, 3, 2)
  q = jnp.ones((1, 3, 2, 2))
  k_BGZS = jnp.ones((1, 1, 2, 3))
  mask = jnp.eye(3, dtype=bool)[None]
  out = layers.attend(q, k_BGZS, v_BGSZ, mask)
  np.testing.assert_allclose(out[0, :, 0], v_BGSZ[0, 0], rtol=1e-6)
  np.testing.assert_allclose(out[0, :, 1], v_BGSZ[0, 0], rtol=1e-6)


def test_attend_on_float32_stored_keys_rounds_like_bfloat16_operands():
  """bfloat16 queries against keys and values stored in float32 (bfloat16-exact values, the CPU
  cache of `config.storage_dtype`) give a bfloat16 result bit-equal to all-bfloat16 operands."""
  rng = np.random.default_rng(5)
  q = jnp.asarray(rng.normal(size=(2, 1, 4, 8)), jnp.bfloat16)
  k_BGZS = jnp.asarray(rng.normal(size=(2, 2, 8, 6)), jnp.bfloat16)
  v_BGSZ = jnp.asarray(rng.normal(size=(2, 2, 6, 8)), jnp.bfloat16)
  mask = jnp.asarray(rng.random((2, 1, 6)) < 0.7).at[:, :, 0].set(True)
  narrow = jax.jit(layers.attend)(q, k_BGZS, v_BGSZ, mask)
  wide = jax.jit(layers.attend)(q, k_BGZS.astype(jnp.float32), v_BGSZ.astype(jnp.float32), mask)
  assert narrow.dtype == wide.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(wide, np.float32), np.asarray(narrow, np.float32))


def _attn(mod, params, *args):
  """Attention output; the module may also return its updated KV cache (None without one)."""
  out = mod.apply(params, *args)
  return out[0] if isinstance(out, tuple) else out


CFG = ModelConfig(d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=1000.0,
                  dense_layers=(0,), dense_d_ff=24)


def test_attention_module_matches_numpy_pipeline():
  """Attention = o_proj(attend(rope(qnorm(x Wq)), rope(knorm(x Wk)), x Wv)) with its own params."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(2, 6, 32)).astype(np.float32))
  pos = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = layers.causal_mask(pos, jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool))
  mod = layers.Attention(CFG)
  params = nn.unbox(mod.init(jax.random.PRNGKey(0), x, pos, mask))["params"]
  # Non-trivial norm scales so the test sees them.
  params["q_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 8).astype(np.float32))
  params["k_norm"]["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, 8).astype(np.float32))
  out = _attn(mod, {"params": params}, x, pos, mask)
  xn = np.asarray(x, np.float64)
  q = np.einsum("btd,dhz->bthz", xn, params["q_proj"]["kernel"])
  k = np.einsum("btd,dgz->btgz", xn, params["k_proj"]["kernel"])
  v = np.einsum("btd,dgz->btgz", xn, params["v_proj"]["kernel"])
  q = np_rotary(np_rms_norm(q, params["q_norm"]["scale"], CFG.rms_norm_eps), pos, CFG.rope_theta)
  k = np_rotary(np_rms_norm(k, params["k_norm"]["scale"], CFG.rms_norm_eps), pos, CFG.rope_theta)
  expected = np.einsum("bthz,hzd->btd", np_attend(q, k, v, np.asarray(mask)),
                       params["o_proj"]["kernel"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_attention_module_causal_blocks_only_without_a_cache():
  """ModelConfig.attention_blocks: at T=128 the module's two blocks give the one-block output."""
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 128, 32))
  pos = jnp.broadcast_to(jnp.arange(128), (2, 128))
  mask = layers.causal_mask(pos, None)
  one, two = (layers.Attention(CFG.replace(attention_blocks=n)) for n in (1, 2))
  params = nn.unbox(one.init(jax.random.PRNGKey(0), x, pos, mask))
  np.testing.assert_allclose(_attn(two, params, x, pos, mask), _attn(one, params, x, pos, mask),
                             rtol=1e-5, atol=1e-6)
  # the program scores [B, G, R, 64, 64] then [B, G, R, 64, 128], never all 128 x 128
  hlo = jax.jit(lambda p: _attn(two, p, x, pos, mask)).lower(params).as_text()
  assert "tensor<2x2x2x64x64xf32>" in hlo and "tensor<2x2x2x64x128xf32>" in hlo
  assert "tensor<2x2x2x128x128xf32>" not in hlo
  assert "tensor<2x2x2x128x128xf32>" in jax.jit(
      lambda p: _attn(one, p, x, pos, mask)).lower(params).as_text()


def test_attention_is_causal_and_ignores_padding_keys():
  """Changing future tokens or padded tokens does not change the earlier/real outputs."""
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 6, 32))
  pos = jnp.arange(6)[None]
  valid = jnp.array([[0, 0, 1, 1, 1, 1]], bool)
  mask = layers.causal_mask(pos, valid)
  mod = layers.Attention(CFG)
  params = nn.unbox(mod.init(jax.random.PRNGKey(0), x, pos, mask))
  out = _attn(mod, params, x, pos, mask)
  x_future = x.at[:, 4:].add(3.0)
  np.testing.assert_allclose(_attn(mod, params, x_future, pos, mask)[:, :4], out[:, :4],
                             rtol=1e-5, atol=1e-6)
  x_pad = x.at[:, :2].set(-7.0)
  np.testing.assert_allclose(_attn(mod, params, x_pad, pos, mask)[:, 2:], out[:, 2:],
                             rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(_attn(mod, params, x_future, pos, mask)[:, 4:] - out[:, 4:]))) > 1e-3



def test_attention_prefill_then_decode_with_a_kv_cache_matches_no_cache():
  """A prompt of 4 written at cache index 0, then 2 tokens decoded one at a time (index 4, 5),
  give the outputs of one causal pass over the 6 tokens (left padding included), and the
  returned cache holds the keys and values in slots [0, 6) and zeros after them. A write at the
  wrong slot, or a mask that lets a query see padding or later slots, changes them."""
  b, t, s = 2, 6, 8
  x = jax.random.normal(jax.random.PRNGKey(7), (b, t, 32))
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  valid = jnp.array([[1] * 6, [0, 0, 1, 1, 1, 1]], bool)
  mod = layers.Attention(CFG)
  full_mask = layers.causal_mask(pos, valid)
  params = nn.unbox(mod.init(jax.random.PRNGKey(0), x, pos, full_mask))
  want = np.asarray(_attn(mod, params, x, pos, full_mask))
  g, z = CFG.num_kv_heads, CFG.head_dim
  cache_k, cache_v = jnp.zeros((b, g, z, s)), jnp.zeros((b, g, s, z))
  key_valid = jnp.zeros((b, s), bool)
  outs = []
  for start, end in ((0, 4), (4, 5), (5, 6)):
    key_valid = key_valid.at[:, start:end].set(valid[:, start:end])
    mask = layers.cache_mask(jnp.int32(start), end - start, key_valid)
    out, (cache_k, cache_v) = mod.apply(params, x[:, start:end], pos[:, start:end], mask,
                                        kv=(cache_k, cache_v, jnp.int32(start)))
    outs.append(np.asarray(out))
  np.testing.assert_allclose(np.concatenate(outs, axis=1), want, rtol=1e-5, atol=1e-6)
  assert np.all(np.abs(np.asarray(cache_k)[..., :t]).sum(2) > 0)  # every written slot
  np.testing.assert_array_equal(np.asarray(cache_k)[..., t:], 0)
  np.testing.assert_array_equal(np.asarray(cache_v)[:, :, t:], 0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mlp_matches_numpy(dtype):
  """Dense SwiGLU: down(silu(x gate) * (x up)); bfloat16 compute stays close."""
  cfg = CFG.replace(dtype=dtype)
  x = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 32))
  mod = layers.MLP(cfg)
  params = nn.unbox(mod.init(jax.random.PRNGKey(7), x))["params"]
  assert params["gate_proj"]["kernel"].dtype == jnp.float32  # params stay float32
  out = mod.apply({"params": params}, x)
  assert out.dtype == jnp.dtype(dtype)
  xn = np.asarray(x, np.float64)
  g = xn @ np.asarray(params["gate_proj"]["kernel"], np.float64)
  u = xn @ np.asarray(params["up_proj"]["kernel"], np.float64)
  expected = (g / (1 + np.exp(-g)) * u) @ np.asarray(params["down_proj"]["kernel"], np.float64)
  tol = 1e-5 if dtype == "float32" else 5e-2
  np.testing.assert_allclose(out.astype(jnp.float32), expected,
                             rtol=tol, atol=tol * np.abs(expected).max())


def test_first_argmax_is_jnp_argmax_on_ties_infinities_nans_and_bfloat16():
  nan, inf = float("nan"), float("inf")
  rows = jnp.array([[1.0, 3.0, 3.0, 0.0],      # tie: the first maximum
                    [-inf, -inf, -inf, -inf],  # nothing allowed: index 0, as argmax
                    [2.0, nan, 5.0, nan],      # a NaN wins over any number
                    [-0.0, 0.0, -1.0, -2.0],   # -0 == +0: the first
                    [-1e9, -1e9, 7.0, inf]])
  np.testing.assert_array_equal(np.asarray(layers.first_argmax(rows)), [1, 0, 1, 0, 3])
  np.testing.assert_array_equal(np.asarray(jnp.argmax(rows, axis=-1)), [1, 0, 1, 0, 3])
  x = jax.random.normal(jax.random.key(0), (6, 50, 300))
  for arr in (x, x.astype(jnp.bfloat16), jnp.round(x)):  # bf16 and rounding make many ties
    got = layers.first_argmax(arr)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.argmax(arr, axis=-1)))
  # Two one-operand reduces, not argmax's (value, index) pair reduce that XLA:CPU runs slowly.
  hlo = jax.jit(layers.first_argmax).lower(rows).as_text()
  reduces = [line for line in hlo.splitlines() if "stablehlo.reduce(" in line]
  assert len(reduces) == 2 and not any("), (" in line for line in reduces)
