"""Tests for pr2_jax.rl.learner: accumulation, ratios at the first mini-step, replay modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from pr2_jax.config import ModelConfig
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import advantages, data, learner, losses
from pr2_jax.rl.config import RLConfig
from pr2_jax.rl.sampler import SamplerConfig, generate
from pr2_jax.train.state import create_train_state, make_optimizer, predictor_initializer

CFG = ModelConfig(vocab_size=24, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  expert_d_ff=32, num_experts=8, top_k=2)
# One MoE layer for the tests whose subject has no layer axis (the policy loss, ratios, sharding,
# skips): layers are unrolled, each compiled anew (this file with a cold compile cache: 401
# CPU-s with two layers everywhere, 359 so). PR2's predictor, per-layer metrics, the aux loss
# and balance plans (all per layer) keep CFG's two, where a mixed-up layer would show.
CFG1 = CFG.replace(num_layers=1)
B, P, N = 8, 4, 5


def _rl(**kw):
  base = dict(prompts_per_step=4, group_size=2, off_policy_k=1, micro_steps=1,
              max_new_tokens=N, learning_rate=1e-2, eval_size=8)
  return RLConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def _rollout(rollout_dtype="float32", cfg=CFG):
  """A rollout batch from a random model of `cfg`, plus the state that produced it."""
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  model = MoETransformer(cfg, mesh)
  tx = make_optimizer(1e-2)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 3, 24), np.int32)
  valid = np.ones((B, P), bool)
  roll = jax.jit(generate, static_argnums=(0, 5))(
      MoETransformer(cfg.replace(dtype=rollout_dtype), mesh), state.params, prompts, valid,
      jax.random.key(2), SamplerConfig(max_new_tokens=N, eos_id=2))
  roll = jax.device_get(roll)
  rewards = jnp.asarray(np.arange(B) % 3, jnp.float32)
  batch = {"tokens": roll.tokens, "valid": roll.valid, "positions": roll.positions,
           "response_mask": roll.response_mask, "rollout_logp": roll.logp,
           "rollout_routes": roll.routes, "adv": np.asarray(advantages.grpo_advantages(rewards, 2))}
  return model, tx, state, batch


def _learner(model, config, tx):
  return learner.Learner(model, config, tx)


def _with_sgd(state):
  """SGD(lr 1) and `state` with its optimizer state: an update is then minus the gradient."""
  tx = optax.sgd(1.0)
  return tx, state.replace(opt_state=tx.init(state.params))


def _assert_updates_close(new, ref, before, tol=1e-5):
  """SGD(lr 1) updates new - before and ref - before (= minus the gradients) agree per leaf,
  to `tol` times the leaf's largest reference entry: an absolute tolerance would wave through
  any error in leaves whose gradients are small (router leaves: ~1e-4 at most). Plus one unit in
  the last place of the parameters: each side's update is rounded to the float32 grid of the
  values it lands on, 1.2e-7 for a norm scale near 1, whose updates are ~1e-3."""
  flat = jax.tree.flatten_with_path(before)[0]
  for (path, b), n, r in zip(flat, jax.tree.leaves(new), jax.tree.leaves(ref)):
    b, r = np.asarray(b), np.asarray(r)
    want, got = r - b, np.asarray(n) - b
    scale = float(np.max(np.abs(want)))
    ulp = float(np.max(np.spacing(np.abs(r))))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale + ulp,
                               err_msg=jax.tree_util.keystr(path))


def _prepare(model, config, params, batch, chunks):
  micro = data.split_micro(batch, chunks)
  old = learner.old_logprob_pass(_learner(model, config, None), params, None, micro)
  micro["old_logp"] = old.logp
  micro["replay_routes"] = old.routes if config.replay_mode == "r2" else micro["rollout_routes"]
  return micro


@pytest.mark.parametrize("loss_kw", [{}, {"loss": "gspo", "tis_cap": 2.0}],
                         ids=["dapo", "gspo_old_tis"])
def test_micro_step_accumulation_equals_full_minibatch(loss_kw):
  """M=4 micro-steps of b=2 give the gradient of one micro-step of 8 sequences: DAPO's token
  mean and GSPO's sequence mean (ratio against π_old, TIS weights) share mini-batch denominators.

  Plain SGD with lr 1 makes the parameter change equal to the gradient (Adam
  would amplify float noise in near-zero gradients into sign flips).
  """
  model, _, state, batch = _rollout(cfg=CFG1)
  tx, state = _with_sgd(state)
  params = {}
  for m in (1, 4):
    config = _rl(micro_steps=m, **loss_kw)
    micro = _prepare(model, config, state.params, batch, m)
    new_state, metrics = learner.update_step(_learner(model, config, tx), state, micro)
    params[m] = new_state.params
    if m == 1:
      ref_metrics = metrics
  _assert_updates_close(params[4], params[1], state.params)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], ref_metrics["entropy"], rtol=1e-5)


def test_grad_norm_is_of_the_gradients_rl_trains():
  """With rl.trainable='routers' grad_norm is the norm the optimizer clips, the routers'
  gradient's; with 'all' every parameter's. SGD(lr 1) without train_only makes the parameter
  change the whole gradient, to measure both against."""
  model, _, state, batch = _rollout(cfg=CFG1)
  tx, state = _with_sgd(state)
  norms = {}
  for trainable in ("all", "routers"):
    config = _rl(trainable=trainable)
    micro = _prepare(model, config, state.params, batch, 1)
    new_state, metrics = learner.update_step(_learner(model, config, tx), state, micro)
    grads = jax.tree_util.tree_leaves_with_path(
        jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state.params, new_state.params))
    kept = [g for path, g in grads
            if trainable == "all" or jax.tree_util.keystr(path).endswith("['mlp']['gate']")]
    assert len(kept) == (len(grads) if trainable == "all" else model.config.num_layers)
    want = np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in kept))
    np.testing.assert_allclose(metrics["grad_norm"], want, rtol=1e-4)
    norms[trainable] = float(metrics["grad_norm"])
  assert norms["routers"] < norms["all"]


def test_logits_chunk_gives_the_same_old_logprobs_update_and_metrics():
  """rl.logits_chunk only changes how many positions the LM head sees at a time: π_old, the
  SGD update (= the gradient) and the metrics equal the unchunked learner's (T - 1 = 8
  positions in chunks of 3: the last chunk is padded). At temperature 0.7, which the chunked
  head must apply as the unchunked one does (test_temperature_divides_the_learner_logits)."""
  model, _, state, batch = _rollout(cfg=CFG1)
  tx, state = _with_sgd(state)
  out = {}
  for chunk in (0, 3):
    config = _rl(micro_steps=2, logits_chunk=chunk, temperature=0.7)
    micro = _prepare(model, config, state.params, batch, 2)
    new_state, metrics = learner.update_step(_learner(model, config, tx), state, micro)
    out[chunk] = micro["old_logp"], new_state.params, metrics
  np.testing.assert_allclose(out[3][0], out[0][0], rtol=1e-5, atol=1e-6)
  _assert_updates_close(out[3][1], out[0][1], state.params)
  for key in ("loss", "grad_norm", "entropy", "k3_kl"):
    np.testing.assert_allclose(out[3][2][key], out[0][2][key], rtol=1e-5, atol=1e-7,
                               err_msg=key)


@pytest.mark.parametrize("loss", losses.POLICY_LOSS_KINDS)
def test_ratio_is_one_at_first_ministep_same_dtype_r3(loss):
  """float32 rollout + R3: π_θ/π_old and π_θ/µ are 1 and nothing clips.

  π_old comes from the same forward function and routes as the update, but
  XLA fuses the gradient program differently, so "exactly" means within an
  ulp of float32 (observed: variance 1e-14); the KV-cache µ is within 1e-5.
  """
  model, tx, state, batch = _rollout(cfg=CFG1)
  for denominator in ("old", "rollout"):
    config = _rl(replay_mode="r3", loss=loss, ratio_denominator=denominator,
                 clip_low=0.2 if loss == "dapo" else 3e-4,
                 clip_high=0.28 if loss == "dapo" else 4e-4)
    micro = _prepare(model, config, state.params, batch, 1)
    _, m = learner.update_step(_learner(model, config, tx), state, micro)
    if denominator == "old":
      np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-6)
      assert float(m["ratio_var"]) < 1e-12
    else:
      np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-5)
      assert float(m["k3_kl"]) < 1e-9
    assert float(m["clip_frac_low"]) == 0.0 and float(m["clip_frac_high"]) == 0.0
    assert float(m["topk_agreement"]) == 1.0 and float(m["zero_dev_ratio"]) == 1.0


def test_bf16_rollout_shows_mismatch():
  """A bfloat16 inference engine gives a non-zero train-inference KL, and it is the KL of the
  log-prob gaps themselves: a float64 numpy oracle of the float32 training forward (routes
  replayed, as R3 does) against the bf16 engine's µ gives k3 = mean(r - 1 - Δ), r = e^Δ, over
  the response tokens. The gaps are bf16 rounding (|Δ| ~ 1e-3, k3 ~ Δ²/2 ~ 1e-7), far from
  ln 2, so no token is extreme; a float32 rollout's k3 is < 1e-9 (the test above).
  The old-log-prob pass reports the same four over the whole batch as old_*: its π_old is the
  first mini-step's π_θ on the same tokens."""
  model, tx, state, batch = _rollout("bfloat16", CFG1)
  config = _rl(replay_mode="r3")
  micro = data.split_micro(batch, 1)
  old = learner.old_logprob_pass(_learner(model, config, None), state.params, None, micro)
  micro.update(old_logp=old.logp, replay_routes=micro["rollout_routes"])
  _, m = learner.update_step(_learner(model, config, tx), state, micro)
  assert set(old.mismatch) == {"old_k3_kl", "old_extreme_frac", "old_mismatch_ratio_mean",
                               "old_mismatch_ratio_var"}
  for key, value in old.mismatch.items():
    np.testing.assert_allclose(float(value), float(m[key.removeprefix("old_")]), rtol=1e-5,
                               err_msg=key)
  mask_BT = np.asarray(batch["response_mask"][:, 1:]) > 0
  delta = (_hand_logp(model, state.params, batch)[1]
           - np.float64(batch["rollout_logp"][:, 1:]))[mask_BT]
  ratio = np.exp(delta)
  want_k3 = np.mean(ratio - 1 - delta)
  assert want_k3 > 1e-8 and np.abs(delta).max() < 0.1  # a real, bf16-sized gap
  # rtol 1e-3: r - 1 - Δ ~ 1e-7 loses digits to cancellation in float32.
  np.testing.assert_allclose(float(m["k3_kl"]), want_k3, rtol=1e-3)
  assert float(m["extreme_frac"]) == 0.0
  np.testing.assert_allclose(float(m["mismatch_ratio_mean"]), ratio.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["mismatch_ratio_var"]), ratio.var(), rtol=1e-3)


