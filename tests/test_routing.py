"""Routing as pure functions: softmax/top-k/gates by hand, replay, -1 rows, load, aux loss,
validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.models import routing

# Logits whose softmax is exactly the probabilities we wrote down (log-probs).
PROBS = np.array([[0.1, 0.2, 0.3, 0.4],
                  [0.5, 0.1, 0.15, 0.25],
                  [0.25, 0.25, 0.25, 0.25]], np.float32)
LOGITS = np.log(PROBS)


def test_router_logits_is_float32_matmul():
  """p = x W_r computed in float32 even from bfloat16 activations."""
  x = np.array([[1.0, 2.0], [-1.0, 0.5]], np.float32)
  w = np.array([[1.0, 0.0, -1.0], [0.5, 2.0, 1.0]], np.float32)
  out = routing.router_logits(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, [[2.0, 4.0, 1.0], [-0.75, 1.0, 1.5]], rtol=1e-6)


def test_top_k_hand_worked_with_ties_to_lower_index():
  """Top-2 ids by hand: [3,2], [0,3]; a full tie picks the lower indices [0,1]."""
  ids = routing.top_k_experts(jnp.asarray(PROBS), 2)
  assert ids.dtype == jnp.int32
  np.testing.assert_array_equal(ids, [[3, 2], [0, 3], [0, 1]])


@pytest.mark.parametrize("norm, expected", [
    (False, [[0.4, 0.3], [0.5, 0.25], [0.25, 0.25]]),
    (True, [[4 / 7, 3 / 7], [2 / 3, 1 / 3], [0.5, 0.5]]),
])
def test_route_live_hand_worked(norm, expected):
  """Live routing: softmax of log-probs gives the probs back; gates are ρ or ρ renormalised."""
  r = routing.route(jnp.asarray(LOGITS), 2, norm)
  np.testing.assert_allclose(r.probs, PROBS, rtol=1e-6)
  np.testing.assert_array_equal(r.expert_ids, [[3, 2], [0, 3], [0, 1]])
  np.testing.assert_allclose(r.gates, expected, rtol=1e-6)


def test_route_matches_numpy_oracle_on_random_logits():
  """Probabilities, ids and gates equal a numpy softmax/argsort/gather oracle."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7, 8)).astype(np.float32) * 3
  r = routing.route(jnp.asarray(logits), 3, True)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ids = np.argsort(-probs, axis=-1, kind="stable")[..., :3]
  gates = np.take_along_axis(probs, ids, -1)
  np.testing.assert_allclose(r.probs, probs, rtol=1e-5)
  np.testing.assert_array_equal(r.expert_ids, ids)
  np.testing.assert_allclose(r.gates, gates / gates.sum(-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize("norm, expected", [
    (False, [[0.1, 0.2], [0.1, 0.15], [0.25, 0.25]]),
    (True, [[1 / 3, 2 / 3], [0.4, 0.6], [0.5, 0.5]]),
])
def test_replay_gathers_gates_from_full_softmax(norm, expected):
  """Replayed experts outside the live top-k get their true probability, not zero."""
  routes = jnp.array([[0, 1], [1, 2], [3, 2]], jnp.int32)  # none equal to the live top-2 sets
  r = routing.route(jnp.asarray(LOGITS), 2, norm, routes)
  np.testing.assert_array_equal(r.expert_ids, routes)
  np.testing.assert_allclose(r.gates, expected, rtol=1e-6)
  np.testing.assert_allclose(routing.replay_gates(jnp.asarray(LOGITS), routes, norm), expected,
                             rtol=1e-6)


def test_replay_gives_router_gradient_through_replayed_experts():
  """d(gate of a replayed, non-top-k expert)/d(its logit) = ρ(1-ρ) (no norm), not 0."""
  routes = jnp.array([[0, 1]], jnp.int32)  # live top-2 would be [3, 2]
  logits = jnp.asarray(LOGITS[:1])
  grad = jax.grad(lambda l: routing.route(l, 2, False, routes).gates[0, 0])(logits)
  # softmax Jacobian row for expert 0: ρ0(δ0j - ρj)
  expected = 0.1 * (np.eye(4)[0] - PROBS[0])
  np.testing.assert_allclose(grad[0], expected, rtol=1e-5, atol=1e-7)


def test_minus_one_rows_are_the_live_router():
  """Rows of -1 take exactly the live ids and gates; replayed rows keep their ids."""
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 6, 8)).astype(np.float32))
  live = routing.route(logits, 2, True)
  routes = np.full((2, 6, 2), -1, np.int32)
  replayed = np.array([[5, 6], [7, 0], [1, 4]], np.int32)
  routes[0, :3] = replayed
  mixed = routing.route(logits, 2, True, jnp.asarray(routes))
  all_live = routing.route(logits, 2, True, jnp.full((2, 6, 2), -1, jnp.int32))
  np.testing.assert_array_equal(all_live.expert_ids, live.expert_ids)
  np.testing.assert_array_equal(all_live.gates, live.gates)
  np.testing.assert_array_equal(mixed.expert_ids[0, :3], replayed)
  np.testing.assert_array_equal(mixed.expert_ids[0, 3:], live.expert_ids[0, 3:])
  np.testing.assert_array_equal(mixed.expert_ids[1], live.expert_ids[1])
  np.testing.assert_array_equal(mixed.gates[1], live.gates[1])
  np.testing.assert_allclose(mixed.gates[0, :3],
                             routing.replay_gates(logits[0, :3], jnp.asarray(replayed), True),
                             rtol=1e-6)


