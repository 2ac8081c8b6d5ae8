"""Train–inference mismatch and routing-drift metrics as pure `jax.numpy` functions.

Dimension legend:
  B sequences, T response positions, L MoE layers, K top-k, E experts.

Every metric is a masked mean with static shapes, so it can run inside the
jitted step. Each family has two forms:
  * `*_sums(...)`: additive masked sums and counts. Micro-step results can be
    added with `jax.tree.map(jnp.add, a, b)`; the total gives exact means over
    the whole mini-batch, whatever the token count of each micro-step.
  * `*_metrics(...)` = `*_from_sums(*_sums(...))`: the means themselves.
`flatten_for_json` turns a metrics dict into plain Python (`loop.Engine._summarise` builds
each metrics.jsonl row with it).

Means over an empty selection are 0 (never NaN).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import (MASK_WHY, as_array, check_distribution, check_finite, check_ids,
                            check_int_dtype, check_rank, check_real_dtype, check_shape, safe_div)

LN2 = math.log(2.0)
NUM_DEV_BINS = 4  # deviation histogram bins: 0, 1, 2, ≥3 experts changed


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------------------
# Train vs rollout log-prob mismatch
# ----------------------------------------------------------------------------

def mismatch_sums(train_logp_BT: jax.Array, rollout_logp_BT: jax.Array,
                  mask_BT: jax.Array) -> dict[str, jax.Array]:
  """Additive masked sums behind `mismatch_metrics` (all float32 scalars)."""
  check_rank("train_logp_BT", train_logp_BT, 2, "[B, T]")
  shape = tuple(jnp.shape(train_logp_BT))  # exact: broadcasting gave fractions above 1
  check_shape("rollout_logp_BT", rollout_logp_BT, shape, "[B, T] of train_logp_BT")
  check_shape("mask_BT", mask_BT, shape, "[B, T] of train_logp_BT")
  check_real_dtype("train_logp_BT", train_logp_BT)
  check_real_dtype("rollout_logp_BT", rollout_logp_BT)
  check_finite("mask_BT", mask_BT, MASK_WHY, low=0)
  mask_BT = _f32(mask_BT)
  # where() first: padding may hold -inf log-probs, and these are metrics only.
  delta_BT = jax.lax.stop_gradient(
      jnp.where(mask_BT > 0, _f32(train_logp_BT) - _f32(rollout_logp_BT), 0.0))
  # expm1 keeps e^Δ − 1 accurate for the tiny Δ of a well-matched engine.
  dev_BT = jnp.expm1(delta_BT)  # ratio − 1
  return {
      "count": jnp.sum(mask_BT),
      "k3": jnp.sum((dev_BT - delta_BT) * mask_BT),
      "extreme": jnp.sum((jnp.abs(delta_BT) > LN2) * mask_BT),
      "ratio_dev": jnp.sum(dev_BT * mask_BT),
      "ratio_dev_sq": jnp.sum(jnp.square(dev_BT) * mask_BT),
  }


def ratio_moments(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`ratio_mean` and `ratio_var` (population variance) from the weighted sums `count`,
  `ratio_dev` = Σ w(r − 1) and `ratio_dev_sq` = Σ w(r − 1)² (deviations keep a ratio near 1
  exact in float32); both 0 when nothing counted. Shared by the mismatch and loss metrics."""
  n = sums["count"]
  dev_mean = safe_div(sums["ratio_dev"], n)
  return {"ratio_mean": jnp.where(n > 0, 1.0 + dev_mean, 0.0),
          "ratio_var": jnp.maximum(safe_div(sums["ratio_dev_sq"], n) - jnp.square(dev_mean), 0.0)}


