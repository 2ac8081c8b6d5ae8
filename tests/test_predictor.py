"""Tests for pr2_jax.pr2.predictor: losses, gradients, and learning a linear router drift."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pr2_jax.models import routing
from pr2_jax.pr2 import predictor as pred


def _features(n=256, d=16, e=8, seed=0, drift_scale=0.5):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  h = jax.random.normal(k1, (n, d))
  w_router = jax.random.normal(k2, (d, e))
  drift = drift_scale * jax.random.normal(k3, (d, e))  # the router's move: linear in h
  p_old = h @ w_router
  return h, p_old, p_old + h @ drift


def _np_log_softmax(x_NE):
  x_NE = x_NE - x_NE.max(-1, keepdims=True)
  return x_NE - np.log(np.exp(x_NE).sum(-1, keepdims=True))


def _np_kl(target_NE, model_NE):
  log_p, log_q = _np_log_softmax(target_NE), _np_log_softmax(model_NE)
  return (np.exp(log_p) * (log_p - log_q)).sum(-1)


def _np_loss(kind, w_DE, h_ND, p_old_NE, p_cur_NE, weight_N):
  """Float64 numpy oracle of one layer's predictor loss (DESIGN §3 PR2)."""
  w_DE, h_ND, p_old_NE, p_cur_NE, weight_N = (np.asarray(x, np.float64) for x in
                                              (w_DE, h_ND, p_old_NE, p_cur_NE, weight_N))
  b_NE = h_ND @ w_DE
  loss_N = {"post": lambda: _np_kl(p_cur_NE, p_old_NE + b_NE),
            "delta": lambda: _np_kl(p_cur_NE - p_old_NE, b_NE),
            "l2": lambda: ((b_NE - (p_cur_NE - p_old_NE)) ** 2).mean(-1)}[kind]()
  return (loss_N * weight_N).sum() / max(weight_N.sum(), 1.0)


def _np_topk(x_NE, k):
  """Indices of the k largest entries, largest first (lax.top_k's order)."""
  return np.argsort(-np.asarray(x_NE), axis=-1, kind="stable")[:, :k]


def _np_overlap(a_NK, b_NK, weight_N):
  hits_N = np.array([len(set(a) & set(b)) for a, b in zip(a_NK.tolist(), b_NK.tolist())])
  return (hits_N / a_NK.shape[-1] * weight_N).sum() / weight_N.sum()


def test_post_loss_hand_worked():
  """W_p = 0 and p_cur = p_old: KL is 0; with p_cur = p_old + log 2 on expert 0 it is
  KL(ρ‖ρ_old)."""
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


def test_loss_values_hand_worked():
  """One token, E = 2, logit change d = p_cur - p_old = [0, ln 2], so softmax(d) = [1/3, 2/3].

  W_p = 0 (b = 0, q̂ = softmax(p_old) = [2/3, 1/3], ρ_cur = softmax([ln 2, ln 2]) = [1/2, 1/2]):
    l2    = mean_e (b - d)² = (0 + (ln 2)²) / 2      = 0.2402265  (a sum would give 0.4805)
    delta = KL([1/3, 2/3] ‖ [1/2, 1/2]) = 5/3 ln 2 - ln 3 = 0.0566330  (reversed KL: 0.0588915)
    post  = KL([1/2, 1/2] ‖ [2/3, 1/3]) = ln 3 - 3/2 ln 2 = 0.0588915  (reversed KL: 0.0566330)
  W_p overshooting, b = h W_p = [0, 2 ln 2] (error b - d = [0, ln 2]):
    l2    = (ln 2)² / 2                                           = 0.2402265
    delta = KL([1/3, 2/3] ‖ softmax(b) = [1/5, 4/5]) = ln 5 - ln 3 - 2/3 ln 2 = 0.0487275
    post  = KL([1/2, 1/2] ‖ softmax([ln 2, 2 ln 2]) = [1/3, 2/3]) = ln 3 - 3/2 ln 2 = 0.0588915
  """
  ln2, ln3, ln5 = np.log(2.0), np.log(3.0), np.log(5.0)
  h = jnp.array([[1.0, 0.0]])  # picks W_p's first row: the second row must not matter
  p_old = jnp.array([[ln2, 0.0]])
  p_cur = jnp.array([[ln2, ln2]])
  loss = lambda kind, w: float(pred.predictor_loss(kind, w, h, p_old, p_cur, jnp.ones(1)))
  zero = jnp.zeros((2, 2))
  np.testing.assert_allclose(loss("l2", zero), ln2 ** 2 / 2, rtol=1e-6)
  np.testing.assert_allclose(loss("delta", zero), 5 / 3 * ln2 - ln3, rtol=1e-5)
  np.testing.assert_allclose(loss("post", zero), ln3 - 1.5 * ln2, rtol=1e-5)
  over = jnp.array([[0.0, 2 * ln2], [7.0, -7.0]])
  np.testing.assert_allclose(loss("l2", over), ln2 ** 2 / 2, rtol=1e-6)
  np.testing.assert_allclose(loss("delta", over), ln5 - ln3 - 2 / 3 * ln2, rtol=1e-5)
  np.testing.assert_allclose(loss("post", over), ln3 - 1.5 * ln2, rtol=1e-5)