def test_route_jits_with_and_without_replay():
  """route is jittable and jit gives the same result as eager."""
  routes = jnp.array([[0, 1], [-1, -1], [3, 2]], jnp.int32)
  eager = routing.route(jnp.asarray(LOGITS), 2, True, routes)
  jitted = jax.jit(routing.route, static_argnums=(1, 2))(jnp.asarray(LOGITS), 2, True, routes)
  np.testing.assert_array_equal(jitted.expert_ids, [[0, 1], [0, 3], [3, 2]])
  np.testing.assert_allclose(jitted.gates, eager.gates, rtol=1e-6)


# --------------------------------------------------------------------------- PR2 prediction

# b = log(w) multiplies the probabilities by w, so q̂ = softmax(p + b) = ρ·w / Σ ρ·w by hand:
#   row 0: ρ·w = [.5, .2, .3, .2] / 1.2 -> q̂ = [5, 2, 3, 2] / 12, top-2 [0, 2] (live: [3, 2])
#   row 1: ρ·w = [.05, .6, .15, .25] / 1.05 -> q̂ = [1, 12, 3, 5] / 21, top-2 [1, 3] (live: [0, 3])
#   row 2: a constant bias changes nothing: q̂ = ρ uniform, top-2 [0, 1]
BIAS_W = np.array([[5.0, 1.0, 1.0, 0.5], [0.1, 6.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]])
BIAS = np.log(BIAS_W).astype(np.float32)
Q_HAT = np.array([[5 / 12, 2 / 12, 3 / 12, 2 / 12], [1 / 21, 12 / 21, 3 / 21, 5 / 21],
                  [0.25, 0.25, 0.25, 0.25]])
PREDICTED_IDS = [[0, 2], [1, 3], [0, 1]]


@pytest.mark.parametrize("predicted_gates, norm, expected", [
    (True, False, [[5 / 12, 3 / 12], [12 / 21, 5 / 21], [0.25, 0.25]]),    # q̂ at the ids
    (True, True, [[5 / 8, 3 / 8], [12 / 17, 5 / 17], [0.5, 0.5]]),
    (False, False, [[0.1, 0.3], [0.1, 0.25], [0.25, 0.25]]),               # ρ at the ids
    (False, True, [[0.25, 0.75], [2 / 7, 5 / 7], [0.5, 0.5]]),
])
def test_route_with_predictor_bias_hand_worked(predicted_gates, norm, expected):
  """With a bias b the ids are TopK(softmax(p + b)); gates are q̂ (predicted_gates) or ρ at those
  ids; `probs` stays the router's own ρ."""
  r = routing.route(jnp.asarray(LOGITS), 2, norm, bias_NE=jnp.asarray(BIAS),
                    predicted_gates=predicted_gates)
  np.testing.assert_array_equal(r.expert_ids, PREDICTED_IDS)
  np.testing.assert_allclose(r.gates, expected, rtol=1e-5)
  np.testing.assert_allclose(r.probs, PROBS, rtol=1e-6)


def test_route_with_bias_oracle_on_random_logits():
  """Random logits and bias: ids and q̂ gates equal a numpy softmax(p + b) oracle."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(6, 8)).astype(np.float32) * 2
  bias = rng.normal(size=(6, 8)).astype(np.float32) * 2
  q = np.exp(logits + bias - (logits + bias).max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  ids = np.argsort(-q, axis=-1, kind="stable")[:, :3]
  r = routing.route(jnp.asarray(logits), 3, False, bias_NE=jnp.asarray(bias))
  np.testing.assert_array_equal(r.expert_ids, ids)
  np.testing.assert_allclose(r.gates, np.take_along_axis(q, ids, -1), rtol=1e-5)
  assert not np.array_equal(ids, np.argsort(-logits, axis=-1, kind="stable")[:, :3])


@pytest.mark.parametrize("predicted_gates, live_gates", [(False, [0.1, 0.25]),
                                                          (True, [12 / 21, 5 / 21])])
def test_route_with_bias_keeps_replayed_ids(predicted_gates, live_gates):
  """A bias only changes the live (-1) rows' choice and gates; replayed rows keep their ids
  and the replay rule's gates, ρ at the replayed ids (DESIGN §2), whatever predicted_gates."""
  routes = jnp.array([[1, 3], [-1, -1], [2, 0]], jnp.int32)
  r = routing.route(jnp.asarray(LOGITS), 2, False, routes, jnp.asarray(BIAS),
                    predicted_gates=predicted_gates)
  np.testing.assert_array_equal(r.expert_ids, [[1, 3], [1, 3], [2, 0]])
  np.testing.assert_allclose(r.gates, [[0.2, 0.4], live_gates, [0.25, 0.25]], rtol=1e-5)


