"""Top-k routing, route recording and replay as pure functions on arrays.

Usable without Flax: every function takes and returns plain arrays, so a
MaxText/Tunix-style model can call `route` inside its own MoE block.

Dimension legend:
  B batch, T sequence length, N tokens (flattened B*T), D d_model,
  E experts, K top-k, L MoE layers.

Routes are int32 `[..., K]` expert ids; a row of -1 means "use the live
router" for that token (and layer). The gates of a replayed route are
gathered from the *full* live softmax, never from a top-k-masked vector:
a replayed expert the live router would not pick still gets its true
probability, so the router keeps receiving gradient through it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import (MASK_WHY, as_array, check_distribution, check_finite, check_ids,
                            check_int_dtype, check_rank, check_shape, check_top_k, is_concrete,
                            require_concrete)

LIVE = -1  # route entry meaning "let the live router choose"
_MIN_GATE_SUM = 1e-18  # its square stays a normal float32: the division's gradient is finite


class Routing(NamedTuple):
  expert_ids: jax.Array  # int32 [..., K], the experts actually used
  gates: jax.Array       # float32 [..., K], combine weights for those experts
  probs: jax.Array       # float32 [..., E], the full live softmax ρ


def router_logits(x_ND: jax.Array, w_DE: jax.Array) -> jax.Array:
  """Router logits p = x W_r, always in float32 (routing is precision-sensitive).
  Shapes (checked, static): x_ND [..., D], w_DE [D, E]."""
  x_ND, w_DE = as_array(x_ND), as_array(w_DE)
  check_rank("w_DE", w_DE, 2, "[D, E]")
  check_shape("x_ND", x_ND, np.shape(x_ND)[:-1] + np.shape(w_DE)[:1], "[..., D] with D of w_DE")
  return jnp.einsum("...d,de->...e", x_ND.astype(jnp.float32), w_DE.astype(jnp.float32))


def top_k_experts(probs_NE: jax.Array, k: int) -> jax.Array:
  """Top-k expert ids, int32 [..., K]; ties go to the lower index (as torch.topk).
  Takes probabilities or any scores: `route` passes ρ for the live router and the scores
  p + b for PR2's predicted route.
  Raises ValueError unless k is an int in [1, E] (static) and, on concrete scores, for a NaN
  or infinite one."""
  probs_NE = as_array(probs_NE)
  check_top_k(k, probs_NE, "probs_NE")
  check_finite("probs_NE", probs_NE, "scores to rank")  # when concrete: top-k ranks NaN silently
  return _top_k(probs_NE, k)


def _top_k(scores_NE: jax.Array, k: int) -> jax.Array:
  """Unchecked `top_k_experts`, for `route`, which checked its inputs (or was told not to)."""
  return jax.lax.top_k(scores_NE, k)[1].astype(jnp.int32)


def _check_ids_shape(probs_NE, expert_ids_NK) -> None:
  """Static: ids [..., K] on probs [..., E]'s leading axes (a jax gather broadcasts or fails
  obscurely otherwise)."""
  if np.ndim(probs_NE) == 0 or np.ndim(expert_ids_NK) == 0:
    raise ValueError(f"probs_NE {np.shape(probs_NE)} and expert_ids_NK "
                     f"{np.shape(expert_ids_NK)} must have an axis each: [..., E], [..., K]")
  check_shape("expert_ids_NK", expert_ids_NK,
              np.shape(probs_NE)[:-1] + np.shape(expert_ids_NK)[-1:],
              "probs_NE's leading axes + (K,)")


def gates_at(probs_NE: jax.Array, expert_ids_NK: jax.Array, norm_topk_prob: bool,
             logits_NE: jax.Array | None = None) -> jax.Array:
  """Gates g_j = ρ_j (or ρ_j / Σ_{i∈I} ρ_i) gathered from the full softmax at `expert_ids`.

  A normalised row whose chosen ρ sum below 1e-18 (chosen logits ~40 or more below the top
  one) is softmax over the chosen `logits_NE` (the same value, computed in log space), or 0
  without logits: ρ_j / Σρ there is 0/0 = NaN, or its gradient -ρ_j / (Σρ)² overflows, and
  either poisons the whole step's gradient.

  Raises ValueError on shapes that disagree (static), on concrete ids outside [0, E) (a
  gather gives them gate 0 silently) and on a concrete `probs_NE` row that is not a
  distribution (NaN, inf or negative, or not summing to 1 within 0.01: logits passed by
  mistake would be gathered as gates).
  """
  probs_NE, expert_ids_NK = as_array(probs_NE), as_array(expert_ids_NK)
  logits_NE = None if logits_NE is None else as_array(logits_NE)
  _check_ids_shape(probs_NE, expert_ids_NK)
  if logits_NE is not None:
    check_shape("logits_NE", logits_NE, np.shape(probs_NE), "probs_NE's shape")
  check_int_dtype("expert_ids_NK", expert_ids_NK)
  check_ids(expert_ids_NK, "expert_ids_NK", 0, np.shape(probs_NE)[-1], "num_experts")
  check_distribution("probs_NE", probs_NE, "the router's softmax ρ over the experts")
  return _gates_at(probs_NE, expert_ids_NK, norm_topk_prob, logits_NE)


def _gates_at(probs_NE, expert_ids_NK, norm_topk_prob, logits_NE):
  # Unchecked: `route` and `replay_gates` pass ids they produced or checked themselves.
  g_NK = jnp.take_along_axis(probs_NE, expert_ids_NK, axis=-1)
  if not norm_topk_prob:
    return g_NK
  total_N1 = jnp.sum(g_NK, axis=-1, keepdims=True)
  ok_N1 = total_N1 > _MIN_GATE_SUM
  g_NK = g_NK / jnp.where(ok_N1, total_N1, 1.0)  # the usual path, bit for bit
  if logits_NE is None:
    return jnp.where(ok_N1, g_NK, 0.0)
  chosen_NK = jnp.take_along_axis(logits_NE.astype(jnp.float32), expert_ids_NK, axis=-1)
  return jnp.where(ok_N1, g_NK, jax.nn.softmax(chosen_NK, axis=-1))


def check_route_rows(routes, num_experts: int, *, name: str = "routes", row: str = "row",
                     allow_live: bool = True) -> None:
  """Concrete routes [..., K] (a no-op on tracers): every row is all -1 (live router, if
  `allow_live`) or K distinct ids in [0, num_experts); raises ValueError naming the row.

  A bad id is not an error downstream: gathers clamp or wrap it, or return NaN."""
  if not is_concrete(routes):
    return
  r = np.asarray(routes)
  check_int_dtype(name, r, "int32 expert ids", ValueError)
  low = LIVE if allow_live else 0
  if np.any(r < low):
    raise ValueError(f"{name} has value {int(r.min())} < {low}" + (
        "; -1 (live router) is the only negative allowed" if allow_live else
        "; every row must be replayed here (no -1 rows)"))
  if np.any(r >= num_experts):
    raise ValueError(f"{name} has expert id {int(r.max())} >= num_experts={num_experts}")
  live = r < 0
  partial = live.any(-1) & ~live.all(-1)
  if np.any(partial):
    idx = tuple(int(i) for i in np.argwhere(partial)[0])
    raise ValueError(f"{name} {row}={idx} mixes -1 and expert ids: {r[idx].tolist()}; "
                     "a row is either all -1 (live) or K expert ids")
  srt = np.sort(r, axis=-1)
  dup = np.any((srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0), axis=-1)
  if np.any(dup):
    idx = tuple(int(i) for i in np.argwhere(dup)[0])
    raise ValueError(f"{name} {row}={idx} repeats an expert: {r[idx].tolist()}")


def _check_route_args(logits_NE, k: int, routes_NK, name: str, allow_live: bool,
                      values: bool = True) -> None:
  check_top_k(k, logits_NE, "logits_NE")
  num_experts = logits_NE.shape[-1]
  if values:  # a NaN or inf logit (a row of -inf too) gives NaN gates, silently
    check_finite("logits_NE", logits_NE, "router logits")
  if routes_NK is None:
    return
  expected = tuple(logits_NE.shape[:-1]) + (k,)
  if tuple(jnp.shape(routes_NK)) != expected:  # static: no broadcasting a [K] row to all
    raise ValueError(f"{name} has shape {tuple(jnp.shape(routes_NK))}, expected the logits' "
                     f"leading axes + (k,) = {expected}")
  # Static, unlike check_route_rows' same message: under jit a float id was truncated silently.
  check_int_dtype(name, routes_NK, "int32 expert ids", ValueError)
  if values:
    check_route_rows(routes_NK, num_experts, name=name, allow_live=allow_live)


def route(logits_NE: jax.Array, k: int, norm_topk_prob: bool,
          routes_NK: jax.Array | None = None, bias_NE: jax.Array | None = None,
          predicted_gates: bool = True, check_values: bool = True) -> Routing:
  """Top-k routing with optional replay and PR2 prediction.

  Args:
    logits_NE: float router logits p [..., E].
    k: experts per token (an int, not a bool).
    norm_topk_prob: renormalise gates over the chosen set.
    routes_NK: optional integer replayed expert ids; rows of -1 use the live top-k.
    bias_NE: optional PR2 predictor bias b = h W_p, logits_NE's shape: the live choice becomes
      TopK(softmax(p + b)) (the predicted route); replayed rows are unaffected.
    predicted_gates: with a bias, gate the predicted rows by the predictive
      distribution q̂ (the paper's rollout choice) rather than the router's ρ.
    check_values: check concrete logits, bias and routes' values (False: the caller already
      did, e.g. `MoETransformer` with `validate_routes`; shapes are always checked).

  Returns:
    Routing(expert_ids, gates, probs) with the experts actually used; `probs`
    is always the router's own ρ = softmax(p).

  Raises:
    ValueError: `k` outside [1, E]; `routes_NK` not of shape logits[:-1] + (k,) or not of an
      integer dtype, or `bias_NE` not of the logits' shape (static); on concrete values, a NaN
      or inf logit or bias, or a route row neither all -1 nor K distinct ids in [0, E). `k`
      and `norm_topk_prob` are static under jit.
  """
  # Array-likes (nested lists) work too, as in loads_from_routes.
  logits_NE = as_array(logits_NE)
  routes_NK = None if routes_NK is None else as_array(routes_NK)
  bias_NE = None if bias_NE is None else as_array(bias_NE)
  _check_route_args(logits_NE, k, routes_NK, "routes_NK", allow_live=True, values=check_values)
  if bias_NE is not None:  # exact: a [E] bias would broadcast to every token
    check_shape("bias_NE", bias_NE, jnp.shape(logits_NE), "logits_NE's shape")
    if check_values:
      check_finite("bias_NE", bias_NE, "predictor bias")
  probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  # Live rows without a bias take the top-k of ρ, as transformers' Qwen3-MoE and the inference
  # engines do (torch.topk of the float32 softmax, ties to the lower id): the logits' order
  # except where ρ underflows to tied zeros ~100 below the top, and there the same experts as
  # theirs. A bias (PR2's predicted route) takes the top-k of the scores p + b instead, as
  # `predicted_topk`: a strong bias can spread them that far, and the next-best experts are
  # the prediction, not the lowest ids.
  # gate_NE: the distribution live rows are gated by; gate_logits_NE: the logits it came from.
  live_NK, gate_NE, gate_logits_NE = None, probs_NE, logits_NE
  if bias_NE is None:
    live_NK = _top_k(probs_NE, k)
  else:
    scores_NE = logits_NE.astype(jnp.float32) + bias_NE
    live_NK = _top_k(scores_NE, k)
    if predicted_gates:
      gate_NE, gate_logits_NE = jax.nn.softmax(scores_NE, axis=-1), scores_NE
  if routes_NK is None:
    return Routing(live_NK, _gates_at(gate_NE, live_NK, norm_topk_prob, gate_logits_NE), probs_NE)
  # Replayed rows keep the replay rule whatever the bias: gates are ρ at the recorded ids.
  replay_N1 = routes_NK[..., :1] >= 0
  ids_NK = jnp.where(replay_N1, routes_NK.astype(jnp.int32), live_NK)
  gates_NK = jnp.where(replay_N1, _gates_at(probs_NE, ids_NK, norm_topk_prob, logits_NE),
                       _gates_at(gate_NE, ids_NK, norm_topk_prob, gate_logits_NE))
  return Routing(ids_NK, gates_NK, probs_NE)


def replay_gates(logits_NE: jax.Array, routes_NK: jax.Array, norm_topk_prob: bool) -> jax.Array:
  """Gates of a fully replayed route (no -1 rows) from the live logits, float32 [..., K].

  `routes_NK` must have the logits' leading axes, K ids per row and an integer dtype (static
  checks); concrete routes must hold K distinct ids in [0, E) per row and concrete logits be
  finite (ValueError otherwise)."""
  logits_NE, routes_NK = as_array(logits_NE), as_array(routes_NK)
  _check_route_args(logits_NE, jnp.shape(routes_NK)[-1] if jnp.ndim(routes_NK) else 0,
                    routes_NK, "routes_NK", allow_live=False)
  probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
  return _gates_at(probs_NE, routes_NK.astype(jnp.int32), norm_topk_prob, logits_NE)


def expert_load(expert_ids_NK: jax.Array, num_experts: int,
                mask_N: jax.Array | None = None) -> jax.Array:
  """Number of (token, k) pairs sent to each expert, float32 [E]; masked tokens excluded.

  Ids must have an integer dtype (static: a float is truncated, also under jit); concrete ids
  outside [0, E) raise (one_hot would count them nowhere, silently)."""
  expert_ids_NK = as_array(expert_ids_NK)
  mask_N = None if mask_N is None else as_array(mask_N)
  check_int_dtype("expert_ids_NK", expert_ids_NK)
  check_ids(expert_ids_NK, "expert_ids_NK", 0, num_experts, "num_experts")
  onehot_NKE = jax.nn.one_hot(expert_ids_NK, num_experts, dtype=jnp.float32)
  if mask_N is not None:  # exact shape: a [N, 1] mask broadcast over K counted pairs N times
    check_shape("mask_N", mask_N, jnp.shape(expert_ids_NK)[:-1], "the ids' leading axes")
    check_finite("mask_N", mask_N, MASK_WHY, low=0)
    onehot_NKE = onehot_NKE * mask_N[..., None, None].astype(jnp.float32)
  return onehot_NKE.reshape(-1, num_experts).sum(0)


def switch_aux_loss(probs_NE: jax.Array, expert_ids_NK: jax.Array,
                    mask_N: jax.Array | None = None) -> jax.Array:
  """Switch-Transformer load-balancing loss E·Σ_e f_e·P_e (1.0 when perfectly even), over the
  tokens `mask_N` keeps (all if None): padding is not routed work and must not be balanced.
  expert_ids_NK [..., K] must have probs_NE [..., E]'s leading axes (static check)."""
  probs_NE, expert_ids_NK = as_array(probs_NE), as_array(expert_ids_NK)
  _check_ids_shape(probs_NE, expert_ids_NK)
  check_distribution("probs_NE", probs_NE, "the router's softmax ρ over the experts")
  num_experts, k = probs_NE.shape[-1], expert_ids_NK.shape[-1]
  if mask_N is None:
    mask_N = jnp.ones(expert_ids_NK.shape[:-1], jnp.float32)
  mask_N = as_array(mask_N)  # expert_load checks its shape and values
  mask_N = mask_N.astype(jnp.float32)
  tokens = jnp.maximum(jnp.sum(mask_N), 1.0)
  f_E = expert_load(expert_ids_NK, num_experts, mask_N) / (tokens * k)
  p_E = jnp.sum((probs_NE * mask_N[..., None]).reshape(-1, num_experts), axis=0) / tokens
  return num_experts * jnp.sum(f_E * p_E)


