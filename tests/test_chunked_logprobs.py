"""Tests for pr2_jax.rl.chunked_logprobs: the LM head chunk by chunk equals the whole logits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pr2_jax.parallel.mesh import TOKEN_AXES, make_mesh
from pr2_jax.rl import losses
from pr2_jax.rl.chunked_logprobs import chunked_token_stats
from test_grouped import count_lowerings

B, T, D, V = 2, 8, 16, 40


def _inputs(v=V, t=T, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (B, t, D), jnp.float32)
  kernel = jax.random.normal(k2, (D, v), jnp.float32) * 0.5
  targets = jax.random.randint(k3, (B, t), 0, v, jnp.int32)
  return hidden, kernel, targets


def _full(hidden, kernel, targets, scale):
  logits = jnp.einsum("btd,dv->btv", hidden, kernel) * scale
  return losses.token_logprobs(logits, targets), losses.token_entropies(logits)


@pytest.mark.parametrize("chunk", [1, 3, 8, 20])  # 3: T is no multiple; 20: one chunk > T
def test_values_equal_the_whole_logits(chunk):
  hidden, kernel, targets = _inputs()
  logp, ent = chunked_token_stats(hidden, kernel, targets, chunk=chunk, scale=1 / 0.7)
  want_logp, want_ent = _full(hidden, kernel, targets, 1 / 0.7)
  assert logp.shape == ent.shape == (B, T) and logp.dtype == ent.dtype == jnp.float32
  np.testing.assert_allclose(logp, want_logp, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-6, atol=1e-6)
  # A hand-worked row: log softmax picks logit[target] - logsumexp.
  row = np.asarray(hidden[1, 2] @ kernel, np.float64) / 0.7
  lse = np.log(np.sum(np.exp(row - row.max()))) + row.max()
  np.testing.assert_allclose(logp[1, 2], row[int(targets[1, 2])] - lse, rtol=1e-5)


def test_gradients_equal_the_whole_logits():
  hidden, kernel, targets = _inputs()
  w_logp, w_ent = (jax.random.normal(jax.random.key(k), (B, T)) for k in (5, 6))

  def objective(stats):
    return lambda h, k: sum(jnp.sum(s * w) for s, w in zip(stats(h, k), (w_logp, w_ent)))

  chunked = objective(lambda h, k: chunked_token_stats(h, k, targets, chunk=3, scale=2.0))
  full = objective(lambda h, k: _full(h, k, targets, 2.0))
  got = jax.grad(chunked, argnums=(0, 1))(hidden, kernel)
  want = jax.grad(full, argnums=(0, 1))(hidden, kernel)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_bfloat16_matmul_matches_the_models_head():
  """dtype is the model's compute dtype: the matmul in bfloat16, the softmax in float32."""
  hidden, kernel, targets = _inputs()
  logp, _ = chunked_token_stats(hidden.astype(jnp.bfloat16), kernel, targets, chunk=4,
                                dtype="bfloat16")
  logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.bfloat16),
                      kernel.astype(jnp.bfloat16)).astype(jnp.float32)
  np.testing.assert_allclose(logp, losses.token_logprobs(logits, targets), rtol=1e-5, atol=1e-5)


def test_the_compiled_gradient_never_holds_the_whole_logits():
  """XLA's memory analysis of value-and-grad: the chunked program's temporaries stay below one
  copy of the [B, T, V] float32 logits, which the unchunked one needs at least twice over."""
  v, t = 8192, 256
  hidden, kernel, targets = _inputs(v=v, t=t)
  whole = B * t * v * 4

  def temp(stats):
    loss = lambda h, k: jnp.sum(stats(h, k)[0])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
        hidden, kernel).compile().memory_analysis().temp_size_in_bytes

  assert temp(lambda h, k: _full(h, k, targets, 1.0)) >= 2 * whole
  assert temp(lambda h, k: chunked_token_stats(h, k, targets, chunk=32)) < whole // 2


