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
from pr2_jax.rl import data, learner, losses
from pr2_jax.rl.config import RLConfig
from pr2_jax.rl.sampler import SamplerConfig, generate
from pr2_jax.train.state import create_train_state, make_optimizer, predictor_initializer

CFG = ModelConfig(vocab_size=24, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  expert_d_ff=32, num_experts=8, top_k=2)
B, P, N = 8, 4, 5


def _rl(**kw):
  base = dict(prompts_per_step=4, group_size=2, off_policy_k=1, micro_steps=1,
              max_new_tokens=N, learning_rate=1e-2, eval_size=8)
  return RLConfig(**{**base, **kw})


@functools.lru_cache(maxsize=None)
def _rollout(rollout_dtype="float32"):
  """A rollout batch from a random model, plus the state that produced it."""
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  model = MoETransformer(CFG, mesh)
  tx = make_optimizer(1e-2)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 3, 24), np.int32)
  valid = np.ones((B, P), bool)
  roll = jax.jit(generate, static_argnums=(0, 5))(
      MoETransformer(CFG.replace(dtype=rollout_dtype), mesh), state.params, prompts, valid,
      jax.random.key(2), SamplerConfig(max_new_tokens=N, eos_id=2))
  roll = jax.device_get(roll)
  rewards = jnp.asarray(np.arange(B) % 3, jnp.float32)
  batch = {"tokens": roll.tokens, "valid": roll.valid, "positions": roll.positions,
           "response_mask": roll.response_mask, "rollout_logp": roll.logp,
           "rollout_routes": roll.routes, "adv": np.asarray(losses.grpo_advantages(rewards, 2))}
  return model, tx, state, batch


def _learner(model, config, tx):
  return learner.Learner(model, config, tx)


def _prepare(model, config, params, batch, chunks):
  micro = data.split_micro(batch, chunks)
  old_logp, routes, _, _ = learner.old_logprob_pass(_learner(model, config, None), params, None,
                                                    micro)
  micro["old_logp"] = old_logp
  micro["replay_routes"] = routes if config.replay_mode == "r2" else micro["rollout_routes"]
  return micro


def test_micro_step_accumulation_equals_full_minibatch():
  """M=4 micro-steps of b=2 give the gradient of one micro-step of 8 sequences.

  Plain SGD with lr 1 makes the parameter change equal to the gradient (Adam
  would amplify float noise in near-zero gradients into sign flips).
  """
  model, _, state, batch = _rollout()
  tx = optax.sgd(1.0)
  state = state.replace(opt_state=tx.init(state.params))
  params = {}
  for m in (1, 4):
    config = _rl(micro_steps=m)
    micro = _prepare(model, config, state.params, batch, m)
    new_state, metrics = learner.update_step(_learner(model, config, tx), state, micro)
    params[m] = new_state.params
    if m == 1:
      ref_metrics = metrics
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), params[1], params[4])
  assert max(jax.tree.leaves(diffs)) < 1e-6
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(metrics["entropy"], ref_metrics["entropy"], rtol=1e-5)


@pytest.mark.parametrize("loss", ["dapo", "gspo"])
def test_ratio_is_one_at_first_ministep_same_dtype_r3(loss):
  """float32 rollout + R3: π_θ/π_old and π_θ/µ are 1 and nothing clips.

  π_old comes from the same forward function and routes as the update, but
  XLA fuses the gradient program differently, so "exactly" means within an
  ulp of float32 (observed: variance 1e-14); the KV-cache µ is within 1e-5.
  """
  model, tx, state, batch = _rollout("float32")
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
  """A bfloat16 inference engine gives a non-zero train-inference KL."""
  model, tx, state, batch = _rollout("bfloat16")
  config = _rl(replay_mode="r3")
  _, m = learner.update_step(_learner(model, config, tx), state,
                             _prepare(model, config, state.params, batch, 1))
  assert float(m["k3_kl"]) > 0