def check_routes_shape(routes, *, batch: int, length: int, num_layers: int, top_k: int) -> None:
  """Static check of a routes array's shape `[B, T, L, K]` and integer dtype (works on tracers):
  int32 or any other integer dtype, e.g. numpy's default int64 (np.argsort); not float or bool."""
  expected = (batch, length, num_layers, top_k)
  if not hasattr(routes, "shape"):  # a nested list read as shape ()
    raise ValueError(f"routes must be an int array [B, T, L, K] = {expected} (numpy or jax), "
                     f"got a {type(routes).__name__}")
  shape = tuple(routes.shape)
  if shape != expected:
    raise ValueError(f"routes has shape {shape}, expected [B, T, L, K] = {expected} (L: the "
                     "MoE layers, ModelConfig.num_moe_layers)")
  check_int_dtype("routes", routes, "int32 or another integer dtype", ValueError)


def validate_routes(routes, *, batch: int, length: int, num_layers: int, top_k: int,
                    num_experts: int) -> None:
  """Host-side check of a routes array `[B, T, L, K]`; raises ValueError naming the problem.

  Each (token, layer) row must be all -1 (live router) or K distinct ids in
  [0, num_experts), of any integer dtype (int32, numpy's int64, ...). L counts the MoE
  layers only (`ModelConfig.num_moe_layers`: `dense_layers` have no router). Runs on host
  numpy: call it before jit, not inside (a traced `routes` is a TypeError).
  """
  check_routes_shape(routes, batch=batch, length=length, num_layers=num_layers, top_k=top_k)
  require_concrete("routes", routes, "validate_routes")
  check_route_rows(routes, num_experts, row="row (b, t, l)")
