"""GRPO group advantages and TIS importance weights: the per-sample factors of the RL losses.

The policy losses in `losses.py` take these as inputs (`adv_B`, `is_weight_BT` / `is_weight_B`);
they are computed here, apart from the losses, so that each module stays well under 400 lines.
This is the lower module of the two: it also defines what both use, the [B, T] input check
`check_BT_inputs` and the log-ratio clamp `MAX_LOG_RATIO`, so nothing here imports `losses`.

Everything is jit-compatible with static shapes: ragged responses are
padded and described by a mask, never sliced.

Dimension legend:
  B sequences, T response positions, P prompts (B = P·G), G samples per prompt.

Conventions:
  * `mask_BT` (bool or float) is 1 on response tokens that count in the loss.
  * `old_logp_BT` is the π_old log-prob (training engine, float32 output) of the sampled tokens and
    `behaviour_logp_BT` the behaviour policy µ's (the inference engine's).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from pr2_jax import checks
from pr2_jax.checks import (check_bound, check_finite, check_rank, check_real_dtype, check_shape,
                            is_concrete)

# Log-ratios are clamped before exp so a wild token cannot overflow to inf/NaN
# (verl does the same); |Δ| = 20 is a ratio of 5e8, far beyond any clip range.
MAX_LOG_RATIO = 20.0


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


# -- Input checks: shapes and dtypes are static (free under jit); values only when concrete --------

# Why a mask value must be finite and >= 0: it multiplies each token's loss and counts it.
MASK_WHY = checks.MASK_WHY + "; a negative one flips the token's gradient"


def check_BT_inputs(logp_BT, old_logp_BT, mask_BT,
                    names: tuple[str, str] = ("logp_BT", "old_logp_BT")) -> tuple[int, int]:
  """Checks the [B, T] inputs of a policy loss against `logp_BT`; returns (B, T). `names` are
  the two log-prob arguments' names in the caller, for the messages.

  Static: the shapes, and real dtypes (a complex log-prob was cast with only numpy's
  ComplexWarning). Concrete masks: finite and >= 0 (a NaN made the loss NaN, a -1 flipped
  that token's gradient and took it out of the count)."""
  first, second = names
  check_rank(first, logp_BT, 2, "[B, T]")
  b, t = jnp.shape(logp_BT)
  check_shape(second, old_logp_BT, (b, t), f"[B, T] of {first}")
  check_shape("mask_BT", mask_BT, (b, t), f"[B, T] of {first}")
  check_real_dtype(first, logp_BT)
  check_real_dtype(second, old_logp_BT)
  check_finite("mask_BT", mask_BT, MASK_WHY, low=0)
  return b, t


# -- Advantages and importance weights -------------------------------------------------------------

def grpo_advantages(rewards_B: jax.Array, group_size: int, eps: float = 1e-6,
                    scale_by_std: bool = True) -> jax.Array:
  """GRPO group-relative advantages, float32 [B].

  Groups are consecutive blocks of `group_size` samples of the same prompt
  (rows `[g*G, (g+1)*G)`). Each reward is centred on its group mean and, when
  `scale_by_std`, divided by the group's *population* standard deviation
  (ddof=0) plus `eps`: `A = (r − mean_g) / (std_g + eps)`. (verl's `torch.std`
  is the sample one, ddof=1: its advantages are ours × sqrt((G−1)/G).)
  `scale_by_std=False` is Dr.GRPO's unbiased variant `A = r − mean_g`.

  A group whose rewards are all equal carries no learning signal and gets an
  advantage of exactly 0 (not the `float-rounding / eps` noise the formula
  alone would give, nor NaN).

  Args:
    rewards_B: rewards, B a multiple of `group_size`; finite (checked when concrete).
    group_size: G samples per prompt (static int).
    eps: added to the standard deviation, >= 0.
    scale_by_std: divide by the group standard deviation.

  Returns:
    adv_B float32.

  Raises:
    ValueError: rewards not rank 1, group_size not a positive int dividing B,
      a negative or non-finite eps, or (concrete rewards) a NaN/inf reward.
  """
  check_rank("rewards_B", rewards_B, 1, "[B]")
  if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  if is_concrete(eps) and not (math.isfinite(eps) and eps >= 0):
    raise ValueError(f"eps must be a finite number >= 0, got {eps!r} (a negative eps can "
                     "cancel the std: inf advantages)")
  check_finite("rewards_B", rewards_B, "a NaN/inf reward makes its whole group's advantages NaN")
  (b,) = jnp.shape(rewards_B)
  if b % group_size:
    raise ValueError(f"batch of {b} rewards is not a multiple of group_size={group_size}")
  r_PG = _f32(rewards_B).reshape(b // group_size, group_size)  # P prompts × G samples
  min_P1 = jnp.min(r_PG, axis=1, keepdims=True)
  # Shifted by the group's min first (it cancels in r − mean): near-equal rewards become small
  # exact differences, whose mean float32 can hold. Unshifted, the mean of 1 and 1 + 1 ulp
  # rounded to one of them: advantages [0, 0.11], not ±0.056, and the group's sum was not 0.
  shifted_PG = r_PG - min_P1
  adv_PG = shifted_PG - jnp.mean(shifted_PG, axis=1, keepdims=True)
  if scale_by_std:
    std_P1 = jnp.sqrt(jnp.mean(jnp.square(adv_PG), axis=1, keepdims=True))
    adv_PG = adv_PG / (std_P1 + eps)
  flat_P1 = jnp.max(r_PG, axis=1, keepdims=True) == min_P1
  return jnp.where(flat_P1, 0.0, adv_PG).reshape(b)


def tis_weights(old_logp_BT: jax.Array, behaviour_logp_BT: jax.Array, cap: float) -> jax.Array:
  """Truncated importance weights `min(π_old/µ, cap) = min(exp(old − behaviour), cap)`.

  Corrects for the gap between the inference engine's behaviour policy µ and
  the training engine's π_old (TIS). Stop-gradient: a weight, not a path.
  Returns float32 [B, T]; positions where both log-probs are -inf (padding) are NaN,
  which the losses mask out. `cap` must be > 0 (no TIS: pass no weights).
  """
  check_bound("cap", cap, math.ulp(0.0), what="> 0 (no TIS: pass no weights)")
  check_rank("old_logp_BT", old_logp_BT, 2, "[B, T]")
  check_shape("behaviour_logp_BT", behaviour_logp_BT, jnp.shape(old_logp_BT),
               "the shape of old_logp_BT")
  check_real_dtype("old_logp_BT", old_logp_BT)  # a complex one would lose its imaginary part
  check_real_dtype("behaviour_logp_BT", behaviour_logp_BT)
  log_w_BT = jnp.clip(_f32(old_logp_BT) - _f32(behaviour_logp_BT), -MAX_LOG_RATIO, MAX_LOG_RATIO)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w_BT), cap))


