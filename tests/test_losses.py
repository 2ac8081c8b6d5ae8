"""RL policy losses against hand-worked values: DAPO, GSPO, TIS weighting, accumulation, dispatch.

GRPO advantages and the TIS weights themselves are tested in tests/test_advantages.py."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.rl import advantages, losses

LN = math.log


# ----------------------------------------------------------------------------
# TIS weights in the loss
# ----------------------------------------------------------------------------

def test_dapo_with_tis_weight_scales_tokens():
  """Ratio 1, A = 1, weights (0.5, 2) → loss = −(0.5 + 2)/2."""
  z = jnp.zeros((1, 2))
  loss, _ = losses.dapo_loss(z, z, jnp.ones(1), jnp.ones((1, 2)),
                             is_weight_BT=jnp.array([[0.5, 2.0]]))
  np.testing.assert_allclose(loss, -1.25, rtol=1e-6)


# ----------------------------------------------------------------------------
# DAPO
# ----------------------------------------------------------------------------

def test_dapo_ratio_one_is_minus_token_mean_advantage():
  """logp = old: loss = −Σ A m / Σ m = −(2·3 − 1·2)/5, ratio exactly 1, nothing clipped."""
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -4.0, -9.0]])
  mask = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  loss, aux = losses.dapo_loss(logp, logp, jnp.array([2.0, -1.0]), mask)
  np.testing.assert_allclose(loss, -0.8, rtol=1e-6)
  assert float(aux["ratio_mean"]) == 1.0 and float(aux["ratio_var"]) == 0.0
  assert float(aux["clip_frac_low"]) == 0.0 and float(aux["clip_frac_high"]) == 0.0
  assert float(aux["sums"]["count"]) == 5.0


# One token per sequence (plus a padding token holding -inf log-probs):
#   r    A    objective −min(rA, clip(r)A)      d loss / d logp (× 5)
#   1.5  +1   −1.28  (upper clip active)        0
#   0.5  −1   +0.8   (lower clip active)        0
#   1.1  +1   −1.1                              −1.1
#   0.5  +1   −0.5   (min picks rA: no clip)    −0.5
#   1.5  −1   +1.5   (min picks rA: no clip)    +1.5
HAND_R = np.array([1.5, 0.5, 1.1, 0.5, 1.5], np.float32)
HAND_A = np.array([1.0, -1.0, 1.0, 1.0, -1.0], np.float32)


def _hand_batch():
  old = jnp.array([[-1.0, 0.0]] * 5)
  logp = old.at[:, 0].add(jnp.log(HAND_R)).at[:, 1].set(-jnp.inf)
  mask = jnp.array([[1.0, 0.0]] * 5)
  return logp, old, mask


def test_dapo_hand_worked_clipping_values_and_gradients():
  logp, old, mask = _hand_batch()
  f = lambda lp: losses.dapo_loss(lp, old, jnp.asarray(HAND_A), mask)
  (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(logp)
  np.testing.assert_allclose(loss, (-1.28 + 0.8 - 1.1 - 0.5 + 1.5) / 5, rtol=1e-5)
  np.testing.assert_allclose(grad[:, 0], np.array([0, 0, -1.1, -0.5, 1.5]) / 5,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grad[:, 1], 0.0)  # padding: finite, zero
  np.testing.assert_allclose(aux["clip_frac_low"], 0.2)
  np.testing.assert_allclose(aux["clip_frac_high"], 0.2)
  np.testing.assert_allclose(aux["ratio_mean"], 5.1 / 5, rtol=1e-6)
  np.testing.assert_allclose(aux["ratio_var"], 6.21 / 5 - 1.02 ** 2, rtol=1e-5)


def test_dapo_clip_range_is_asymmetric():
  """r = 1.25 with A > 0 is inside 1 + 0.28 (not clipped); with symmetric 0.2 it would be."""
  lp = jnp.array([[LN(1.25)]])
  z = jnp.zeros((1, 1))
  loss, aux = losses.dapo_loss(lp, z, jnp.ones(1), jnp.ones((1, 1)))
  np.testing.assert_allclose(loss, -1.25, rtol=1e-6)
  assert float(aux["clip_frac_high"]) == 0.0
  loss, aux = losses.dapo_loss(lp, z, jnp.ones(1), jnp.ones((1, 1)), clip_high=0.2)
  np.testing.assert_allclose(loss, -1.2, rtol=1e-6)
  assert float(aux["clip_frac_high"]) == 1.0


def _tiny_policy(seed=0, b=4, t=5, v=7, d=3):
  """logp_BT = log softmax(x W)[target]: a differentiable toy policy with parameters W."""
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
  x_BTD = jax.random.normal(k1, (b, t, d))
  w_DV = jax.random.normal(k2, (d, v))
  targets_BT = jax.random.randint(k3, (b, t), 0, v)
  old_BT = losses.token_logprobs(jnp.einsum("btd,dv->btv", x_BTD, w_DV), targets_BT)
  w_DV = w_DV + 0.3 * jax.random.normal(k4, (d, v))  # current policy moved away from old
  mask_BT = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]],
                      jnp.float32)
  logp = lambda w, sl: losses.token_logprobs(jnp.einsum("btd,dv->btv", x_BTD[sl], w),
                                             targets_BT[sl])
  return w_DV, old_BT, mask_BT, logp


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
def test_micro_step_losses_and_grads_sum_to_the_full_batch(kind):
  """With the mini-batch denominator, two half-batch losses (and grads, and sums) add up exactly."""
  w, old, mask, logp = _tiny_policy()
  adv = jnp.array([1.0, -0.5, 2.0, -1.5])
  clips = dict(clip_low=0.1, clip_high=0.1)  # make some tokens/sequences clip
  denom = losses.loss_denominator(kind, mask)

  def loss_fn(w, d, lo, hi):
    sl = slice(lo, hi)
    return losses.policy_loss(kind, logp(w, sl), old[sl], adv[sl], mask[sl], denom=d, **clips)

  vg = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), static_argnums=(2, 3))
  (full, aux), g_full = vg(w, None, 0, 4)
  halves = [vg(w, denom, 0, 2), vg(w, denom, 2, 4)]
  np.testing.assert_allclose(halves[0][0][0] + halves[1][0][0], full, rtol=1e-5)
  np.testing.assert_allclose(halves[0][1] + halves[1][1], g_full, rtol=1e-5, atol=1e-7)
  sums = jax.tree.map(jnp.add, halves[0][0][1]["sums"], halves[1][0][1]["sums"])
  for key, val in losses.loss_stats_from_sums(sums).items():
    np.testing.assert_allclose(val, aux[key], rtol=1e-5, atol=1e-7, err_msg=key)
  # the test exercises clipping
  assert float(aux["clip_frac_low"]) + float(aux["clip_frac_high"]) > 0


def test_loss_denominator_counts_tokens_or_sequences():
  mask = jnp.array([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
  assert float(losses.loss_denominator("dapo", mask)) == 3.0
  assert float(losses.loss_denominator("gspo", mask)) == 2.0


def test_gradient_step_moves_logprobs_with_the_advantage_sign():
  """One SGD step on logits raises log π of A > 0 tokens and lowers it for A < 0.

  The gradient by hand, at π = π_old (ratio 1, inside any clip range): DAPO's loss is
  -Σ_t r_t A_b / 6 tokens, dr/dlog π = r = 1; GSPO's is -Σ_b s_b A_b / 2 sequences with
  s_b = exp(mean of 3 log-ratios), ds/dlog π_t = s / 3 = 1/3. Both give dL/dlog π_bt = -A_b / 6,
  and dlog π / dlogits = onehot(target) - softmax(logits), so the numpy oracle is
  g_btv = -A_b / 6 (onehot_btv - p_btv)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  logits = jax.random.normal(k1, (2, 3, 5))
  targets = jax.random.randint(k2, (2, 3), 0, 5)
  old = losses.token_logprobs(logits, targets)
  mask = jnp.ones((2, 3))
  adv = jnp.array([1.0, -1.0])
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  want = -np.array([1.0, -1.0])[:, None, None] / 6 * (np.eye(5)[np.asarray(targets)] - p)
  for kind in losses.POLICY_LOSS_KINDS:
    g = jax.jit(jax.grad(lambda lg: losses.policy_loss(
        kind, losses.token_logprobs(lg, targets), old, adv, mask)[0]))(logits)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7, err_msg=kind)
    delta = losses.token_logprobs(logits - 0.1 * g, targets) - old
    assert np.all(delta[0] > 0) and np.all(delta[1] < 0), kind