def test_weights_exclude_padding():
  h, p_old, p_cur = _features(n=4)
  w = jnp.zeros((h.shape[1], p_old.shape[1]))
  p_cur_padded = p_cur.at[3].set(100.0)  # garbage on a padded position
  mask = jnp.array([1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(pred.predictor_loss("post", w, h[:3], p_old[:3], p_cur[:3], mask[:3]),
                             pred.predictor_loss("post", w, h, p_old, p_cur_padded, mask),
                             rtol=1e-6)


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
  """On a router whose drift is linear in h, the trained predictor's top-k beats the stale route.

  The two layers get different features, routers and drifts, so their trained W_p differ and
  each layer's loss, predicted top-k and overlap are checked against a numpy oracle on that
  layer's own data and weights: a layer mix-up (layer 0's W_p everywhere, weights paired with
  another layer's data) cannot pass.
  """
  layers = [_features(seed=0, drift_scale=0.5), _features(seed=1, drift_scale=0.8)]
  L = len(layers)
  h_NLD, p_old_NLE, p_cur_NLE = (jnp.stack(x, axis=1) for x in zip(*layers))
  weight = jnp.ones(h_NLD.shape[0])
  w = pred.init_predictor(L, h_NLD.shape[-1], p_old_NLE.shape[-1])
  tx = optax.adam(3e-2)
  opt = tx.init(w)
  losses_fn = lambda w: pred.predictor_losses(kind, w, h_NLD, p_old_NLE, p_cur_NLE, weight)
  first_L = np.asarray(losses_fn(w))
  # A random W_p that differs per layer: each layer's loss must use its own weights and data.
  w_rand = 0.3 * jax.random.normal(jax.random.key(3), w.shape)
  rand_L = np.asarray(losses_fn(w_rand))

  @jax.jit
  def step(w, opt):
    updates, opt = tx.update(jax.grad(lambda w: jnp.sum(losses_fn(w)))(w), opt)
    return optax.apply_updates(w, updates), opt

  for _ in range(300):
    w, opt = step(w, opt)
  last_L = np.asarray(losses_fn(w))
  k = 2
  live = jax.lax.top_k(p_cur_NLE, k)[1]
  predicted_NLK = np.asarray(pred.predicted_topk(w, h_NLD, p_old_NLE, k))
  overlap_L = np.asarray(pred.topk_overlap(predicted_NLK, live, weight))
  w_np = np.asarray(w, np.float64)
  assert np.abs(w_np[0] - w_np[1]).max() > 0.1  # the layers really learned different W_p
  for l, (h, p_old, p_cur) in enumerate(layers):
    h, p_old, p_cur = (np.asarray(x, np.float64) for x in (h, p_old, p_cur))
    ones = np.ones(h.shape[0])
    np.testing.assert_allclose(first_L[l], _np_loss(kind, np.zeros_like(w_np[l]), h, p_old,
                                                    p_cur, ones), rtol=1e-4)
    np.testing.assert_allclose(rand_L[l], _np_loss(kind, np.asarray(w_rand[l], np.float64), h,
                                                   p_old, p_cur, ones), rtol=1e-4)
    # Trained to ~0, so only the absolute error is meaningful here.
    np.testing.assert_allclose(last_L[l], _np_loss(kind, w_np[l], h, p_old, p_cur, ones),
                               atol=1e-6)
    assert last_L[l] < 0.2 * first_L[l], (l, last_L, first_L)
    want_topk = _np_topk(p_old + h @ w_np[l], k)
    np.testing.assert_array_equal(predicted_NLK[:, l], want_topk)
    want_overlap = _np_overlap(want_topk, _np_topk(p_cur, k), ones)
    np.testing.assert_allclose(overlap_L[l], want_overlap, rtol=1e-6)
    stale = _np_overlap(_np_topk(p_old, k), _np_topk(p_cur, k), ones)
    assert want_overlap > stale + 0.2, (l, want_overlap, stale)
  assert float(pred.bias_logit_ratio(w, h_NLD, p_old_NLE, weight)) > 0


def test_zero_predictor_predicts_the_live_route():
  h, p_old, _ = _features(n=16)
  w = pred.init_predictor(1, h.shape[1], p_old.shape[1])
  np.testing.assert_array_equal(pred.predicted_topk(w, h[:, None], p_old[:, None], 2),
                                jax.lax.top_k(p_old[:, None], 2)[1])
  assert float(pred.bias_logit_ratio(w, h[:, None], p_old[:, None], jnp.ones(16))) == 0.0


def test_zero_predictor_and_live_route_differ_only_at_ties_of_rho():
  """Logits ~180 apart underflow ρ to [1, 0, 0, 0, 0, 0]: the live router breaks the tie of
  zeros by the lower id as transformers does ([0, 1]), the prediction takes the top-k of the
  scores ([0, 3]); where ρ does not tie, W_p = 0 predicts the live route."""
  p_NLE = jnp.array([[[150.0, -29.0, 3.0, 34.0, -5.0, 0.0]], [[1.0, -2.0, 0.5, 3.0, -1.0, 0.0]]])
  w = pred.init_predictor(1, 3, 6)
  predicted = pred.predicted_topk(w, jnp.ones((2, 1, 3)), p_NLE, 2)
  live = routing.route(p_NLE[:, 0], 2, True).expert_ids
  np.testing.assert_array_equal(predicted[:, 0], [[0, 3], [3, 0]])
  np.testing.assert_array_equal(live, [[0, 1], [3, 0]])


def test_bias_logit_ratio_hand_worked():
  """mean|b| / mean|p_old| over weighted positions, b = h W_p. Two positions, one layer,
  d = 1, E = 2: W_p = [[1, -2]] gives b = h·[1, -2]."""
  w_LDE = jnp.array([[[1.0, -2.0]]])
  h_NLD = jnp.array([[[1.0]], [[-3.0]]])            # |b| rows: [1, 2] and [3, 6]
  p_NLE = jnp.array([[[4.0, -4.0]], [[1.0, 1.0]]])  # |p| rows: 8 and 2
  bias, logit = pred.bias_logit_sums(w_LDE, h_NLD, p_NLE, jnp.array([1.0, 1.0]))
  assert (float(bias), float(logit)) == (12.0, 10.0)
  np.testing.assert_allclose(pred.bias_logit_ratio(w_LDE, h_NLD, p_NLE, jnp.ones(2)), 1.2)
  # A padding position (weight 0) counts in neither sum.
  np.testing.assert_allclose(pred.bias_logit_ratio(w_LDE, h_NLD, p_NLE, jnp.array([1.0, 0.0])),
                             3.0 / 8.0)
  # From sums added over micro-steps (the learner's metric): the ratio of the sums, and 0 (not
  # NaN) for W_p = 0 on all-zero logits.
  np.testing.assert_allclose(pred.bias_logit_ratio_from_sums(bias + 3.0, logit + 5.0), 1.0)
  assert float(pred.bias_logit_ratio_from_sums(jnp.float32(0), jnp.float32(0))) == 0.0


def test_topk_overlap_hand_worked():
  a = jnp.array([[[0, 1]], [[2, 3]]])
  b = jnp.array([[[1, 2]], [[2, 3]]])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.ones(2)), [0.75])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.array([1.0, 0.0])), [0.5])