def sequence_tis_weights(old_logp_BT: jax.Array, behaviour_logp_BT: jax.Array,
                         mask_BT: jax.Array, cap: float) -> jax.Array:
  """Sequence-level TIS weight for GSPO, `min((π_old(y)/µ(y))^{1/|y|}, cap)`, float32 [B].

  The geometric-mean ratio matches GSPO's length-normalised sequence ratio.
  Stop-gradient; sequences with an empty mask get weight 1. `cap` must be > 0.
  """
  check_bound("cap", cap, math.ulp(0.0), what="> 0 (no TIS: pass no weights)")
  check_BT_inputs(old_logp_BT, behaviour_logp_BT, mask_BT, ("old_logp_BT", "behaviour_logp_BT"))
  mask_BT = _f32(mask_BT)
  delta_BT = jnp.where(mask_BT > 0, _f32(old_logp_BT) - _f32(behaviour_logp_BT), 0.0)
  log_w_B = checks.safe_div(jnp.sum(delta_BT * mask_BT, axis=1), jnp.sum(mask_BT, axis=1))
  log_w_B = jnp.clip(log_w_B, -MAX_LOG_RATIO, MAX_LOG_RATIO)
  return jax.lax.stop_gradient(jnp.minimum(jnp.exp(log_w_B), cap))