# ----------------------------------------------------------------------------
# GSPO
# ----------------------------------------------------------------------------

def _gspo_batch():
  """seq0: token log-ratios (ln 2, 0) → s = √2; seq1: (ln ¼) + padding → s = ¼; seq2 all padding."""
  old = jnp.array([[-1.0, -2.0], [-0.5, -3.0], [-1.0, -1.0]])
  logp = old + jnp.array([[LN(2.0), 0.0], [LN(0.25), 5.0], [7.0, 7.0]])
  mask = jnp.array([[1, 1], [1, 0], [0, 0]], jnp.float32)
  return logp, old, jnp.array([1.0, -1.0, 3.0]), mask


def test_gspo_sequence_ratio_hand_worked():
  """ε = (0.2, 0.5): seq0 unclipped −√2; seq1 −min(−¼, −0.8) = 0.8 (lower clip);
  mean over 2 seqs."""
  logp, old, adv, mask = _gspo_batch()
  f = lambda lp: losses.gspo_loss(lp, old, adv, mask, clip_low=0.2, clip_high=0.5)
  (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(logp)
  np.testing.assert_allclose(loss, (-math.sqrt(2) + 0.8) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux["ratio_mean"], (math.sqrt(2) + 0.25) / 2, rtol=1e-6)
  np.testing.assert_allclose(aux["clip_frac_low"], 0.5)
  assert float(aux["clip_frac_high"]) == 0.0 and float(aux["sums"]["count"]) == 2.0
  # GSPO gradient: d(−s A)/d logp_t = −s A / |y| per token, / 2 sequences; clipped seq1 gets 0.
  np.testing.assert_allclose(grad, [[-math.sqrt(2) / 4] * 2, [0, 0], [0, 0]], rtol=1e-6, atol=1e-7)


def test_gspo_default_clip_is_tight():
  """With ε = 3e-4/4e-4, s = √2 with A > 0 clips at 1.0004 and gets no gradient."""
  logp, old, adv, mask = _gspo_batch()
  (loss, aux), grad = jax.value_and_grad(
      lambda lp: losses.gspo_loss(lp, old, adv, mask), has_aux=True)(logp)
  np.testing.assert_allclose(loss, (-1.0004 + 0.9997) / 2, atol=1e-7)  # float32 cancellation
  np.testing.assert_array_equal(grad, 0.0)
  np.testing.assert_allclose([aux["clip_frac_low"], aux["clip_frac_high"]], [0.5, 0.5])


def test_gspo_ratio_one_is_minus_mean_sequence_advantage():
  """Same log-probs: s = 1 for every sequence, loss = −mean A over non-empty sequences."""
  logp, _, adv, mask = _gspo_batch()
  loss, aux = losses.gspo_loss(logp, logp, adv, mask)
  np.testing.assert_allclose(loss, -(1.0 - 1.0) / 2, atol=1e-7)
  loss, aux = losses.gspo_loss(logp, logp, jnp.array([2.0, 1.0, 9.0]), mask)
  np.testing.assert_allclose(loss, -1.5, rtol=1e-6)
  assert float(aux["ratio_var"]) == 0.0 and float(aux["clip_frac_high"]) == 0.0


# ----------------------------------------------------------------------------
# Dispatch, log-probs, entropy
# ----------------------------------------------------------------------------

def test_policy_loss_dispatches_and_rejects_unknown_kinds():
  logp, old, mask = _hand_batch()
  a = losses.policy_loss("dapo", logp, old, jnp.asarray(HAND_A), mask)[0]
  b = losses.dapo_loss(logp, old, jnp.asarray(HAND_A), mask)[0]
  assert float(a) == float(b)
  logp, old, adv, mask = _gspo_batch()
  a = losses.policy_loss("gspo", logp, old, adv, mask, clip_low=0.2, clip_high=0.5, denom=4.0)[0]
  np.testing.assert_allclose(a, (-math.sqrt(2) + 0.8) / 4, rtol=1e-6)
  with pytest.raises(ValueError, match="allowed: dapo, gspo"):
    losses.policy_loss("ppo", logp, old, adv, mask)


def test_losses_jit():
  logp, old, mask = _hand_batch()
  loss, aux = jax.jit(losses.dapo_loss)(logp, old, jnp.asarray(HAND_A), mask)
  np.testing.assert_allclose(loss, -0.116, rtol=1e-5)
  loss, _ = jax.jit(losses.policy_loss, static_argnums=0)("gspo", *_gspo_batch())
  # Default clip (3e-4, 4e-4), as in test_gspo_default_clip_is_tight: seq0 s = √2, A = 1 ->
  # -min(√2, 1.0004) = -1.0004; seq1 s = ¼, A = -1 -> -min(-¼, -0.9997) = 0.9997; seq2 is all
  # padding. Mean over the 2 non-empty sequences: (-1.0004 + 0.9997) / 2 = -0.00035.
  np.testing.assert_allclose(loss, -0.00035, atol=1e-7)  # float32 cancellation, as there


def test_token_logprobs_by_hand_in_float32():
  probs = np.array([0.1, 0.2, 0.7], np.float32)
  logits = jnp.asarray(np.log(probs) + 3.0, jnp.bfloat16)[None, None].repeat(2, axis=1)
  out = losses.token_logprobs(logits, jnp.array([[2, 0]]))
  assert out.dtype == jnp.float32 and out.shape == (1, 2)
  np.testing.assert_allclose(out, [[LN(0.7), LN(0.1)]], atol=2e-2)  # bf16 logits
  out = losses.token_logprobs(jnp.log(jnp.asarray(probs))[None, None], jnp.array([[1]]))
  np.testing.assert_allclose(out, [[LN(0.2)]], rtol=1e-6)


def test_token_entropy_by_hand_with_mask_and_minus_inf_logits():
  """Uniform over 4 → ln 4; two live entries (rest −inf) → ln 2; the masked token is ignored."""
  ninf = -jnp.inf
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, ninf, ninf], [5.0, 0.0, 0.0, 0.0]]])
  mask = jnp.array([[1, 1, 0]])
  np.testing.assert_allclose(losses.token_entropy(logits, mask), (LN(4) + LN(2)) / 2, rtol=1e-6)
  np.testing.assert_allclose(losses.token_entropy(logits, mask, denom=4.0), (LN(4) + LN(2)) / 4,
                             rtol=1e-6)
  g = jax.grad(lambda lg: losses.token_entropy(lg, mask))(logits)
  assert np.all(np.isfinite(g))