def test_bad_inputs_are_named():
  hidden, kernel, targets = _inputs()
  with pytest.raises(ValueError, match="chunk must be a positive int, got 0"):
    chunked_token_stats(hidden, kernel, targets, chunk=0)
  with pytest.raises(ValueError, match=r"targets_BT\[0, 1\] = 40 is outside \[0, V=40\)"):
    chunked_token_stats(hidden, kernel, targets.at[0, 1].set(V), chunk=4)
  with pytest.raises(ValueError, match=r"kernel_DV has shape \(8, 40\), expected \[D, V\] with "
                                       rf"D = {kernel.shape[0]}, hidden_BTD's last axis$"):
    chunked_token_stats(hidden, kernel[:8], targets, chunk=4)
  with pytest.raises(ValueError, match=r"targets_BT has shape \(2, 7\)"):
    chunked_token_stats(hidden, kernel, targets[:, :7], chunk=4)
  # Static, so under jit too: the int32 cast would truncate float ids silently.
  with pytest.raises(ValueError, match="targets_BT has dtype float32; token ids must be integers"):
    jax.jit(lambda h, t: chunked_token_stats(h, kernel, t, chunk=4))(hidden, targets * 1.0)
  with pytest.raises(ValueError, match="scale must be a finite real number"):
    chunked_token_stats(hidden, kernel, targets, chunk=4, scale=float("nan"))



@pytest.mark.parametrize("bad", [-1.0, 0.0, -0.0])
def test_a_scale_that_is_not_positive_is_refused(bad):
  """scale is 1 / temperature: -1 (the least likely tokens most likely) and 0 (every token
  equally likely) ran silently. A positive scale gives the whole logits' values, under jit too."""
  hidden, kernel, targets = _inputs()
  with pytest.raises(ValueError, match=rf"chunked_token_stats.scale must be > 0, got {bad}"):
    chunked_token_stats(hidden, kernel, targets, chunk=4, scale=bad)
  want = _full(hidden, kernel, targets, 2.0)
  for got in (chunked_token_stats(hidden, kernel, targets, chunk=4, scale=2.0),
              jax.jit(lambda h: chunked_token_stats(h, kernel, targets, chunk=4, scale=2.0))(
                  hidden)):
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-5)

def test_no_positions_give_empty_stats():
  """T = 0 as `token_logprobs` has it: [B, 0] results (the chunk of min(chunk, T) positions
  was 0, a ZeroDivisionError)."""
  hidden, kernel, targets = _inputs(t=0)
  chunked, whole = chunked_token_stats(hidden, kernel, targets, chunk=4), _full(hidden, kernel,
                                                                                targets, 1.0)
  for stats in (chunked, whole):
    assert [(s.shape, s.dtype) for s in stats] == [((B, 0), jnp.float32)] * 2


def test_eager_calls_with_the_same_shapes_compile_once():
  """Outside jit, a second call with other values builds no program (the lax.map's body was a
  closure made per call: traced and compiled again every call)."""
  hidden, kernel, targets = _inputs()
  call = lambda h: chunked_token_stats(h, kernel, targets, chunk=3, scale=2.0)  # noqa: E731
  jax.block_until_ready(call(hidden))
  hidden2 = hidden * 0.5  # other values, outside the count
  with count_lowerings() as built:
    logp, ent = jax.block_until_ready(call(hidden2))
  assert built == []
  want_logp, want_ent = _full(hidden2, kernel, targets, 2.0)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)


def _loop_bodies(hlo: str) -> list[str]:
  """The text of every while-loop body computation in a compiled module."""
  names = re.findall(r"body=%?([\w.\-]+)", hlo)
  blocks = re.split(r"\n(?=\S)", hlo)
  return [blk for blk in blocks for name in names if re.match(rf"%?{re.escape(name)} ", blk)]


def test_sharded_rows_equal_one_device_and_sum_the_head_gradient_once():
  """Rows split over a (2, 4) mesh: the values and gradients of one device, and no all-reduce
  inside the chunk loop (plain jit all-reduces the head's gradient there, once per chunk)."""
  mesh = make_mesh(2, 4)
  hidden, kernel, targets = _inputs()
  b8 = lambda x: jnp.concatenate([x] * 4)  # B = 8 rows for 8 token shards
  rows = NamedSharding(mesh, P(TOKEN_AXES))
  hidden, targets = jax.device_put(b8(hidden), rows), jax.device_put(b8(targets), rows)

  def grad_fn(m):
    loss = lambda h, k: sum(jnp.sum(s) for s in chunked_token_stats(h, k, targets, chunk=3,
                                                                     mesh=m))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

  (value, grads), (want_value, want_grads) = (grad_fn(m)(hidden, kernel) for m in (mesh, None))
  np.testing.assert_allclose(value, want_value, rtol=1e-5)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  for m, inside in ((mesh, False), (None, True)):
    bodies = _loop_bodies(grad_fn(m).lower(hidden, kernel).compile().as_text())
    assert bodies and any("all-reduce(" in body for body in bodies) == inside
  with pytest.raises(ValueError, match="batch size 2 must be divisible by the 8 token shards"):
    chunked_token_stats(*_inputs(), chunk=3, mesh=mesh)
