"""Mismatch and routing metrics against hand-worked values; accumulation; JSON flattening."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.rl import metrics

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------
# Mismatch
# ----------------------------------------------------------------------------

def test_identical_logprobs_have_zero_mismatch():
  logp = jnp.array([[-1.0, -2.5, -0.1], [-3.0, -jnp.inf, -jnp.inf]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  m = metrics.mismatch_metrics(logp, logp, mask)
  assert float(m["k3_kl"]) == 0.0 and float(m["extreme_frac"]) == 0.0
  assert float(m["ratio_mean"]) == 1.0 and float(m["ratio_var"]) == 0.0


# Δ per token: ln2 + 0.01 (extreme), −(ln2 + 0.01) (extreme), ln2 − 0.01, 0; a masked Δ = 10.
HAND_DELTA = [LN2 + 0.01, -(LN2 + 0.01), LN2 - 0.01, 0.0, 10.0]
HAND_RATIO = [2 * math.exp(0.01), 0.5 * math.exp(-0.01), 2 * math.exp(-0.01), 1.0]
HAND_K3 = [r - 1 - d for r, d in zip(HAND_RATIO, HAND_DELTA)]  # 0.31695, 0.19817, 0.29695, 0


def test_mismatch_hand_worked():
  rollout = jnp.full((1, 5), -1.5)
  train = rollout + jnp.array([HAND_DELTA])
  mask = jnp.array([[1, 1, 1, 1, 0]], bool)
  m = jax.jit(metrics.mismatch_metrics)(train, rollout, mask)
  np.testing.assert_allclose(m["k3_kl"], np.mean(HAND_K3), rtol=1e-5)
  np.testing.assert_allclose(m["k3_kl"], 0.2030194, rtol=1e-5)
  # ln2 − 0.01 is not extreme, the masked 10 is out
  np.testing.assert_allclose(m["extreme_frac"], 0.5)
  np.testing.assert_allclose(m["ratio_mean"], np.mean(HAND_RATIO), rtol=1e-6)
  np.testing.assert_allclose(m["ratio_var"], np.var(HAND_RATIO), rtol=1e-5)


def test_k3_is_nonnegative_and_mismatch_sums_accumulate():
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(k1, (4, 6))
  b = a + 0.5 * jax.random.normal(k2, (4, 6))
  mask = (jnp.arange(6)[None] < jnp.array([[6], [2], [4], [1]])).astype(jnp.float32)
  full = metrics.mismatch_metrics(a, b, mask)
  assert float(full["k3_kl"]) > 0
  s = jax.tree.map(jnp.add, metrics.mismatch_sums(a[:1], b[:1], mask[:1]),
                   metrics.mismatch_sums(a[1:], b[1:], mask[1:]))
  for key, val in metrics.mismatch_from_sums(s).items():
    np.testing.assert_allclose(val, full[key], rtol=1e-5, err_msg=key)


def test_empty_mask_gives_zeros_not_nan():
  z = jnp.zeros((2, 3))
  m = metrics.mismatch_metrics(z, z + 1.0, jnp.zeros((2, 3)))
  assert all(float(v) == 0.0 for v in m.values())


# ----------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------

def _hand_routes():
  """B=1, T=4, L=2, K=2, E=4. Token 3 is masked out; layer 1 token 0 is a live (-1) row.

  layer 0: {0,1} vs {1,2} → ∩1 dev1 | {2,3} vs {3,2} → ∩2 dev0 | {0,1} vs {2,3} → ∩0 dev2
  layer 1: live (excluded)         | {1,0} vs {0,1} → ∩2 dev0 | {3,0} vs {3,1} → ∩1 dev1
  coverage gap 1 − ρ(I_rep): layer 0: 0.7, 0.5, 0.2; layer 1: —, 0.2, 0.3
  """
  rep = jnp.array([[[[0, 1], [-1, -1]], [[2, 3], [1, 0]], [[0, 1], [3, 0]], [[0, 1], [0, 1]]]])
  cur = jnp.array([[[[1, 2], [2, 3]], [[3, 2], [0, 1]], [[2, 3], [3, 1]], [[2, 3], [2, 3]]]])
  probs = jnp.array([[[[0.1, 0.2, 0.3, 0.4], [0.97, 0.01, 0.01, 0.01]],
                      [[0.25, 0.25, 0.25, 0.25], [0.5, 0.3, 0.1, 0.1]],
                      [[0.4, 0.4, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6]],
                      [[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]]])
  mask = jnp.array([[1, 1, 1, 0]])
  return rep, cur, probs, mask


def test_routing_single_token_k2():
  """{0,1} vs {1,2}: agreement 0.5, deviation 1."""
  rep = jnp.array([0, 1]).reshape(1, 1, 1, 2)
  cur = jnp.array([1, 2]).reshape(1, 1, 1, 2)
  probs = jnp.array([0.1, 0.2, 0.3, 0.4]).reshape(1, 1, 1, 4)
  m = metrics.routing_metrics(rep, cur, probs, jnp.ones((1, 1)))
  np.testing.assert_allclose(m["topk_agreement"], 0.5)
  np.testing.assert_allclose(m["dev_hist"], [0, 1, 0, 0])
  assert float(m["zero_dev_ratio"]) == 0.0
  np.testing.assert_allclose(m["coverage_gap"], 0.7, rtol=1e-6)


def test_routing_metrics_refuse_router_logits_for_probabilities():
  """Logits where ρ belongs gave a coverage gap of -1.75, silently."""
  rep, cur, probs, mask = _hand_routes()
  logits = jnp.log(probs + 1e-3) + 2.0
  with pytest.raises(ValueError, match=r"probs_BTLE\[0, 0, 0\] sums to 8.*expected 1: the live "
                                       r"router's softmax"):
    metrics.routing_metrics(rep, cur, probs.at[0, 0, 0].set(2.0), mask)
  with pytest.raises(ValueError, match=r"probs_BTLE\[0, 0, 0, 0\] = -.* not a finite number"):
    metrics.routing_metrics(rep, cur, logits, mask)
  metrics.routing_metrics(rep, cur, probs.at[0, 0, 0, 0].add(0.005), mask)  # rounding is fine


def test_routing_hand_worked_overall_and_per_layer():
  m = jax.jit(metrics.routing_metrics)(*_hand_routes())
  np.testing.assert_allclose(m["topk_agreement"], 3 / 5, rtol=1e-6)  # (.5 + 1 + 0 + 1 + .5) / 5
  np.testing.assert_allclose(m["topk_agreement_per_layer"], [0.5, 0.75], rtol=1e-6)
  np.testing.assert_allclose(m["dev_hist"], [0.4, 0.4, 0.2, 0.0], rtol=1e-6)
  np.testing.assert_allclose(m["dev_hist_per_layer"], [[1 / 3, 1 / 3, 1 / 3, 0], [0.5, 0.5, 0, 0]],
                             rtol=1e-6)
  np.testing.assert_allclose(m["zero_dev_ratio"], 0.4, rtol=1e-6)
  np.testing.assert_allclose(m["zero_dev_ratio_per_layer"], [1 / 3, 0.5], rtol=1e-6)
  np.testing.assert_allclose(m["coverage_gap"], (0.7 + 0.5 + 0.2 + 0.2 + 0.3) / 5, rtol=1e-5)
  np.testing.assert_allclose(m["coverage_gap_per_layer"], [1.4 / 3, 0.25], rtol=1e-5)


def test_routing_shape_mismatches_raise_even_under_jit():
  """K=2 replayed against K=3 current used to broadcast to an agreement of 1.0."""
  rep, cur, probs, mask = _hand_routes()
  fn = jax.jit(metrics.routing_metrics)
  cur3 = jnp.concatenate([cur, cur[..., :1]], axis=-1)
  with pytest.raises(ValueError, match=r"current routes have shape \(1, 4, 2, 3\), expected the "
                                       r"replayed routes' \(1, 4, 2, 2\)"):
    fn(rep, cur3, probs, mask)
  with pytest.raises(ValueError, match=r"replayed routes must be \[B, T, L, K\], got shape "
                                       r"\(4, 2, 2\)"):
    fn(rep[0], cur[0], probs, mask)
  with pytest.raises(ValueError, match=r"probs have shape \(1, 4, 1, 4\), expected "
                                       r"\(1, 4, 2\) \+ \(E,\)"):
    fn(rep, cur, probs[:, :, :1], mask)
  with pytest.raises(ValueError, match=r"mask has shape \(1, 3\), expected \(1, 4\)"):
    fn(rep, cur, probs, mask[:, :3])


@pytest.mark.parametrize("which, bad", [(0, 9), (1, 4), (1, -2)])
def test_routing_ids_outside_the_experts_raise(which, bad):
  """An id of 9 with E=4 used to read a NaN probability into coverage_gap; -1 stays legal."""
  args = list(_hand_routes())
  args[which] = args[which].at[0, 2, 1, 0].set(bad)
  name = ("replayed_BTLK", "current_BTLK")[which]
  with pytest.raises(ValueError, match=rf"{name}\[0, 2, 1, 0\] = {bad} is outside "
                                       r"\[-1, num_experts=4\)"):
    metrics.routing_metrics(*args)


def test_routing_mask_excludes_tokens():
  """Unmasking token 3 (two deviations per layer, ρ(I_rep) = 0) changes the numbers as computed
  by hand."""
  rep, cur, probs, _ = _hand_routes()
  m = metrics.routing_metrics(rep, cur, probs, jnp.ones((1, 4)))
  np.testing.assert_allclose(m["topk_agreement_per_layer"], [1.5 / 4, 1.5 / 3], rtol=1e-6)
  np.testing.assert_allclose(m["dev_hist"], [2 / 7, 2 / 7, 3 / 7, 0], rtol=1e-6)
  np.testing.assert_allclose(m["coverage_gap_per_layer"], [2.4 / 4, 1.5 / 3], rtol=1e-5)


def test_routing_rows_with_any_minus_one_are_left_out():
  """A row holding a -1 anywhere is live (nothing forced), in the replayed or the current
  routes: [3, -1] vs [3, 1] and [0, 1] vs [-1, 1] are left out, so only {0,1} vs {0,1} counts
  (agreement 1, deviation 0, gap 1 − 0.7; including either row lowered the agreement)."""
  rep = jnp.array([[3, -1], [0, 1], [0, 1]]).reshape(1, 3, 1, 2)
  cur = jnp.array([[3, 1], [-1, 1], [0, 1]]).reshape(1, 3, 1, 2)
  probs = jnp.tile(jnp.array([0.4, 0.3, 0.2, 0.1]), (1, 3, 1, 1))
  sums = metrics.routing_sums(rep, cur, probs, jnp.ones((1, 3)))
  np.testing.assert_array_equal(sums["count"], [1.0])
  m = metrics.routing_from_sums(sums)
  np.testing.assert_allclose(m["topk_agreement"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(m["dev_hist"], [1, 0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(m["coverage_gap"], 0.3, rtol=1e-5)


def test_routing_deviation_three_or_more_share_the_last_bin():
  """K=4: {0..3} vs {4..7} (dev 4) and vs {0,5,6,7} (dev 3) both land in bin ≥3."""
  rep = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]]).reshape(1, 2, 1, 4)
  cur = jnp.array([[4, 5, 6, 7], [0, 5, 6, 7]]).reshape(1, 2, 1, 4)
  probs = jnp.full((1, 2, 1, 8), 1 / 8)
  m = metrics.routing_metrics(rep, cur, probs, jnp.ones((1, 2)))
  np.testing.assert_allclose(m["dev_hist"], [0, 0, 0, 1])
  np.testing.assert_allclose(m["topk_agreement"], 0.125)
  np.testing.assert_allclose(m["coverage_gap"], 0.5, rtol=1e-6)


def test_routing_identical_routes_agree_fully_and_sums_accumulate():
  rep, cur, probs, mask = _hand_routes()
  m = metrics.routing_metrics(cur, cur, probs, jnp.ones((1, 4)))
  assert float(m["topk_agreement"]) == 1.0 and float(m["zero_dev_ratio"]) == 1.0
  full = metrics.routing_metrics(rep, cur, probs, mask)
  s = jax.tree.map(jnp.add, metrics.routing_sums(rep[:, :2], cur[:, :2], probs[:, :2], mask[:, :2]),
                   metrics.routing_sums(rep[:, 2:], cur[:, 2:], probs[:, 2:], mask[:, 2:]))
  for key, val in metrics.routing_from_sums(s).items():
    np.testing.assert_allclose(val, full[key], rtol=1e-6, err_msg=key)


# ----------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------

def test_flatten_for_json():
  m = {"step": 7, "k3_kl": jnp.float32(0.25), "per_layer": jnp.array([0.5, 0.75]),
       "hist": jnp.ones((2, 2)), "loss": {"sums": {"count": jnp.int32(3)}}, "phase": "rl"}
  out = metrics.flatten_for_json(m)
  assert out == {"step": 7, "k3_kl": 0.25, "per_layer": [0.5, 0.75],
                 "hist": [[1.0, 1.0], [1.0, 1.0]],
                 "loss/sums/count": 3, "phase": "rl"}
  assert type(out["k3_kl"]) is float and type(out["per_layer"][0]) is float
  assert type(out["loss/sums/count"]) is int
  json.dumps(out)
  json.dumps(metrics.flatten_for_json(metrics.routing_metrics(*_hand_routes())))


@pytest.mark.parametrize("shapes, match", [
    (((2, 5), (2, 5), (5,)), r"mask_BT has shape \(5,\), expected \[B, T\] of train_logp_BT"),
    (((2, 5), (2, 1), (2, 5)), r"rollout_logp_BT has shape \(2, 1\)"),
    (((10,), (10,), (10,)), r"train_logp_BT has shape \(10,\), expected rank 2"),
])
def test_mismatch_metrics_refuse_shapes_that_would_broadcast(shapes, match):
  """A [T] mask broadcast over [B, T] gave an extreme fraction of 1.33."""
  with pytest.raises(ValueError, match=match):
    metrics.mismatch_metrics(*(jnp.zeros(s) for s in shapes))


@pytest.mark.parametrize("bad, shown", [(-1.0, "-1.0"), (float("nan"), "nan")])
def test_metrics_reject_negative_or_nan_masks(bad, shown):
  """A -1 mask subtracted its token from the means, a NaN one made them NaN. Concrete masks
  are checked, naming the entry."""
  z, mask = jnp.zeros((2, 3)), jnp.ones((2, 3)).at[0, 1].set(bad)
  match = rf"mask_BT\[0, 1\] = {shown} is not a finite number >= 0 \(a token weight"
  with pytest.raises(ValueError, match=match):
    metrics.mismatch_metrics(z, z, mask)
  routes = jnp.zeros((2, 3, 1, 1), jnp.int32)
  with pytest.raises(ValueError, match=match):
    metrics.routing_metrics(routes, routes, jnp.ones((2, 3, 1, 2)) / 2, mask)


def test_mismatch_metrics_refuse_complex_logprobs_eagerly_and_under_jit():
  z = jnp.zeros((1, 2))
  for call in (metrics.mismatch_metrics, jax.jit(metrics.mismatch_metrics)):
    with pytest.raises(TypeError, match=r"rollout_logp_BT has dtype complex64, expected real"):
      call(z, z + 1j, jnp.ones((1, 2)))
  # A weight mask stays valid: Δ = ln 2 on both tokens, weights (3, 1) → ratio_mean 2.
  got = metrics.mismatch_metrics(jnp.full((1, 2), LN2), z, jnp.array([[3.0, 1.0]]))
  np.testing.assert_allclose(got["ratio_mean"], 2.0, rtol=1e-6)


def test_fractional_mask_weights_give_the_same_means_as_their_multiples():
  """Masks are weights: scaling them all leaves every weighted mean as it is (dividing by
  max(Σw, 1) halved k3 at weights 0.1); all-zero weights still give 0."""
  rng = np.random.default_rng(0)
  train, rollout = (jnp.asarray(rng.normal(size=(2, 5)), jnp.float32) for _ in range(2))
  mask = jnp.asarray(rng.integers(0, 2, (2, 5)), jnp.float32).at[0, 0].set(1)
  full, tenth = (metrics.mismatch_metrics(train, rollout, s * mask) for s in (1.0, 0.1))
  for key in ("k3_kl", "extreme_frac", "ratio_mean", "ratio_var"):
    np.testing.assert_allclose(tenth[key], full[key], rtol=1e-5)
  assert float(metrics.mismatch_metrics(train, rollout, 0 * mask)["k3_kl"]) == 0.0
  probs = jnp.full((1, 2, 1, 4), 0.25)
  rep, cur = jnp.array([[[[0, 1]], [[2, 3]]]]), jnp.array([[[[0, 1]], [[0, 1]]]])
  half = metrics.routing_metrics(rep, cur, probs, jnp.array([[0.2, 0.2]]))
  assert float(half["topk_agreement"]) == pytest.approx(0.5)


def test_routing_metrics_checks_id_dtypes_under_jit_and_takes_nested_lists():
  probs, mask = jnp.full((1, 1, 1, 4), 0.25), jnp.ones((1, 1))
  ids = jnp.zeros((1, 1, 1, 2), jnp.int32).at[..., 1].set(1)
  with pytest.raises(TypeError, match="replayed_BTLK has dtype float32"):
    jax.jit(metrics.routing_metrics)(ids.astype(jnp.float32) + 0.7, ids, probs, mask)
  lists = metrics.routing_metrics([[[[0, 1]]]], [[[[1, 2]]]], [[[[0.5, 0.3, 0.2, 0.0]]]], [[1.0]])
  assert float(lists["topk_agreement"]) == 0.5
  assert float(lists["coverage_gap"]) == pytest.approx(0.2)


def test_routing_means_are_weighted_by_unequal_fractional_mask_values():
  """Mask values weight tokens (not just select them): agreements (1, 0) with weights
  (0.75, 0.25) average to 0.75 and the deviation histogram to [0.75, 0, 0.25, 0]; a 0/1 mask
  read from the weights gave 0.5 and [0.5, 0, 0.5, 0]."""
  rep = jnp.array([[0, 1], [2, 3]]).reshape(1, 2, 1, 2)
  cur = jnp.array([[0, 1], [0, 1]]).reshape(1, 2, 1, 2)
  probs = jnp.array([[0.4, 0.3, 0.2, 0.1]] * 2).reshape(1, 2, 1, 4)
  m = metrics.routing_metrics(rep, cur, probs, jnp.array([[0.75, 0.25]]))
  np.testing.assert_allclose(m["topk_agreement"], 0.75, rtol=1e-6)
  np.testing.assert_allclose(m["dev_hist"], [0.75, 0, 0.25, 0], rtol=1e-6)
  np.testing.assert_allclose(m["coverage_gap"], 0.75 * 0.3 + 0.25 * 0.7, rtol=1e-5)