# ----------------------------------------------------------------------------
# Bad input: exact shapes (no silent broadcasting), dtypes, and concrete values
# ----------------------------------------------------------------------------

def test_gspo_per_token_advantage_with_b_equal_t_is_rejected_not_misaligned():
  """B == T: an [B, T] advantage would broadcast against s_B along the wrong axis."""
  z, mask = jnp.zeros((3, 3)), jnp.ones((3, 3))
  adv_BT = jnp.arange(9.0).reshape(3, 3)
  with pytest.raises(ValueError, match=r"adv_B has shape \(3, 3\), expected \[B\] = \(3,\): GSPO"):
    losses.policy_loss("gspo", z, z, adv_BT, mask)
  with pytest.raises(ValueError, match=r"is_weight_B has shape \(3, 3\), expected \[B\] = \(3,\)"):
    losses.policy_loss("gspo", z, z, jnp.ones(3), mask, is_weight=jnp.ones((3, 3)))


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
@pytest.mark.parametrize("arg, bad, message", [
    ("adv", jnp.ones(1), r"adv_B has shape \(1,\), expected \[B\] = \(4,\)"),
    ("mask", jnp.ones((4, 1)),
     r"mask_BT has shape \(4, 1\), expected \[B, T\] of logp_BT = \(4, 6\)"),
    ("old", jnp.zeros((6,)), r"old_logp_BT has shape \(6,\), expected \[B, T\] of logp_BT"),
    ("logp", jnp.zeros((4, 6, 1)), r"logp_BT has shape \(4, 6, 1\), expected rank 2 \[B, T\]"),
    ("denom", 0.0, r"=0.0 must be a finite count > 0"),
    ("denom", float("nan"), r"=nan must be a finite count > 0"),
    ("denom", jnp.ones(2), r"has shape \(2,\), expected a scalar count"),
])
def test_policy_losses_reject_misshaped_inputs(kind, arg, bad, message):
  args = {"logp": jnp.zeros((4, 6)), "old": jnp.zeros((4, 6)), "adv": jnp.ones(4),
          "mask": jnp.ones((4, 6)), "denom": None, arg: bad}
  with pytest.raises(ValueError, match=message):
    losses.policy_loss(kind, args["logp"], args["old"], args["adv"], args["mask"],
                       denom=args["denom"])


