"""Tests for pr2_jax.rl.programs: which configs share jitted programs, the LRU, and that a run
on shared programs equals a run on fresh ones."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.config import ModelConfig
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import data, loop, programs
from pr2_jax.rl.char_tokenizer import CharTokenizer
from pr2_jax.rl.config import ExperimentConfig, PR2Config, RLConfig, SFTConfig


def _config(seed=0, **rl):
  model = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      expert_d_ff=32, num_experts=4, top_k=2)
  rl = RLConfig(**{**dict(num_steps=1, prompts_per_step=8, group_size=2, off_policy_k=2,
                          micro_steps=2, max_new_tokens=6, eval_every=0, eval_size=16), **rl})
  return ExperimentConfig(model=model, rl=rl, sft=SFTConfig(num_steps=4, batch_size=8),
                          task="countdown", checkpoint_every=0, seed=seed)


def _rl(cfg, **kw):
  return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **kw))


MESH = make_mesh(1, 1, devices=jax.devices()[:1])
IDS = dict(eos_id=CharTokenizer().eos_id, pad_id=CharTokenizer().pad_id)  # the loop's tokenizer


def test_program_key_ignores_only_what_no_program_reads():
  base = _config()
  key = programs.program_key(base, MESH)
  same = [dataclasses.replace(base, seed=3), dataclasses.replace(base, checkpoint_every=5),
          dataclasses.replace(base, init_from="/somewhere"),
          _rl(base, num_steps=9), _rl(base, eval_every=4), _rl(base, eval_size=64),
          _rl(base, max_consecutive_skips=2),
          # The warm-up's settings key its own step (Programs.warmup), not the RL programs.
          dataclasses.replace(base, sft=SFTConfig(num_steps=5, batch_size=8, learning_rate=1.0)),
          # r3 runs no predictor: its settings reach no program.
          dataclasses.replace(base, pr2=PR2Config(lr_mult=2.0, predicted_gates=False))]
  for cfg in same:
    assert programs.program_key(cfg, MESH) == key, cfg
  other = [_rl(base, temperature=0.5), _rl(base, eval_temperature=0.0),
           _rl(base, learning_rate=1.0),
           _rl(base, replay_mode="r2"), _rl(base, micro_steps=1),
           # The learner's and sampler's settings a resume may change or a host reads nearby.
           _rl(base, logits_chunk=4), _rl(base, top_p=0.9), _rl(base, rollout_dtype="float32"),
           _rl(base, max_new_tokens=5), _rl(base, off_policy_k=1),
           dataclasses.replace(base, model=base.model.replace(d_model=64)),
           dataclasses.replace(base, task_kwargs={"num_numbers": 2})]
  for cfg in other:
    assert programs.program_key(cfg, MESH) != key, cfg
  assert programs.program_key(base, make_mesh(1, 2, devices=jax.devices()[:2])) != key
  pr2 = _rl(base, replay_mode="pr2")
  assert programs.program_key(dataclasses.replace(pr2, pr2=PR2Config(lr_mult=2.0)),
                              MESH) != programs.program_key(pr2, MESH)


def test_runs_differing_in_warm_up_or_unused_pr2_settings_share_programs():
  """Another SFT step count (or learning rate), or PR2 settings in a mode without the
  predictor, reuse the RL programs; only the warm-up step is built again for another
  SFTConfig, and kept for the last one."""
  programs.clear()
  base = _config()
  first = programs.programs_for(base, MESH, **IDS)
  longer = dataclasses.replace(base, sft=SFTConfig(num_steps=9, batch_size=8))
  assert programs.programs_for(longer, MESH, **IDS) is first
  unused = dataclasses.replace(base, pr2=PR2Config(lr_mult=2.0))
  assert programs.programs_for(unused, MESH, **IDS) is first
  key = jax.random.key(0)
  warmup = first.warmup(key, base.sft)
  assert first.warmup(key, base.sft) is warmup
  other = first.warmup(key, longer.sft)
  assert other is not warmup and first.warmup(key, longer.sft) is other
  pr2 = _rl(base, replay_mode="pr2")
  assert programs.programs_for(pr2, MESH, **IDS) is not programs.programs_for(
      dataclasses.replace(pr2, pr2=PR2Config(lr_mult=2.0)), MESH, **IDS)
  programs.clear()


def test_programs_for_keeps_the_last_two():
  programs.clear()
  a, b, c = (_config(**{"learning_rate": lr}) for lr in (1e-3, 2e-3, 3e-3))
  first = programs.programs_for(a, MESH, **IDS)
  assert programs.programs_for(dataclasses.replace(a, seed=7), MESH, **IDS) is first
  second = programs.programs_for(b, MESH, **IDS)
  assert programs.programs_for(a, MESH, **IDS) is first  # now the most recently used
  programs.programs_for(c, MESH, **IDS)  # evicts b, the least recently used
  assert programs.programs_for(a, MESH, **IDS) is first
  assert programs.programs_for(b, MESH, **IDS) is not second
  programs.clear()
  assert programs.programs_for(a, MESH, **IDS) is not first


def _sample(engine):
  """The engine's rollout of its evaluation prompts, sampled with its own key."""
  prompts, valid = data.encode_prompts(engine.tok, engine.eval_problems, engine.prompt_slots)
  return np.asarray(engine.sample(engine.state.params, prompts, valid, engine.key, predictor=None,
                                  feature_slots_BF=None).tokens)