def test_replay_modes_choose_routes():
  """r3 forces the rollout's routes in the old pass; r2/none use (and record) the live router."""
  model, _, state, batch = _rollout()
  foreign = np.asarray(batch["rollout_routes"])[::-1].copy()  # other rows' routes
  batch = {**batch, "rollout_routes": foreign}
  micro = data.split_micro(batch, 1)
  old = lambda mode: learner.old_logprob_pass(_learner(model, _rl(replay_mode=mode), None),
                                             state.params, None, micro)[1]
  routes_r3 = old("r3")
  np.testing.assert_array_equal(np.asarray(routes_r3), micro["rollout_routes"])
  routes_r2, routes_none = old("r2"), old("none")
  np.testing.assert_array_equal(np.asarray(routes_r2), np.asarray(routes_none))
  assert not np.array_equal(np.asarray(routes_r2), micro["rollout_routes"])


def test_update_moves_logprob_with_advantage_sign():
  """After a few updates, positive-advantage responses gain log-prob, negative ones lose it."""
  model, tx, state, batch = _rollout()
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


def test_sharded_update_matches_single_device():
  """The jitted learner on a (2, 4) mesh gives the single-device update (SGD: update = gradient)."""
  model1, _, state1, batch = _rollout()
  tx = optax.sgd(1.0)
  state1 = state1.replace(opt_state=tx.init(state1.params))
  config = _rl(prompts_per_step=8, group_size=2, micro_steps=2)
  batch16 = {k: np.concatenate([v, v]) for k, v in batch.items()}
  micro = _prepare(model1, config, state1.params, batch16, 2)
  ref, _ = learner.update_step(_learner(model1, config, tx), state1, micro)
  mesh = make_mesh(2, 4)
  model = MoETransformer(CFG, mesh)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  _, update_fn = learner.make_learner_fns(_learner(model, config, tx), mesh, shardings, micro)
  micro_sh = jax.device_put(micro, learner.batch_shardings(mesh, micro))
  new, _ = update_fn(state, micro_sh, jnp.asarray(False))
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       ref.params, new.params)
  assert max(jax.tree.leaves(diffs)) < 1e-5


# -- PR2 ---------------------------------------------------------------------

from pr2_jax.pr2.predictor import init_predictor  # noqa: E402
from pr2_jax.rl.config import PR2Config  # noqa: E402