def test_dapo_shape_checks_keep_valid_per_token_advantages_and_weights():
  """[B, T] advantages stay valid for DAPO; a [B] TIS weight (would misalign) is rejected."""
  z, mask = jnp.zeros((2, 2)), jnp.ones((2, 2))
  loss, _ = losses.dapo_loss(z, z, jnp.array([[1.0, 2.0], [3.0, 6.0]]), mask)
  np.testing.assert_allclose(loss, -3.0, rtol=1e-6)  # ratio 1: −mean of the token advantages
  with pytest.raises(ValueError,
                     match=r"is_weight_BT has shape \(2,\), expected \[B, T\] = \(2, 2\)"):
    losses.dapo_loss(z, z, jnp.ones(2), mask, is_weight_BT=jnp.ones(2))


def test_denominator_is_checked_only_when_concrete():
  """A traced denom (inside jit) is not read on the host; the loss is still right."""
  logp, old, mask = _hand_batch()
  f = jax.jit(lambda d: losses.dapo_loss(logp, old, jnp.asarray(HAND_A), mask, denom=d)[0])
  np.testing.assert_allclose(f(jnp.float32(10.0)), -0.116 / 2, rtol=1e-5)


@pytest.mark.parametrize("targets, message", [
    (jnp.array([[0, -1]]), r"targets_BT\[0, 1\] = -1 is outside \[0, V=3\)"),
    (jnp.array([[3, 0]]), r"targets_BT\[0, 0\] = 3 is outside"),
    (jnp.array([[0.0, 1.0]]), r"targets_BT has dtype float32, expected an integer dtype"),
    (jnp.array([[True, False]]), r"targets_BT has dtype bool, expected an integer dtype"),
    (jnp.array([0, 1]), r"targets_BT has shape \(2,\), expected \[B, T\] of logits_BTV = \(1, 2\)"),
])
def test_token_logprobs_rejects_bad_targets(targets, message):
  with pytest.raises(ValueError, match=message):
    losses.token_logprobs(jnp.zeros((1, 2, 3)), targets)


