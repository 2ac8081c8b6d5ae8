"""PR2's route evolution predictor as pure functions on arrays.

Dimension legend:
  N tokens (or cached feature positions), D d_model, E experts, K top-k,
  L MoE layers.

Per MoE layer a weight `W_p [D, E]` (no bias, zero-initialised) forecasts
where the router is heading: bias `b = h W_p`, predictive distribution
`q̂ = softmax(p + b)`, predicted route `TopK(q̂, K)`, taken as the top-k of the
scores p + b (q̂ underflows to tied zeros ~100 below the top score). With `W_p = 0` the
prediction is the live route, so PR2 starts as R3; the live router takes the top-k of
ρ = softmax(p) as transformers does, so the two differ only where ρ underflows to tied zeros
(logits ~100 below the top), a tie ρ breaks by the lower id.

Training fits `W_p` on cached rollout features `(h_old, p_old)` against the
current training router `ρ_θ` on the same tokens. Every loss here takes the
router logits as data (stop-gradient), so only `W_p` can receive gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import (as_array, check_finite, check_int_dtype, check_rank, check_shape,
                            check_top_k, is_concrete)
from pr2_jax.config import check_int

PREDICTOR_LOSSES = ("post", "delta", "l2")
_MIN_LOGIT_SUM = 1e-9  # bias_logit_ratio's denominator floor: all-zero logits give 0, not NaN


def init_predictor(num_layers: int, d_model: int, num_experts: int) -> jax.Array:
  """Zero `W_p` for every MoE layer, float32 [L, D, E]."""
  for name, value in (("num_layers", num_layers), ("d_model", d_model),
                      ("num_experts", num_experts)):
    check_int("init_predictor", name, value)
  return jnp.zeros((num_layers, d_model, num_experts), jnp.float32)


def predictor_bias(h_ND: jax.Array, w_DE: jax.Array) -> jax.Array:
  """b = h W_p in float32 (added to float32 router logits). Shapes (checked, static):
  h_ND [..., D], w_DE [D, E]."""
  h_ND, w_DE = as_array(h_ND), as_array(w_DE)
  check_rank("w_DE", w_DE, 2, "[D, E]")
  check_shape("h_ND", h_ND, jnp.shape(h_ND)[:-1] + jnp.shape(w_DE)[:1], "[..., D] with D of w_DE")
  return _bias(h_ND, w_DE)


def _bias(h, w):
  """Unchecked b = h W_p in float32: h_ND [..., D] with one layer's w_DE [D, E], or
  h_NLD [N, L, D] with the stacked w_LDE [L, D, E] (b_NLE)."""
  spec = "...d,de->...e" if jnp.ndim(w) == 2 else "nld,lde->nle"
  return jnp.einsum(spec, h.astype(jnp.float32), w.astype(jnp.float32))


def _kl(target_logits_NE, model_logits_NE, weight_N):
  """Σ_n w_n KL(softmax(target) ‖ softmax(model)) / Σ_n w_n."""
  log_p_NE = jax.nn.log_softmax(target_logits_NE, axis=-1)
  log_q_NE = jax.nn.log_softmax(model_logits_NE, axis=-1)
  kl_N = jnp.sum(jnp.exp(log_p_NE) * (log_p_NE - log_q_NE), axis=-1)
  return jnp.sum(kl_N * weight_N) / jnp.maximum(jnp.sum(weight_N), 1.0)


def _zero_padding(x, weight_N):
  """x [N, ...] with the rows of weight 0 set to 0: a padding position's feature may hold
  anything, and a NaN there made the loss and W_p's gradient NaN under jit."""
  keep = jnp.reshape(weight_N > 0, jnp.shape(weight_N) + (1,) * (jnp.ndim(x) - 1))
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


def _check_finite_features(h, p_old, p_cur, names: tuple[str, str, str]) -> None:
  """Concrete features and logits are finite (no-op on tracers), as `route` checks its logits:
  a -inf p_old made the loss inf, a NaN one NaN, far from the cached feature that caused it."""
  for name, x, what in zip(names, (h, p_old, p_cur),
                           ("router inputs", "rollout router logits", "current router logits")):
    check_finite(name, x, what)