@pytest.mark.parametrize("with_bias,expected", [(False, [[0, 1]]), (True, [[0, 3]])],
                         ids=["live", "zero_bias"])
def test_route_ids_where_softmax_underflows(with_bias, expected):
  """Scores ~180 apart underflow ρ (and q̂) to exact zeros below the top expert. The live
  router takes the top-k of ρ as transformers does (torch.topk of the float32 softmax: the tie
  goes to the lower id, [[0, 1]]); a bias, PR2's predicted route, takes the top-k of the
  scores p + b (as `predicted_topk`), the second-largest logit 34: [[0, 3]]. Gates alike."""
  logits = jnp.asarray([[150.0, -29.0, 3.0, 34.0, -5.0, 0.0]])
  bias = jnp.zeros_like(logits) if with_bias else None
  for norm in (True, False):
    r = routing.route(logits, 2, norm, bias_NE=bias)
    np.testing.assert_array_equal(r.expert_ids, expected)
    np.testing.assert_allclose(r.gates, [[1.0, 0.0]], atol=1e-6)


def test_expert_load_counts_pairs_and_respects_mask():
  """Load counts (token, k) pairs per expert; masked tokens (padding) are excluded."""
  ids = jnp.array([[0, 1], [1, 2], [3, 0]], jnp.int32)
  np.testing.assert_array_equal(routing.expert_load(ids, 5), [2, 2, 1, 1, 0])
  np.testing.assert_array_equal(routing.expert_load(ids, 5, jnp.array([1, 0, 1])), [2, 1, 0, 1, 0])
  np.testing.assert_array_equal(
      routing.expert_load(ids.reshape(1, 3, 2), 5, jnp.array([[True, True, False]])),
      [1, 2, 1, 0, 0])


def test_switch_aux_loss_uniform_is_one_and_collapsed_is_num_experts():
  """E·Σ f_e P_e = 1 for perfectly even routing; E when everything goes to one expert."""
  uniform = jnp.full((4, 4), 0.25)
  np.testing.assert_allclose(routing.switch_aux_loss(uniform,
                                                     jnp.array([[0, 1], [2, 3], [1, 0], [3, 2]])),
                             1.0,
                             rtol=1e-6)
  onehot = jnp.tile(jnp.array([[1.0, 0, 0, 0]]), (4, 1))
  np.testing.assert_allclose(routing.switch_aux_loss(onehot, jnp.zeros((4, 1), jnp.int32)), 4.0,
                             rtol=1e-6)
  # Hand example: f = [3/4, 1/4, 0, 0], P = [0.5, 0.3, 0.1, 0.1] -> 4 * (0.375 + 0.075) = 1.8
  probs = jnp.tile(jnp.array([[0.5, 0.3, 0.1, 0.1]]), (4, 1))
  np.testing.assert_allclose(routing.switch_aux_loss(probs, jnp.array([[0], [0], [0], [1]])), 1.8,
                             rtol=1e-6)


# --------------------------------------------------------------------------- validate_routes

SHAPE = dict(batch=2, length=3, num_layers=2, top_k=2, num_experts=4)


def _good():
  r = np.full((2, 3, 2, 2), -1, np.int32)
  r[0, 0, 0] = [3, 1]
  r[1, 2, 1] = [0, 2]
  return r


def test_validate_routes_accepts_valid_numpy_and_jax():
  """All -1 rows, distinct in-range ids, numpy or jax int32, or numpy's default int64 (what
  np.argsort returns): no error."""
  routing.validate_routes(_good(), **SHAPE)
  routing.validate_routes(jnp.asarray(_good()), **SHAPE)
  for dtype in (np.int64, np.int16):
    routing.validate_routes(_good().astype(dtype), **SHAPE)
  with pytest.raises(ValueError, match=r"routes has expert id 4 >= num_experts=4"):
    routing.validate_routes(_set(_good(), (0, 1, 0), [4, 0]).astype(np.int64), **SHAPE)