def test_token_logprobs_rejects_float_targets_under_jit_and_bad_logits_rank():
  with pytest.raises(ValueError, match=r"targets_BT has dtype float32"):
    jax.jit(losses.token_logprobs)(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)))
  with pytest.raises(ValueError, match=r"logits_BTV has shape \(2, 3\), expected rank 3"):
    losses.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2,), jnp.int32))


def test_entropy_and_denominator_reject_misshaped_inputs():
  with pytest.raises(ValueError, match=r"mask_BT has shape \(1, 1\), expected \[B, T\] of logits"):
    losses.token_entropy(jnp.zeros((1, 2, 3)), jnp.ones((1, 1)))
  with pytest.raises(ValueError, match=r"denom=0.0 must be a finite count > 0"):
    losses.token_entropy(jnp.zeros((1, 2, 3)), jnp.ones((1, 2)), denom=0.0)
  with pytest.raises(ValueError, match=r"mask_BT has shape \(3,\), expected rank 2"):
    losses.loss_denominator("dapo", jnp.ones(3))


def test_tis_weights_at_padding_with_inf_logprobs_do_not_make_the_loss_nan():
  """Padding may hold -inf log-probs on both sides: its TIS weight is exp(-inf + inf) = NaN,
  and NaN * mask 0 is still NaN. The loss masks the weight first: the value is the one
  without the padding position, by hand -A·w·r averaged over the two real tokens."""
  logp = jnp.asarray([[-1.0, -2.0, -jnp.inf]])
  old = jnp.asarray([[-1.0, -2.0, -jnp.inf]])
  behaviour = jnp.asarray([[-0.9, -2.2, -jnp.inf]])
  mask = jnp.asarray([[1.0, 1.0, 0.0]])
  w = advantages.tis_weights(old, behaviour, cap=2.0)
  assert np.isnan(w[0, 2])  # documented; the losses take care of it
  loss, _ = losses.dapo_loss(logp, old, jnp.asarray([1.5]), mask, is_weight_BT=w)
  expected = -1.5 * (math.exp(-0.1) + math.exp(0.2)) / 2  # ratio 1, w = exp(old - µ)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: losses.dapo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                              clip_low=1.2), r"clip_low=1.2 must be in \[0, 1\]"),
    (lambda: losses.gspo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                              clip_high=-0.1), r"clip_high=-0.1 must be in \[0, inf\]"),
    (lambda: losses.dapo_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.ones(1), jnp.ones((1, 2)),
                              clip_low=jnp.float32(1.5)), r"clip_low=1.5 must be in \[0, 1\]"),
    (lambda: advantages.tis_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), cap=jnp.float32(0)),
     r"cap=0.0 must be > 0"),
])
def test_bad_loss_hyper_parameters_are_refused(call, match):
  """clip_low > 1 made the lower ratio bound negative, silently."""
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
@pytest.mark.parametrize("bad, shown", [(-1.0, "-1.0"), (float("nan"), "nan"),
                                        (float("inf"), "inf")])
