"""RL policy losses as pure `jax.numpy` functions: DAPO, GSPO, and token log-probs/entropy.

GRPO is not a separate loss here: its clipped objective is `dapo_loss` with
`clip_high = clip_low` (0.2: the symmetric PPO clip) on `grpo_advantages`; GRPO's mean over
each sequence's tokens, then over sequences, is `mask_BT = mask / len_B[:, None]` (float
weights) with `denom = B`. DAPO's token mean (the default) weights long responses more.

Their inputs, GRPO group advantages and TIS weights, are computed in `advantages.py`, which
also holds the input checks both modules share (this module imports them from there).

Everything is jit-compatible with static shapes: ragged responses are
padded and described by a mask, never sliced.

Dimension legend:
  B sequences, T response positions, V vocabulary.

Conventions:
  * `mask_BT` (bool or float) is 1 on response tokens that count in the loss.
  * `old_logp_BT` is the log-prob the ratio is taken against: π_old from the
    training engine's old-log-prob pass, or the behaviour µ when that pass is skipped.
    It is treated as a constant (stop-gradient).
  * Aggregation uses an explicit denominator so that gradient accumulation is
    exact: with `denom` = the *mini-batch's* token count (DAPO) or sequence
    count (GSPO), the sum of the M micro-step losses (and of their gradients)
    equals the mini-batch loss (and its gradient). `loss_denominator` computes it.
  * Diagnostics come in two forms (see `loss_stats_from_sums`): `aux` holds
    means over the call's own tokens/sequences, and `aux["sums"]` holds additive
    masked sums and counts. To aggregate across micro-steps, add the `sums`
    dicts (`jax.tree.map(jnp.add, ...)`) and call `loss_stats_from_sums`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import (check_bound, check_count, check_finite, check_ids, check_rank,
                            check_real_dtype, check_shape, is_concrete, safe_div)
from pr2_jax.rl.advantages import MASK_WHY, MAX_LOG_RATIO, check_BT_inputs
from pr2_jax.rl.config import LOSS_DEFAULTS
from pr2_jax.rl.metrics import ratio_moments

# Each kind's ratio level: "token" ones weigh and count tokens (TIS weights [B, T], denominator
# the masked tokens), "sequence" ones sequences ([B], the sequences with a response). A new kind
# goes here, in policy_loss's dispatch and in rl.config.LOSSES (a test ties the two lists).
LOSS_LEVELS = {"dapo": "token", "gspo": "sequence"}
POLICY_LOSS_KINDS = tuple(LOSS_LEVELS)
# The losses' default clip ranges are RLConfig's (one table: rl.config.LOSS_DEFAULTS).
_DAPO_CLIP_LOW, _DAPO_CLIP_HIGH, _ = LOSS_DEFAULTS["dapo"]
_GSPO_CLIP_LOW, _GSPO_CLIP_HIGH, _ = LOSS_DEFAULTS["gspo"]


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _adv_BT(adv: jax.Array) -> jax.Array:
  """Per-sequence advantages [B] broadcast over tokens; [B, T] passes through."""
  adv = _f32(adv)
  return adv[:, None] if adv.ndim == 1 else adv


# -- Input checks: shapes and dtypes are static (free under jit); values only when concrete --------

_ADV_WHY = "a NaN or inf advantage makes the loss NaN"
_WEIGHT_WHY = "a TIS weight: a negative one flips the gradient, a NaN one makes the loss NaN"


def _check_clip(clip_low, clip_high) -> None:
  check_bound("clip_low", clip_low, 0.0, 1.0)  # 1 - clip_low is the lower ratio bound
  check_bound("clip_high", clip_high, 0.0)


def _check_weight(name: str, weight_X, mask_BT, per_sequence: bool) -> None:
  """TIS weights: real (static) and, when they and the mask are concrete, finite and >= 0 on
  the tokens (or sequences) the mask counts. Elsewhere the loss masks them out: `tis_weights`
  is NaN at padding, which must pass."""
  check_real_dtype(name, weight_X)
  if is_concrete(weight_X) and is_concrete(mask_BT):
    counted = np.asarray(mask_BT, np.float64) > 0
    counted = counted.any(axis=1) if per_sequence else counted
    check_finite(name, np.where(counted, np.asarray(weight_X, np.float64), 1.0), _WEIGHT_WHY,
                 low=0)


# -- Diagnostics shared by the losses --------------------------------------------------------------

def _ratio_sums(ratio_X: jax.Array, adv_X: jax.Array, weight_X: jax.Array,
                clip_low: float, clip_high: float) -> dict[str, jax.Array]:
  """Additive masked sums of ratio statistics over any elements X (tokens or sequences)."""
  ratio_X = jax.lax.stop_gradient(ratio_X)
  # Sums of r − 1 rather than r: r ≈ 1, so the variance E[(r−1)²] − E[r−1]²
  # does not cancel catastrophically in float32 (and is exactly 0 at r ≡ 1).
  dev_X = ratio_X - 1.0
  low_X = (adv_X < 0) & (ratio_X < 1.0 - clip_low)     # lower clip active: grad is 0
  high_X = (adv_X > 0) & (ratio_X > 1.0 + clip_high)   # upper clip active: grad is 0
  return {
      "count": jnp.sum(weight_X),
      "ratio_dev": jnp.sum(dev_X * weight_X),
      "ratio_dev_sq": jnp.sum(jnp.square(dev_X) * weight_X),
      "clip_low": jnp.sum(low_X * weight_X),
      "clip_high": jnp.sum(high_X * weight_X),
  }


def loss_stats_from_sums(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Means from (possibly micro-step-accumulated) `aux["sums"]`.

  Returns `ratio_mean`, `ratio_var` (population variance), `clip_frac_low`
  (share where A<0 and r<1−ε_low) and `clip_frac_high` (A>0 and r>1+ε_high).
  Means weighted by the mask's values (which may be fractional); all are 0 when the count is 0.
  """
  n = sums["count"]
  return {**ratio_moments(sums), "clip_frac_low": safe_div(sums["clip_low"], n),
          "clip_frac_high": safe_div(sums["clip_high"], n)}