def test_topk_overlap_hand_worked_two_layers():
  """|A ∩ B| / K per (token, layer), order-free, averaged over tokens separately per layer:
  token 0: layer 0 {0,1}∩{2,1} = 1/2, layer 1 {4,5}∩{5,4} = 1;
  token 1: layer 0 {2,3}∩{3,2} = 1,   layer 1 {6,7}∩{0,1} = 0.
  Weights [1, 3]: layer 0 (1/2 + 3) / 4 = 0.875, layer 1 (1 + 0) / 4 = 0.25."""
  a = jnp.array([[[0, 1], [4, 5]], [[2, 3], [6, 7]]])
  b = jnp.array([[[2, 1], [5, 4]], [[3, 2], [0, 1]]])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.ones(2)), [0.75, 0.5])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.array([1.0, 3.0])), [0.875, 0.25])
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.array([1.0, 0.0])), [0.5, 1.0])


def test_unknown_loss():
  with pytest.raises(ValueError, match="unknown predictor loss 'kl'"):
    pred.predictor_loss("kl", jnp.zeros((2, 2)), jnp.ones((1, 2)), jnp.zeros((1, 2)),
                        jnp.zeros((1, 2)), jnp.ones(1))


@pytest.mark.parametrize("bad, match", [
    ({"weight_N": jnp.ones((3, 1))}, r"weight_N has shape \(3, 1\), expected \[N\]"),
    ({"p_cur_NLE": jnp.zeros((1, 2, 4))},
     r"p_cur_NLE has shape \(1, 2, 4\), expected .*\(3, 2, 4\)"),
    ({"h_old_NLD": jnp.zeros((3, 2, 5))},
     r"h_old_NLD has shape \(3, 2, 5\), expected .*\(3, 2, 6\)"),
])
def test_predictor_losses_refuse_shapes_that_would_broadcast(bad, match):
  """A [N, 1] weight broadcast to [N, N] and gave 2.0 / 4.5 for losses of 0.43 / 0.91."""
  args = {"w_LDE": jnp.zeros((2, 6, 4)), "h_old_NLD": jnp.zeros((3, 2, 6)),
          "p_old_NLE": jnp.zeros((3, 2, 4)), "p_cur_NLE": jnp.zeros((3, 2, 4)),
          "weight_N": jnp.ones(3), **bad}
  with pytest.raises(ValueError, match=match):
    pred.predictor_losses("post", **args)


