"""GRPO advantages and TIS weights against hand-worked values, and their input checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.rl import advantages

LN = math.log

# ----------------------------------------------------------------------------
# GRPO advantages
# ----------------------------------------------------------------------------

def test_grpo_advantages_two_groups_by_hand():
  """Group [3,1,2,2]: mean 2, population std √0.5 → A = ±√2, 0, 0; a flat group gives exactly 0."""
  rewards = jnp.array([3.0, 1.0, 2.0, 2.0, 0.1, 0.1, 0.1, 0.1])
  adv = advantages.grpo_advantages(rewards, group_size=4)
  assert adv.dtype == jnp.float32
  s = math.sqrt(0.5)
  np.testing.assert_allclose(adv[:4], [1 / (s + 1e-6), -1 / (s + 1e-6), 0, 0], rtol=1e-6)
  # Population std (ddof=0): the sample std would give 1/√(2/3) ≈ 1.2247 instead of √2.
  assert abs(float(adv[0]) - math.sqrt(2)) < 1e-5
  np.testing.assert_array_equal(adv[4:], 0.0)  # exactly zero, not rounding/eps noise
  assert np.all(np.isfinite(adv))


def test_grpo_flat_groups_of_three_are_exactly_zero():
  """mean(0.1, 0.1, 0.1) is not exactly 0.1 in float32; the advantage still is exactly 0."""
  adv = advantages.grpo_advantages(jnp.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7]), group_size=3)
  np.testing.assert_array_equal(adv, 0.0)


def test_grpo_without_std_scaling_only_centres():
  """Dr.GRPO: A = r − mean_g."""
  adv = advantages.grpo_advantages(jnp.array([3.0, 1.0, 2.0, 2.0, 1.0, 0.0]), group_size=2,
                                   scale_by_std=False)
  np.testing.assert_allclose(adv, [1, -1, 0, 0, 0.5, -0.5], atol=1e-7)


def test_grpo_rejects_ragged_groups():
  with pytest.raises(ValueError, match="multiple of group_size=4"):
    advantages.grpo_advantages(jnp.zeros(7), group_size=4)


def test_grpo_jits():
  f = jax.jit(advantages.grpo_advantages, static_argnums=1)
  np.testing.assert_allclose(f(jnp.array([1.0, 0.0]), 2), [1 / 1.000002, -1 / 1.000002], rtol=1e-6)


# ----------------------------------------------------------------------------
# TIS
# ----------------------------------------------------------------------------

def test_tis_weights_are_capped_and_stop_gradient():
  """exp(old − µ) = 0.5, 3, 1 with cap 2 → 0.5, 2, 1; no gradient to either argument."""
  old = jnp.array([[LN(0.5), LN(3.0), 0.0]])
  mu = jnp.zeros((1, 3))
  np.testing.assert_allclose(advantages.tis_weights(old, mu, cap=2.0), [[0.5, 2.0, 1.0]],
                             rtol=1e-6)
  g_old, g_mu = jax.grad(lambda o, m: jnp.sum(advantages.tis_weights(o, m, 2.0)),
                         argnums=(0, 1))(old, mu)
  np.testing.assert_array_equal(g_old, 0.0)
  np.testing.assert_array_equal(g_mu, 0.0)


def test_sequence_tis_weight_is_capped_geometric_mean():
  """Token log-ratios (ln 4, 0) → (4·1)^{1/2} = 2; (ln 16) → 16 capped at 3; empty mask → 1."""
  old = jnp.array([[LN(4.0), 0.0], [LN(16.0), 9.0], [5.0, 5.0]])
  mask = jnp.array([[1, 1], [1, 0], [0, 0]])
  w = advantages.sequence_tis_weights(old, jnp.zeros_like(old), mask, cap=3.0)
  np.testing.assert_allclose(w, [2.0, 3.0, 1.0], rtol=1e-6)


def test_sequence_tis_weight_averages_over_its_own_length_not_t():
  """|y| is the sequence's masked length: log-ratios (ln 4, ln 4 | padding) give 4, not
  4^{2/3} as a mean over T = 3 would; (ln 9 | padding, padding) gives 9 capped at 5."""
  old = jnp.array([[LN(4.0), LN(4.0), 7.0], [LN(9.0), -3.0, 2.0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  w = advantages.sequence_tis_weights(old, jnp.zeros_like(old), mask, cap=5.0)
  np.testing.assert_allclose(w, [4.0, 5.0], rtol=1e-6)


def test_sequence_tis_weight_ignores_minus_inf_padding():
  """Padding may hold -inf in both engines' log-probs (-inf − -inf = NaN): it is left out, so
  the weight is the geometric mean over the real tokens, (2 · 8)^{1/2} = 4, finite, jitted too."""
  old = jnp.array([[LN(2.0), LN(8.0), -jnp.inf]])
  mu = jnp.array([[0.0, 0.0, -jnp.inf]])
  mask = jnp.array([[1.0, 1.0, 0.0]])
  for f in (advantages.sequence_tis_weights, jax.jit(advantages.sequence_tis_weights)):
    np.testing.assert_allclose(f(old, mu, mask, 10.0), [4.0], rtol=1e-6)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("rewards, group_size, eps, message", [
    (jnp.ones((2, 2)), 2, 1e-6, r"rewards_B has shape \(2, 2\), expected rank 1 \[B\]"),
    (jnp.ones(4), 2.0, 1e-6, r"group_size must be a positive int, got 2.0"),
    (jnp.ones(4), True, 1e-6, r"group_size must be a positive int, got True"),
    (jnp.ones(4), 0, 1e-6, r"group_size must be a positive int, got 0"),
    (jnp.array([1.0, 0.0, jnp.nan, 1.0]), 2, 1e-6,
     r"rewards_B\[2\] = nan is not finite \(a NaN/inf reward"),
    (np.array([1.0, -np.inf]), 2, 1e-6, r"rewards_B\[1\] = -inf is not finite"),
    (jnp.array([1.0, 0.0]), 2, -0.5, r"eps must be a finite number >= 0, got -0.5"),
    (jnp.array([1.0, 0.0]), 2, float("nan"), r"eps must be a finite number >= 0, got nan"),
])
def test_grpo_rejects_bad_inputs(rewards, group_size, eps, message):
  with pytest.raises(ValueError, match=message):
    advantages.grpo_advantages(rewards, group_size, eps=eps)


def test_grpo_eps_zero_is_valid():
  np.testing.assert_allclose(advantages.grpo_advantages(jnp.array([1.0, 0.0]), 2, eps=0.0),
                             [1.0, -1.0], rtol=1e-6)


def test_grpo_flat_group_is_exactly_zero_with_eps_zero():
  """eps = 0 is allowed, and a flat group's std is then 0: the formula alone gives 0/0 = NaN,
  which must not reach the loss. The flat group gets exactly 0, eagerly and under jit, while the
  other group keeps (r − mean) / std = ±1."""
  rewards = jnp.array([2.5, 2.5, 1.0, 0.0])
  for f in (advantages.grpo_advantages, jax.jit(advantages.grpo_advantages, static_argnums=1)):
    adv = f(rewards, 2, 0.0)
    np.testing.assert_array_equal(adv[:2], 0.0)
    np.testing.assert_allclose(adv[2:], [1.0, -1.0], rtol=1e-6)


def test_tis_rejects_misshaped_inputs():
  with pytest.raises(ValueError, match=r"behaviour_logp_BT has shape \(2,\), expected"):
    advantages.tis_weights(jnp.zeros((2, 2)), jnp.zeros(2), cap=2.0)
  with pytest.raises(ValueError, match=r"mask_BT has shape \(2, 1\), expected \[B, T\]"):
    advantages.sequence_tis_weights(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.ones((2, 1)),
                                    cap=2.0)


@pytest.mark.parametrize("call, match", [
    (lambda: advantages.tis_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)), cap=0.0),
     r"cap=0.0 must be > 0 \(no TIS: pass no weights\)"),
    (lambda: advantages.sequence_tis_weights(jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                                             jnp.ones((1, 2)), cap=-1), r"cap=-1 must be"),
])
def test_bad_tis_caps_are_refused(call, match):
  """cap 0 zeroed every gradient, cap -1 flipped the loss's sign: both silently."""
  with pytest.raises(ValueError, match=match):
    call()