def _check_layer_inputs(w_DE, h_ND, p_old_NE, p_cur_NE, weight_N) -> None:
  check_rank("w_DE", w_DE, 2, "[D, E]")
  check_rank("h_old_ND", h_ND, 2, "[N, D]")
  (d, e), n = jnp.shape(w_DE), jnp.shape(h_ND)[0]
  check_shape("h_old_ND", h_ND, (n, d), "[N, D] with D of w_DE")
  check_shape("p_old_NE", p_old_NE, (n, e), "[N, E] with N of h_old and E of w_DE")
  check_shape("p_cur_NE", p_cur_NE, (n, e), "[N, E] with N of h_old and E of w_DE")
  check_shape("weight_N", weight_N, (n,), "[N]")


def predictor_loss(kind: str, w_DE: jax.Array, h_old_ND: jax.Array, p_old_NE: jax.Array,
                   p_cur_NE: jax.Array, weight_N: jax.Array) -> jax.Array:
  """One layer's predictor loss over weighted feature positions (weight 0 = padding).

  'post' (default): KL(sg(ρ_cur) ‖ softmax(p_old + h_old W_p)), i.e. the
    predicted distribution should be the router's distribution now.
  'delta': KL(softmax(sg(p_cur − p_old)) ‖ softmax(b)), the bias alone
    should predict the logit change.
  'l2': ‖b − sg(p_cur − p_old)‖² / E, the squared error on the logit change averaged over
    the E experts (DESIGN §3's norm divided by E, so its size does not grow with E; Adam's
    update is invariant to that constant factor).

  Shapes (checked, static): w_DE [D, E], h_old_ND [N, D], p_old_NE and p_cur_NE [N, E],
  weight_N [N]. Weights are counts (0/1 per position): the mean divides by
  max(Σ weight, 1), and positions of weight 0 are left out whatever they hold. A negative or
  non-finite weight, or a NaN or inf in h_old, p_old or p_cur at a weighted position, raises
  ValueError (when concrete).
  """
  w_DE, h_old_ND, p_old_NE, p_cur_NE, weight_N = map(
      as_array, (w_DE, h_old_ND, p_old_NE, p_cur_NE, weight_N))
  _check_layer_inputs(w_DE, h_old_ND, p_old_NE, p_cur_NE, weight_N)
  check_finite("weight_N", weight_N, "0/1 counts per position", low=0)
  h_old_ND, p_old_NE, p_cur_NE = (_zero_padding(x, weight_N) for x in (h_old_ND, p_old_NE,
                                                                       p_cur_NE))
  _check_finite_features(h_old_ND, p_old_NE, p_cur_NE, ("h_old_ND", "p_old_NE", "p_cur_NE"))
  p_old_NE = jax.lax.stop_gradient(p_old_NE.astype(jnp.float32))
  p_cur_NE = jax.lax.stop_gradient(p_cur_NE.astype(jnp.float32))
  b_NE = predictor_bias(jax.lax.stop_gradient(h_old_ND), w_DE)
  weight_N = weight_N.astype(jnp.float32)
  if kind == "post":
    return _kl(p_cur_NE, p_old_NE + b_NE, weight_N)
  if kind == "delta":
    return _kl(p_cur_NE - p_old_NE, b_NE, weight_N)
  if kind == "l2":
    err_N = jnp.mean(jnp.square(b_NE - (p_cur_NE - p_old_NE)), axis=-1)
    return jnp.sum(err_N * weight_N) / jnp.maximum(jnp.sum(weight_N), 1.0)
  raise ValueError(f"unknown predictor loss {kind!r}; allowed: {PREDICTOR_LOSSES}")