@pytest.mark.parametrize("make, pattern", [
    (lambda r: r[:, :2],
     r"routes has shape \(2, 2, 2, 2\), expected \[B, T, L, K\] = \(2, 3, 2, 2\) \(L: the MoE "
     r"layers, ModelConfig.num_moe_layers\)"),
    (lambda r: r[..., None], r"routes has shape .* expected"),
    (lambda r: r.astype(bool), r"routes has dtype bool, expected int32 or another integer"),
    (lambda r: r.astype(np.float32), r"routes has dtype float32, expected int32"),
    (lambda r: r.tolist(), r"routes must be an int array \[B, T, L, K\] = .* got a list"),
    (lambda r: _set(r, (0, 1, 0), [-2, -2]), r"value -2 < -1"),
    (lambda r: _set(r, (0, 1, 0), [4, 0]), r"expert id 4 >= num_experts=4"),
    (lambda r: _set(r, (1, 0, 1), [-1, 2]),
     r"row \(b, t, l\)=\(1, 0, 1\) mixes -1 and expert ids: \[-1, 2\]"),
    (lambda r: _set(r, (0, 2, 1), [3, 3]),
     r"row \(b, t, l\)=\(0, 2, 1\) repeats an expert: \[3, 3\]"),
])
def test_validate_routes_rejects(make, pattern):
  """Wrong shape, dtype, range, mixed rows and repeats each raise a ValueError naming the
  problem."""
  with pytest.raises(ValueError, match=pattern):
    routing.validate_routes(make(_good()), **SHAPE)


def test_check_routes_shape_works_on_tracers():
  """The static part (shape, int32) also runs inside jit, where values are unknown."""
  dims = {k: v for k, v in SHAPE.items() if k != "num_experts"}
  check = lambda r: routing.check_routes_shape(r, **dims) or r
  jax.eval_shape(check, jnp.asarray(_good()))
  with pytest.raises(ValueError, match=r"routes has shape \(2, 3, 1, 2\), "
                                       r"expected \[B, T, L, K\] = \(2, 3, 2, 2\)"):
    jax.eval_shape(check, jnp.asarray(_good())[:, :, :1])
  with pytest.raises(ValueError, match=r"routes has dtype float32, expected int32"):
    jax.eval_shape(check, jnp.asarray(_good(), jnp.float32))


def _set(r, idx, row):
  r = r.copy()
  r[idx] = row
  return r


def test_expert_load_rejects_ids_outside_the_experts():
  with pytest.raises(ValueError, match=r"expert_ids_NK\[0, 1\] = 9 is outside "
                                       r"\[0, num_experts=8\)"):
    routing.expert_load(jnp.asarray([[0, 9]], jnp.int32), 8)
  np.testing.assert_array_equal(jax.jit(routing.expert_load, static_argnums=1)(
      jnp.asarray([[0, 3], [3, 1]], jnp.int32), 4), [1, 1, 0, 2])


@pytest.mark.parametrize("routes, match", [
    ([[7, 0], [1, 2], [0, 1]], r"routes_NK has expert id 7 >= num_experts=4"),
    ([[-2, 0], [1, 2], [0, 1]], r"routes_NK has value -2 < -1"),
    ([[0, -1], [1, 2], [0, 1]], r"routes_NK row=\(0,\) mixes -1 and expert ids: \[0, -1\]"),
    ([[2, 2], [1, 2], [0, 1]], r"routes_NK row=\(0,\) repeats an expert: \[2, 2\]"),
    ([2, 1], r"routes_NK has shape \(2,\), expected the logits' leading axes \+ \(k,\) = \(3, 2\)"),
    ([[0, 1, 2]] * 3, r"routes_NK has shape \(3, 3\), expected .* = \(3, 2\)"),
])
def test_route_refuses_bad_replayed_routes_eagerly(routes, match):
  """Gathers do not fail on bad ids: id 7 gave NaN gates, -2 wrapped to expert 2, a [K] row
  was broadcast to every token."""
  with pytest.raises(ValueError, match=match):
    routing.route(jnp.asarray(LOGITS), 2, True, routes_NK=jnp.asarray(routes, jnp.int32))


def test_replay_gates_refuses_live_rows_and_bad_ids():
  with pytest.raises(ValueError, match=r"value -1 < 0; every row must be replayed"):
    routing.replay_gates(jnp.asarray(LOGITS), jnp.full((3, 2), -1, jnp.int32), True)
  with pytest.raises(ValueError, match=r"expert id 9 >= num_experts=4"):
    routing.replay_gates(jnp.asarray(LOGITS), jnp.asarray([[9, 0]] * 3, jnp.int32), True)
  with pytest.raises(ValueError, match=r"k=0 must be an int in \[1, num_experts=4\]"):
    routing.route(jnp.asarray(LOGITS), 0, True)