def _hand_logp(model, params, micro0, temperature=1.0):
  """float64 log softmax(logits / temperature) of tokens[:, 1:] from a plain forward
  (routes replayed from the rollout, as R3 does)."""
  out = model.apply({"params": params}, micro0["tokens"], routes=micro0["rollout_routes"],
                    positions=micro0["positions"], valid=micro0["valid"])
  z = np.asarray(out.logits[:, :-1], np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return log_softmax, np.take_along_axis(log_softmax, micro0["tokens"][:, 1:, None], -1)[..., 0]


def test_mismatch_metrics_match_a_numpy_oracle():
  """k3_kl, extreme_frac and the IS ratio's mean/variance (DESIGN §3 Metrics) over the valid
  response tokens of the mini-batch, with Δ = log π_train − log µ: µ is moved by hand by offsets
  on both sides of ±ln 2, and two micro-steps of different token counts must add up to the
  mini-batch's means. The ratio denominator is π_old, so only a µ-based metric can match. The
  old-log-prob pass's old_* row is the same over the whole batch, both micro-batches."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  offsets = np.array([-1.2, -0.4, 0.0, 0.5, 1.0])  # |Δ| ≈ |offset|: 2 of 5 beyond ln 2
  shift_BS = offsets[np.random.default_rng(4).integers(0, 5, batch["rollout_logp"].shape)]
  moved = {**batch, "rollout_logp": (batch["rollout_logp"] + shift_BS).astype(np.float32)}
  config = _rl(replay_mode="r3", micro_steps=2, ratio_denominator="old")
  micro = data.split_micro(moved, 2)
  old = learner.old_logprob_pass(_learner(model, config, None), state.params, None, micro)
  micro.update(old_logp=old.logp, replay_routes=micro["rollout_routes"])
  _, m = learner.update_step(_learner(model, config, tx), state, micro)
  mask_BT = np.asarray(batch["response_mask"][:, 1:]) > 0
  counts = mask_BT.reshape(2, -1).sum(1)
  assert counts[0] != counts[1]  # a mean of the micro-steps' means would differ
  delta = (_hand_logp(model, state.params, batch)[1]
           - np.float64(moved["rollout_logp"][:, 1:]))[mask_BT]
  extreme = np.abs(delta) > np.log(2)
  assert 0.2 < extreme.mean() < 0.6 and np.abs(np.abs(delta) - np.log(2)).min() > 0.1
  ratio = np.exp(delta)
  np.testing.assert_allclose(float(m["k3_kl"]), np.mean(ratio - 1 - delta), rtol=1e-5)
  assert float(m["extreme_frac"]) == pytest.approx(extreme.mean(), abs=1e-7)
  np.testing.assert_allclose(float(m["mismatch_ratio_mean"]), ratio.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(m["mismatch_ratio_var"]), ratio.var(), rtol=1e-4)
  # The old pass's π_old (θ_old = θ here) against µ: the same means over both micro-batches.
  want = {"old_k3_kl": np.mean(ratio - 1 - delta), "old_extreme_frac": extreme.mean(),
          "old_mismatch_ratio_mean": ratio.mean(), "old_mismatch_ratio_var": ratio.var()}
  for key, value in want.items():
    np.testing.assert_allclose(float(old.mismatch[key]), value, rtol=1e-4, err_msg=key)


def _np_topk(x, k):
  """Top-k ids of the last axis (ties to the lower index, as the router)."""
  return np.argsort(-np.asarray(x, np.float64), axis=-1, kind="stable")[..., :k]


def test_r2_routing_metrics_compare_rollout_and_replayed_routes_with_the_live_router():
  """R2's routing metrics (docs/architecture.md §5): the ROLLOUT's routes against the live
  training router's top-k, over every valid slot (prompt and response), from a numpy oracle on
  the router logits of the update's forward (old-pass routes replayed). A bfloat16 rollout plus
  hand-edited routes (one and two experts swapped out) give deviations 0, 1 and 2."""
  model, tx, state, batch = _rollout("bfloat16")
  k, num_e = CFG.top_k, CFG.num_experts
  routes = np.array(batch["rollout_routes"])
  rng = np.random.default_rng(5)
  num_l = CFG.num_moe_layers
  for dev in (1, 2):  # 6 (row, slot, layer) triples each get `dev` experts from outside the set
    for b, t, l in zip(rng.integers(0, B, 6), rng.integers(0, P + N, 6),
                       rng.integers(0, num_l, 6)):
      free = [e for e in range(num_e) if e not in routes[b, t, l]]
      routes[b, t, l, :dev] = free[:dev]
  config = _rl(replay_mode="r2")
  micro = _prepare(model, config, state.params, {**batch, "rollout_routes": routes}, 1)
  _, m = learner.update_step(_learner(model, config, tx), state, micro)
  m0 = jax.tree.map(lambda x: np.asarray(x[0]), micro)
  out = model.apply({"params": state.params}, m0["tokens"], routes=m0["replay_routes"],
                    positions=m0["positions"], valid=m0["valid"], return_router_logits=True)
  live_BSLK = _np_topk(out.router_logits, k)
  inter_BSL = (routes[..., :, None] == live_BSLK[..., None, :]).any(-1).sum(-1)
  w_BS1 = m0["valid"].astype(np.float64)[..., None]
  agree_L = (inter_BSL / k * w_BS1).sum((0, 1)) / w_BS1.sum()
  hist_4 = np.array([((k - inter_BSL == d) * w_BS1).sum() for d in range(4)]) / (
      w_BS1.sum() * num_l)
  assert hist_4[1] > 0 and hist_4[2] > 0  # the hand edits show up as deviations 1 and 2
  np.testing.assert_allclose(np.asarray(m["topk_agreement_per_layer"]), agree_L, rtol=1e-6)
  np.testing.assert_allclose(float(m["topk_agreement"]), agree_L.mean(), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(m["dev_hist"]), hist_4, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(float(m["zero_dev_ratio"]), hist_4[0], rtol=1e-6)
  # DESIGN §3's I_rep, the route R2 replays (the old pass's), is reported beside them as
  # `replayed_*`: the live router's own at θ_old, (almost) full agreement at the first
  # mini-step, which alone would hide the rollout's drift.
  replayed = (m0["replay_routes"][..., :, None] == live_BSLK[..., None, :]).any(-1).sum(-1)
  replayed_L = (replayed / k * w_BS1).sum((0, 1)) / w_BS1.sum()
  np.testing.assert_allclose(np.asarray(m["replayed_topk_agreement_per_layer"]), replayed_L,
                             rtol=1e-6)
  np.testing.assert_allclose(float(m["replayed_zero_dev_ratio"]),
                             ((replayed == k) * w_BS1).sum() / w_BS1.sum() / num_l, rtol=1e-6)
  assert float(m["replayed_topk_agreement"]) > agree_L.mean() + 0.02
  _, m_r3 = learner.update_step(_learner(model, _rl(replay_mode="r3"), tx), state,
                                _prepare(model, _rl(replay_mode="r3"), state.params, batch, 1))
  assert not [key for key in m_r3 if key.startswith("replayed_")], "r3 replays the rollout's"


def _hand_policy_loss(kind, logp, against, adv, mask, clip_low, clip_high, weight=None):
  """Numpy DAPO (token mean) / GSPO (sequence mean) loss and mean ratio; weight = TIS."""
  log_r = np.where(mask > 0, logp - against, 0.0)
  if kind == "gspo":
    log_r = (log_r * mask).sum(1) / mask.sum(1)
    mask = (mask.sum(1) > 0).astype(np.float64)
  else:
    adv = adv[:, None]
  r = np.exp(log_r)
  obj = -np.minimum(r * adv, np.clip(r, 1 - clip_low, 1 + clip_high) * adv)
  if weight is not None:
    obj = obj * weight
  return (obj * mask).sum() / mask.sum(), (r * mask).sum() / mask.sum()


def _perturbed_r3_micro(model, state, batch, config, old_shift=(-0.3, 0.1),
                        rollout_shift=(-0.1, 0.3)):
  """One micro-step whose π_old and µ are both moved off π_θ by independent uniform shifts
  (nats; by default to opposite sides on average, so π_θ/π_old > 1 > π_θ/µ in the mean)."""
  micro = _prepare(model, config, state.params, batch, 1)
  rng = np.random.default_rng(3)
  micro["old_logp"] = np.asarray(micro["old_logp"]) + rng.uniform(*old_shift,
                                                                  micro["old_logp"].shape)
  micro["rollout_logp"] = micro["rollout_logp"] + rng.uniform(*rollout_shift,
                                                              micro["rollout_logp"].shape)
  return {k: np.asarray(v, np.float32) if k.endswith("logp") else v for k, v in micro.items()}


def test_ratio_denominator_divides_by_pi_old_or_by_mu():
  """'old' takes r = π_θ/π_old, 'rollout' r = π_θ/µ: with π_old and µ moved apart by hand, the
  ratio mean and the DAPO loss match a numpy oracle on the chosen denominator only."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  results = {}
  for denominator in ("old", "rollout"):
    config = _rl(replay_mode="r3", ratio_denominator=denominator)
    micro = _perturbed_r3_micro(model, state, batch, config)
    _, m = learner.update_step(_learner(model, config, tx), state, micro)
    m0 = jax.tree.map(lambda x: x[0], micro)
    logp = _hand_logp(model, state.params, m0)[1]
    against = m0["old_logp"] if denominator == "old" else m0["rollout_logp"][:, 1:]
    loss, ratio_mean = _hand_policy_loss("dapo", logp, np.float64(against), m0["adv"],
                                         m0["response_mask"][:, 1:].astype(np.float64),
                                         config.clip_low, config.clip_high)
    np.testing.assert_allclose(float(m["ratio_mean"]), ratio_mean, rtol=1e-5)
    np.testing.assert_allclose(float(m["loss"]), loss, rtol=1e-5, atol=1e-7)
    results[denominator] = ratio_mean
  assert results["old"] > 1.05 and results["rollout"] < 0.95  # the two cases can tell apart


@pytest.mark.parametrize("loss", losses.POLICY_LOSS_KINDS)
def test_tis_weights_cap_the_loss(loss):
  """ratio 'old' with tis_cap: each token's (DAPO) or sequence's (GSPO) loss is weighted by
  min(π_old/µ, cap); the perturbation pushes some weights onto the cap and leaves some below.
  The entropy stays the mean over response tokens (numpy oracle), GSPO's loss denominator (its
  sequence count) notwithstanding."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  clips = (0.2, 0.28) if loss == "dapo" else (3e-4, 4e-4)
  config = _rl(replay_mode="r3", loss=loss, ratio_denominator="old", tis_cap=1.1,
               clip_low=clips[0], clip_high=clips[1])
  # π_old/µ = e^(U(-0.2, 0.4) - U(-0.2, 0.2)): spread on both sides of the cap and of 1.
  micro = _perturbed_r3_micro(model, state, batch, config, (-0.2, 0.4), (-0.2, 0.2))
  _, m = learner.update_step(_learner(model, config, tx), state, micro)
  m0 = jax.tree.map(lambda x: x[0], micro)
  mask = m0["response_mask"][:, 1:].astype(np.float64)
  log_w = np.float64(m0["old_logp"]) - m0["rollout_logp"][:, 1:]
  if loss == "gspo":
    log_w = (log_w * mask).sum(1) / mask.sum(1)
    counted = mask.sum(1) > 0
  else:
    counted = mask > 0
  weight = np.minimum(np.exp(log_w), 1.1)
  assert (weight[counted] == 1.1).any() and (weight[counted] < 1.0).any()
  logp = _hand_logp(model, state.params, m0)[1]
  want, _ = _hand_policy_loss(loss, logp, np.float64(m0["old_logp"]), m0["adv"], mask,
                              *clips, weight=weight)
  unweighted, _ = _hand_policy_loss(loss, logp, np.float64(m0["old_logp"]), m0["adv"], mask,
                                    *clips)
  assert abs(want - unweighted) > 1e-3 * abs(want)
  np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5, atol=1e-7)
  # The entropy is a token mean whatever the loss: GSPO's sequence count is not its denominator.
  log_softmax = _hand_logp(model, state.params, m0)[0]
  entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
  assert loss == "dapo" or counted.sum() != (mask > 0).sum()  # GSPO's denominators differ
  np.testing.assert_allclose(float(m["entropy"]), entropy[mask > 0].mean(), rtol=1e-5)


def test_temperature_divides_the_learner_logits():
  """temperature 0.7: π_old, π_θ and the entropy are those of softmax(logits / 0.7)."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  config = _rl(replay_mode="r3", temperature=0.7)
  micro = data.split_micro(batch, 1)
  m0 = jax.tree.map(lambda x: x[0], micro)
  log_softmax, want = _hand_logp(model, state.params, m0, 0.7)
  at_one = _hand_logp(model, state.params, m0)[1]
  mask = m0["response_mask"][:, 1:] > 0
  assert np.abs(want - at_one)[mask].max() > 1e-2  # 0.7 is far from 1 for this model
  old_logp = learner.old_logprob_pass(_learner(model, config, None), state.params, None,
                                      micro).logp
  np.testing.assert_allclose(np.asarray(old_logp[0])[mask], want[mask], rtol=1e-5, atol=1e-5)
  # µ := the hand log-probs, so the update's ratio π_θ/µ is 1 only if π_θ uses 0.7 too.
  micro["old_logp"], micro["replay_routes"] = old_logp, micro["rollout_routes"]
  micro["rollout_logp"] = np.concatenate([np.zeros((1, B, 1)), want[None]], -1).astype(np.float32)
  _, m = learner.update_step(_learner(model, config, tx), state, micro)
  np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-5)
  entropy = -(np.exp(log_softmax) * log_softmax).sum(-1)
  np.testing.assert_allclose(float(m["entropy"]), entropy[mask].mean(), rtol=1e-5)