def test_init_predictor_refuses_sizes_that_are_not_positive_ints():
  with pytest.raises(ValueError, match=r"init_predictor.num_layers must be a positive int, got -1"):
    pred.init_predictor(-1, 4, 4)


def test_topk_overlap_refuses_shapes_that_disagree():
  """a's K=2 against b's K=3 gave 1.0 one way and 0.667 the other; an L of 1 broadcast."""
  a = jnp.array([[[0, 1]], [[2, 3]]])
  with pytest.raises(ValueError, match=r"b_NLK has shape \(2, 1, 3\), expected \[N, L, K\] of "
                                       r"a_NLK = \(2, 1, 2\)"):
    pred.topk_overlap(a, jnp.array([[[0, 1, 2]], [[2, 3, 4]]]), jnp.ones(2))
  with pytest.raises(ValueError, match=r"b_NLK has shape \(2, 2, 2\)"):
    pred.topk_overlap(a, jnp.concatenate([a, a], 1), jnp.ones(2))
  with pytest.raises(ValueError, match=r"weight_N has shape \(3,\), expected \[N\] of a_NLK"):
    pred.topk_overlap(a, a, jnp.ones(3))
  with pytest.raises(ValueError, match=r"a_NLK has shape \(2, 2\), expected rank 3"):
    pred.topk_overlap(a[:, 0], a[:, 0], jnp.ones(2))
  np.testing.assert_allclose(pred.topk_overlap(a, jnp.array([[[1, 2]], [[2, 3]]]), jnp.ones(2)),
                             [0.75])