def test_bad_routes_are_only_shape_checked_under_jit():
  """Under jit the values cannot be read without a host sync: callers validate first."""
  fn = jax.jit(lambda r: routing.replay_gates(jnp.asarray(LOGITS), r, True))
  # Valid routes still give the normalised gates under jit: experts (3, 2) of each PROBS row,
  # p_3 / (p_3 + p_2): 0.4 / 0.7, 0.25 / 0.4, 0.25 / 0.5.
  np.testing.assert_allclose(fn(jnp.asarray([[3, 2]] * 3, jnp.int32)),
                             [[4 / 7, 3 / 7], [0.625, 0.375], [0.5, 0.5]], rtol=1e-6)
  with pytest.raises(ValueError, match=r"has shape \(3, 1\)"):
    jax.jit(lambda r: routing.route(jnp.asarray(LOGITS), 2, True, routes_NK=r))(
        jnp.zeros((3, 1), jnp.int32))


def test_normalised_gates_of_underflowed_experts_are_their_softmax_not_nan():
  """Replayed experts ~120 below the top logit: ρ underflows to 0 for both, and ρ_j / Σρ was
  0/0. The gates are softmax over the chosen logits, [0, -1] -> [0.731, 0.269], with a
  finite gradient; rows that do not underflow keep the usual value bit for bit."""
  logits = jnp.asarray([[120.0, 0.0, -1.0, 1.0], [1.0, 2.0, 0.5, 2.0]])
  routes = jnp.asarray([[1, 2], [1, 3]], jnp.int32)
  gates = routing.replay_gates(logits, routes, True)
  e = np.exp([0.0, -1.0])
  np.testing.assert_allclose(gates[0], e / e.sum(), rtol=1e-6)
  rho = jax.nn.softmax(logits[1])
  assert np.array_equal(gates[1], np.asarray(rho[jnp.asarray([1, 3])] / (rho[1] + rho[3])))
  grad = jax.grad(lambda p: routing.route(p, 2, True, routes_NK=routes).gates[:, 0].sum())(logits)
  # The first gate is a sigmoid of the two chosen logits' gap, g = σ(l_a - l_b), so its
  # gradient is ±g (1 - g) on those two and 0 elsewhere (the top logit 120 cancels out).
  # Row 0: g = σ(0 - (-1)) = 0.7311, g (1 - g) = 0.19661; row 1: g = σ(2 - 2) = 0.5 -> 0.25.
  s = 1 / (1 + np.exp(-1.0))
  a = s * (1 - s)
  np.testing.assert_allclose(grad, [[0, a, -a, 0], [0, 0.25, 0, -0.25]], rtol=1e-5, atol=1e-7)
  assert np.all(routing.gates_at(jax.nn.softmax(logits), routes, True)[0] == 0)  # no logits


def test_expert_load_refuses_a_mask_of_another_shape():
  """A [N, 1] mask gave loads [2, 6, 2, 2] for a true [1, 2, 0, 1]."""
  ids = jnp.asarray([[0, 1], [1, 3], [2, 0]], jnp.int32)
  mask = jnp.asarray([1.0, 1.0, 0.0])
  np.testing.assert_array_equal(routing.expert_load(ids, 4, mask), [1, 2, 0, 1])
  with pytest.raises(ValueError, match=r"mask_N has shape \(3, 1\), expected the ids' leading"):
    routing.expert_load(ids, 4, mask[:, None])


def test_switch_aux_loss_leaves_masked_tokens_out():
  """Padding is not routed work: with the last two tokens masked, f = [1/2, 1/2, 0, 0] over
  the two real tokens (top-1) and P = mean of their probs [0.5, 0.3, 0.1, 0.1]:
  4 * (0.5 * 0.5 + 0.5 * 0.3) = 1.6; the padding's collapsed routes do not count, nor its
  probs: they give the used experts 0 and 1 mass, so counting them in P gives 2.0."""
  probs = jnp.asarray([[0.6, 0.2, 0.1, 0.1], [0.4, 0.4, 0.1, 0.1],
                       [0.1, 0.1, 0.1, 0.7], [0.1, 0.1, 0.1, 0.7]])
  ids = jnp.asarray([[0], [1], [3], [3]], jnp.int32)
  mask = jnp.asarray([True, True, False, False])
  np.testing.assert_allclose(routing.switch_aux_loss(probs, ids, mask), 1.6, rtol=1e-6)
  np.testing.assert_allclose(routing.switch_aux_loss(probs[:2], ids[:2]), 1.6, rtol=1e-6)