def test_replay_modes_choose_routes():
  """r3 forces the rollout's routes in the old pass; r2/none use (and record) the live router."""
  model, _, state, batch = _rollout()
  foreign = np.asarray(batch["rollout_routes"])[::-1].copy()  # other rows' routes
  batch = {**batch, "rollout_routes": foreign}
  micro = data.split_micro(batch, 1)
  old = lambda mode: learner.old_logprob_pass(_learner(model, _rl(replay_mode=mode), None),
                                             state.params, None, micro).routes
  routes_r3 = old("r3")
  np.testing.assert_array_equal(np.asarray(routes_r3), micro["rollout_routes"])
  routes_r2, routes_none = old("r2"), old("none")
  np.testing.assert_array_equal(np.asarray(routes_r2), np.asarray(routes_none))
  assert not np.array_equal(np.asarray(routes_r2), micro["rollout_routes"])


def test_update_moves_logprob_with_advantage_sign():
  """After a few updates, positive-advantage responses gain log-prob, negative ones lose it."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  config = _rl(replay_mode="r3", learning_rate=1e-2)
  micro = _prepare(model, config, state.params, batch, 1)
  seq_logp = lambda p: np.asarray(jnp.sum(
      learner.forward_logprobs(model, p, batch, batch["rollout_routes"], 1.0)[0]
      * batch["response_mask"][:, 1:], axis=1))
  before = seq_logp(state.params)
  step = jax.jit(functools.partial(learner.update_step, _learner(model, config, tx)))
  for _ in range(3):
    state, _ = step(state, micro)
  delta, adv = seq_logp(state.params) - before, np.asarray(batch["adv"])
  assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def _single_and_sharded(config, mesh_shape):
  """The SGD learner (update = gradient) on one device and jitted on a mesh, on the same
  16-sequence batch: ((state, metrics) of one device, the state before, update_fn, its args)."""
  model1, _, state1, batch = _rollout(cfg=CFG1)
  tx, state1 = _with_sgd(state1)
  batch16 = {k: np.concatenate([v, v]) for k, v in batch.items()}
  micro = _prepare(model1, config, state1.params, batch16, 2)
  ref = learner.update_step(_learner(model1, config, tx), state1, micro)
  mesh = make_mesh(*mesh_shape)
  model = MoETransformer(model1.config, mesh)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  _, update_fn = learner.make_learner_fns(_learner(model, config, tx), mesh, shardings, micro)
  micro_sh = jax.device_put(micro, learner.batch_shardings(mesh, micro))
  return ref, state1, update_fn, (state, micro_sh, jnp.asarray(False), None)


@pytest.mark.parametrize("logits_chunk", [0, 3])
def test_sharded_update_matches_single_device(logits_chunk):
  """The jitted learner on a (2, 4) mesh gives the single-device update (SGD: update = gradient),
  also with the LM head in chunks (then each device loops over its own rows)."""
  config = _rl(prompts_per_step=8, group_size=2, micro_steps=2, logits_chunk=logits_chunk)
  (ref, _), before, update_fn, args = _single_and_sharded(config, (2, 4))
  new, _ = update_fn(*args)
  _assert_updates_close(new.params, ref.params, before.params)


def test_data_parallel_update_never_gathers_router_logits():
  """On a (8, 1) mesh the router's top-k (the model's and the routing metrics') runs on each
  device's rows: no all-gather comes from a top_k (plain jit gathered the whole batch's router
  logits to every device, per layer and micro-step; the small response mask of the loss
  denominators is gathered in their own program), and the metrics are one device's."""
  import re
  config = _rl(prompts_per_step=8, group_size=2, micro_steps=2, replay_mode="r2")
  (_, ref_metrics), _, update_fn, args = _single_and_sharded(config, (8, 1))
  denoms = learner.denominators(config, args[1])
  text = update_fn.jitted.lower(*args, None, denoms).compile().as_text()
  gathers = [l for l in text.splitlines() if re.search(r" all-gather(-start)?\(", l)]
  assert not gathers, gathers
  _, metrics = update_fn(*args)
  assert set(metrics) == set(ref_metrics)
  for key, value in ref_metrics.items():
    np.testing.assert_allclose(np.asarray(metrics[key]), np.asarray(value), rtol=1e-5,
                               atol=1e-6, err_msg=key)


# -- PR2 ---------------------------------------------------------------------

from pr2_jax.pr2.predictor import init_predictor, predicted_topk  # noqa: E402
from pr2_jax.rl import programs  # noqa: E402
from pr2_jax.rl.config import ExperimentConfig, PR2Config, SFTConfig  # noqa: E402