@functools.lru_cache(maxsize=None)
def _pr2_setup():
  """A PR2 rollout with W_p = 0 (so routes equal R3's) and features at 4 random slots."""
  model, tx, state, _ = _rollout()
  w = init_predictor(CFG.num_moe_layers, CFG.d_model, CFG.num_experts)
  pred_tx = optax.adam(1e-2)
  state = state.replace(predictor=w, pred_opt_state=pred_tx.init(w))
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 3, 24), np.int32)
  slots = np.sort(np.random.default_rng(0).permutation(P + N)[:4])[None].repeat(B, 0).astype(np.int32)
  roll = jax.device_get(jax.jit(generate, static_argnums=(0, 5))(
      model, state.params, prompts, np.ones((B, P), bool), jax.random.key(2),
      SamplerConfig(max_new_tokens=N, eos_id=2, feature_dtype="float32"), w, slots))
  rewards = jnp.asarray(np.arange(B) % 3, jnp.float32)
  batch = {"tokens": roll.tokens, "valid": roll.valid, "positions": roll.positions,
           "response_mask": roll.response_mask, "rollout_logp": roll.logp,
           "rollout_routes": roll.routes, "adv": np.asarray(losses.grpo_advantages(rewards, 2)),
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
  """With W_p = 0 the PR2 rollout routes are R3's, and the policy update is identical."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  _, _, _, r3_batch = _rollout()
  np.testing.assert_array_equal(batch["rollout_routes"], r3_batch["rollout_routes"])
  r3_state, _ = learner.update_step(_learner(model, _rl(replay_mode="r3"), tx), state,
                                    _prepare(model, _rl(replay_mode="r3"), state.params, r3_batch, 1))
  lr = _pr2_learner(model, tx, pred_tx)
  micro = _prepare(model, lr.rl, state.params, batch, 1)
  pr2_state, m = learner.update_step(lr, state, micro, jnp.asarray(False))
  for a, b in zip(jax.tree.leaves(r3_state.params), jax.tree.leaves(pr2_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(m["pred_topk_acc"]) == 1.0 and float(m["bias_logit_ratio"]) == 0.0


def test_gradients_stay_in_their_lanes():
  """Policy loss -> W_p gradient is 0; predictor loss -> backbone gradient is 0."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx)
  micro = jax.tree.map(lambda x: x[0], _prepare(model, lr.rl, state.params, batch, 1))
  denoms = learner._denominators(lr.rl, jax.tree.map(lambda x: x[None], micro))
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


def test_pr2_update_with_fsdp_matches_single_device():
  """PR2 on a (2, 4) mesh with model.fsdp: W_p is split over 'data' like the weights, the
  update (SGD, lr 1: update = gradient) equals one device's, and W_p stays split."""
  model1, _, _, state1, batch = _pr2_setup()
  tx, pred_tx = optax.sgd(1.0), optax.sgd(1.0)
  config = _rl(replay_mode="pr2", prompts_per_step=8, group_size=2, micro_steps=2)
  make = lambda model: learner.Learner(model, config, tx, PR2Config(feature_dtype="float32"), pred_tx)
  w = _mispredicting_wp(state1)
  state1 = state1.replace(opt_state=tx.init(state1.params), predictor=w,
                          pred_opt_state=pred_tx.init(w))
  micro = _prepare(model1, config, state1.params, {k: np.concatenate([v, v]) for k, v in batch.items()}, 2)
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
  np.testing.assert_allclose(np.asarray(new.predictor), np.asarray(ref.predictor), atol=1e-5)
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_pr2_r2_predicts_in_the_old_logprob_pass():
  """pr2_r2: the old pass routes by softmax(p + h W_p) and caches its own features."""
  model, tx, pred_tx, state, batch = _pr2_setup()
  lr = _pr2_learner(model, tx, pred_tx, "pr2_r2")
  micro = data.split_micro({k: v for k, v in batch.items() if k not in ("feature_h", "feature_p")}, 1)
  w = jax.random.normal(jax.random.key(5), state.predictor.shape)
  _, routes, (h, p), _ = learner.old_logprob_pass(lr, state.params, w, micro)
  _, routes_live, _, _ = learner.old_logprob_pass(lr, state.params, jnp.zeros_like(w), micro)
  assert not np.array_equal(np.asarray(routes), np.asarray(routes_live))
  assert h.shape == (1, B, 4, CFG.num_moe_layers, CFG.d_model)
  assert p.shape == (1, B, 4, CFG.num_moe_layers, CFG.num_experts)


def test_non_finite_loss_skips_the_update():
  """A NaN advantage makes the loss non-finite: params and optimizer state stay untouched."""
  model, tx, state, batch = _rollout()
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
  old_logp, _, _, old_dropped = old_fn(state.params, None, micro, plan, capacity=phase.capacity)
  micro = {**micro, "old_logp": old_logp, "replay_routes": micro["rollout_routes"]}
  new, metrics = update_fn(state, micro, jnp.asarray(False), plan, phase.capacity)
  return dict(old_logp=np.asarray(old_logp), old_dropped=int(np.sum(old_dropped)),
              params=new.params, metrics=metrics, phase=phase)


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
  for x, y in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(got["params"])):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)
  assert got["old_dropped"] == 0 and float(got["metrics"]["dropped"]) == 0
  imb = got["phase"].imbalance_ML
  assert imb["foresight"].mean() < imb["none"].mean()


def test_capacity_buckets_compile_once_each():
  """Plans change with every minibatch and never recompile (cache size stays 1); a new
  capacity bucket compiles the update once, a repeated one not at all."""
  _, _, _, batch = _rollout()
  batch16 = {k: np.concatenate([v, v]) for k, v in batch.items()}
  first = data.split_micro(batch16, 2)
  step_plan, _, _ = balancing.step_plan(SHAPE, first["rollout_routes"], first["valid"], 0.0,
                                        balancing.StepState())
  mesh = make_mesh(2, 4)
  model = MoETransformer(CFG, mesh)
  state, shardings = create_train_state(model, optax.sgd(1.0), jax.random.key(0), mesh)
  config = _rl(prompts_per_step=8, group_size=2, micro_steps=2, balance_mode="foresight")
  minis, layouts, needed = [], set(), []
  for seed in range(3):  # other sequence orders: other micro-steps, other plans
    micro = data.split_micro(batch16, 2, np.random.default_rng(seed).permutation(16))
    # π_old = µ (the loss's value is not under test): no old-log-prob pass to compile.
    micro["old_logp"], micro["replay_routes"] = micro["rollout_logp"][..., 1:], micro["rollout_routes"]
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