def _clipped_objective(ratio: jax.Array, adv: jax.Array, clip_low: float,
                       clip_high: float) -> jax.Array:
  """PPO-clip loss −min(r A, clip(r, 1−ε_low, 1+ε_high) A), elementwise."""
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  return -jnp.minimum(ratio * adv, clipped * adv)


# -- Losses ----------------------------------------------------------------------------------------

def dapo_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, adv_B: jax.Array,
              mask_BT: jax.Array, *, clip_low: float = _DAPO_CLIP_LOW,
              clip_high: float = _DAPO_CLIP_HIGH,
              is_weight_BT: jax.Array | None = None,
              denom: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
  """DAPO token-level clipped policy loss (clip-higher, token-mean, no KL).

  Per token `r_t = exp(logp − old_logp)` and
  `ℓ_t = −w_t · min(r_t A, clip(r_t, 1−ε_low, 1+ε_high) A)`, with `w_t` the
  optional TIS weight (1 if None). `loss = Σ_t ℓ_t m_t / denom`.

  Args:
    logp_BT: current-policy log-probs of the sampled tokens (differentiated).
    old_logp_BT: log-probs the ratio is taken against (stop-gradient).
    adv_B: per-sequence advantages [B] (a per-token [B, T] array also works).
    mask_BT: 1 on response tokens that count, 0 elsewhere (a float mask weights tokens,
      but the default denominator is max(Σ mask_BT, 1), a token count: pass `denom` for
      weights that sum below 1).
    clip_low, clip_high: ε_low in [0, 1], ε_high >= 0 of the asymmetric clip range.
    is_weight_BT: optional TIS weights (see `tis_weights`), stop-gradient; >= 0 where
      mask_BT counts (elsewhere, e.g. NaN at padding, they are masked out).
    denom: token-mean denominator; default max(Σ mask_BT, 1) of this call (an all-masked
      call gives 0, not NaN). Pass the mini-batch's token count (`loss_denominator`) so
      micro-step losses add up to the mini-batch loss.

  Returns:
    (loss, aux): aux has `ratio_mean`, `ratio_var`, `clip_frac_low`,
    `clip_frac_high` as means over this call's masked tokens, and `sums`
    (additive; see `loss_stats_from_sums`).

  Raises:
    ValueError: an input whose shape is not exactly the documented one (no
      broadcasting), a concrete mask value or counted `is_weight_BT` that is NaN, inf or
      negative, a concrete advantage that is NaN or inf, or a concrete `denom` that is not
      a finite count > 0.
    TypeError: log-probs or advantages that are not real numbers (e.g. complex).
  """
  b, t = check_BT_inputs(logp_BT, old_logp_BT, mask_BT)
  if jnp.shape(adv_B) not in ((b,), (b, t)):
    raise ValueError(f"adv_B has shape {jnp.shape(adv_B)}, expected [B] = {(b,)} or "
                     f"[B, T] = {(b, t)}")
  check_finite("adv_B", adv_B, _ADV_WHY)
  if is_weight_BT is not None:
    check_shape("is_weight_BT", is_weight_BT, (b, t), "[B, T]")
    _check_weight("is_weight_BT", is_weight_BT, mask_BT, per_sequence=False)
  check_count("denom", denom)
  _check_clip(clip_low, clip_high)
  mask_BT = _f32(mask_BT)
  adv_BT = jnp.broadcast_to(_adv_BT(adv_B), mask_BT.shape)
  # where() before exp: padding positions may hold -inf/NaN log-probs.
  log_ratio_BT = jnp.where(mask_BT > 0,
                           _f32(logp_BT) - jax.lax.stop_gradient(_f32(old_logp_BT)), 0.0)
  ratio_BT = jnp.exp(jnp.clip(log_ratio_BT, -MAX_LOG_RATIO, MAX_LOG_RATIO))
  loss_BT = _clipped_objective(ratio_BT, adv_BT, clip_low, clip_high)
  if is_weight_BT is not None:  # masked first: a padding weight may be NaN (-inf - -inf)
    loss_BT = loss_BT * jnp.where(mask_BT > 0, jax.lax.stop_gradient(_f32(is_weight_BT)), 0.0)
  if denom is None:
    denom = jnp.maximum(jnp.sum(mask_BT), 1.0)
  loss = jnp.sum(loss_BT * mask_BT) / jax.lax.stop_gradient(_f32(denom))
  sums = _ratio_sums(ratio_BT, adv_BT, mask_BT, clip_low, clip_high)
  return loss, {**loss_stats_from_sums(sums), "sums": sums}