@functools.lru_cache(maxsize=None)
def _pr2_setup():
  """A PR2 rollout with W_p = 0 (so routes equal R3's) and features at 4 random slots."""
  model, tx, state, _ = _rollout()
  w = init_predictor(CFG.num_moe_layers, CFG.d_model, CFG.num_experts)
  pred_tx = optax.adam(1e-2)
  state = state.replace(predictor=w, pred_opt_state=pred_tx.init(w))
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 3, 24), np.int32)
  slots = np.sort(np.random.default_rng(0).permutation(P + N)[:4])[None].repeat(B, 0)
  slots = slots.astype(np.int32)
  roll = jax.device_get(jax.jit(generate, static_argnums=(0, 5))(
      model, state.params, prompts, np.ones((B, P), bool), jax.random.key(2),
      SamplerConfig(max_new_tokens=N, eos_id=2, feature_dtype="float32"), w, slots))
  rewards = jnp.asarray(np.arange(B) % 3, jnp.float32)
  batch = {"tokens": roll.tokens, "valid": roll.valid, "positions": roll.positions,
           "response_mask": roll.response_mask, "rollout_logp": roll.logp,
           "rollout_routes": roll.routes, "adv": np.asarray(advantages.grpo_advantages(rewards, 2)),
           "feature_slots": slots, "feature_h": roll.feature_h, "feature_p": roll.feature_p}
  return model, tx, pred_tx, state, batch


def _pr2_learner(model, tx, pred_tx, mode="pr2"):
  return learner.Learner(model, _rl(replay_mode=mode), tx, PR2Config(feature_dtype="float32"),
                         pred_tx)


def _mispredicting_wp(state):
  """A random W_p: the predictor loss is then clearly positive.

  W_p = 0 predicts the live distribution (the router has not moved), and a constant W_p shifts
  every expert's logit equally, leaving the softmax unchanged: both give a loss of zero up to
  rounding.
  """
  return 0.1 * jax.random.normal(jax.random.key(7), state.predictor.shape)


def test_zero_predictor_pr2_step_equals_r3_step():
  """With W_p = 0 the PR2 rollout routes are R3's, and the policy update is the same.

  The two are different programs (PR2's holds the predictor) that XLA may fuse and round
  differently in the last bits (4.7e-9 apart on ~0.03 weights with its older fusion
  emitters), and Adam would turn that noise in near-zero gradients into steps up to the
  learning rate: SGD(lr 1) makes the updates the gradients, compared to float tolerance.
  """
  model, _, pred_tx, state, batch = _pr2_setup()
  tx, state = _with_sgd(state)
  _, _, _, r3_batch = _rollout()
  np.testing.assert_array_equal(batch["rollout_routes"], r3_batch["rollout_routes"])
  r3 = _rl(replay_mode="r3")
  r3_state, _ = learner.update_step(_learner(model, r3, tx), state,
                                    _prepare(model, r3, state.params, r3_batch, 1))
  lr = _pr2_learner(model, tx, pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 1)
  pr2_state, m = learner.update_step(lr, state, micro, jnp.asarray(False))
  _assert_updates_close(pr2_state.params, r3_state.params, state.params)
  assert float(m["pred_topk_acc"]) == 1.0 and float(m["bias_logit_ratio"]) == 0.0


def test_gradients_stay_in_their_lanes():
  """Policy loss -> W_p gradient is 0; predictor loss -> backbone gradient is 0."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx)
  micro = jax.tree.map(lambda x: x[0], _prepare(model, lr.rl, state.params, batch, 1))
  denoms = learner.denominators(lr.rl, jax.tree.map(lambda x: x[None], micro))
  w = _mispredicting_wp(state)  # non-zero so a leak would show
  # Jitted: op-by-op autodiff of the whole model takes about a minute on 2 cores.
  g_w = jax.jit(jax.grad(lambda w: learner.micro_step(lr, state.params, w, micro, denoms)[0]))(w)
  assert float(jnp.abs(g_w).max()) == 0.0
  pred_loss = lambda p: jnp.sum(
      learner.micro_step(lr, p, w, micro, denoms)[1]["pred"]["loss_per_layer"])
  assert float(pred_loss(state.params)) > 0
  g_params = jax.jit(jax.grad(pred_loss))(state.params)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_params)) == 0.0


def test_predictor_skipped_at_first_ministep_and_trained_after():
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 1)
  w = _mispredicting_wp(state)
  state = state.replace(predictor=w, pred_opt_state=pred_tx.init(w))
  skipped, m = learner.update_step(lr, state, micro, jnp.asarray(False))
  np.testing.assert_array_equal(np.asarray(skipped.predictor), np.asarray(state.predictor))
  for a, b in zip(jax.tree.leaves(skipped.pred_opt_state), jax.tree.leaves(state.pred_opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(m["pred_loss"]) > 0  # measured even when not applied
  trained, _ = learner.update_step(lr, state, micro, jnp.asarray(True))
  assert float(jnp.abs(trained.predictor - state.predictor).max()) > 0


def test_predictor_learning_rate_is_lr_mult_times_the_policy_rate():
  """Programs' predictor optimizer steps at α·η (PR2Config.lr_mult × RLConfig.learning_rate):
  the W_p change of one trained update equals Adam's first step at α·η on the (clipped) W_p
  gradient, −α·η·g / (|g| + ε) with ε = PR2Config.adam_eps, for α = 3 and 6; at η alone it
  would be 3-6x smaller. The gradient itself, read off an SGD(lr 1) step, is the numpy
  oracle's."""
  model, tx, _, state, batch = _pr2_setup()
  rl = _rl(replay_mode="pr2")
  micro = _prepare(model, rl, state.params, batch, 1)
  w = _mispredicting_wp(state)
  # The W_p gradient: SGD with lr 1 moves W_p by exactly -g.
  sgd = optax.sgd(1.0)
  by_sgd, _ = learner.update_step(
      learner.Learner(model, rl, tx, PR2Config(feature_dtype="float32"), sgd),
      state.replace(predictor=w, pred_opt_state=sgd.init(w)), micro, jnp.asarray(True))
  g = np.asarray(w, np.float64) - np.asarray(by_sgd.predictor, np.float64)
  # ...is that of DESIGN §3's Σ_l mean_t KL(ρ_θ ‖ softmax(p_old + h W_p)): per layer,
  # Σ_n h_n ⊗ (q̂_n − ρ_n) / N over the feature rows (a mean over layers would be L times smaller).
  m0 = jax.tree.map(lambda x: np.asarray(x[0]), micro)
  out = model.apply({"params": state.params}, m0["tokens"], routes=m0["replay_routes"],
                    positions=m0["positions"], valid=m0["valid"], return_router_logits=True)
  num_l = CFG.num_moe_layers
  h = np.asarray(m0["feature_h"], np.float64).reshape(-1, num_l, CFG.d_model)
  p_old = np.asarray(m0["feature_p"], np.float64).reshape(-1, num_l, CFG.num_experts)
  rho = np.exp(_np_log_softmax(np.asarray(_at_slots(out.router_logits, m0["feature_slots"]),
                                          np.float64)))
  q = np.exp(_np_log_softmax(p_old + np.einsum("nld,lde->nle", h, np.asarray(w, np.float64))))
  assert _at_slots(m0["valid"], m0["feature_slots"]).all()  # every row weighs 1
  want_g = np.einsum("nld,nle->lde", h, q - rho) / h.shape[0]
  np.testing.assert_allclose(g, want_g, rtol=1e-3, atol=1e-3 * np.abs(want_g).max())
  g = g * min(1.0, rl.grad_clip / np.linalg.norm(g))  # make_optimizer clips by global norm
  assert np.mean(np.abs(g) > 1e-6) > 0.9  # nearly every entry is checked below
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  for alpha in (3.0, 6.0):
    cfg = ExperimentConfig(model=CFG, rl=rl, sft=SFTConfig(num_steps=0),
                           pr2=PR2Config(lr_mult=alpha, feature_dtype="float32"))
    progs = programs.Programs(cfg, mesh, eos_id=2, pad_id=0)
    new, _ = learner.update_step(progs.learner, state.replace(
        predictor=w, pred_opt_state=progs.pred_tx.init(w)), micro, jnp.asarray(True))
    step = np.asarray(new.predictor, np.float64) - np.asarray(w, np.float64)
    want = -alpha * rl.learning_rate * g / (np.abs(g) + cfg.pr2.adam_eps)
    # g is read off float32 weights (rounding ~1e-8): compare where that cannot flip Adam's step.
    big = np.abs(g) > 1e-6
    np.testing.assert_allclose(step[big], want[big], rtol=0, atol=1e-6, err_msg=f"α={alpha}")
    assert np.abs(step).max() <= alpha * rl.learning_rate * (1 + 1e-5)


def _at_slots(x_bS_, slots_bF):
  """x[i, slots[i, f]] flattened to [b * F, ...] (numpy)."""
  x = np.asarray(x_bS_)[np.arange(slots_bF.shape[0])[:, None], slots_bF]
  return x.reshape((-1,) + x.shape[2:])


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_post_loss_L(w_LDE, h_NLD, p_old_NLE, p_cur_NLE, weight_N):
  """Numpy float64 oracle of the 'post' predictor loss per layer (DESIGN §3 PR2):
  Σ_n w_n KL(softmax(p_cur) ‖ softmax(p_old + h W_p)) / Σ_n w_n."""
  w_LDE, h_NLD, p_old_NLE, p_cur_NLE = (np.asarray(x, np.float64)
                                        for x in (w_LDE, h_NLD, p_old_NLE, p_cur_NLE))
  log_p = _np_log_softmax(p_cur_NLE)
  log_q = _np_log_softmax(p_old_NLE + np.einsum("nld,lde->nle", h_NLD, w_LDE))
  kl_NL = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  return (kl_NL * weight_N[:, None]).sum(0) / weight_N.sum()