def test_policy_losses_reject_negative_or_non_finite_masks(kind, bad, shown):
  """A -1 mask flipped the token's gradient and took it out of the count (DAPO's loss went from
  0.18 to 0.94), a NaN one made the loss NaN: concrete masks are checked, naming the entry."""
  z, mask = jnp.zeros((2, 3)), jnp.ones((2, 3)).at[1, 2].set(bad)
  match = rf"mask_BT\[1, 2\] = {shown} is not a finite number >= 0 \(a token weight"
  with pytest.raises(ValueError, match=match):
    losses.policy_loss(kind, z, z, jnp.ones(2), mask)
  with pytest.raises(ValueError, match=match):
    losses.loss_denominator(kind, mask)
  with pytest.raises(ValueError, match=match):
    losses.token_entropy(jnp.zeros((2, 3, 4)), mask)


def test_mask_values_are_read_only_when_concrete():
  """Inside jit the mask is a tracer: no host sync, no check. Bool, int and weight masks pass:
  ratio 1, A = 1, weights (2, 1) on row 0 → −(2 + 1)/3 = −1 (the count is Σ mask)."""
  z = jnp.zeros((1, 2))
  f = jax.jit(lambda m: losses.dapo_loss(z, z, jnp.ones(1), m)[0])
  np.testing.assert_allclose(f(jnp.array([[2.0, 1.0]])), -1.0, rtol=1e-6)
  f(jnp.array([[-1.0, 1.0]]))  # unchecked by design: jitted callers build their own masks
  for mask in (jnp.array([[True, True]]), jnp.array([[1, 1]], jnp.int32)):
    np.testing.assert_allclose(losses.dapo_loss(z, z, jnp.ones(1), mask)[0], -1.0, rtol=1e-6)


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
@pytest.mark.parametrize("arg", ["logp_BT", "old_logp_BT", "adv_B"])
def test_policy_losses_refuse_complex_inputs_eagerly_and_under_jit(kind, arg):
  """A complex log-prob was cast to float with only numpy's ComplexWarning (the imaginary part
  dropped): the dtype is static, so the error also comes under jit."""
  args = {"logp_BT": jnp.zeros((2, 3)), "old_logp_BT": jnp.zeros((2, 3)), "adv_B": jnp.ones(2)}
  args[arg] = args[arg] + 1j
  call = lambda a: losses.policy_loss(kind, a["logp_BT"], a["old_logp_BT"], a["adv_B"],
                                      jnp.ones((2, 3)))[0]
  match = rf"{arg} has dtype complex64, expected real numbers"
  with pytest.raises(TypeError, match=match):
    call(args)
  with pytest.raises(TypeError, match=match):
    jax.jit(call)(args)


def test_a_kind_without_a_branch_raises_instead_of_running_as_gspo(monkeypatch):
  """policy_loss and loss_denominator read 'dapo, else GSPO': a kind added to the list but not
  to a branch ran with GSPO's denominator and weights, silently."""
  monkeypatch.setattr(losses, "LOSS_LEVELS", {**losses.LOSS_LEVELS, "new": "token"})
  monkeypatch.setattr(losses, "POLICY_LOSS_KINDS", (*losses.POLICY_LOSS_KINDS, "new"))
  mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  assert float(losses.loss_denominator("new", mask)) == 2.0  # tokens, by its level
  assert float(losses.loss_denominator("gspo", mask)) == 1.0  # sequences with a response
  z = jnp.zeros((2, 3))
  with pytest.raises(NotImplementedError, match="policy_loss has no branch for 'new'"):
    losses.policy_loss("new", z, z, jnp.zeros(2), mask)


@pytest.mark.parametrize("kind, shape, at", [("dapo", (2, 3), "1, 2"), ("gspo", (2,), "1")])
@pytest.mark.parametrize("bad, shown", [(-1.0, "-1.0"), (float("nan"), "nan"),
                                        (float("inf"), "inf")])
