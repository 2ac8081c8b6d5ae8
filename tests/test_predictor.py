"""Tests for pr2_jax.pr2.predictor: losses, gradients, and learning a linear router drift."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pr2_jax.pr2 import predictor as pred


def _features(n=256, d=16, e=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(k1, (n, d))
  w_router = jax.random.normal(k2, (d, e))
  drift = 0.5 * jax.random.normal(k3, (d, e))  # the router's move: a fixed linear map of h
  p_old = h @ w_router
  return h, p_old, p_old + h @ drift


def test_post_loss_hand_worked():
  """W_p = 0 and p_cur = p_old: KL is 0; with p_cur = p_old + log 2 on expert 0 it is KL(ρ‖ρ_old)."""
  h = jnp.ones((1, 2))
  p_old = jnp.zeros((1, 2))
  w = jnp.zeros((2, 2))
  assert float(pred.predictor_loss("post", w, h, p_old, p_old, jnp.ones(1))) == 0.0
  p_cur = jnp.array([[jnp.log(2.0), 0.0]])  # ρ_cur = [2/3, 1/3], q̂ = [1/2, 1/2]
  expected = 2 / 3 * np.log(4 / 3) + 1 / 3 * np.log(2 / 3)
  np.testing.assert_allclose(float(pred.predictor_loss("post", w, h, p_old, p_cur, jnp.ones(1))),
                             expected, rtol=1e-6)


def test_l2_and_delta_targets_are_the_logit_change():
  h, p_old, p_cur = _features(n=64)
  # The exact drift as W_p makes b = p_cur - p_old: l2 and delta are then ~0.
  w_exact = jnp.linalg.lstsq(h, p_cur - p_old)[0]
  for kind in ("l2", "delta", "post"):
    assert float(pred.predictor_loss(kind, w_exact, h, p_old, p_cur, jnp.ones(64))) < 1e-6
    assert float(pred.predictor_loss(kind, jnp.zeros_like(w_exact), h, p_old, p_cur,
                                     jnp.ones(64))) > 1e-2


def test_weights_exclude_padding():
  h, p_old, p_cur = _features(n=4)
  w = jnp.zeros((h.shape[1], p_old.shape[1]))
  p_cur_padded = p_cur.at[3].set(100.0)  # garbage on a padded position
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(pred.predictor_loss("post", w, h[:3], p_old[:3], p_cur[:3], mask[:3]),
                             pred.predictor_loss("post", w, h, p_old, p_cur_padded, mask), rtol=1e-6)


def test_gradient_reaches_only_w_p():
  """Router logits and features are data: their gradients are exactly zero."""
  h, p_old, p_cur = _features(n=32)
  w = jnp.zeros((h.shape[1], p_old.shape[1]))
  grads = jax.grad(lambda w, h, a, b: pred.predictor_loss("post", w, h, a, b, jnp.ones(32)),
                   argnums=(0, 1, 2, 3))(w, h, p_old, p_cur)
  assert float(jnp.abs(grads[0]).max()) > 0
  for g in grads[1:]:
    assert float(jnp.abs(g).max()) == 0.0


@pytest.mark.parametrize("kind", pred.PREDICTOR_LOSSES)
def test_loss_falls_and_predictor_learns_linear_drift(kind):
  """On a router whose drift is linear in h, the trained predictor's top-k beats the stale route."""
  h, p_old, p_cur = _features()
  L = 2
  h_NLD, p_old_NLE, p_cur_NLE = (jnp.stack([x, x], axis=1) for x in (h, p_old, p_cur))
  weight = jnp.ones(h.shape[0])
  w = pred.init_predictor(L, h.shape[1], p_old.shape[1])
  tx = optax.adam(3e-2)
  opt = tx.init(w)
  loss_fn = lambda w: jnp.sum(pred.predictor_losses(kind, w, h_NLD, p_old_NLE, p_cur_NLE, weight))
  first = float(loss_fn(w))
  step = jax.jit(lambda w, opt: (lambda g: (optax.apply_updates(w, tx.update(g, opt)[0]),
                                            tx.update(g, opt)[1]))(jax.grad(loss_fn)(w)))
  for _ in range(300):
    w, opt = step(w, opt)
  assert float(loss_fn(w)) < 0.2 * first
  k = 2
  live = jax.lax.top_k(p_cur_NLE, k)[1]
  stale = pred.topk_overlap(jax.lax.top_k(p_old_NLE, k)[1], live, weight)
  predicted = pred.topk_overlap(pred.predicted_topk(w, h_NLD, p_old_NLE, k), live, weight)
  assert float(predicted.mean()) > float(stale.mean()) + 0.2, (predicted, stale)
  assert float(pred.bias_logit_ratio(w, h_NLD, p_old_NLE, weight)) > 0


def test_zero_predictor_predicts_the_live_route():
  h, p_old, _ = _features(n=16)
  w = pred.init_predictor(1, h.shape[1], p_old.shape[1])
  np.testing.assert_array_equal(pred.predicted_topk(w, h[:, None], p_old[:, None], 2),
                                jax.lax.top_k(p_old[:, None], 2)[1])
  assert float(pred.bias_logit_ratio(w, h[:, None], p_old[:, None], jnp.ones(16))) == 0.0


def test_topk_overlap_hand_worked():
  a = jnp.array([[[0, 1]], [[2, 3]]])
  b = jnp.array([[[1, 2]], [[2, 3]]])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.ones(2)), [0.75])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.array([1.0, 0.0])), [0.5])


def test_unknown_loss():
  with pytest.raises(ValueError, match="unknown predictor loss 'kl'"):
    pred.predictor_loss("kl", jnp.zeros((2, 2)), jnp.ones((1, 2)), jnp.zeros((1, 2)),
                        jnp.zeros((1, 2)), jnp.ones(1))