def gspo_loss(logp_BT: jax.Array, old_logp_BT: jax.Array, adv_B: jax.Array,
              mask_BT: jax.Array, *, clip_low: float = _GSPO_CLIP_LOW,
              clip_high: float = _GSPO_CLIP_HIGH,
              is_weight_B: jax.Array | None = None,
              denom_seqs: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
  """GSPO sequence-level clipped policy loss.

  Sequence ratio `s_i = exp(mean_{t∈y_i}(logp − old_logp)) = (π(y_i)/π_old(y_i))^{1/|y_i|}`,
  `ℓ_i = −w_i · min(s_i A_i, clip(s_i, 1−ε_low, 1+ε_high) A_i)`, and
  `loss = Σ_i ℓ_i / denom_seqs` over sequences with a non-empty mask. The
  gradient flows through s_i, so it is GSPO's `s_i A_i · mean_t ∇log π(y_i,t)`
  for unclipped sequences and 0 for clipped ones.

  Args:
    logp_BT, old_logp_BT, mask_BT: as in `dapo_loss`.
    adv_B: per-sequence advantages [B].
    clip_low, clip_high: ε_low, ε_high on the sequence ratio. The default 3e-4 is below
      bfloat16's resolution for log-probs (its spacing near a log-prob of -1 is 2^-7 ≈ 8e-3,
      and a sequence ratio is a mean of their differences): pass float32 log-probs, or the
      clip range only sees rounding.
    is_weight_B: optional per-sequence TIS weights (see `sequence_tis_weights`), >= 0 for
      sequences with a non-empty mask.
    denom_seqs: sequence-mean denominator; default the number of sequences
      with a non-empty mask in this call. Pass the mini-batch's count for
      exact micro-step accumulation.

  Returns:
    (loss, aux) like `dapo_loss`, but the ratio statistics and clip fractions
    are over *sequences* (`sums["count"]` counts sequences).

  Raises:
    ValueError: as `dapo_loss`; `adv_B` and `is_weight_B` must be exactly [B].
  """
  b, _ = check_BT_inputs(logp_BT, old_logp_BT, mask_BT)
  check_shape("adv_B", adv_B, (b,), "[B]", ": GSPO's advantage is per sequence")
  check_finite("adv_B", adv_B, _ADV_WHY)
  if is_weight_B is not None:
    check_shape("is_weight_B", is_weight_B, (b,), "[B]", ": GSPO's TIS weight is per sequence")
    _check_weight("is_weight_B", is_weight_B, mask_BT, per_sequence=True)
  check_count("denom_seqs", denom_seqs)
  _check_clip(clip_low, clip_high)
  mask_BT = _f32(mask_BT)
  len_B = jnp.sum(mask_BT, axis=1)
  valid_B = _f32(len_B > 0)
  log_ratio_BT = jnp.where(mask_BT > 0,
                           _f32(logp_BT) - jax.lax.stop_gradient(_f32(old_logp_BT)), 0.0)
  log_s_B = safe_div(jnp.sum(log_ratio_BT * mask_BT, axis=1), len_B)  # mask-weighted mean
  s_B = jnp.exp(jnp.clip(log_s_B, -MAX_LOG_RATIO, MAX_LOG_RATIO))
  adv_B = _f32(adv_B)
  loss_B = _clipped_objective(s_B, adv_B, clip_low, clip_high)
  if is_weight_B is not None:
    loss_B = loss_B * jnp.where(valid_B > 0, jax.lax.stop_gradient(_f32(is_weight_B)), 0.0)
  if denom_seqs is None:
    denom_seqs = jnp.maximum(jnp.sum(valid_B), 1.0)
  loss = jnp.sum(loss_B * valid_B) / jax.lax.stop_gradient(_f32(denom_seqs))
  sums = _ratio_sums(s_B, adv_B, valid_B, clip_low, clip_high)
  return loss, {**loss_stats_from_sums(sums), "sums": sums}


def loss_denominator(kind: str, mask_BT: jax.Array) -> jax.Array:
  """The aggregation denominator of `kind` over a (mini-)batch mask, float32 scalar ≥ 1.

  'dapo': number of masked tokens; 'gspo': number of sequences with a
  non-empty mask. Compute it on the whole mini-batch and pass it as `denom`
  to every micro-step's `policy_loss` so their losses and gradients sum exactly.
  """
  _check_kind(kind)
  check_rank("mask_BT", mask_BT, 2, "[B, T]")
  check_finite("mask_BT", mask_BT, MASK_WHY, low=0)
  mask_BT = _f32(mask_BT)
  if LOSS_LEVELS[kind] == "token":
    return jnp.maximum(jnp.sum(mask_BT), 1.0)
  return jnp.maximum(jnp.sum(_f32(jnp.sum(mask_BT, axis=1) > 0)), 1.0)


def _check_kind(kind: str) -> None:
  if kind not in POLICY_LOSS_KINDS:
    raise ValueError(f"unknown policy loss {kind!r}; allowed: {', '.join(POLICY_LOSS_KINDS)}")


def policy_loss(kind: str, logp_BT: jax.Array, old_logp_BT: jax.Array, adv_B: jax.Array,
                mask_BT: jax.Array, *, clip_low: float | None = None,
                clip_high: float | None = None, is_weight: jax.Array | None = None,
                denom: jax.Array | float | None = None) -> tuple[jax.Array, dict]:
  """Dispatch to `dapo_loss` or `gspo_loss` by name.

  `clip_low`/`clip_high` default to the chosen loss's defaults (0.2/0.28 for
  DAPO, 3e-4/4e-4 for GSPO). `is_weight` is [B, T] for DAPO and [B] for GSPO;
  `denom` counts tokens for DAPO and sequences for GSPO (see `loss_denominator`).
  GRPO's objective is "dapo" with `clip_high = clip_low` (this module's docstring).
  Raises ValueError for an unknown `kind` (allowed: `POLICY_LOSS_KINDS`).
  """
  _check_kind(kind)
  clips = {}
  if clip_low is not None:
    clips["clip_low"] = clip_low
  if clip_high is not None:
    clips["clip_high"] = clip_high
  if kind == "dapo":
    return dapo_loss(logp_BT, old_logp_BT, adv_B, mask_BT, is_weight_BT=is_weight,
                     denom=denom, **clips)
  if kind == "gspo":
    return gspo_loss(logp_BT, old_logp_BT, adv_B, mask_BT, is_weight_B=is_weight,
                     denom_seqs=denom, **clips)
  raise NotImplementedError(f"policy_loss has no branch for {kind!r} (in LOSS_LEVELS)")


# -- Log-probs and entropy from logits -------------------------------------------------------------

def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log softmax(logits)[target] per position, float32 [B, T].

  `logits_BTV[:, t]` must already be the prediction for `targets_BT[:, t]`
  (the caller shifts by one). Computed as `logit[target] − logsumexp(logits)`
  in float32, which avoids materialising the full log-softmax.

  Raises:
    ValueError: logits not [B, T, V], targets not an integer [B, T] array, or
      (concrete targets) a target outside [0, V).
  """
  check_rank("logits_BTV", logits_BTV, 3, "[B, T, V]")
  check_shape("targets_BT", targets_BT, jnp.shape(logits_BTV)[:2], "[B, T] of logits_BTV")
  if not jnp.issubdtype(jnp.result_type(targets_BT), jnp.integer):
    raise ValueError(f"targets_BT has dtype {jnp.result_type(targets_BT)}, expected an integer "
                     "dtype (token ids; a float would be truncated)")
  if is_concrete(targets_BT):
    check_ids(targets_BT, "targets_BT", 0, jnp.shape(logits_BTV)[2], "V")
  logits_BTV = _f32(logits_BTV)
  targets_BT1 = jnp.asarray(targets_BT, jnp.int32)[..., None]
  picked_BT = jnp.take_along_axis(logits_BTV, targets_BT1, axis=-1)[..., 0]
  return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def token_entropy(logits_BTV: jax.Array, mask_BT: jax.Array,
                  denom: jax.Array | float | None = None) -> jax.Array:
  """Mean policy entropy `H = −Σ_v p_v log p_v` over masked tokens, float32 scalar.

  `denom` defaults to this call's token count; pass the mini-batch's count
  to make micro-step values add up.
  """
  check_rank("logits_BTV", logits_BTV, 3, "[B, T, V]")
  check_shape("mask_BT", mask_BT, jnp.shape(logits_BTV)[:2], "[B, T] of logits_BTV")
  check_finite("mask_BT", mask_BT, MASK_WHY, low=0)
  check_count("denom", denom)
  mask_BT = _f32(mask_BT)
  if denom is None:
    denom = jnp.maximum(jnp.sum(mask_BT), 1.0)
  return jnp.sum(token_entropies(logits_BTV) * mask_BT) / _f32(denom)


def token_entropies(logits_BTV: jax.Array) -> jax.Array:
  """Policy entropy `−Σ_v p_v log p_v` per position, float32 [B, T]."""
  check_rank("logits_BTV", logits_BTV, 3, "[B, T, V]")
  log_p_BTV = jax.nn.log_softmax(_f32(logits_BTV), axis=-1)
  p_BTV = jnp.exp(log_p_BTV)
  # Masked-out vocab entries (-inf logits) have p = 0: use 0·log 0 = 0, and
  # keep -inf out of the product so neither value nor gradient turns NaN.
  log_p_BTV = jnp.where(p_BTV > 0, log_p_BTV, 0.0)
  return -jnp.einsum("btv,btv->bt", p_BTV, log_p_BTV)