def predictor_losses(kind: str, w_LDE: jax.Array, h_old_NLD: jax.Array, p_old_NLE: jax.Array,
                     p_cur_NLE: jax.Array, weight_N: jax.Array) -> jax.Array:
  """Per-layer losses [L]; the objective is their sum (DESIGN §3: Σ_l).

  Shapes (checked): w_LDE [L, D, E], h_old_NLD [N, L, D], p_old_NLE and p_cur_NLE
  [N, L, E], weight_N [N] (0/1 counts, as in `predictor_loss`); values checked as there."""
  w_LDE, h_old_NLD, p_old_NLE, p_cur_NLE, weight_N = map(
      as_array, (w_LDE, h_old_NLD, p_old_NLE, p_cur_NLE, weight_N))
  check_rank("w_LDE", w_LDE, 3, "[L, D, E]")
  l, d, e = jnp.shape(w_LDE)
  n = jnp.shape(weight_N)[0] if jnp.ndim(weight_N) else -1
  check_shape("weight_N", weight_N, (n,), "[N]")
  check_shape("h_old_NLD", h_old_NLD, (n, l, d), "[N, L, D] of weight_N and w_LDE")
  check_shape("p_old_NLE", p_old_NLE, (n, l, e), "[N, L, E] of weight_N and w_LDE")
  check_shape("p_cur_NLE", p_cur_NLE, (n, l, e), "[N, L, E] of weight_N and w_LDE")
  # Here, on the stacked arrays: inside the vmap below they are tracers, and unchecked.
  check_finite("weight_N", weight_N, "0/1 counts per position", low=0)
  h_old_NLD, p_old_NLE, p_cur_NLE = (_zero_padding(x, weight_N)
                                     for x in (h_old_NLD, p_old_NLE, p_cur_NLE))
  _check_finite_features(h_old_NLD, p_old_NLE, p_cur_NLE, ("h_old_NLD", "p_old_NLE", "p_cur_NLE"))
  layer = lambda w, h, p_old, p_cur: predictor_loss(kind, w, h, p_old, p_cur, weight_N)
  return jax.vmap(layer, in_axes=(0, 1, 1, 1))(w_LDE, h_old_NLD, p_old_NLE, p_cur_NLE)


def _check_stacked(w_LDE, h_NLD, p_NLE, weight_N=None) -> None:
  """Static: w [L, D, E], h [N, L, D], p [N, L, E] and weight [N] agree (the einsum would fail
  obscurely, or a p of fewer experts broadcast silently)."""
  check_rank("w_LDE", w_LDE, 3, "[L, D, E]")
  check_rank("h_NLD", h_NLD, 3, "[N, L, D]")
  (l, d, e), n = jnp.shape(w_LDE), jnp.shape(h_NLD)[0]
  check_shape("h_NLD", h_NLD, (n, l, d), "[N, L, D] with L, D of w_LDE")
  check_shape("p_NLE", p_NLE, (n, l, e), "[N, L, E] with N of h_NLD and L, E of w_LDE")
  if weight_N is not None:
    check_shape("weight_N", weight_N, (n,), "[N] with N of h_NLD")


def predicted_topk(w_LDE: jax.Array, h_NLD: jax.Array, p_NLE: jax.Array, k: int) -> jax.Array:
  """TopK(softmax(p + h W_p)) per layer, int32 [N, L, K]. Shapes checked (static): w_LDE
  [L, D, E], h_NLD [N, L, D], p_NLE [N, L, E]; k an int in [1, E]."""
  w_LDE, h_NLD, p_NLE = as_array(w_LDE), as_array(h_NLD), as_array(p_NLE)
  _check_stacked(w_LDE, h_NLD, p_NLE)
  check_top_k(k, p_NLE, "p_NLE")
  for name, x, what in (("w_LDE", w_LDE, "predictor weights"), ("h_NLD", h_NLD, "router inputs"),
                        ("p_NLE", p_NLE, "router logits")):
    check_finite(name, x, what)  # when concrete: top-k would rank a NaN silently
  # Top-k of the scores, not of q̂: q̂ underflows to tied zeros ~100 below the top score.
  return jax.lax.top_k(p_NLE.astype(jnp.float32) + _bias(h_NLD, w_LDE), k)[1].astype(jnp.int32)