def _np_topk_acc_L(pred_NLE, live_NLE, k, weight_N):
  """Weighted mean over tokens of |TopK(pred) ∩ TopK(live)| / k per layer (numpy argsort)."""
  top = lambda x: np.argsort(-np.asarray(x, np.float64), axis=-1, kind="stable")[..., :k]
  hits_NL = (top(pred_NLE)[..., :, None] == top(live_NLE)[..., None, :]).any(-1).sum(-1)
  return (hits_NL / k * weight_N[:, None]).sum(0) / weight_N.sum()


def test_predictor_learns_toward_the_router_after_the_update():
  """Once θ ≠ θ_old the predictor's target is the router of the *current* params: pred_loss (per
  layer) is KL(softmax(p_θ) ‖ softmax(p_old + h_old W_p)) at the feature slots and the top-k
  accuracy is the overlap of the predicted top-k with p_θ's, both from a numpy oracle on the
  same inputs. At the first mini-step p_θ = p_old, which every other test runs at: a target of
  p_old would give W_p = 0 loss 0 and accuracy 1 here."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 1)
  moved, _ = learner.update_step(lr, state, micro, jnp.asarray(False))  # θ_old -> θ
  m0 = jax.tree.map(lambda x: np.asarray(x[0]), micro)
  out = model.apply({"params": moved.params}, m0["tokens"], routes=m0["replay_routes"],
                    positions=m0["positions"], valid=m0["valid"], return_router_logits=True)
  slots = m0["feature_slots"]
  p_cur = _at_slots(out.router_logits, slots)
  h_old = m0["feature_h"].reshape(-1, CFG.num_moe_layers, CFG.d_model)  # cached at the slots
  p_old = m0["feature_p"].reshape(-1, CFG.num_moe_layers, CFG.num_experts)
  valid = _at_slots(m0["valid"], slots).astype(np.float64)
  k = CFG.top_k
  wants = []
  for w in (jnp.zeros_like(state.predictor), _mispredicting_wp(state)):
    _, m = learner.update_step(lr, moved.replace(predictor=w, pred_opt_state=pred_tx.init(w)),
                               micro, jnp.asarray(False))
    want = _np_post_loss_L(w, h_old, p_old, p_cur, valid)
    wants.append(want)
    np.testing.assert_allclose(np.asarray(m["pred_loss_per_layer"]), want, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(float(m["pred_loss"]), want.sum(), rtol=1e-4, atol=1e-8)
    b_NLE = np.einsum("nld,lde->nle", np.asarray(h_old, np.float64), np.asarray(w, np.float64))
    acc_L = _np_topk_acc_L(p_old + b_NLE, p_cur, k, valid)
    np.testing.assert_allclose(np.asarray(m["pred_topk_acc_per_layer"]), acc_L, rtol=1e-6)
    np.testing.assert_allclose(float(m["pred_topk_acc"]), acc_L.mean(), rtol=1e-6)
    assert float(m["pred_topk_acc"]) < 1.0
  # W_p = 0 predicts p_old: its loss is KL(ρ_θ ‖ ρ_old) > 0 only because the router moved.
  assert wants[0].sum() > 1e-6, wants[0]


@pytest.mark.parametrize("kind", ["delta", "l2"])
def test_predictor_step_optimises_the_configured_loss(kind):
  """PR2Config.loss reaches the predictor's objective (DESIGN §3's ablations), checked on small
  random features against numpy: 'delta' is KL(softmax(p − p_old) ‖ softmax(h W_p)) and 'l2'
  the mean over experts of (h W_p − (p − p_old))², per layer, summed over the valid feature
  rows and divided by the mini-batch's feature count (twice this micro-step's: share 1/2).
  For l2 the W_p gradient too: Σ_n h_n ⊗ 2 (b_n − Δ_n) / E / count per layer."""
  rng = np.random.default_rng(8)
  b, s, f, num_l, d, e, k = 2, 5, 3, 2, 4, 8, 2
  slots = np.array([[0, 2, 4], [1, 2, 3]], np.int32)
  valid = np.ones((b, s), bool)
  valid[1, 3] = False  # row 1's last feature slot is padding
  micro = {"feature_slots": slots, "valid": valid,
           "feature_h": rng.normal(size=(b, f, num_l, d)).astype(np.float32),
           "feature_p": rng.normal(size=(b, f, num_l, e)).astype(np.float32),
           "rollout_routes": np.zeros((b, s, num_l, k), np.int32)}
  logits = rng.normal(size=(b, s, num_l, e)).astype(np.float32)
  w = rng.normal(size=(num_l, d, e)).astype(np.float32)
  model = MoETransformer(CFG, make_mesh(1, 1, devices=jax.devices()[:1]))
  lr = learner.Learner(model, _rl(replay_mode="pr2"), None,
                       PR2Config(loss=kind, feature_dtype="float32"), None)
  out = learner.predictor_step(lr, jnp.asarray(w), micro, jnp.asarray(logits), 10.0)
  h = np.float64(micro["feature_h"]).reshape(-1, num_l, d)
  p_old = np.float64(micro["feature_p"]).reshape(-1, num_l, e)
  p_cur = np.float64(_at_slots(logits, slots))
  weight = _at_slots(valid, slots).astype(np.float64)
  assert weight.sum() == 5
  b_NLE = np.einsum("nld,lde->nle", h, np.float64(w))
  delta = p_cur - p_old
  if kind == "l2":
    loss_NL = ((b_NLE - delta) ** 2).mean(-1)
    grad = np.einsum("n,nld,nle->lde", weight, h, 2 * (b_NLE - delta) / e) / 10.0
    np.testing.assert_allclose(np.asarray(out["grad"]), grad, rtol=1e-4, atol=1e-6)
  else:
    log_p, log_q = _np_log_softmax(delta), _np_log_softmax(b_NLE)
    loss_NL = (np.exp(log_p) * (log_p - log_q)).sum(-1)
  want = (loss_NL * weight[:, None]).sum(0) / 10.0
  np.testing.assert_allclose(np.asarray(out["loss_per_layer"]), want, rtol=1e-5)


def test_bias_logit_ratio_is_the_minibatch_ratio_of_means():
  """DESIGN §3's mean|b| / mean|p_old| over the whole mini-batch: with two micro-steps whose
  logits differ 10x in size, a mean of per-micro-step ratios would be far from it."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = learner.Learner(model, _rl(replay_mode="pr2", micro_steps=2), tx,
                       PR2Config(feature_dtype="float32"), pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 2)
  micro["feature_p"] = micro["feature_p"] * np.array([1.0, 10.0])[:, None, None, None, None]
  w = _mispredicting_wp(state)
  _, m = learner.update_step(lr, state.replace(predictor=w, pred_opt_state=pred_tx.init(w)),
                             micro, jnp.asarray(False))
  num_l = CFG.num_moe_layers
  h = np.asarray(micro["feature_h"], np.float64).reshape(-1, num_l, CFG.d_model)
  p = np.asarray(micro["feature_p"], np.float64).reshape(-1, num_l, CFG.num_experts)
  valid = np.concatenate([_at_slots(micro["valid"][i], micro["feature_slots"][i])
                          for i in range(2)]).astype(np.float64)[:, None, None]
  b = np.einsum("nld,lde->nle", h, np.asarray(w, np.float64))
  want = (np.abs(b) * valid).sum() / (np.abs(p) * valid).sum()
  np.testing.assert_allclose(float(m["bias_logit_ratio"]), want, rtol=1e-5)


def test_pr2_update_with_fsdp_matches_single_device():
  """PR2 on a (2, 4) mesh with model.fsdp: W_p is split over 'data' like the weights, the
  update (SGD, lr 1: update = gradient) equals one device's, and W_p stays split."""
  model1, _, _, state1, batch = _pr2_setup()
  tx, pred_tx = optax.sgd(1.0), optax.sgd(1.0)
  config = _rl(replay_mode="pr2", prompts_per_step=8, group_size=2, micro_steps=2)
  make = lambda model: learner.Learner(model, config, tx, PR2Config(feature_dtype="float32"),
                                       pred_tx)
  w = _mispredicting_wp(state1)
  state1 = state1.replace(opt_state=tx.init(state1.params), predictor=w,
                          pred_opt_state=pred_tx.init(w))
  batch16 = {k: np.concatenate([v, v]) for k, v in batch.items()}
  micro = _prepare(model1, config, state1.params, batch16, 2)
  ref, _ = learner.update_step(make(model1), state1, micro, jnp.asarray(True))

  mesh = make_mesh(2, 4)
  model = MoETransformer(CFG.replace(fsdp=True), mesh)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  _, (w_sharding, opt_shardings) = predictor_initializer(model.config, pred_tx, mesh)
  state = state.replace(predictor=jax.device_put(w, w_sharding),
                        pred_opt_state=jax.device_put(pred_tx.init(w), opt_shardings))
  shardings = shardings.replace(predictor=w_sharding, pred_opt_state=opt_shardings)
  _, update_fn = learner.make_learner_fns(make(model), mesh, shardings, micro)
  new, _ = update_fn(state, jax.device_put(micro, learner.batch_shardings(mesh, micro)),
                     jnp.asarray(True))
  assert new.predictor.sharding.spec == PartitionSpec(None, "data", None)
  assert float(jnp.abs(ref.predictor - state1.predictor).max()) > 0  # W_p did move
  _assert_updates_close(new.predictor, ref.predictor, state1.predictor)
  _assert_updates_close(new.params, ref.params, state1.params)


