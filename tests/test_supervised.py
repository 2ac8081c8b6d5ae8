"""Tests for pr2_jax.train.supervised: loss, the jitted sharded step, the loop."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pr2_jax.config import ModelConfig
from pr2_jax.data import synthetic
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.train import supervised
from pr2_jax.train.state import create_train_state, make_optimizer

# Recorded on the project's CPU machine (jax 0.10.2, flax 0.12.8, optax 0.2.8).
# Update only when a change is *meant* to alter the numerics (init, model maths,
# optimizer); a refactor that moves this value is a bug.
GOLDEN_LOSS_AFTER_ONE_STEP = 3.0654759407043457


def _mesh(data, expert):
  return make_mesh(data, expert, devices=jax.devices()[: data * expert])


def _two_steps(mesh, cfg=ModelConfig(vocab_size=32), lr=1e-2):
  model = MoETransformer(cfg, mesh)
  tx = make_optimizer(lr)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  step = supervised.make_train_step(model, tx, mesh, shardings)
  batch = synthetic.reverse_copy_batch(np.random.default_rng(0), 8, 4)
  state, m1 = step(state, batch)
  state, m2 = step(state, batch)
  return state, m1, m2


def test_next_token_loss_hand_worked():
  """Uniform logits give ln(V) on masked targets; the mask selects targets."""
  logits = jnp.zeros((1, 3, 4))
  tokens = jnp.array([[0, 1, 2]])
  loss, _ = supervised.next_token_loss(logits, tokens, jnp.array([[0.0, 0.0, 1.0]]))
  np.testing.assert_allclose(loss, np.log(4.0), rtol=1e-6)
  # A confident, correct prediction on the one unmasked target: loss ~0, accuracy 1.
  logits = logits.at[0, 1, 2].set(50.0)
  loss, acc = supervised.next_token_loss(logits, tokens, jnp.array([[0.0, 0.0, 1.0]]))
  assert float(loss) < 1e-6 and float(acc) == 1.0



def test_next_token_loss_is_a_mean_over_tokens_not_sequences():
  """Rows with different numbers of targets weigh by their targets: row 0 has one, predicted
  with confidence (nll 0), row 1 three under uniform logits over V = 4 (ln 4 each, argmax 0,
  all wrong). Token mean: loss 3 ln 4 / 4, accuracy 1 / 4; a mean of per-row means would
  give ln 4 / 2 and 1 / 2."""
  logits = jnp.zeros((2, 4, 4)).at[0, 2, 2].set(50.0)
  tokens = jnp.array([[0, 3, 1, 2], [0, 1, 2, 3]])
  mask = jnp.array([[0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]])
  loss, acc = supervised.next_token_loss(logits, tokens, mask)
  np.testing.assert_allclose(float(loss), 3 * np.log(4.0) / 4, rtol=1e-6)
  np.testing.assert_allclose(float(acc), 0.25, rtol=1e-6)

def test_golden_loss_after_one_step():
  """Single device: the loss after one AdamW step matches the recorded value."""
  _, m1, m2 = _two_steps(_mesh(1, 1))
  assert float(m2["loss"]) < float(m1["loss"])
  np.testing.assert_allclose(
      float(m2["loss"]), GOLDEN_LOSS_AFTER_ONE_STEP, rtol=1e-5,
      err_msg="golden loss moved: see the comment on GOLDEN_LOSS_AFTER_ONE_STEP")


def test_sharded_step_matches_single_device():
  """(2, 4) and (1, 8) meshes train exactly like one device (float tolerance)."""
  state1, _, m_ref = _two_steps(_mesh(1, 1))
  for shape in [(2, 4), (1, 8)]:
    state, _, m = _two_steps(_mesh(*shape))
    np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         state.params, state1.params)
    assert max(jax.tree.leaves(diffs)) < 1e-4, diffs


def test_fsdp_step_matches_single_device_and_keeps_weights_split():
  """ModelConfig.fsdp on a (4, 2) mesh: the same two steps as one device, and the updated
  weights and AdamW moments stay split over 'data' (XLA gathers them only where used)."""
  state1, _, m_ref = _two_steps(_mesh(1, 1))
  state, _, m = _two_steps(_mesh(4, 2), ModelConfig(vocab_size=32, fsdp=True))
  np.testing.assert_allclose(float(m["loss"]), float(m_ref["loss"]), rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                       state.params, state1.params)
  assert max(jax.tree.leaves(diffs)) < 1e-4, diffs
  q = state.params["layers_0"]["self_attn"]["q_proj"]["kernel"]  # [D, H, Z]
  assert q.sharding.spec[0] == "data" and q.addressable_shards[0].data.shape[0] == 64 // 4
  mu = state.opt_state[1][0].mu["layers_0"]["mlp"]["gate_proj"]  # [E, D, F]
  assert tuple(mu.sharding.spec)[:2] == ("expert", "data")
  assert mu.addressable_shards[0].data.shape[:2] == (8 // 2, 64 // 4)


def test_fsdp_step_gathers_the_embedding_table_not_the_batch():
  """Under FSDP the embedding table's D is split over 'data'. The lookup's gradient, split by
  batch, was replicated to every device to be scattered into the split table: the step
  all-gathered [8, 11, 16] of the [B, T, D] cotangent and the token ids (XLA warned
  "Involuntary full rematerialization"), a whole global batch per device at scale. Now the
  [V, D] table is gathered for the lookup, as every weight is at its use."""
  mesh = _mesh(4, 2)
  model = MoETransformer(ModelConfig(vocab_size=32, fsdp=True), mesh)
  tx = make_optimizer(1e-2)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  batch = synthetic.reverse_copy_batch(np.random.default_rng(0), 8, 4)
  step = supervised.make_train_step(model, tx, mesh, shardings)
  text = step.lower(state, batch).compile().as_text()
  gathered = set(re.findall(r"= (\w+\[[\d,]*\])\S* all-gather\(", text))
  t = batch["tokens"].shape[1]
  assert "f32[32,64]" in gathered  # the table, V x D
  assert not [shape for shape in gathered if re.match(rf"\w+\[\d+,{t}[,\]]", shape)], gathered


def test_state_is_created_sharded():
  """Expert weights are split over 'expert'; the step donates the old state."""
  mesh = _mesh(2, 4)
  model = MoETransformer(ModelConfig(vocab_size=32), mesh)
  tx = make_optimizer(1e-3)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  w = state.params["layers_0"]["mlp"]["gate_proj"]
  assert w.sharding.spec[0] == "expert"
  assert w.addressable_shards[0].data.shape[0] == 8 // 4
  step = supervised.make_train_step(model, tx, mesh, shardings)
  old = state
  state, _ = step(state, synthetic.reverse_copy_batch(np.random.default_rng(0), 8, 2))
  assert old.params["layers_0"]["mlp"]["gate_proj"].is_deleted()
  assert int(state.step) == 1


def test_aux_loss_enters_the_objective():
  """The step descends nll + aux_loss_coef * Switch loss: with SGD (lr 0.5) the update is
  0.5 (∇nll + coef ∇aux) computed apart; the metrics report the nll as `loss`, aux apart and
  the gradient's norm as `grad_norm` (with lr 1 the update's norm, a wrong grad_norm, was the
  same). Some rows are left-padded: a step that dropped `valid` passed every test before."""
  mesh, coef = _mesh(1, 1), 2.0
  model = MoETransformer(ModelConfig(vocab_size=32, aux_loss_coef=coef), mesh)
  tx = optax.sgd(0.5)
  state, shardings = create_train_state(model, tx, jax.random.key(0), mesh)
  before = jax.device_get(state.params)  # the step donates the state
  batch = synthetic.reverse_copy_batch(np.random.default_rng(0), 8, 4)
  # Left padding of one slot on even rows: the step must pass positions and valid on.
  valid = np.ones(batch["tokens"].shape, bool)
  valid[::2, 0] = False
  batch.update(valid=valid, positions=np.maximum(np.cumsum(valid, 1) - 1, 0).astype(np.int32))
  keys = ("tokens", "loss_mask", "positions", "valid")
  new, m = supervised.make_train_step(model, tx, mesh, shardings, keys)(state, batch)

  def parts(params):
    out = model.apply({"params": params}, batch["tokens"], positions=batch["positions"],
                      valid=batch["valid"])
    log_p = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(log_p, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    mask = jnp.asarray(batch["loss_mask"][:, 1:], jnp.float32)
    return -jnp.sum(picked * mask) / jnp.sum(mask), out.aux_loss

  (nll, aux), (g_nll, g_aux) = jax.jit(lambda p: (
      parts(p), (jax.grad(lambda q: parts(q)[0])(p), jax.grad(lambda q: parts(q)[1])(p))))(before)
  np.testing.assert_allclose(float(m["loss"]), float(nll), rtol=1e-5)
  np.testing.assert_allclose(float(m["aux_loss"]), float(aux), rtol=1e-5)
  grad = jax.tree.map(lambda n, a: n + coef * a, g_nll, g_aux)
  np.testing.assert_allclose(float(m["grad_norm"]), float(optax.tree.norm(grad)), rtol=1e-4)
  flat = jax.tree.flatten_with_path(before)[0]
  for (path, p), n, gn, ga in zip(flat, jax.tree.leaves(new.params), jax.tree.leaves(g_nll),
                                  jax.tree.leaves(g_aux)):
    want = 0.5 * (np.asarray(gn) + coef * np.asarray(ga))
    # Read as parameter differences: float32 rounding of |p| adds to the error.
    atol = 1e-5 * np.abs(want).max() + 4 * np.finfo(np.float32).eps * np.abs(np.asarray(p)).max()
    np.testing.assert_allclose(np.asarray(p) - np.asarray(n), want, rtol=1e-4, atol=atol,
                               err_msg=jax.tree_util.keystr(path))
  router_aux = coef * np.abs(np.asarray(g_aux["layers_0"]["mlp"]["gate"])).max()
  assert router_aux > 1e-2 * np.abs(np.asarray(g_nll["layers_0"]["mlp"]["gate"])).max()


def test_train_loop_loss_falls():
  """A short run of the reverse-copy task lowers the loss and calls back with metrics."""
  seen = []
  cfg = supervised.SupervisedConfig(batch_size=16, num_digits=3, num_steps=40, log_every=10)
  _, history = supervised.train(ModelConfig(vocab_size=32), cfg, _mesh(1, 2),
                                on_metrics=lambda s, m: seen.append(s))
  assert seen == [1, 10, 20, 30, 40]
  assert history[-1]["loss"] < 0.8 * history[0]["loss"]



def test_train_passes_its_settings_to_the_optimizer_and_the_batches():
  """`train` with warm-up, weight decay, clipping and a seed of its own matches three steps of
  `make_train_step` under an optimizer built apart (optax's clip and AdamW; the schedule by
  hand: warm-up 1 then cosine over 2 steps to 0.1 lr: 0, lr, 0.55 lr) on the seed's
  reverse-copy batches of `num_digits`. A setting dropped on its way (weight decay, grad
  clip 0.05, which binds here, the warm-up) or another batch shape changes the losses or
  the weights."""
  cfg = supervised.SupervisedConfig(batch_size=8, num_digits=3, num_steps=3, learning_rate=1e-2,
                                    warmup_steps=1, weight_decay=0.1, grad_clip=0.05, seed=3,
                                    log_every=1)
  model_cfg = ModelConfig(vocab_size=32, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                          expert_d_ff=32, num_experts=4, top_k=2, num_layers=1)
  mesh = _mesh(1, 1)
  state, history = supervised.train(model_cfg, cfg, mesh)
  model = MoETransformer(model_cfg, mesh)
  lrs = jnp.array([0.0, 1e-2, 0.55e-2])
  tx = optax.chain(optax.clip_by_global_norm(0.05),
                   optax.adamw(lambda count: lrs[count], weight_decay=0.1))
  ref, shardings = create_train_state(model, tx, jax.random.key(3), mesh)
  step = supervised.make_train_step(model, tx, mesh, shardings)
  rng, losses = np.random.default_rng(3), []
  for _ in range(3):
    ref, m = step(ref, synthetic.reverse_copy_batch(rng, 8, 3))
    losses.append(float(m["loss"]))
    assert float(m["grad_norm"]) > 0.05  # the clip binds at every step
  np.testing.assert_allclose([h["loss"] for h in history], losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               state.params, ref.params)

@pytest.mark.parametrize("kwargs, field", [
    (dict(batch_size=0), "batch_size"), (dict(num_steps=0), "num_steps"),
    (dict(learning_rate=0.0), "learning_rate"),
    # Passed before: NaN trained on NaN, the rest failed later or were used silently.
    (dict(learning_rate=float("nan")), "learning_rate"), (dict(batch_size=16.0), "batch_size"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(grad_clip=0.0), "grad_clip"),
    (dict(warmup_steps=-1), "warmup_steps"), (dict(seed=1.5), "seed")])
def test_config_validation(kwargs, field):
  with pytest.raises(ValueError, match=field):
    supervised.SupervisedConfig(**kwargs)


def test_batch_not_divisible_by_mesh():
  with pytest.raises(ValueError, match="batch_size=6 must be divisible by the 8 token shards"):
    supervised.SupervisedConfig(batch_size=6).validate_mesh(_mesh(2, 4))


def test_vocab_too_small_for_task():
  with pytest.raises(ValueError, match="vocab_size=8"):
    supervised.train(ModelConfig(vocab_size=8), supervised.SupervisedConfig(num_steps=1),
                     _mesh(1, 1))