@pytest.mark.parametrize("gap", [20.0, 50.0, 60.0, 80.0, 86.0, 100.0])
def test_replayed_gates_have_a_finite_gradient_far_below_the_top_logit(gap):
  """ρ / Σρ's gradient -ρ / (Σρ)² overflowed to inf (NaN for the whole step) once Σρ fell below
  ~1e-19, well before Σρ itself underflows: between ~44 and ~87 logits below the top."""
  logits = jnp.asarray([[0.0, -gap, -gap - 1.0, -gap - 2.0]])
  routes = jnp.asarray([[1, 2]], jnp.int32)
  fn = lambda p: routing.route(p, 2, True, routes_NK=routes).gates[:, 0].sum()
  np.testing.assert_allclose(fn(logits), 1 / (1 + np.exp(-1.0)), rtol=1e-6)
  for grad in (jax.grad(fn)(logits), jax.jit(jax.grad(fn))(logits)):
    assert np.all(np.isfinite(grad)), grad
    np.testing.assert_allclose(grad[0, 1], np.exp(-1.0) / (1 + np.exp(-1.0)) ** 2, rtol=1e-5)


# --------------------------------------------------------------------------- bad arguments

def test_router_logits_refuse_a_d_mismatch():
  """A D mismatch failed inside opt_einsum."""
  with pytest.raises(ValueError, match=r"x_ND has shape \(4, 3\), expected \[\.\.\., D\] with D "
                                       r"of w_DE = \(4, 5\)"):
    routing.router_logits(jnp.ones((4, 3)), jnp.ones((5, 6)))
  with pytest.raises(ValueError, match=r"w_DE has shape \(5, 6, 1\), expected rank 2"):
    routing.router_logits(jnp.ones((4, 5)), jnp.ones((5, 6, 1)))
  np.testing.assert_array_equal(routing.router_logits(jnp.ones((4, 5)), jnp.ones((5, 6))),
                                np.full((4, 6), 5.0))


@pytest.mark.parametrize("k", [0, 5, True, 2.0])
def test_top_k_experts_wants_k_in_one_to_num_experts(k):
  """k > E was a raw lax error, k = 0 an empty result, True silently k = 1."""
  with pytest.raises(ValueError, match=rf"k={k!r} must be an int in \[1, num_experts=4\]"):
    routing.top_k_experts(jnp.asarray(PROBS), k)
  with pytest.raises(ValueError, match=rf"k={k!r} must be an int in \[1, num_experts=4\]"):
    routing.route(jnp.asarray(LOGITS), k, True)
  np.testing.assert_array_equal(routing.top_k_experts(jnp.asarray(PROBS), 2),
                                jax.lax.top_k(jnp.asarray(PROBS), 2)[1])


def test_gates_at_refuses_ids_outside_the_experts_and_shapes_that_disagree():
  """An eager id >= E gave gate 0 silently; an N mismatch failed in jax's indexing."""
  probs = jax.nn.softmax(jnp.asarray(LOGITS))
  with pytest.raises(ValueError, match=r"expert_ids_NK\[1, 0\] = 4 is outside "
                                       r"\[0, num_experts=4\)"):
    routing.gates_at(probs, jnp.asarray([[0, 1], [4, 2], [1, 2]]), True)
  with pytest.raises(ValueError, match=r"expert_ids_NK\[0, 1\] = -1 is outside"):
    routing.gates_at(probs, jnp.asarray([[0, -1], [3, 2], [1, 2]]), False)
  with pytest.raises(ValueError, match=r"expert_ids_NK has shape \(2, 2\), expected probs_NE's "
                                       r"leading axes \+ \(K,\) = \(3, 2\)"):
    routing.gates_at(probs, jnp.asarray([[0, 1], [3, 2]]), True)
  with pytest.raises(ValueError, match=r"logits_NE has shape \(3, 5\), expected probs_NE's shape"):
    routing.gates_at(probs, jnp.asarray([[0, 1]] * 3), True, jnp.zeros((3, 5)))
  ids = jnp.asarray([[0, 1], [3, 2], [1, 2]])
  np.testing.assert_allclose(routing.gates_at(probs, ids, False),
                             np.take_along_axis(np.asarray(probs), np.asarray(ids), -1))
  jitted = jax.jit(lambda i: routing.gates_at(probs, i, False))  # traced: shapes only
  assert jitted(jnp.asarray([[0, 9]] * 3)).shape == (3, 2)