def test_pr2_old_pass_replays_the_rollout_and_caches_nothing():
  """pr2 (PR2-R3): the old pass replays the rollout's routes whatever W_p is, and takes no
  features (the rollout cached them): its routes are rollout_routes, its feats None, and its
  π_old is r3's, bit for bit. Only pr2_r2 predicts (and gathers features) here."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  micro = data.split_micro({k: v for k, v in batch.items()
                            if k not in ("feature_h", "feature_p")}, 1)
  w = jax.random.normal(jax.random.key(5), state.predictor.shape)
  logp, routes, feats, _, _ = learner.old_logprob_pass(_pr2_learner(model, tx, pred_tx, "pr2"),
                                                        state.params, w, micro)
  assert feats is None
  np.testing.assert_array_equal(np.asarray(routes), np.asarray(micro["rollout_routes"]))
  r3_logp = learner.old_logprob_pass(_learner(model, _rl(replay_mode="r3"), tx),
                                     state.params, None, micro).logp
  np.testing.assert_array_equal(np.asarray(logp), np.asarray(r3_logp))


def test_pr2_r2_predicts_in_the_old_logprob_pass():
  """pr2_r2: the old pass routes by softmax(p + h W_p) and caches its own features."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx, "pr2_r2")
  micro = data.split_micro({k: v for k, v in batch.items()
                            if k not in ("feature_h", "feature_p")}, 1)
  w = jax.random.normal(jax.random.key(5), state.predictor.shape)
  old_logp, routes, (h, p), _, _ = learner.old_logprob_pass(lr, state.params, w, micro)
  routes_live = learner.old_logprob_pass(lr, state.params, jnp.zeros_like(w), micro).routes
  assert not np.array_equal(np.asarray(routes), np.asarray(routes_live))
  m0 = jax.tree.map(lambda x: x[0], micro)
  # π_old is the training forward's: R̂ replayed, gated by ρ (the predictor only picks R̂), so
  # the first mini-step's ratio π_θ/π_old is 1. Gating by q̂ here would differ by ~1e-2.
  m0_replay = {**m0, "rollout_routes": routes[0]}
  np.testing.assert_allclose(np.asarray(old_logp[0]),
                             _hand_logp(model, state.params, m0_replay)[1], rtol=0, atol=2e-5)
  out = model.apply({"params": state.params}, m0["tokens"], positions=m0["positions"],
                    valid=m0["valid"], predictor=w, predicted_gates=False,
                    return_router_logits=True, return_router_inputs=True)
  num_l, k = CFG.num_moe_layers, CFG.top_k
  slots = m0["feature_slots"]
  # The cached features are the predicting forward's router inputs and logits at the slots.
  np.testing.assert_allclose(np.asarray(h[0]).reshape(-1, num_l, CFG.d_model),
                             _at_slots(out.router_inputs, slots), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(p[0]).reshape(-1, num_l, CFG.num_experts),
                             _at_slots(out.router_logits, slots), rtol=1e-5, atol=1e-5)
  # ...and the recorded routes there are TopK(p + h W_p) of exactly those features.
  want = np.asarray(predicted_topk(w, np.asarray(h[0]).reshape(-1, num_l, CFG.d_model),
                                   np.asarray(p[0]).reshape(-1, num_l, CFG.num_experts), k))
  np.testing.assert_array_equal(np.sort(_at_slots(routes[0], slots), -1), np.sort(want, -1))
  # Everywhere else too, from the forward's own router inputs and logits.
  every = predicted_topk(w, np.asarray(out.router_inputs).reshape(-1, num_l, CFG.d_model),
                         np.asarray(out.router_logits).reshape(-1, num_l, CFG.num_experts), k)
  np.testing.assert_array_equal(np.sort(np.asarray(routes[0]).reshape(-1, num_l, k), -1),
                                np.sort(np.asarray(every), -1))