def test_sequence_tis_weights_reject_negative_masks_and_complex_logprobs():
  """check_BT_inputs, shared with the losses: concrete masks finite and >= 0; real log-probs."""
  z = jnp.zeros((1, 2))
  with pytest.raises(ValueError, match=r"mask_BT\[0, 0\] = -1.0 is not a finite number >= 0"):
    advantages.sequence_tis_weights(z, z, jnp.array([[-1.0, 1.0]]), cap=2.0)
  with pytest.raises(TypeError, match=r"behaviour_logp_BT has dtype complex64, expected real"):
    jax.jit(lambda b: advantages.sequence_tis_weights(z, b, jnp.ones((1, 2)), cap=2.0))(z + 1j)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_near_equal_rewards_are_centred_exactly(scale_by_std):
  """Rewards 1 and 1 + 1 ulp (2^-23): the float32 group mean rounded to one of them, giving
  [0, 0.11]. Centred on the group's min first, the differences are exact: A = ∓2^-24 / (2^-24
  + eps) = ∓0.0562518 (float64 formula), and ∓2^-24 without the std; each group sums to 0."""
  ulp = 2.0 ** -23
  rewards = jnp.array([1.0, 1.0 + ulp, 1e8, 1e8 + 8.0], jnp.float32)
  adv = np.asarray(advantages.grpo_advantages(rewards, 2, scale_by_std=scale_by_std))
  half = ulp / 2
  # [1e8, 1e8 + 8]: mean 1e8 + 4 is not a float32 (spacing 8 there), the shifted one is.
  expected = ([-half / (half + 1e-6), half / (half + 1e-6), -4 / (4 + 1e-6), 4 / (4 + 1e-6)]
              if scale_by_std else [-half, half, -4.0, 4.0])
  np.testing.assert_allclose(adv, expected, rtol=1e-6)
  np.testing.assert_array_equal(adv.reshape(2, 2).sum(1), [0.0, 0.0])


def test_tis_weights_checks_rank_and_real_dtype():
  logp = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"old_logp_BT has shape \(2, 3, 1\), expected rank 2"):
    advantages.tis_weights(logp[..., None], logp[..., None], 2.0)
  with pytest.raises(TypeError, match="old_logp_BT has dtype complex64, expected real numbers"):
    advantages.tis_weights(logp.astype(jnp.complex64), logp, 2.0)


def test_sequence_tis_weight_is_a_true_weighted_mean_for_small_fractional_masks():
  """log π_old - log µ = ln 2 on both tokens: the weight is 2 at any mask weights. Dividing by
  max(Σ mask, 1) gave 2^0.5 for weights 0.25."""
  old, mu = jnp.full((2, 2), math.log(2.0)), jnp.zeros((2, 2))
  mask = jnp.array([[0.25, 0.25], [1.0, 0.0]])
  np.testing.assert_allclose(advantages.sequence_tis_weights(old, mu, mask, cap=10.0),
                             [2.0, 2.0], rtol=1e-6)