def topk_overlap(a_NLK: jax.Array, b_NLK: jax.Array, weight_N: jax.Array) -> jax.Array:
  """Weighted mean of |A ∩ B| / K per layer, float32 [L]. Shapes checked (static): a_NLK and
  b_NLK the same [N, L, K] (the overlap would otherwise depend on the argument order, or
  broadcast), weight_N [N]. Ids must be integers (static) and, when concrete, >= 0: a -1 row
  (the live router: no route) would match another -1 row. Ids are not checked against E.
  Concrete weights must be finite and >= 0 (ValueError), as `predictor_loss`'s: a negative one
  subtracts its position from the mean. Array-likes (nested lists) work too."""
  a_NLK, b_NLK, weight_N = as_array(a_NLK), as_array(b_NLK), as_array(weight_N)
  check_rank("a_NLK", a_NLK, 3, "[N, L, K]")
  check_shape("b_NLK", b_NLK, jnp.shape(a_NLK), "[N, L, K] of a_NLK")
  check_shape("weight_N", weight_N, jnp.shape(a_NLK)[:1], "[N] of a_NLK")
  check_finite("weight_N", weight_N, "a position's weight in the mean; 0 leaves it out", low=0)
  for name, ids in (("a_NLK", a_NLK), ("b_NLK", b_NLK)):
    check_int_dtype(name, ids, "integer expert ids", ValueError)
    if is_concrete(ids) and np.any(np.asarray(ids) < 0):
      idx = tuple(int(i) for i in np.argwhere(np.asarray(ids) < 0)[0])
      raise ValueError(f"{name}{list(idx)} = {int(np.asarray(ids)[idx])}: topk_overlap compares "
                       "expert ids >= 0 (a -1 row, the live router, holds no route)")
  k = a_NLK.shape[-1]
  inter_NL = jnp.sum(jnp.any(a_NLK[..., :, None] == b_NLK[..., None, :], axis=-1), axis=-1)
  weight_N = weight_N.astype(jnp.float32)
  total = jnp.sum(weight_N)  # a weighted mean: fractional weights are not divided by 1
  return jnp.einsum("nl,n->l", inter_NL / k, weight_N) / jnp.where(total > 0, total, 1.0)


def bias_logit_sums(w_LDE: jax.Array, h_NLD: jax.Array, p_NLE: jax.Array,
                    weight_N: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(Σ w|b|, Σ w|p_old|) over positions, layers and experts: additive over micro-steps, so a
  mini-batch's ratio is the ratio of its sums (not a mean of per-micro-step ratios).
  Shapes checked (static): w_LDE [L, D, E], h_NLD [N, L, D], p_NLE [N, L, E], weight_N [N];
  positions of weight 0 are left out whatever they hold; a concrete negative or non-finite
  weight raises ValueError."""
  w_LDE, h_NLD, p_NLE, weight_N = map(as_array, (w_LDE, h_NLD, p_NLE, weight_N))
  _check_stacked(w_LDE, h_NLD, p_NLE, weight_N)
  check_finite("weight_N", weight_N, "0/1 counts per position", low=0)  # -1 subtracts |b|
  h_NLD, p_NLE = _zero_padding(h_NLD, weight_N), _zero_padding(p_NLE, weight_N)
  b_NLE = _bias(h_NLD, w_LDE)
  w = weight_N.astype(jnp.float32)[:, None, None]
  return jnp.sum(jnp.abs(b_NLE) * w), jnp.sum(jnp.abs(p_NLE.astype(jnp.float32)) * w)


def bias_logit_ratio(w_LDE: jax.Array, h_NLD: jax.Array, p_NLE: jax.Array,
                     weight_N: jax.Array) -> jax.Array:
  """mean|b| / mean|p_old| over weighted positions (DESIGN §3): how hard the predictor pushes.
  One float32 scalar pooled over all layers (Σ|b| / Σ|p_old|, not a mean of per-layer
  ratios). Shapes as `bias_logit_sums` (checked)."""
  return bias_logit_ratio_from_sums(*bias_logit_sums(w_LDE, h_NLD, p_NLE, weight_N))


def bias_logit_ratio_from_sums(bias_abs_sum: jax.Array, logit_abs_sum: jax.Array) -> jax.Array:
  """Σ|b| / Σ|p_old| from `bias_logit_sums`' two sums (e.g. added over a mini-batch's
  micro-steps), float32 scalar. The denominator is floored at 1e-9 so that W_p = 0 on all-zero
  logits (or no weighted position) reads 0, not 0/0 = NaN."""
  return bias_abs_sum / jnp.maximum(logit_abs_sum, _MIN_LOGIT_SUM)