def test_non_finite_loss_skips_the_update():
  """A NaN advantage makes the loss non-finite: params and optimizer state stay untouched."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  config = _rl(replay_mode="r3")
  bad = {**batch, "adv": np.full_like(batch["adv"], np.nan)}
  new, m = learner.update_step(_learner(model, config, tx), state,
                               _prepare(model, config, state.params, bad, 1))
  assert int(m["skipped"]) == 1 and int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  _, ok = learner.update_step(_learner(model, config, tx), state,
                              _prepare(model, config, state.params, batch, 1))
  assert int(ok["skipped"]) == 0


@jax.custom_vjp
def _nan_backward(x):
  """The identity, whose backward pass gives NaN: a non-finite gradient under a finite loss."""
  return x


_nan_backward.defvjp(lambda x: (x, None), lambda _, g: (g * jnp.nan,))


def test_non_finite_gradient_with_a_finite_loss_skips_the_update(monkeypatch):
  """The update checks the gradient, not only the loss: a log-prob whose backward pass gives NaN
  (the forward unchanged) leaves the loss finite, and the update is still skipped with params
  and optimizer state untouched. The NaN-advantage test makes both non-finite at once."""
  model, tx, state, batch = _rollout(cfg=CFG1)
  config = _rl(replay_mode="r3")
  micro = _prepare(model, config, state.params, batch, 1)
  forward = learner.forward_logprobs
  monkeypatch.setattr(learner, "forward_logprobs", lambda *a, **kw: (
      lambda logp, ent, out: (_nan_backward(logp), ent, out))(*forward(*a, **kw)))
  new, m = learner.update_step(_learner(model, config, tx), state, micro)
  assert np.isfinite(float(m["loss"])) and np.isnan(float(m["grad_norm"]))
  assert int(m["skipped"]) == 1 and int(new.step) == int(state.step) + 1
  for a, b in zip(jax.tree.leaves((new.params, new.opt_state)),
                  jax.tree.leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_non_finite_predictor_gradient_skips_the_update():
  """A NaN cached router input at a weighted feature slot makes the predictor's loss and
  gradient NaN while the policy's stay finite. With the predictor trained, the whole update is
  skipped: W_p, params and both optimizer states stay as they were and `skipped` is 1 (the
  NaN W_p was applied and routed every later rollout by NaN scores, unchecked under jit). At
  the first mini-step, where W_p is not updated, the policy update goes on."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 1)
  valid_bF = np.take_along_axis(np.asarray(micro["valid"][0]), micro["feature_slots"][0], 1)
  row, col = np.argwhere(valid_bF)[0]
  feature_h = np.array(micro["feature_h"])
  feature_h[0, row, col, 0, 0] = np.nan
  bad = {**micro, "feature_h": feature_h}
  new, m = learner.update_step(lr, state, bad, jnp.asarray(True))
  assert np.isnan(float(m["pred_loss"])) and np.isfinite(float(m["loss"]))
  assert int(m["skipped"]) == 1 and int(new.step) == int(state.step) + 1
  kept = lambda s: (s.params, s.opt_state, s.predictor, s.pred_opt_state)
  for a, b in zip(jax.tree.leaves(kept(new)), jax.tree.leaves(kept(state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  policy_only, m = learner.update_step(lr, state, bad, jnp.asarray(False))
  assert int(m["skipped"]) == 0
  np.testing.assert_array_equal(np.asarray(policy_only.predictor), np.asarray(state.predictor))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(policy_only.params), jax.tree.leaves(state.params)))


def test_non_finite_predictor_gradient_with_a_finite_loss_skips_the_update(monkeypatch):
  """The trained predictor's gradient is checked, not only its loss: a predictor loss whose
  backward gives NaN (its value unchanged) skips the whole update, W_p and params untouched."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 1)
  w = _mispredicting_wp(state)
  state = state.replace(predictor=w, pred_opt_state=pred_tx.init(w))
  losses_fn = learner.pred.predictor_losses
  monkeypatch.setattr(learner.pred, "predictor_losses",
                      lambda *a, **kw: _nan_backward(losses_fn(*a, **kw)))
  new, m = learner.update_step(lr, state, micro, jnp.asarray(True))
  assert np.isfinite(float(m["pred_loss"])) and np.isfinite(float(m["loss"]))
  assert int(m["skipped"]) == 1
  kept = lambda s: (s.params, s.opt_state, s.predictor, s.pred_opt_state)
  for a, b in zip(jax.tree.leaves(kept(new)), jax.tree.leaves(kept(state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("loss, bad_leaf, want", [
    (1.0, None, True), (np.nan, None, False), (np.inf, None, False),
    (1.0, np.nan, False), (1.0, -np.inf, False), (np.nan, np.nan, False)])
def test_all_finite_needs_the_loss_and_every_gradient_finite(loss, bad_leaf, want):
  """A finite loss with one NaN gradient entry deep in the tree still skips the update (the
  skip test above makes both non-finite at once, so 'or' in place of 'and' passed it)."""
  grads = {"a": jnp.ones((2, 3)), "b": {"c": jnp.zeros(4), "d": jnp.arange(3.0)}}
  if bad_leaf is not None:
    grads["b"]["d"] = grads["b"]["d"].at[1].set(bad_leaf)
  assert bool(learner.all_finite(jnp.float32(loss), grads)) is want


def test_aux_loss_coef_adds_the_micro_steps_mean_switch_loss():
  """ModelConfig.aux_loss_coef: the objective is the policy loss plus coef x the mean over the M
  micro-steps of each one's Switch loss (replayed routes), in the value, the metrics and the
  gradient (SGD, lr 1: update = -gradient)."""
  model, _, state, batch = _rollout()
  coef, m_steps = 2.0, 2
  tx, state = _with_sgd(state)
  config = _rl(replay_mode="r3", micro_steps=m_steps)
  micro = _prepare(model, config, state.params, batch, m_steps)
  with_aux = MoETransformer(CFG.replace(aux_loss_coef=coef), model.mesh)
  new0, m0 = learner.update_step(_learner(model, config, tx), state, micro)
  new_c, m_c = learner.update_step(_learner(with_aux, config, tx), state, micro)

  def mean_aux(params):
    return jnp.mean(jnp.stack([model.apply(
        {"params": params}, micro["tokens"][i], routes=micro["replay_routes"][i],
        positions=micro["positions"][i], valid=micro["valid"][i]).aux_loss
        for i in range(m_steps)]))

  aux, g_aux = jax.jit(jax.value_and_grad(mean_aux))(state.params)
  for m in (m0, m_c):
    np.testing.assert_allclose(float(m["aux_loss"]), float(aux), rtol=1e-5)
  np.testing.assert_allclose(float(m_c["loss"]), float(m0["loss"]) + coef * float(aux),
                             rtol=1e-5)
  flat = jax.tree.flatten_with_path(state.params)[0]
  for (path, p), a, b, g in zip(flat, jax.tree.leaves(new0.params), jax.tree.leaves(new_c.params),
                                jax.tree.leaves(g_aux)):
    # Gradients are read as parameter differences: float32 rounding of |p| adds to the error.
    p = np.asarray(p)
    atol = 1e-5 * np.abs(p - np.asarray(b)).max() + 4 * np.finfo(np.float32).eps * np.abs(p).max()
    np.testing.assert_allclose(np.asarray(a) - np.asarray(b), coef * np.asarray(g), rtol=1e-4,
                               atol=atol, err_msg=jax.tree_util.keystr(path))
  gate = state.params["layers_0"]["mlp"]["gate"]
  router_grad = coef * np.abs(np.asarray(g_aux["layers_0"]["mlp"]["gate"])).max()
  assert router_grad > 1e-2 * np.abs(np.asarray(gate) - np.asarray(
      new_c.params["layers_0"]["mlp"]["gate"])).max()  # the aux term is visible in the step


# -- balancing: eplb_step / foresight layouts and foresight capacity -----------

from pr2_jax.rl import balancing  # noqa: E402

SHAPE = balancing.BalanceShape(num_experts=8, num_devices=4, slots=3, token_shards=8)
TOKENS_PER_SHARD = 8 * (P + N) // 8  # a micro-step of 8 sequences over 8 token shards


def _balanced_run(mode, micro, capacity_mode="bucket", fsdp=False):
  """Old-log-prob pass + one update (SGD, lr 1) on a (2, 4) mesh; planning as the loop does."""
  mesh = make_mesh(2, 4)
  model = MoETransformer(CFG.replace(fsdp=fsdp), mesh)
  tx = optax.sgd(1.0)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  config = _rl(prompts_per_step=8, group_size=2, micro_steps=2, balance_mode=mode)
  micro = jax.device_put(micro, learner.batch_shardings(mesh, micro))
  example = {**micro, "old_logp": jnp.zeros(micro["tokens"].shape[:2] + (P + N - 1,)),
             "replay_routes": micro["rollout_routes"]}
  old_fn, update_fn = learner.make_learner_fns(_learner(model, config, tx), mesh, shardings,
                                               example)
  step_plan, _, _ = balancing.step_plan(SHAPE, micro["rollout_routes"], micro["valid"], 0.0,
                                        balancing.StepState())
  phase = balancing.plan_phase(SHAPE, micro["rollout_routes"], micro["valid"], step_plan,
                               balancing.layout_kind(mode, True), capacity_mode == "bucket", 2,
                               TOKENS_PER_SHARD)
  plan = step_plan if mode == "eplb_step" else None
  old_logp, _, _, old_dropped, _ = old_fn(state.params, None, micro, plan,
                                          capacity=phase.capacity)
  micro = {**micro, "old_logp": old_logp, "replay_routes": micro["rollout_routes"]}
  before = jax.device_get(state.params)  # the update donates the state
  new, metrics = update_fn(state, micro, jnp.asarray(False), plan, phase.capacity)
  return dict(old_logp=np.asarray(old_logp), old_dropped=int(np.sum(old_dropped)),
              params=new.params, before=before, metrics=metrics, phase=phase)


@pytest.mark.parametrize("mode, fsdp", [("eplb_step", False), ("foresight", False),
                                        ("foresight", True)])
def test_balanced_learner_equals_static_dropless(mode, fsdp):
  """eplb_step / foresight layouts at a foresight capacity bucket change where experts run and
  the buffer size, not the maths: old log-probs, loss and gradients (SGD: update = -gradient)
  equal the static layout's at the model's dropless capacity, with nothing dropped. So do
  weights split over 'data' too (fsdp), which the replicas are gathered from."""
  _, _, _, batch = _rollout()
  micro = data.split_micro({k: np.concatenate([v, v]) for k, v in batch.items()}, 2)
  ref = _balanced_run("none", micro, capacity_mode="model")
  got = _balanced_run(mode, micro, fsdp=fsdp)
  assert ref["phase"].capacity is None and got["phase"].capacity < TOKENS_PER_SHARD
  assert got["phase"].capacity >= got["phase"].needed
  np.testing.assert_allclose(got["old_logp"], ref["old_logp"], atol=1e-5)
  np.testing.assert_allclose(float(got["metrics"]["loss"]), float(ref["metrics"]["loss"]),
                             rtol=1e-5, atol=1e-7)
  _assert_updates_close(got["params"], ref["params"], ref["before"])
  assert got["old_dropped"] == 0 and float(got["metrics"]["dropped"]) == 0
  imb = got["phase"].imbalance_ML
  assert imb["foresight"].mean() < imb["none"].mean()


def test_a_small_capacity_drops_the_same_pairs_in_the_old_pass_and_the_update():
  """An explicit per-slot capacity reaches both phases: on one device (8 experts, one slot
  each) with capacity 6 of ~9 pairs per expert, each micro-step drops Σ_{l,e} max(0, n_le - 6)
  (token, k) pairs, n_le the valid tokens' R3 routes to e at layer l (numpy), in the old pass
  and in the update alike, so π_θ at the first mini-step is still π_old. An old pass at the
  model's dropless capacity would report 0 and a π_old the update's forward does not compute."""
  model, tx, state, batch = _rollout()
  config = _rl(replay_mode="r3", micro_steps=2, ratio_denominator="old")
  micro = data.split_micro(batch, 2)
  old = learner.old_logprob_pass(_learner(model, config, None), state.params, None, micro,
                                 capacity=6)
  routes = np.asarray(micro["rollout_routes"])  # [M, b, S, L, K]
  num_m, num_l = routes.shape[0], CFG.num_moe_layers
  want_M = np.zeros(num_m, np.int64)
  for i in range(num_m):
    for layer in range(num_l):
      ids = routes[i, :, :, layer][np.asarray(micro["valid"][i])]
      want_M[i] += np.maximum(np.bincount(ids.ravel(), minlength=CFG.num_experts) - 6, 0).sum()
  assert want_M.min() > 0
  np.testing.assert_array_equal(np.asarray(old.dropped), want_M)
  dropless = learner.old_logprob_pass(_learner(model, config, None), state.params, None, micro)
  mask = np.asarray(micro["response_mask"][..., 1:]) > 0
  assert np.abs(np.asarray(old.logp) - np.asarray(dropless.logp))[mask].max() > 1e-3
  micro.update(old_logp=old.logp, replay_routes=micro["rollout_routes"])
  _, m = learner.update_step(_learner(model, config, tx), state, micro, capacity=6)
  assert int(m["dropped"]) == want_M.sum()
  np.testing.assert_allclose(float(m["ratio_mean"]), 1.0, atol=1e-6)


def test_foresight_micro_layout_plans_from_the_valid_tokens_only():
  """foresight's in-step plan is the planner's on the micro-step's loads without padding (the
  host's `plan_phase` counts those, and picks the capacity bucket from them): padding routed
  to expert 0 here would give it the redundant slots, and a layout the bucket was not sized
  for. And eplb_step's micro_layout is the step plan it is given."""
  from pr2_jax.balance import plan_placement
  from pr2_jax.balance.loads import loads_from_routes
  rng = np.random.default_rng(6)
  routes = rng.integers(0, 8, (4, 16, 3, 2)).astype(np.int32)
  valid = np.ones((4, 16), bool)
  valid[2:, 6:] = False
  routes[~valid] = 0  # padding's (recorded, unused) routes all point at expert 0
  model = MoETransformer(CFG, make_mesh(2, 4))
  config = _rl(prompts_per_step=8, balance_mode="foresight")
  lr = _learner(model, config, None)
  slots = CFG.num_experts // 4 + config.redundant_slots
  want = plan_placement(loads_from_routes(routes, valid, 8), 4, slots,
                        method=config.planner_method).slot_expert
  padded = plan_placement(loads_from_routes(routes, None, 8), 4, slots,
                          method=config.planner_method).slot_expert
  assert not np.array_equal(np.asarray(want), np.asarray(padded))
  got = jax.jit(lambda r, v: learner.micro_layout(lr, r, v).slot_expert)(routes, valid)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  step = _learner(model, _rl(prompts_per_step=8, balance_mode="eplb_step"), None)
  assert learner.micro_layout(step, routes, valid, "the step plan") == "the step plan"


def test_capacity_buckets_compile_once_each():
  """Plans change with every minibatch and never recompile (cache size stays 1); a new
  capacity bucket compiles the update once, a repeated one not at all."""
  rollout_model, _, _, batch = _rollout(cfg=CFG1)
  batch16 = {k: np.concatenate([v, v]) for k, v in batch.items()}
  first = data.split_micro(batch16, 2)
  step_plan, _, _ = balancing.step_plan(SHAPE, first["rollout_routes"], first["valid"], 0.0,
                                        balancing.StepState())
  mesh = make_mesh(2, 4)
  model = MoETransformer(rollout_model.config, mesh)
  state, shardings = create_train_state(model, optax.sgd(1.0), jax.random.key(0), mesh)
  config = _rl(prompts_per_step=8, group_size=2, micro_steps=2, balance_mode="foresight")
  minis, layouts, needed = [], set(), []
  for seed in range(3):  # other sequence orders: other micro-steps, other plans
    micro = data.split_micro(batch16, 2, np.random.default_rng(seed).permutation(16))
    # π_old = µ (the loss's value is not under test): no old-log-prob pass to compile.
    micro["old_logp"] = micro["rollout_logp"][..., 1:]
    micro["replay_routes"] = micro["rollout_routes"]
    phase = balancing.plan_phase(SHAPE, micro["rollout_routes"], micro["valid"], step_plan,
                                 "foresight", True, 2, TOKENS_PER_SHARD)
    layouts.add(phase.layouts_MLDS.tobytes())
    needed.append(phase.needed)
    minis.append(jax.device_put(micro, learner.batch_shardings(mesh, micro)))
  assert len(layouts) == 3  # three different sets of plans
  capacity = balancing.capacity_bucket(max(needed), 2, TOKENS_PER_SHARD)
  _, update_fn = learner.make_learner_fns(learner.Learner(model, config, optax.sgd(1.0)), mesh,
                                          shardings, minis[0])
  for mini in minis:
    state, m = update_fn(state, mini, jnp.asarray(False), None, capacity)
    assert float(m["dropped"]) == 0
  assert update_fn.jitted._cache_size() == 1
  bigger = balancing.capacity_bucket(capacity + 1, 2, TOKENS_PER_SHARD)
  assert bigger > capacity
  for mini in minis:
    state, _ = update_fn(state, mini, jnp.asarray(False), None, bigger)
  assert update_fn.jitted._cache_size() == 2
  update_fn(state, minis[0], jnp.asarray(False), None, capacity)
  assert update_fn.jitted._cache_size() == 2


def test_pred_loss_is_the_minibatch_mean_over_valid_feature_slots():
  """Two micro-steps, one feature slot of row 0 marked padding: pred_loss is the mean over the
  mini-batch's *valid* feature positions (numpy oracle), and so is pred_topk_acc_per_layer. A
  share of 1 per micro-step summed the two means (2x), and weighting padding slots counted the
  masked one; Adam's scale invariance hid both from the update tests. The W_p step (SGD, lr 1:
  minus the gradient) is the oracle's gradient of that mean, Σ_n w_n h_n ⊗ (q̂_n − ρ_n) / Σ_n w_n:
  the micro-steps' gradients add up, they are not averaged over M."""
  model, tx, _, state, batch = _pr2_setup()
  pred_tx = optax.sgd(1.0)
  lr = learner.Learner(model, _rl(replay_mode="pr2", micro_steps=2), tx,
                       PR2Config(feature_dtype="float32"), pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 2)
  slot = int(micro["feature_slots"][0, 0, 1])
  micro["valid"] = np.asarray(micro["valid"]).copy()
  micro["valid"][0, 0, slot] = False
  w = _mispredicting_wp(state)
  new, m = learner.update_step(lr, state.replace(predictor=w, pred_opt_state=pred_tx.init(w)),
                               micro, jnp.asarray(True))
  num_l = CFG.num_moe_layers
  p_cur, valid = [], []
  for i in range(2):
    mi = jax.tree.map(lambda x: np.asarray(x[i]), micro)
    out = model.apply({"params": state.params}, mi["tokens"], routes=mi["replay_routes"],
                      positions=mi["positions"], valid=mi["valid"], return_router_logits=True)
    p_cur.append(_at_slots(out.router_logits, mi["feature_slots"]))
    valid.append(_at_slots(mi["valid"], mi["feature_slots"]))
  valid = np.concatenate(valid).astype(np.float64)
  assert valid.sum() == valid.size - 1
  h = np.asarray(micro["feature_h"]).reshape(-1, num_l, CFG.d_model)
  p_old = np.asarray(micro["feature_p"]).reshape(-1, num_l, CFG.num_experts)
  want = _np_post_loss_L(w, h, p_old, np.concatenate(p_cur), valid)
  np.testing.assert_allclose(np.asarray(m["pred_loss_per_layer"]), want, rtol=1e-4, atol=1e-8)
  # The top-k accuracy likewise: one mean over the valid feature rows, not a sum of two.
  b_NLE = np.einsum("nld,lde->nle", np.float64(h), np.asarray(w, np.float64))
  acc_L = _np_topk_acc_L(p_old + b_NLE, np.concatenate(p_cur), CFG.top_k, valid)
  assert acc_L.max() < 1.0
  np.testing.assert_allclose(np.asarray(m["pred_topk_acc_per_layer"]), acc_L, rtol=1e-6)
  rho = np.exp(_np_log_softmax(np.float64(np.concatenate(p_cur))))
  q = np.exp(_np_log_softmax(p_old + b_NLE))
  want_g = np.einsum("n,nld,nle->lde", valid, np.float64(h), q - rho) / valid.sum()
  g = np.asarray(w, np.float64) - np.asarray(new.predictor, np.float64)
  np.testing.assert_allclose(g, want_g, rtol=1e-3, atol=1e-3 * np.abs(want_g).max())


def test_denominators_hand_values():
  """M = 2 micro-steps of b = 3 sequences, S = 4 slots: the loss masks are response_mask[..., 1:]
  (the predicted positions), rows [1,1,1] [0,1,0] [0,0,1] | [0,0,0] [1,0,0] [1,1,0]: 8 tokens
  (DAPO's denominator and the entropy's), 5 non-empty sequences (GSPO's), 1/M = 1/2 per
  micro-step, and 9 valid feature slots of 12. An all-empty mini-batch divides by 1, not 0."""
  resp = np.array([[[0, 1, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]],
                   [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]]], np.float32)
  valid = np.ones((2, 3, 4), bool)
  valid[0, 0, 0] = False
  valid[1, 0] = False
  slots = np.array([[[0, 3], [1, 2], [3, 3]], [[0, 1], [2, 3], [0, 3]]], np.int32)
  mini = {"response_mask": jnp.asarray(resp), "valid": jnp.asarray(valid),
          "feature_slots": jnp.asarray(slots)}
  dapo = learner.denominators(_rl(), mini)
  assert {k: float(v) for k, v in dapo.items()} == {"loss": 8.0, "tokens": 8.0, "micro": 0.5,
                                                    "features": 9.0}
  assert float(learner.denominators(_rl(loss="gspo"), mini)["loss"]) == 5.0
  empty = learner.denominators(_rl(), {"response_mask": jnp.zeros((2, 3, 4)),
                                       "valid": jnp.zeros((2, 3, 4), bool),
                                       "feature_slots": jnp.asarray(slots)})
  assert {k: float(v) for k, v in empty.items()} == {"loss": 1.0, "tokens": 1.0, "micro": 0.5,
                                                     "features": 1.0}