W_LDE, H_NLD, P_NLE = jnp.zeros((2, 5, 6)), jnp.ones((4, 2, 5)), jnp.ones((4, 2, 6))


@pytest.mark.parametrize("args, match", [
    ((W_LDE, H_NLD, P_NLE[..., :3]), r"p_NLE has shape \(4, 2, 3\), expected \[N, L, E\] .*"
                                     r"= \(4, 2, 6\)"),
    ((W_LDE, H_NLD[:, :1], P_NLE), r"h_NLD has shape \(4, 1, 5\), expected \[N, L, D\] .*"
                                   r"= \(4, 2, 5\)"),
    ((W_LDE, H_NLD[..., :4], P_NLE), r"h_NLD has shape \(4, 2, 4\)"),
    ((W_LDE[0], H_NLD, P_NLE), r"w_LDE has shape \(5, 6\), expected rank 3"),
])
def test_stacked_predictor_functions_refuse_shapes_that_disagree(args, match):
  """p with E=3 against w's E=6 gave a ratio silently; an L or D mismatch failed in opt_einsum."""
  with pytest.raises(ValueError, match=match):
    pred.bias_logit_ratio(*args, jnp.ones(4))
  with pytest.raises(ValueError, match=match):
    pred.predicted_topk(*args, 2)


def test_bias_logit_sums_refuse_a_weight_of_another_length():
  with pytest.raises(ValueError, match=r"weight_N has shape \(3,\), expected \[N\] with N of "
                                       r"h_NLD = \(4,\)"):
    pred.bias_logit_sums(W_LDE, H_NLD, P_NLE, jnp.ones(3))
  assert [float(x) for x in pred.bias_logit_sums(W_LDE, H_NLD, P_NLE, jnp.ones(4))] == [0, 48]
  # A negative weight subtracted its position's |b| and |p_old| from the sums, silently.
  with pytest.raises(ValueError, match=r"weight_N\[1\] = -1.0 is not a finite number >= 0"):
    pred.bias_logit_ratio(W_LDE, H_NLD, P_NLE, jnp.array([1.0, -1.0, 1.0, 1.0]))


@pytest.mark.parametrize("k", [0, 7, True, 2.0])
def test_predicted_topk_wants_k_in_one_to_num_experts(k):
  """k > E was a raw lax error, k = 0 an empty [N, L, 0] result, True silently k = 1."""
  with pytest.raises(ValueError, match=rf"k={k!r} must be an int in \[1, num_experts=6\]"):
    pred.predicted_topk(W_LDE, H_NLD, P_NLE, k)
  assert pred.predicted_topk(W_LDE, H_NLD, P_NLE, 6).shape == (4, 2, 6)


def test_predictor_bias_refuses_a_d_mismatch():
  with pytest.raises(ValueError, match=r"h_ND has shape \(4, 3\), expected \[\.\.\., D\] with D "
                                       r"of w_DE = \(4, 5\)"):
    pred.predictor_bias(jnp.ones((4, 3)), jnp.ones((5, 6)))
  with pytest.raises(ValueError, match=r"w_DE has shape \(5,\), expected rank 2"):
    pred.predictor_bias(jnp.ones((4, 5)), jnp.ones(5))
  np.testing.assert_array_equal(pred.predictor_bias(jnp.ones((4, 5)), jnp.ones((5, 6))),
                                np.full((4, 6), 5.0))