def test_policy_losses_refuse_negative_or_non_finite_tis_weights(kind, shape, at, bad, shown):
  """A -1 TIS weight flipped the sign of its token's (sequence's) loss, a NaN one made the loss
  NaN, with no error. Weights the mask does not count may be anything (NaN at padding); the
  loss is unchanged, and under jit the values are not read."""
  z, adv, mask = jnp.zeros((2, 3)), jnp.array([1.0, 2.0]), jnp.ones((2, 3))
  w = jnp.ones(shape).at[(1, 2)[:len(shape)]].set(bad)
  with pytest.raises(ValueError, match=rf"is_weight_B\w*\[{at}\] = {shown} is not a finite "
                                       r"number >= 0 \(a TIS weight"):
    losses.policy_loss(kind, z, z, adv, mask, is_weight=w)
  good, _ = losses.policy_loss(kind, z, z, adv, mask, is_weight=jnp.ones(shape))
  np.testing.assert_allclose(good, -1.5, rtol=1e-6)  # ratio 1: −mean advantage
  masked = mask.at[1].set(0.0)  # row 1 not counted: its weight is masked out
  ref, _ = losses.policy_loss(kind, z, z, adv, masked, is_weight=jnp.ones(shape))
  loss, _ = losses.policy_loss(kind, z, z, adv, masked, is_weight=w)
  np.testing.assert_array_equal(loss, ref)
  f = jax.jit(lambda w: losses.policy_loss(kind, z, z, adv, mask, is_weight=w)[0])
  np.testing.assert_allclose(f(jnp.ones(shape)), good, rtol=1e-6)
  f(w)  # unchecked by design, as masks are


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
@pytest.mark.parametrize("bad, shown", [(float("nan"), "nan"), (-float("inf"), "-inf")])
def test_policy_losses_refuse_non_finite_advantages(kind, bad, shown):
  """A NaN advantage made the loss NaN with no error; a finite one still gives −mean A."""
  z, mask = jnp.zeros((2, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match=rf"adv_B\[1\] = {shown} is not finite \(a NaN or inf"):
    losses.policy_loss(kind, z, z, jnp.array([1.0, bad]), mask)
  loss, _ = losses.policy_loss(kind, z, z, jnp.array([1.0, -2.0]), mask)
  np.testing.assert_allclose(loss, 0.5, rtol=1e-6)
  f = jax.jit(lambda a: losses.policy_loss(kind, z, z, a, mask)[0])
  np.testing.assert_allclose(f(jnp.array([1.0, -2.0])), 0.5, rtol=1e-6)


# ----------------------------------------------------------------------------
# Clip statistics, stop-gradient, the log-ratio clamp, empty calls, float masks
# ----------------------------------------------------------------------------

def test_dapo_lower_clip_fraction_reads_eps_low_not_eps_high():
  """r = 0.75 with A < 0 is below 1 − ε_low = 0.8 (clipped: loss 0.8, no gradient) but above
  1 − ε_high = 0.72: clip_frac_low must count it, as the loss clipped it."""
  lp, z = jnp.array([[LN(0.75)]]), jnp.zeros((1, 1))
  f = lambda x: losses.dapo_loss(x, z, -jnp.ones(1), jnp.ones((1, 1)))
  (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(lp)
  np.testing.assert_allclose(loss, 0.8, rtol=1e-6)
  np.testing.assert_array_equal(grad, 0.0)
  assert float(aux["clip_frac_low"]) == 1.0 and float(aux["clip_frac_high"]) == 0.0


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
def test_no_gradient_reaches_the_old_logprobs(kind):
  """old_logp is the ratio's constant denominator (stop-gradient): d loss / d old is 0 where
  d loss / d logp is not. At r = 1 with A = (1, −2) over 2 × 3 tokens, d loss / d logp is
  −A / 6 per token for both losses (DAPO: −A m / Σm; GSPO: −A s / |y| / 2 sequences)."""
  old = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -1.5, -2.5]])
  f = lambda lp, o: losses.policy_loss(kind, lp, o, jnp.array([1.0, -2.0]), jnp.ones((2, 3)),
                                       clip_low=0.2, clip_high=0.2)[0]
  g_new, g_old = jax.grad(f, argnums=(0, 1))(old, old)
  np.testing.assert_allclose(g_new, [[-1 / 6] * 3, [1 / 3] * 3], rtol=1e-6)
  np.testing.assert_array_equal(g_old, 0.0)


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
def test_an_extreme_log_ratio_is_clamped_at_max_log_ratio(kind):
  """Δ = 100 overflows float32's exp to inf. Clamped at MAX_LOG_RATIO = 20, a negative-advantage
  token (its unclipped branch rA) gives loss and ratio_mean e^20 and a finite gradient."""
  old, lp = jnp.zeros((1, 1)), jnp.full((1, 1), 100.0)
  f = lambda x: losses.policy_loss(kind, x, old, -jnp.ones(1), jnp.ones((1, 1)))
  (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(lp)
  assert losses.MAX_LOG_RATIO == 20.0
  np.testing.assert_allclose(loss, math.exp(20.0), rtol=1e-5)
  np.testing.assert_allclose(aux["ratio_mean"], math.exp(20.0), rtol=1e-5)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kind", losses.POLICY_LOSS_KINDS)
def test_an_all_masked_call_reports_zero_loss_and_zero_statistics(kind):
  """No token counted (a micro-step of padding): the loss and every ratio statistic are 0, as
  loss_stats_from_sums promises, not a ratio_mean of 1 from the empty 1 + 0/1."""
  lp, z = jnp.array([[0.3, -0.2]]), jnp.zeros((1, 2))
  loss, aux = losses.policy_loss(kind, lp, z, jnp.ones(1), jnp.zeros((1, 2)))
  assert float(loss) == 0.0
  for key in ("ratio_mean", "ratio_var", "clip_frac_low", "clip_frac_high"):
    assert float(aux[key]) == 0.0, key
  assert float(aux["sums"]["count"]) == 0.0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_gspo_float_mask_weights_the_sequence_log_ratio(scale):
  """A float mask weights the tokens of s = exp(Σ m Δ / Σ m): Δ = (ln 2, ln 8) with weights
  (3, 1) gives ln s = 6 ln 2 / 4, s = 2^1.5 (unweighted Δs over Σ m gave s = 2); scaling the
  weights leaves s unchanged while a sequence's weights sum to >= 1 (the length is floored at
  1). Wide clip: loss = −s A with A = 1."""
  old = jnp.zeros((1, 2))
  lp = jnp.array([[LN(2.0), LN(8.0)]])
  mask = scale * jnp.array([[3.0, 1.0]])
  loss, aux = losses.gspo_loss(lp, old, jnp.ones(1), mask, clip_low=0.5, clip_high=5.0)
  np.testing.assert_allclose(aux["ratio_mean"], 2 ** 1.5, rtol=1e-5)
  np.testing.assert_allclose(loss, -(2 ** 1.5), rtol=1e-5)


def test_gspo_checks_the_tis_weight_of_a_partly_masked_sequence():
  """A sequence counts when any of its tokens does: its NaN weight is refused even when its mask
  ends in padding (a check of fully-masked rows only let it through to a NaN loss)."""
  z, mask = jnp.zeros((2, 3)), jnp.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
  with pytest.raises(ValueError, match=r"is_weight_B\[0\] = nan is not a finite number >= 0"):
    losses.gspo_loss(z, z, jnp.ones(2), mask, is_weight_B=jnp.array([float("nan"), 1.0]))


@pytest.mark.parametrize("loss", ["dapo", "gspo"])
def test_fractional_masks_summing_below_one_give_true_weighted_means(loss):
  """Both tokens have log-ratio ln 2, so every mean of the ratio is 2 whatever the weights.
  Dividing by max(Σ mask, 1) pulled it towards 1 when the weights sum below 1: GSPO's sequence
  ratio was 2^0.5 (and so its loss), the ratio statistics 1.5 (DAPO) and 1.41 (GSPO)."""
  logp, old = jnp.full((1, 2), math.log(2.0)), jnp.zeros((1, 2))
  fn = losses.dapo_loss if loss == "dapo" else losses.gspo_loss
  for w in (0.25, 1.0):
    value, aux = fn(logp, old, jnp.ones(1), jnp.full((1, 2), w), clip_low=0.5, clip_high=5.0)
    assert float(aux["ratio_mean"]) == pytest.approx(2.0, rel=1e-6), w
    assert float(aux["ratio_var"]) == pytest.approx(0.0, abs=1e-6)
    if loss == "gspo":  # -A·s over one sequence: the sequence ratio itself
      assert float(value) == pytest.approx(-2.0, rel=1e-6), w