def test_mismatch_row_names_and_values_from_sums():
  """Sums over 4 tokens: k3 2, extreme 1, ratio - 1 summing to 0.4 and its square to 0.2 give
  k3_kl 0.5, extreme_frac 0.25, ratio mean 1.1 and variance 0.05 - 0.1^2 = 0.04; the prefix
  goes in front of every key, 'mismatch_' only before the ratio ones."""
  sums = {"count": jnp.float32(4), "k3": jnp.float32(2), "extreme": jnp.float32(1),
          "ratio_dev": jnp.float32(0.4), "ratio_dev_sq": jnp.float32(0.2)}
  row = {k: float(v) for k, v in learner.mismatch_row(sums, "old_").items()}
  assert row == pytest.approx({"old_k3_kl": 0.5, "old_extreme_frac": 0.25,
                               "old_mismatch_ratio_mean": 1.1, "old_mismatch_ratio_var": 0.04})
  assert set(learner.mismatch_row(sums)) == {"k3_kl", "extreme_frac", "mismatch_ratio_mean",
                                             "mismatch_ratio_var"}


def test_minibatch_metrics_pred_keys_hand_values():
  """The predictor's rows from summed micro-step statistics: pred_loss sums the layers' losses
  (0.2 + 0.3), pred_topk_acc averages the layers' accuracies (0.5, 1.0 -> 0.75), and the grad
  norm is the global norm of the gradients given ([3, 4] -> 5), bias_logit_ratio Σ|b| / Σ|p| =
  1 / 4."""
  from pr2_jax.rl import metrics
  logp, mask = jnp.full((2, 3), -1.0), jnp.ones((2, 3))
  routes = jnp.tile(jnp.arange(2), (2, 3, 2, 1))
  stats = {"loss": jnp.float32(0.25), "entropy": jnp.float32(1.5), "dropped": jnp.int32(3),
           "aux_loss": jnp.float32(0.0),
           "loss_sums": losses.dapo_loss(logp, logp, jnp.ones(2), mask)[1]["sums"],
           "mismatch": metrics.mismatch_sums(logp, logp, mask),
           "routing": metrics.routing_sums(routes, routes, jnp.full((2, 3, 2, 4), 0.25), mask),
           "pred": {"loss_per_layer": jnp.array([0.2, 0.3]),
                    "topk_acc_per_layer": jnp.array([0.5, 1.0]),
                    "bias_abs_sum": jnp.float32(1.0), "logit_abs_sum": jnp.float32(4.0)}}
  out = learner.minibatch_metrics(stats, {"w": jnp.array([3.0, 4.0])})
  assert float(out["pred_loss"]) == pytest.approx(0.5)
  assert float(out["pred_topk_acc"]) == 0.75
  np.testing.assert_allclose(np.asarray(out["pred_topk_acc_per_layer"]), [0.5, 1.0])
  assert float(out["grad_norm"]) == 5.0 and float(out["bias_logit_ratio"]) == 0.25
  assert (float(out["loss"]), float(out["entropy"]), int(out["dropped"])) == (0.25, 1.5, 3)