def test_gates_at_refuses_a_probs_row_that_is_not_a_distribution():
  """Logits passed as probs_NE were gathered as gates (-2.3, -1.6), silently; routing_metrics
  already refused them. A softmax gives the same gates as before; under jit probs are not read."""
  ids = jnp.asarray([[0, 1], [3, 2], [1, 2]])
  with pytest.raises(ValueError, match=r"probs_NE\[0, 0\] = -2.3\d* is not a finite number >= 0 "
                                       r"\(the router's softmax"):
    routing.gates_at(jnp.asarray(LOGITS), ids, False)
  with pytest.raises(ValueError, match=r"probs_NE\[2\] sums to 1.25, expected 1: the router's "
                                       r"softmax ρ over the experts \(not its logits\)"):
    routing.gates_at(jnp.asarray(PROBS).at[2, 0].set(0.5), ids, True)
  with pytest.raises(ValueError, match=r"probs_NE\[1, 3\] = nan is not a finite number"):
    routing.gates_at(jnp.asarray(PROBS).at[1, 3].set(jnp.nan), ids, True)
  want = np.take_along_axis(PROBS, np.asarray(ids), -1)
  np.testing.assert_allclose(routing.gates_at(jnp.asarray(PROBS), ids, True),
                             want / want.sum(-1, keepdims=True), rtol=1e-6)
  traced = jax.jit(lambda p: routing.gates_at(p, ids, False))
  np.testing.assert_allclose(traced(jnp.asarray(PROBS)), want, rtol=1e-6)
  traced(jnp.asarray(LOGITS))  # unchecked by design: jitted callers pass their own softmax

@pytest.mark.parametrize("bias, match", [
    (np.zeros((6, 7), np.float32), r"bias_NE has shape \(6, 7\), expected logits_NE's shape = "
                                   r"\(3, 4\)"),
    (np.zeros(4, np.float32), r"bias_NE has shape \(4,\), expected logits_NE's shape"),
    (np.array([[0, np.nan, 0, 0]] * 3, np.float32), r"bias_NE\[0, 1\] = nan is not finite"),
])
def test_route_refuses_a_bias_of_another_shape_or_not_finite(bias, match):
  """(6, 7) was a raw TypeError; a [E] bias broadcast to every token silently."""
  with pytest.raises(ValueError, match=match):
    routing.route(jnp.asarray(LOGITS), 2, True, bias_NE=jnp.asarray(bias))
  r = routing.route(jnp.asarray(LOGITS), 2, True, bias_NE=jnp.zeros((3, 4)))
  live = routing.route(jnp.asarray(LOGITS), 2, True)
  np.testing.assert_array_equal(r.expert_ids, live.expert_ids)


@pytest.mark.parametrize("edit, match", [
    (lambda l: l.at[1, 2].set(jnp.nan), r"logits_NE\[1, 2\] = nan is not finite \(router logits\)"),
    (lambda l: l.at[2, 3].set(jnp.inf), r"logits_NE\[2, 3\] = inf is not finite"),
    (lambda l: l.at[1].set(-jnp.inf), r"logits_NE\[1, 0\] = -inf is not finite"),
])
def test_route_refuses_logits_that_are_not_finite_when_concrete(edit, match):
  """They returned NaN gates silently. Under jit values cannot be read: shapes only."""
  logits = edit(jnp.asarray(LOGITS))
  with pytest.raises(ValueError, match=match):
    routing.route(logits, 2, True)
  with pytest.raises(ValueError, match=match):
    routing.replay_gates(logits, jnp.asarray([[0, 1]] * 3, jnp.int32), True)
  routing.route(logits, 2, True, check_values=False)  # the caller's choice: not checked
  assert jax.jit(routing.route, static_argnums=(1, 2))(logits, 2, True).gates.shape == (3, 2)


def test_route_refuses_logits_without_an_expert_axis():
  """A scalar raised IndexError."""
  with pytest.raises(ValueError, match=r"logits_NE has shape \(\), expected \[\.\.\., E\]"):
    routing.route(jnp.float32(1.0), 1, True)


def test_route_accepts_int64_replayed_routes():
  """numpy's default int (np.argsort) replays exactly as int32."""
  routes = np.array([[0, 1], [-1, -1], [3, 2]])
  assert routes.dtype == np.int64
  r64 = routing.route(jnp.asarray(LOGITS), 2, True, routes_NK=routes)
  r32 = routing.route(jnp.asarray(LOGITS), 2, True, routes_NK=routes.astype(np.int32))
  np.testing.assert_array_equal(r64.expert_ids, r32.expert_ids)
  np.testing.assert_array_equal(r64.gates, r32.gates)
  with pytest.raises(ValueError, match=r"routes_NK has dtype float32, expected int32"):
    routing.route(jnp.asarray(LOGITS), 2, True, routes_NK=routes.astype(np.float32))