def test_predictor_loss_refuses_negative_weights_when_concrete():
  """Weights are 0/1 counts: a -1 subtracted a position's loss (and shrank the divisor)."""
  h, p_old, p_cur = _features(n=4, d=3, e=5)
  w = jnp.zeros((3, 5))
  weight = jnp.array([1.0, -1.0, 1.0, 0.0])
  with pytest.raises(ValueError, match=r"weight_N\[1\] = -1.0 is not a finite number >= 0"):
    pred.predictor_loss("post", w, h, p_old, p_cur, weight)
  with pytest.raises(ValueError, match=r"weight_N\[2\] = nan is not a finite number >= 0"):
    pred.predictor_loss("l2", w, h, p_old, p_cur, weight.at[1:3].set(jnp.array([1, jnp.nan])))
  with pytest.raises(ValueError, match=r"weight_N\[1\] = -1.0"):
    pred.predictor_losses("post", w[None], h[:, None], p_old[:, None], p_cur[:, None], weight)
  ok = jnp.array([1.0, 1.0, 0.0, 1.0])
  np.testing.assert_allclose(pred.predictor_loss("post", w, h, p_old, p_cur, ok),
                             _np_loss("post", w, h, p_old, p_cur, ok), rtol=1e-5)
  jitted = jax.jit(functools.partial(pred.predictor_loss, "post"))  # traced: no value check
  assert np.isfinite(jitted(w, h, p_old, p_cur, weight))


def test_array_likes_work_like_the_arrays_they_spell():
  """Nested lists were an AttributeError ('list' object has no attribute 'astype')."""
  a, b = [[[0, 1]], [[2, 3]]], [[[1, 2]], [[2, 3]]]  # overlaps 1/2 and 1 (hand-worked above)
  np.testing.assert_allclose(pred.topk_overlap(a, b, [1.0, 1.0]), [0.75])
  np.testing.assert_allclose(pred.topk_overlap(jnp.array(a), jnp.array(b), [1.0, 0.0]), [0.5])
  # post loss, hand-worked as in test_post_loss_hand_worked: W_p = 0, ρ_cur = [2/3, 1/3].
  expected = 2 / 3 * np.log(4 / 3) + 1 / 3 * np.log(2 / 3)
  got = pred.predictor_loss("post", [[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0]], [[0.0, 0.0]],
                            [[math.log(2.0), 0.0]], [1.0])
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  np.testing.assert_array_equal(pred.predictor_bias([[1.0, 1.0]], [[1.0, 0.0], [0.0, 2.0]]),
                                [[1.0, 2.0]])


@pytest.mark.parametrize("arg", ["h_old", "p_old", "p_cur"])
@pytest.mark.parametrize("bad, shown", [(-np.inf, "-inf"), (np.nan, "nan")])
def test_predictor_loss_refuses_non_finite_features_when_concrete(arg, bad, shown):
  """p_old = -inf gave an inf loss, a NaN one NaN: concrete features are checked as route checks
  its logits, by predictor_loss and (on the stacked arrays, before its vmap) predictor_losses."""
  h, p_old, p_cur = _features(n=4, d=3, e=5)
  args = {"h_old": h, "p_old": p_old, "p_cur": p_cur}
  args[arg] = args[arg].at[1, 2].set(bad)
  w, weight = jnp.zeros((3, 5)), jnp.ones(4)
  with pytest.raises(ValueError, match=rf"{arg}_N[DE]\[1, 2\] = {shown} is not finite \("):
    pred.predictor_loss("post", w, args["h_old"], args["p_old"], args["p_cur"], weight)
  with pytest.raises(ValueError, match=rf"{arg}_NL[DE]\[1, 0, 2\] = {shown} is not finite"):
    pred.predictor_losses("post", w[None], args["h_old"][:, None], args["p_old"][:, None],
                          args["p_cur"][:, None], weight)
  jitted = jax.jit(functools.partial(pred.predictor_loss, "post"))  # traced: no value check
  jitted(w, args["h_old"], args["p_old"], args["p_cur"], weight)