def mismatch_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`mismatch_metrics`' keys from (possibly accumulated) `mismatch_sums`: sums of several
  micro-steps add key by key (`jax.tree.map(jnp.add, a, b)`), so the result is the exact token
  mean over all of them, not a mean of per-micro-step means."""
  n = sums["count"]
  return {"k3_kl": safe_div(sums["k3"], n), "extreme_frac": safe_div(sums["extreme"], n),
          **ratio_moments(sums)}


def mismatch_metrics(train_logp_BT: jax.Array, rollout_logp_BT: jax.Array,
                     mask_BT: jax.Array) -> dict[str, jax.Array]:
  """Train–inference mismatch over masked tokens, with `Δ = train − rollout` per token.

  Returns float32 scalars:
    k3_kl: `mean(e^Δ − 1 − Δ)`, the k3 estimator of KL(µ_rollout ‖ π_train)
      (non-negative, 0 iff the log-probs agree).
    extreme_frac: `mean(|Δ| > ln 2)`, tokens whose probability differs by
      more than a factor 2 between the engines.
    ratio_mean, ratio_var: mean and population variance of the IS ratio e^Δ.
  Raises ValueError unless all three inputs have the same [B, T] shape, or on a concrete mask
  value that is NaN, inf or negative; TypeError on log-probs that are not real (complex).
  """
  return mismatch_from_sums(mismatch_sums(train_logp_BT, rollout_logp_BT, mask_BT))


# ----------------------------------------------------------------------------
# Routing drift: replayed route vs the live training router
# ----------------------------------------------------------------------------

def _check_routing_inputs(replayed_BTLK, current_BTLK, probs_BTLE, mask_BT) -> None:
  """Shapes always (a K mismatch would broadcast into a wrong agreement); ids in [-1, E)
  when concrete (an id >= E reads a NaN probability)."""
  shape = tuple(jnp.shape(replayed_BTLK))
  if len(shape) != 4:
    raise ValueError(f"replayed routes must be [B, T, L, K], got shape {shape}")
  if tuple(jnp.shape(current_BTLK)) != shape:
    raise ValueError(f"current routes have shape {jnp.shape(current_BTLK)}, expected the "
                     f"replayed routes' {shape} [B, T, L, K]")
  if tuple(jnp.shape(probs_BTLE))[:3] != shape[:3] or jnp.ndim(probs_BTLE) != 4:
    raise ValueError(f"probs have shape {jnp.shape(probs_BTLE)}, expected {shape[:3]} + (E,)")
  if tuple(jnp.shape(mask_BT)) != shape[:2]:
    raise ValueError(f"mask has shape {jnp.shape(mask_BT)}, expected {shape[:2]} [B, T]")
  check_finite("mask_BT", mask_BT, MASK_WHY, low=0)
  # Router logits here gave a negative coverage gap, silently
  check_distribution("probs_BTLE", probs_BTLE, "the live router's softmax ρ over the experts")
  num_experts = jnp.shape(probs_BTLE)[-1]
  for name, ids in (("replayed_BTLK", replayed_BTLK), ("current_BTLK", current_BTLK)):
    check_int_dtype(name, ids)  # static: under jit a float id would be truncated silently
    check_ids(ids, name, -1, num_experts, "num_experts")


def routing_sums(replayed_BTLK: jax.Array, current_BTLK: jax.Array, probs_BTLE: jax.Array,
                 mask_BT: jax.Array) -> dict[str, jax.Array]:
  """Additive per-layer sums behind `routing_metrics` (float32 [L] or [L, 4])."""
  replayed_BTLK, current_BTLK, probs_BTLE, mask_BT = map(
      as_array, (replayed_BTLK, current_BTLK, probs_BTLE, mask_BT))
  _check_routing_inputs(replayed_BTLK, current_BTLK, probs_BTLE, mask_BT)
  k = replayed_BTLK.shape[-1]
  rep_BTLK = replayed_BTLK.astype(jnp.int32)
  cur_BTLK = current_BTLK.astype(jnp.int32)
  # A replayed row with any -1 is "live" (no route was forced), so there is
  # nothing to compare: such (token, layer) pairs are left out.
  valid_BTL = jnp.all(rep_BTLK >= 0, axis=-1) & jnp.all(cur_BTLK >= 0, axis=-1)
  w_BTL = _f32(mask_BT)[:, :, None] * valid_BTL
  # |I_rep ∩ I_cur| by pairwise comparison (K × K, K is small); the ids in one
  # top-k set are distinct, so each replayed expert matches at most once.
  same_BTLKK = rep_BTLK[..., :, None] == cur_BTLK[..., None, :]
  inter_BTL = jnp.sum(jnp.any(same_BTLKK, axis=-1), axis=-1)
  dev_BTL = jnp.minimum(k - inter_BTL, NUM_DEV_BINS - 1)
  hist_BTLH = jax.nn.one_hot(dev_BTL, NUM_DEV_BINS, dtype=jnp.float32)
  # Live probability mass the router still puts on the replayed set (a metric:
  # no gradient; -1 ids are clamped to 0 and masked out by w).
  probs_BTLE = jax.lax.stop_gradient(_f32(probs_BTLE))
  rho_rep_BTLK = jnp.take_along_axis(probs_BTLE, jnp.maximum(rep_BTLK, 0), axis=-1)
  gap_BTL = 1.0 - jnp.sum(rho_rep_BTLK, axis=-1)
  return {
      "count": jnp.einsum("btl->l", w_BTL),
      "agreement": jnp.einsum("btl,btl->l", _f32(inter_BTL) / k, w_BTL),
      "dev_hist": jnp.einsum("btlh,btl->lh", hist_BTLH, w_BTL),
      "coverage_gap": jnp.einsum("btl,btl->l", gap_BTL, w_BTL),
  }


def routing_from_sums(sums: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """`routing_metrics`' keys (overall and `_per_layer`) from (possibly accumulated)
  `routing_sums`, which add key by key over micro-steps like `mismatch_sums`."""
  n_L = sums["count"]
  n = jnp.sum(n_L)
  hist_L4 = safe_div(sums["dev_hist"], n_L[:, None])
  hist_4 = safe_div(jnp.sum(sums["dev_hist"], axis=0), n)
  return {
      "topk_agreement": safe_div(jnp.sum(sums["agreement"]), n),
      "zero_dev_ratio": hist_4[0],
      "dev_hist": hist_4,
      "coverage_gap": safe_div(jnp.sum(sums["coverage_gap"]), n),
      "topk_agreement_per_layer": safe_div(sums["agreement"], n_L),
      "zero_dev_ratio_per_layer": hist_L4[:, 0],
      "dev_hist_per_layer": hist_L4,
      "coverage_gap_per_layer": safe_div(sums["coverage_gap"], n_L),
  }


def routing_metrics(replayed_BTLK: jax.Array, current_BTLK: jax.Array, probs_BTLE: jax.Array,
                    mask_BT: jax.Array) -> dict[str, jax.Array]:
  """How far the live training router has drifted from the replayed routes.

  For every masked token t and layer l, with `I_rep` the replayed top-k set,
  `I_cur` the set the live router would pick now, and `ρ` its live softmax:
    topk_agreement: `mean |I_rep ∩ I_cur| / K`.
    dev_hist [4]: shares of deviation `K − |I_rep ∩ I_cur|` ∈ {0, 1, 2, ≥3}.
    zero_dev_ratio: `dev_hist[0]`, the share of routes that did not move.
    coverage_gap: `mean(1 − Σ_{j∈I_rep} ρ_j)`, live mass outside the replayed set.
  Overall values average over all (token, layer) pairs; the same keys with
  suffix `_per_layer` hold arrays [L] (`dev_hist_per_layer` is [L, 4]).

  The token mask applies to every layer. (token, layer) pairs whose replayed
  or current row contains -1 (the live router was used, nothing was replayed)
  are excluded from every metric; a layer with no pairs reports 0. Rows are
  top-k sets: K distinct ids (a repeated replayed id counts each time it
  matches).

  Args:
    replayed_BTLK: int replayed expert ids, -1 rows = live.
    current_BTLK: int live top-k ids of the current router on the same tokens.
    probs_BTLE: float live router softmax ρ of the current router.
    mask_BT: 1 on tokens that count.
  Raises ValueError on mismatched shapes, or (when concrete) ids outside [-1, E), a mask
  value that is NaN, inf or negative, or a probs row that is not a distribution (sums to 1
  within 0.01; router logits passed by mistake).
  """
  return routing_from_sums(routing_sums(replayed_BTLK, current_BTLK, probs_BTLE, mask_BT))


# ----------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------

def _to_python(x: Any) -> Any:
  a = np.asarray(jax.device_get(x))
  if a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer):
    return a.tolist()  # ints (e.g. `step`, counts) stay ints
  return a.astype(np.float64).tolist()  # scalar → float, array → (nested) list of floats


def flatten_for_json(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Metrics (jax/numpy arrays, Python numbers, nested dicts) → JSON-ready Python.

  Scalars become `float` (integer scalars stay `int`), arrays become
  (nested) lists, nested dicts are flattened with `/`-joined keys
  (`{"loss": {"sums": {"count": n}}}` → `{"loss/sums/count": n}`). Strings and
  None pass through. Non-finite values stay float NaN/inf (Python's `json`
  writes them as NaN/Infinity).
  """
  out: dict[str, Any] = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten_for_json(value, prefix=f"{name}/"))
    elif value is None or isinstance(value, str):
      out[name] = value
    else:
      out[name] = _to_python(value)
  return out