def test_switch_aux_loss_refuses_ids_of_other_tokens():
  """probs [6, 8] with ids [3, 2] was a raw TypeError."""
  with pytest.raises(ValueError, match=r"expert_ids_NK has shape \(3, 2\), expected probs_NE's "
                                       r"leading axes \+ \(K,\) = \(6, 2\)"):
    routing.switch_aux_loss(jnp.full((6, 8), 0.125), jnp.zeros((3, 2), jnp.int32))
  np.testing.assert_allclose(
      routing.switch_aux_loss(jnp.full((6, 8), 0.125), jnp.zeros((6, 2), jnp.int32)), 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_float_or_bool_ids_are_refused_under_jit_too(dtype):
  """The dtype is static: under jit float ids were truncated (route gave [[2, 0], [0, 1]] for
  [[2.9, 0.2], [0., 1.]]), since check_route_rows and check_ids read values only when concrete."""
  ids = np.array([[2.9, 0.2], [0.0, 1.0], [3.0, 1.0]]).astype(dtype)
  name = np.dtype(dtype).name
  cases = [
      (lambda r: routing.route(LOGITS, 2, True, routes_NK=r).expert_ids, ValueError,
       rf"routes_NK has dtype {name}, expected int32 expert ids"),
      (lambda r: routing.replay_gates(LOGITS, r, True), ValueError,
       rf"routes_NK has dtype {name}, expected int32 expert ids"),
      (lambda r: routing.expert_load(r, 4), TypeError,
       rf"expert_ids_NK has dtype {name}, expected an integer dtype"),
      (lambda r: routing.gates_at(jnp.asarray(PROBS), r, True), TypeError,
       rf"expert_ids_NK has dtype {name}, expected an integer dtype"),
  ]
  for fn, error, match in cases:
    with pytest.raises(error, match=match):
      fn(jnp.asarray(ids))
    with pytest.raises(error, match=match):
      jax.jit(fn)(jnp.asarray(ids))


def test_integer_ids_still_jit():
  """The static dtype check passes int32 (and numpy's int64) under jit: same values as eager."""
  ids = np.array([[2, 0], [0, 1], [3, 1]], np.int32)
  np.testing.assert_array_equal(jax.jit(lambda r: routing.expert_load(r, 4))(ids), [2, 2, 1, 1])
  got = jax.jit(lambda r: routing.replay_gates(LOGITS, r, False))(ids.astype(np.int64))
  np.testing.assert_allclose(got, [[0.3, 0.1], [0.5, 0.1], [0.25, 0.25]], rtol=1e-6)


def test_array_likes_work_like_the_arrays_they_spell():
  """Nested lists were an AttributeError ('list' object has no attribute 'shape'); they route
  like the arrays they spell (the PROBS rows: top-2 ids [3, 2], [0, 3], [0, 1])."""
  logits = LOGITS.tolist()
  r = routing.route(logits, 2, False, routes_NK=[[-1, -1], [1, 2], [-1, -1]])
  np.testing.assert_array_equal(r.expert_ids, [[3, 2], [1, 2], [0, 1]])
  np.testing.assert_allclose(r.gates, [[0.4, 0.3], [0.1, 0.15], [0.25, 0.25]], rtol=1e-6)
  np.testing.assert_allclose(routing.replay_gates(logits, [[0, 1], [1, 2], [3, 0]], True),
                             [[1 / 3, 2 / 3], [0.4, 0.6], [0.5, 0.5]], rtol=1e-6)
  np.testing.assert_array_equal(routing.expert_load([[0, 1], [1, 2]], 4, [1.0, 0.0]),
                                [1, 1, 0, 0])
  np.testing.assert_array_equal(routing.top_k_experts(PROBS.tolist(), 1), [[3], [0], [0]])


def test_top_k_experts_refuses_nan_scores_when_concrete():
  with pytest.raises(ValueError, match=r"probs_NE\[0, 1\] = nan is not finite \(scores to rank\)"):
    routing.top_k_experts(jnp.array([[0.1, jnp.nan, 0.3]]), 2)
  ids = jax.jit(routing.top_k_experts, static_argnums=1)(jnp.array([[0.1, 0.5, 0.3]]), 2)
  np.testing.assert_array_equal(ids, [[1, 2]])


def test_expert_load_and_aux_loss_check_their_masks_and_probabilities():
  ids = jnp.array([[0], [1]])
  for mask, shown in (([-1.0, 1.0], "-1.0"), ([jnp.nan, 1.0], "nan")):
    with pytest.raises(ValueError, match=rf"mask_N\[0\] = {shown} is not a finite number >= 0"):
      routing.expert_load(ids, 2, jnp.array(mask))
  np.testing.assert_array_equal(routing.expert_load(ids, 2, [1.0, 0.0]), [1.0, 0.0])  # a list
  with pytest.raises(ValueError, match=r"probs_NE\[0\] sums to 4.*\(not its logits\)"):
    routing.switch_aux_loss(jnp.array([[1.0, 3.0], [0.5, 0.5]]), ids)
  # Hand-worked: f = (1/2, 1/2), P = (0.75, 0.25): 2 · (0.375 + 0.125) = 1.
  probs = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  assert float(routing.switch_aux_loss(probs, ids, [1.0, 1.0])) == pytest.approx(1.0)