@pytest.mark.parametrize("kind", pred.PREDICTOR_LOSSES)
@pytest.mark.parametrize("arg", ["h_old", "p_old", "p_cur"])
def test_a_non_finite_padding_position_is_left_out_eager_and_jitted(kind, arg):
  """Weight 0 = padding, whatever it holds: a -inf or NaN there made the jitted loss and W_p's
  gradient NaN (0 * NaN), while the eager call refused it as if it counted."""
  h, p_old, p_cur = _features(n=4, d=3, e=5)
  w = 0.3 * jax.random.normal(jax.random.key(7), (3, 5))
  weight = jnp.array([1.0, 1.0, 0.0, 1.0])
  args = {"h_old": h, "p_old": p_old, "p_cur": p_cur}
  clean = pred.predictor_loss(kind, w, h, p_old, p_cur, weight)
  rows = jnp.array([0, 1, 3])
  np.testing.assert_allclose(clean, pred.predictor_loss(kind, w, h[rows], p_old[rows],
                                                        p_cur[rows], weight[rows]), rtol=1e-6)
  for bad in (np.nan, -np.inf):
    dirty = dict(args, **{arg: args[arg].at[2, 1].set(bad)})
    loss = lambda w_DE: pred.predictor_loss(kind, w_DE, dirty["h_old"], dirty["p_old"],
                                            dirty["p_cur"], weight)
    np.testing.assert_allclose(loss(w), clean, rtol=1e-6)  # eager: no error either
    np.testing.assert_allclose(jax.jit(loss)(w), clean, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss))(w),
        jax.grad(lambda w_DE: pred.predictor_loss(kind, w_DE, h, p_old, p_cur, weight))(w),
        rtol=1e-5, atol=1e-7)
    stacked = [dirty[a][:, None] for a in ("h_old", "p_old", "p_cur")]
    np.testing.assert_allclose(pred.predictor_losses(kind, w[None], *stacked, weight), [clean],
                               rtol=1e-6)
  with pytest.raises(ValueError, match=rf"{arg}_N[DE]\[1, 1\] = nan is not finite"):
    pred.predictor_loss(kind, w, *(dict(args, **{arg: args[arg].at[1, 1].set(np.nan)})[a]
                                   for a in ("h_old", "p_old", "p_cur")), weight)  # weighted


def test_bias_logit_sums_leave_out_padding_positions():
  h, p_old, _ = _features(n=4, d=3, e=5)
  w = 0.3 * jax.random.normal(jax.random.key(7), (1, 3, 5))
  weight = jnp.array([1.0, 0.0, 1.0, 1.0])
  clean = pred.bias_logit_sums(w, h[:, None], p_old[:, None], weight)
  got = pred.bias_logit_sums(w, h.at[1, 0].set(np.nan)[:, None], p_old.at[1].set(-np.inf)[:, None],
                             weight)
  np.testing.assert_allclose(got, clean, rtol=1e-6)
  keep = np.asarray(weight) > 0  # against numpy over the weighted rows alone
  b = np.asarray(h)[keep] @ np.asarray(w[0])
  np.testing.assert_allclose(got, (np.abs(b).sum(), np.abs(np.asarray(p_old)[keep]).sum()),
                             rtol=1e-5)