def test_a_second_seed_traces_nothing_and_matches_fresh_programs():
  """Seed 1 after seed 0 runs seed 0's traced programs and gets exactly what seed 1 gets on
  fresh programs: no program closes over the seed (the key is an argument of the state init and
  the sampler; the learner takes none). Runs that share programs with the same seed are checked
  end to end by test_loop's and test_balancing's resume tests."""
  programs.clear()
  first = loop.Engine(_config(seed=0), MESH)
  shared = loop.Engine(_config(seed=1), MESH)
  assert shared.programs is first.programs
  tokens = [_sample(first), _sample(shared)]
  assert shared.sample._cache_size() == 1  # one trace for both seeds
  assert not np.array_equal(tokens[0], tokens[1])
  programs.clear()
  fresh = loop.Engine(_config(seed=1), MESH)
  assert fresh.programs is not shared.programs
  for a, b in zip(jax.tree.leaves(shared.state), jax.tree.leaves(fresh.state), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(_sample(fresh), tokens[1])


def _np_token_logp(logits_BSV, tokens_BS):
  """float64 log softmax of logits[:, :-1] at tokens[:, 1:] (temperature 1)."""
  z = np.asarray(logits_BSV[:, :-1], np.float64)
  z = z - z.max(-1, keepdims=True)
  log_softmax = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return np.take_along_axis(log_softmax, np.asarray(tokens_BS)[:, 1:, None], -1)[..., 0]


def test_predicted_gates_reaches_the_rollout():
  """PR2Config.predicted_gates sets how the rollout gates its predicted routes: with a non-zero
  W_p, µ is the log-prob of a forward gated by q̂ (True) or by the router's ρ at the same
  routes (False), each checked against a full forward of the training model (float32 rollout)
  on the sampled tokens; the two oracles differ by far more than the tolerance."""
  base = _config(replay_mode="pr2", rollout_dtype="float32")
  m = base.model
  w_LDE = 0.5 * jax.random.normal(jax.random.key(5), (m.num_moe_layers, m.d_model, m.num_experts))
  prompts_BP = np.asarray(jax.random.randint(jax.random.key(1), (4, 5), 3, 24), np.int32)
  valid_BP = np.ones((4, 5), bool)
  forward = jax.jit(lambda model, params, roll, **kw: model.apply(
      {"params": params}, roll.tokens, positions=roll.positions, valid=roll.valid, **kw).logits,
                    static_argnums=0, static_argnames="predicted_gates")
  for gates in (True, False):
    progs = programs.Programs(dataclasses.replace(base, pr2=PR2Config(predicted_gates=gates)),
                              MESH, **IDS)
    params = progs.init_state(jax.random.key(0))[0].params
    roll = jax.device_get(progs.sample(params, prompts_BP, valid_BP, jax.random.key(2),
                                       predictor=w_LDE, feature_slots_BF=None))
    mask_BT = roll.response_mask[:, 1:] > 0
    mu = roll.logp[:, 1:][mask_BT]
    live = _np_token_logp(forward(progs.model, params, roll, predictor=w_LDE,
                                  predicted_gates=gates), roll.tokens)[mask_BT]
    np.testing.assert_allclose(mu, live, rtol=0, atol=1e-5, err_msg=f"gates={gates}")
    # ρ gates at the rollout's own routes (a replay): µ exactly when gates=False, and far from
    # µ when the rollout gated by q̂.
    replay = _np_token_logp(forward(progs.model, params, roll, routes=jnp.asarray(roll.routes)),
                            roll.tokens)[mask_BT]
    if gates:
      assert np.abs(mu - replay).max() > 1e-3
    else:
      np.testing.assert_allclose(mu, replay, rtol=0, atol=1e-5)


def test_the_training_engine_computes_in_model_dtype():
  """model.dtype is the learner's and warm-up's compute dtype (docs/scaling.md: bf16 at real
  scale), rl.rollout_dtype the sampler's; parameters stay float32. It used to be forced to
  float32, so a bf16 run silently trained in float32. A float32 rollout of a bf16 model samples
  in float32."""
  progs = programs.Programs(dataclasses.replace(
      _config(rollout_dtype="float32"), model=_config().model.replace(dtype="bfloat16")),
                            MESH, **IDS)
  assert progs.model.config.dtype == "bfloat16"
  params = progs.init_state(jax.random.key(0))[0].params
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  tokens = jnp.ones((2, 6), jnp.int32)
  logits = progs.model.apply({"params": params}, tokens).logits
  f32 = progs.model.clone(config=progs.model.config.replace(dtype="float32"))
  ref = f32.apply({"params": params}, tokens).logits
  # bf16 compute: close to float32, but not equal to it.
  assert 0 < float(jnp.max(jnp.abs(logits.astype(jnp.float32) - ref))) < 0.1
  # The sampler runs in rl.rollout_dtype (float32 here), not in model.dtype: its µ is a
  # float32 forward's log-prob of the sampled tokens, far closer than bf16 rounding.
  prompts_BP = np.asarray(jax.random.randint(jax.random.key(1), (4, 5), 3, 24), np.int32)
  roll = jax.device_get(progs.sample(params, prompts_BP, np.ones((4, 5), bool), jax.random.key(2),
                                     predictor=None, feature_slots_BF=None))
  mask_BT = roll.response_mask[:, 1:] > 0
  live = _np_token_logp(f32.apply({"params": params}, roll.tokens, positions=roll.positions,
                                  valid=roll.valid).logits, roll.tokens)
  np.testing.assert_allclose(roll.logp[:, 1:][mask_BT], live[mask_BT], rtol=0, atol=1e-5)


def test_the_predictor_optimizer_takes_pr2_adam_eps():
  """A gradient far below pr2.adam_eps (an undrifted router's rounding noise) moves W_p by a
  thousandth of the predictor's learning rate α·η, not by ~all of it as Adam's default ε did."""
  pr2 = _rl(_config(), replay_mode="pr2")
  w, g = jnp.zeros(3), jnp.full(3, 1e-6)
  rate = pr2.rl.learning_rate * pr2.pr2.lr_mult
  for eps, want in ((1e-3, rate / 1001), (1e-8, rate / 1.01)):  # rate·g / (g + ε)
    tx = programs.Programs(dataclasses.replace(pr2, pr2=PR2Config(adam_eps=eps)), MESH, 2,
                           0).pred_tx
    update, _ = tx.update(g, tx.init(w), w)
    np.testing.assert_allclose(update, -want, rtol=1e-3)


def test_the_predictor_optimizer_clips_at_rl_grad_clip():
  """W_p's gradient is clipped to RLConfig.grad_clip like the policy's: with a clip of 1e-3,
  g = (100, 0) becomes (1e-3, 0) and Adam's first step is α·η·1e-3 / (1e-3 + ε) = α·η/2 at
  ε = 1e-3; unclipped it would be α·η·100 / (100 + ε) ≈ α·η."""
  pr2 = _rl(_config(), replay_mode="pr2", grad_clip=1e-3)
  tx = programs.Programs(pr2, MESH, 2, 0).pred_tx
  w, g = jnp.zeros(2), jnp.array([100.0, 0.0])
  update, _ = tx.update(g, tx.init(w), w)
  rate = pr2.rl.learning_rate * pr2.pr2.lr_mult
  np.testing.assert_allclose(update, [-rate / 2, 0.0], rtol=1e-5)


def test_the_predictor_optimizer_has_no_weight_decay():
  """PR2Config: W_p stays where its fit puts it. With RLConfig.weight_decay = 0.1, a zero
  gradient leaves W_p = 1 exactly where it is, while the policy's AdamW shrinks its weights by
  η·0.1 per step."""
  progs = programs.Programs(_rl(_config(), replay_mode="pr2", weight_decay=0.1), MESH, 2, 0)
  w, g = jnp.ones(3), jnp.zeros(3)
  update, _ = progs.pred_tx.update(g, progs.pred_tx.init(w), w)
  np.testing.assert_array_equal(update, jnp.zeros(3))
  update, _ = progs.tx.update(g, progs.tx.init(w), w)
  np.testing.assert_allclose(update, jnp.full(3, -1e-4 * 0.1), rtol=1e-6)


def test_the_rollout_engine_is_dropless_whatever_the_learners_capacity():
  """A decode step sized capacity from its B tokens and dropped (token, expert) pairs every
  step, reported nowhere, its routes still listing the dropped experts. With a capacity
  factor that drops in training, the rollout now equals the dropless one token for token."""
  programs.clear()
  base = _config()
  dropless = loop.Engine(base, MESH)
  capped_cfg = dataclasses.replace(base, model=base.model.replace(capacity_factor=0.5))
  capped = loop.Engine(capped_cfg, MESH)
  capped.state = dropless.state  # same weights (the key is the same too)
  prompts, valid = data.encode_prompts(dropless.tok, dropless.eval_problems,
                                       dropless.prompt_slots)
  rolls = [e.sample(dropless.state.params, prompts, valid, dropless.key, predictor=None,
                    feature_slots_BF=None) for e in (dropless, capped)]
  np.testing.assert_array_equal(rolls[1].tokens, rolls[0].tokens)
  np.testing.assert_array_equal(rolls[1].logp, rolls[0].logp)
  # The learner still applies the factor: its model drops at 0.5 of an even share.
  assert capped.programs.model.config.capacity_factor == 0.5
  programs.clear()


def test_evaluation_samples_at_eval_temperature():
  """eval_temperature = 0 is greedy: the eval sampler's every response token is the argmax of a
  full forward at its prefix (float32 rollout, so no rounding flips it), whatever the key; the
  rollout's sampler (temperature 1) draws other tokens with another key. (An eval sampler built
  from the rollout's SamplerConfig sampled the evaluation at temperature 1.)"""
  progs = programs.Programs(_config(eval_temperature=0.0, rollout_dtype="float32"), MESH, **IDS)
  assert progs.eval_sample is not progs.sample
  params = progs.init_state(jax.random.key(0))[0].params
  prompts_BP = np.asarray(jax.random.randint(jax.random.key(1), (4, 5), 3, 24), np.int32)
  valid_BP = np.ones((4, 5), bool)
  draw = lambda fn, seed: jax.device_get(fn(params, prompts_BP, valid_BP, jax.random.key(seed),
                                            predictor=None, feature_slots_BF=None))
  greedy, other_key = draw(progs.eval_sample, 2), draw(progs.eval_sample, 3)
  np.testing.assert_array_equal(other_key.tokens, greedy.tokens)
  mask_BT = greedy.response_mask[:, 1:] > 0
  logits_BSV = progs.model.apply({"params": params}, greedy.tokens, positions=greedy.positions,
                                 valid=greedy.valid).logits
  argmax_BT = np.asarray(jnp.argmax(logits_BSV[:, :-1], -1))
  np.testing.assert_array_equal(greedy.tokens[:, 1:][mask_BT], argmax_BT[mask_BT])
  assert not np.array_equal(draw(progs.sample, 2).tokens, draw(progs.sample, 3).tokens)


def test_the_warm_up_schedule_spans_its_steps_and_warms_up_first():
  """SFTConfig reaches the warm-up's optimizer: a constant gradient g makes Adam's update
  -lr_t·sign(g) (ε = 1e-8 beside |g| = 1), so the updates read the schedule. With no warm-up
  and 2 steps, the second rate is the cosine halfway down to 10 %: lr·(0.1 + 0.9·½(1 + cos π/2))
  = 0.55·lr; with 1 warm-up step of 3, the first is 0, the second the peak and the third again
  halfway down the decay (optax's decay spans the steps after the warm-up). The rates are
  checked to 1e-4, not 1e-5: Adam's bias correction 1 - β2^t in float32 (0.999 rounds to
  0.99900001) is 1.3e-5 relative off, which puts the updates 6.6e-6 below lr_t: at 1e-5 the
  second rate passed with 0.5 % of its tolerance to spare."""
  def rates(sft, steps):
    tx, w, g = programs.warmup_optimizer(sft), jnp.zeros(2), jnp.array([1.0, -1.0])
    opt, out = tx.init(w), []
    for _ in range(steps):
      update, opt = tx.update(g, opt, w)
      out.append(float(-update[0]))
      np.testing.assert_allclose(update, -out[-1] * np.sign(g), rtol=1e-6)
    return out

  lr = 0.5
  np.testing.assert_allclose(rates(SFTConfig(num_steps=2, warmup_steps=0, learning_rate=lr), 2),
                             [lr, 0.55 * lr], rtol=1e-4)
  np.testing.assert_allclose(rates(SFTConfig(num_steps=3, warmup_steps=1, learning_rate=lr), 3),
                             [0.0, lr, 0.55 * lr], rtol=1e-4, atol=1e-9)