def test_topk_overlap_refuses_live_rows_and_float_ids():
  live = jnp.array([[[-1, -1]]])
  with pytest.raises(ValueError, match=r"a_NLK\[0, 0, 0\] = -1: topk_overlap compares"):
    pred.topk_overlap(live, live, jnp.ones(1))  # two live rows "agreed" fully
  with pytest.raises(ValueError, match=r"b_NLK\[0, 0, 1\] = -1"):
    pred.topk_overlap(jnp.array([[[0, 1]]]), jnp.array([[[0, -1]]]), jnp.ones(1))
  with pytest.raises(ValueError, match="b_NLK has dtype float32, expected integer expert ids"):
    pred.topk_overlap(jnp.array([[[0, 1]]]), jnp.array([[[0.0, 1.0]]]), jnp.ones(1))


@pytest.mark.parametrize("bad, shown", [(-1.0, "-1.0"), (float("nan"), "nan"),
                                        (float("inf"), "inf")])
def test_topk_overlap_refuses_negative_or_non_finite_weights(bad, shown):
  """Weights [1, -1] gave an overlap of 1.0 for tokens agreeing on 2/2 and 0/2 routes, silently;
  predictor_loss already refused them. Weights >= 0 give the hand-worked values, under jit too
  (where the weights are not read)."""
  a = jnp.array([[[0, 1]], [[2, 3]]])
  b = jnp.array([[[0, 1]], [[4, 5]]])
  with pytest.raises(ValueError, match=rf"weight_N\[1\] = {shown} is not a finite number >= 0 "
                                       r"\(a position's weight"):
    pred.topk_overlap(a, b, jnp.array([1.0, bad]))
  np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.array([1.0, 1.0])), [0.5])
  np.testing.assert_allclose(jax.jit(pred.topk_overlap)(a, b, jnp.array([1.0, 3.0])), [0.25])


def test_predicted_topk_refuses_non_finite_inputs_when_concrete():
  w, h, p = jnp.zeros((1, 2, 3)), jnp.ones((1, 1, 2)), jnp.array([[[0.0, jnp.nan, 1.0]]])
  with pytest.raises(ValueError, match=r"p_NLE\[0, 0, 1\] = nan is not finite \(router logits\)"):
    pred.predicted_topk(w, h, p, 2)
  with pytest.raises(ValueError, match=r"h_NLD\[0, 0, 0\] = inf"):
    pred.predicted_topk(w, h.at[0, 0, 0].set(jnp.inf), jnp.zeros((1, 1, 3)), 2)
  ids = jax.jit(pred.predicted_topk, static_argnums=3)(w, h, jnp.array([[[0.0, 2.0, 1.0]]]), 2)
  np.testing.assert_array_equal(ids, [[[1, 2]]])


def test_topk_overlap_is_a_weighted_mean_for_fractional_weights():
  a, b = jnp.array([[[0, 1]], [[2, 3]]]), jnp.array([[[0, 1]], [[0, 1]]])
  for weight in ([1.0, 1.0], [0.2, 0.2], [0.3, 0.1]):
    want = (weight[0] * 1.0 + weight[1] * 0.0) / sum(weight)
    np.testing.assert_allclose(pred.topk_overlap(a, b, jnp.array(weight)), [want], rtol=1e-6)
  np.testing.assert_array_equal(pred.topk_overlap(a, b, jnp.zeros(2)), [0.0])


@pytest.mark.parametrize("kind", pred.PREDICTOR_LOSSES)
def test_no_weighted_position_gives_zero_loss_and_zero_gradient(kind):
  """A micro-step may hold no sampled feature position (every weight 0): its loss is 0 and W_p's
  gradient exactly 0, per layer and stacked, not 0/0 = NaN in the predictor's update."""
  h, p_old, p_cur = _features(n=4, d=3, e=4)
  w = 0.1 * jnp.ones((3, 4))
  zero = jnp.zeros(4)
  loss, grad = jax.value_and_grad(lambda w: pred.predictor_loss(kind, w, h, p_old, p_cur, zero))(w)
  assert float(loss) == 0.0
  np.testing.assert_array_equal(grad, 0.0)
  stacked = pred.predictor_losses(kind, w[None], h[:, None], p_old[:, None], p_cur[:, None], zero)
  np.testing.assert_array_equal(stacked, [0.0])
