"""Train state: born sharded, and its per-device memory computed from shapes alone."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pr2_jax.config import ModelConfig
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.train.state import (bytes_per_device, clip_by_global_norm, create_train_state,
                                  make_optimizer, predictor_initializer, state_memory,
                                  train_only)

CFG = ModelConfig(vocab_size=24, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  expert_d_ff=16, num_experts=8, top_k=2, num_layers=2)


def _device0_bytes(tree):
  """Bytes the first device really holds (the oracle for the shape-only count)."""
  dev = jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == dev)


@pytest.mark.parametrize("data, expert", [(8, 1), (2, 4), (1, 8)])
def test_state_memory_matches_the_arrays_a_device_holds(data, expert):
  mesh = make_mesh(data, expert)
  model, tx = MoETransformer(CFG, mesh), optax.adamw(1e-3)
  state, _ = create_train_state(model, tx, jax.random.key(0), mesh)
  mem = state_memory(model, tx, mesh)
  assert mem["params"] == _device0_bytes(state.params)
  assert mem["opt_state"] == _device0_bytes(state.opt_state)
  assert mem["total"] == 2 * mem["params"] + mem["opt_state"]
  assert mem["param_count"] == sum(x.size for x in jax.tree.leaves(state.params))


def test_state_memory_without_a_mesh_is_one_devices():
  """mesh=None, MoETransformer's one-device mode, was an AttributeError on None.shape."""
  one = state_memory(MoETransformer(CFG), optax.adamw(1e-3))
  state, _ = create_train_state(MoETransformer(CFG), optax.adamw(1e-3), jax.random.key(0),
                                make_mesh(1, 1, jax.devices()[:1]))
  assert one["params"] == _device0_bytes(state.params) == 4 * one["param_count"]
  assert one["opt_state"] == _device0_bytes(state.opt_state)


def test_a_state_on_another_mesh_than_the_models_is_refused():
  """The state was laid out for its own mesh while the model's shard_maps split the work over
  another, resharding every call: neither what validate_mesh approved nor what was asked."""
  tx = optax.adamw(1e-3)
  model = MoETransformer(CFG, make_mesh(2, 4))
  with pytest.raises(ValueError, match=r"the model was built on the mesh \{'data': 2, "
                                       r"'expert': 4\}, the state is asked for on "
                                       r"\{'data': 8, 'expert': 1\}"):
    create_train_state(model, tx, jax.random.key(0), make_mesh(8, 1))
  # state_memory without a mesh takes the model's (it was 1 x 1, then a batch-split error).
  assert state_memory(model, tx) == state_memory(model, tx, make_mesh(2, 4))
  assert state_memory(model, tx)["params"] < state_memory(MoETransformer(CFG), tx)["params"]


def test_state_memory_counts_one_gradient_per_parameter():
  """`grads` is what the update's gradients hold, laid out like the parameters: `params` again,
  not the optimizer's two moments (memory_plan prints it as a column of its own). Hand count
  on one device: 4 bytes per float32 parameter."""
  one = state_memory(MoETransformer(CFG), optax.adamw(1e-3))
  assert one["grads"] == one["params"] == 4 * one["param_count"]
  mesh = make_mesh(2, 4)
  split = state_memory(MoETransformer(CFG, mesh), optax.adamw(1e-3), mesh)
  assert split["grads"] == split["params"] < one["params"]


def test_bytes_per_device_takes_each_leafs_dtype_and_shard():
  """The model's parameters are all float32, so a count of 4 bytes an element, or of whole
  arrays on the fake 8-way data axis, would only show here. Hand count: a [16, 6] bfloat16
  split 8 ways is 2 x 6 x 2 = 24 bytes, a replicated [5] int8 5, a replicated [4, 4] float32
  64."""
  mesh = make_mesh(8, 1)
  tree = {"a": jax.ShapeDtypeStruct((16, 6), jnp.bfloat16),
          "b": jax.ShapeDtypeStruct((5,), jnp.int8),
          "c": jax.ShapeDtypeStruct((4, 4), jnp.float32)}
  shardings = {"a": NamedSharding(mesh, PartitionSpec("data", None)),
               "b": NamedSharding(mesh, PartitionSpec()),
               "c": NamedSharding(mesh, PartitionSpec(None, None))}
  assert bytes_per_device(tree, shardings) == 24 + 5 + 64


def test_expert_weights_split_over_the_expert_axis():
  # Hand count: 3 matrices (gate, up, down) of D x F per expert, E experts, L layers, float32.
  expert_bytes = 2 * 8 * 3 * 32 * 16 * 4
  one = state_memory(MoETransformer(CFG, make_mesh(8, 1)), optax.sgd(1.0), make_mesh(8, 1))
  four = state_memory(MoETransformer(CFG, make_mesh(2, 4)), optax.sgd(1.0), make_mesh(2, 4))
  assert one["params"] - four["params"] == expert_bytes - expert_bytes // 4
  np.testing.assert_equal(four["opt_state"], 0)  # plain SGD keeps no state


def test_fsdp_splits_every_d_model_weight_over_data():
  """fsdp on (2, 4): every parameter but the [Z] q/k norms holds half as much per device
  (hand count), as the arrays a device really holds confirm; a data axis that does not
  divide d_model is refused up front."""
  mesh = make_mesh(2, 4)
  tx = optax.adamw(1e-3)
  plain = state_memory(MoETransformer(CFG, mesh), tx, mesh)
  model = MoETransformer(CFG.replace(fsdp=True), mesh)
  fsdp = state_memory(model, tx, mesh)
  norms = CFG.num_layers * 2 * CFG.head_dim * 4  # q_norm and k_norm scales, float32
  assert fsdp["params"] == (plain["params"] - norms) // 2 + norms
  state, _ = create_train_state(model, tx, jax.random.key(0), mesh)
  assert fsdp["params"] == _device0_bytes(state.params)
  assert fsdp["opt_state"] == _device0_bytes(state.opt_state)
  odd = MoETransformer(CFG.replace(d_model=36, fsdp=True), make_mesh(8, 1))
  with pytest.raises(ValueError, match=r"fsdp=True splits d_model=36 .* size 8 does not divide"):
    create_train_state(odd, tx, jax.random.key(0), make_mesh(8, 1))


@pytest.mark.parametrize("fsdp", [False, True])
def test_predictor_is_born_zero_and_split_like_the_parameters(fsdp):
  """W_p [L, D, E] and its AdamW moments: replicated, or under fsdp split over 'data' on D
  (hand count on (2, 4): 2 layers x 32 x 8 float32 = 2048 bytes, half of it per device)."""
  mesh = make_mesh(2, 4)
  init, (w_sharding, opt_shardings) = predictor_initializer(CFG.replace(fsdp=fsdp),
                                                             optax.adamw(1e-3), mesh)
  w, opt = init()
  assert w.shape == (2, 32, 8) and not np.any(np.asarray(w))
  expected = PartitionSpec(None, "data" if fsdp else None, None)
  assert w.sharding.spec == w_sharding.spec == expected
  assert _device0_bytes(w) == (1024 if fsdp else 2048)
  mu = opt[0].mu  # adamw: (ScaleByAdamState, ...)
  assert mu.sharding.spec == expected and _device0_bytes(mu) == _device0_bytes(w)
  assert jax.tree.structure(opt_shardings) == jax.tree.structure(opt)


def test_predictor_initializer_rejects_a_mesh_the_model_cannot_use():
  tx = optax.adamw(1e-3)
  with pytest.raises(ValueError, match=r"fsdp=True splits d_model=36 .* size 8 does not divide"):
    predictor_initializer(CFG.replace(d_model=36, fsdp=True), tx, make_mesh(8, 1))
  with pytest.raises(ValueError, match=r"num_experts=6 must be divisible .* 'expert' axis size 4"):
    predictor_initializer(CFG.replace(num_experts=6), tx, make_mesh(2, 4))


def _at_schedule_step(state, step):
  """`state` with only the learning-rate schedule's counter moved to `step` (Adam's moments
  and bias-correction count stay fresh, so the update is still Adam's first: sign(g)).
  A constant lr keeps no counter: its state is returned unchanged."""
  is_schedule = lambda path, _: path[-1].tuple_name == "ScaleByScheduleState"
  if not optax.tree_utils.tree_get_all_with_path(state, "count", is_schedule):
    return state
  return optax.tree_utils.tree_set(state, is_schedule, count=jnp.asarray(step, jnp.int32))


@pytest.mark.parametrize("warmup_steps, total_steps, lr_at_step", [
    # lr 0.01, warmup 4, cosine over steps 4..20 to 0.1 * lr, then held there
    (4, 20, {0: 0.0, 2: 0.005, 4: 0.01, 12: 0.0055, 20: 0.001, 30: 0.001}),
    # no warmup: the first update at the peak (it was at 0), cosine over steps 0..20
    (0, 20, {0: 0.01, 10: 0.0055, 20: 0.001}),
    # warmup 1: update 1 at 0, the peak from update 2; cosine over 1..10 (4: cos(pi/3) = 0.5)
    (1, 10, {0: 0.0, 1: 0.01, 4: 0.00775, 10: 0.001}),
    (4, 0, {0: 0.01}),  # no total_steps: a constant lr, no warmup (the state keeps no counter)
])
def test_make_optimizer_schedule_and_decoupled_weight_decay(warmup_steps, total_steps,
                                                           lr_at_step):
  """Adam's first update is -lr_t * (g / (|g| + eps) + wd * p) = -lr_t * (sign(g) + wd * p):
  decoupled weight decay, scaled by the scheduled lr (|g| < grad_clip, so no clipping)."""
  tx = make_optimizer(0.01, warmup_steps=warmup_steps, total_steps=total_steps,
                      weight_decay=0.1)
  p = np.array([0.5, -2.0, 1.5], np.float32)
  g = np.array([0.3, -0.2, 0.05], np.float32)
  for step, lr in lr_at_step.items():
    state = _at_schedule_step(tx.init(jnp.asarray(p)), step)
    update, _ = tx.update(jnp.asarray(g), state, jnp.asarray(p))
    np.testing.assert_allclose(np.asarray(update), -lr * (np.sign(g) + 0.1 * p), rtol=1e-5,
                               atol=1e-9, err_msg=f"step {step}")


def test_make_optimizer_decays_every_leaf_of_a_tree():
  """Weight decay reaches matrices, vectors and stacked expert weights alike (no mask): the
  first update of each leaf is -lr * (sign(g) + wd * p). The test above has one vector leaf,
  so decaying only vectors (norm scales), or only matrices, would pass it."""
  rng = np.random.default_rng(0)
  p = {"kernel": rng.normal(size=(3, 2)), "scale": rng.normal(size=(4,)),
       "experts": rng.normal(size=(2, 2, 3))}
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  g = jax.tree.map(lambda a: 0.01 * jnp.sign(a) + 0.001, p)  # |g| < grad_clip: no clipping
  tx = make_optimizer(0.01, weight_decay=0.1)
  update, _ = tx.update(g, tx.init(p), p)
  for name in p:
    np.testing.assert_allclose(update[name], -0.01 * (np.sign(g[name]) + 0.1 * p[name]),
                               rtol=1e-5, atol=1e-9, err_msg=name)


def test_make_optimizer_eps_shrinks_steps_of_gradients_below_it():
  """Adam's first step is -lr g / (|g| + eps): with eps 1e-3 a gradient of 1e-6 (rounding noise)
  moves its weight by ~1e-3 of lr and one of 1e-2 by 10/11 of it; at 1e-8 both by ~lr."""
  g, lr = jnp.array([1e-6, 1e-2]), 0.1
  for eps, want in ((1e-3, [-lr / 1001, -lr / 1.1]), (1e-8, [-lr / 1.01, -lr / (1 + 1e-6)])):
    tx = make_optimizer(lr, eps=eps)
    update, _ = tx.update(g, tx.init(jnp.zeros(2)), jnp.zeros(2))
    np.testing.assert_allclose(update, want, rtol=1e-4)


def _run_optimizer(tx, grads):
  """The updates `tx` makes from these gradients, in order, on 2 parameters from zero."""
  p = jnp.zeros(2)
  state, updates = tx.init(p), []
  for g in grads:
    update, state = tx.update(jnp.asarray(g), state, p)
    p = optax.apply_updates(p, update)
    updates.append(np.asarray(update))
  return updates


def _numpy_adam(grads, lr, b1, b2, eps):
  """Adam with bias correction and no weight decay, in numpy: the updates, in order."""
  mu, nu, out = np.zeros(2), np.zeros(2), []
  for t, g in enumerate(grads, 1):
    mu, nu = b1 * mu + (1 - b1) * g, b2 * nu + (1 - b2) * g**2
    out.append(-lr * (mu / (1 - b1**t)) / (np.sqrt(nu / (1 - b2**t)) + eps))
  return out


def test_make_optimizer_clips_the_global_norm_before_adam():
  """Two steps, grad_clip=2: g1 (norm 5) is scaled to norm 2, g2 (norm 0.5) is not. Adam's
  first step is sign(g) either way; the second shows the clipped g1 in both moments."""
  b1, b2, eps, lr, clip = 0.9, 0.95, 1e-8, 0.1, 2.0
  grads = [np.array([3.0, -4.0], np.float32), np.array([0.3, 0.4], np.float32)]
  updates = _run_optimizer(make_optimizer(lr, grad_clip=clip, b2=b2), grads)
  # numpy oracle: clip by global norm, then Adam with bias correction (weight decay 0)
  want = _numpy_adam([g * min(1.0, clip / np.linalg.norm(g)) for g in grads], lr, b1, b2, eps)
  # hand-worked: g1 -> [1.2, -1.6]; mu2 = [0.138, -0.104], nu2 = [0.0729, 0.1296]
  np.testing.assert_allclose(want[1], [-0.0840, 0.0475], atol=1e-4)
  np.testing.assert_allclose(updates[0], [-lr, lr], rtol=1e-6)
  np.testing.assert_allclose(updates[1], want[1], rtol=1e-5)


def test_make_optimizer_defaults_are_adams_betas_and_eps():
  """The RL learner and the warm-up take make_optimizer's defaults (b1 0.9, b2 0.999, eps 1e-8,
  docs/benchmarks.md): the first Adam step is sign(g) whatever they are, so three steps of
  unclipped gradients of different sizes against a numpy Adam show them."""
  lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
  grads = [np.array([0.3, -0.02], np.float32), np.array([0.01, 0.5], np.float32),
           np.array([-0.2, 0.05], np.float32)]
  got = _run_optimizer(make_optimizer(lr), grads)
  for t, (update, want) in enumerate(zip(got, _numpy_adam(grads, lr, b1, b2, eps)), 1):
    np.testing.assert_allclose(update, want, rtol=1e-4, err_msg=f"step {t}")


def test_train_only_steps_the_named_parameters_as_alone_and_freezes_the_rest():
  """grad_clip 1 and weight decay 0.5: the router's gradient [0.3, 0.4] (norm 0.5) is not
  clipped, though with the frozen [30, 40] the global norm would be 50 and scale it by 1/50;
  the frozen weights do not decay. Two steps (the frozen gradient 0 in the second, so a clip
  that saw it would scale the two router gradients differently): the router's match a tx of
  its own."""
  lr, wd = 0.1, 0.5
  params = {"mlp": {"gate": jnp.array([1.0, -1.0]), "gate_proj": jnp.array([2.0, 2.0])}}
  grads = {"mlp": {"gate": jnp.array([0.3, 0.4]), "gate_proj": jnp.array([30.0, 40.0])}}
  tx = train_only(make_optimizer(lr, weight_decay=wd), frozenset({"gate"}))
  alone = make_optimizer(lr, weight_decay=wd)
  state, p = tx.init(params), params
  alone_state, router = alone.init(params["mlp"]["gate"]), params["mlp"]["gate"]
  for step in range(2):
    if step:
      grads = {"mlp": {"gate": grads["mlp"]["gate"], "gate_proj": jnp.zeros(2)}}
    update, state = tx.update(grads, state, p)
    p = optax.apply_updates(p, update)
    alone_update, alone_state = alone.update(grads["mlp"]["gate"], alone_state, router)
    router = optax.apply_updates(router, alone_update)
  np.testing.assert_array_equal(p["mlp"]["gate_proj"], params["mlp"]["gate_proj"])
  np.testing.assert_allclose(p["mlp"]["gate"], router, rtol=1e-6)
  # Adam's first step is -lr·sign(g); decay -lr·wd·w: 1 -> 1 - 0.1 - 0.05 = 0.85 after one.
  first = optax.apply_updates(params, tx.update(grads, tx.init(params), params)[0])  # any g>0
  np.testing.assert_allclose(first["mlp"]["gate"], [0.85, -1.05], rtol=1e-6)
  # The state is the wrapped optimizer's own (shardings and checkpoints as for every run).
  assert (jax.tree.structure(tx.init(params)) ==
          jax.tree.structure(make_optimizer(lr).init(params)))


def test_train_only_refuses_a_tree_without_the_named_parameters():
  tx = train_only(make_optimizer(0.1), frozenset({"gate"}))
  with pytest.raises(ValueError, match=r"no parameter path has a key in \['gate'\], so nothing "
                                       r"would train"):
    tx.init({"mlp": {"gate_proj": jnp.zeros(2)}})  # a key that only starts with the name


def _clip_pair(max_norm):
  return clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)


@pytest.mark.parametrize("scale", [0.1, 10.0])  # global norm 0.5 (kept) and 50 (clipped)
def test_clip_by_global_norm_matches_optax(scale):
  """Below max_norm the gradient comes back untouched, bit for bit; above it scaled to norm
  max_norm, as optax's (which divides, then multiplies: to an ulp); the same empty state.
  The norm is the whole tree's: the 3 and the -4 sit in different leaves, so clipping each
  leaf by its own norm (to [2, 0] and -2) fails here."""
  tree = {"a": jnp.array([3.0, 0.0]) * scale,  # |tree| = 5 scale
          "b": {"c": jnp.array([[0.0, -4.0], [0.0, 0.0]]) * scale}}
  ours, theirs = _clip_pair(2.0)
  assert jax.tree.structure(ours.init(tree)) == jax.tree.structure(theirs.init(tree))
  got, _ = ours.update(tree, ours.init(tree))
  want, _ = theirs.update(tree, theirs.init(tree))
  if scale < 1:
    assert all(np.array_equal(g, t) for g, t in zip(jax.tree.leaves(got), jax.tree.leaves(tree)))
  else:  # hand-worked: [30, 0], [[0, -40], [0, 0]] -> [1.2, 0], [[0, -1.6], [0, 0]]
    np.testing.assert_allclose(got["a"], [1.2, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["b"]["c"], [[0.0, -1.6], [0.0, 0.0]], rtol=1e-6)
    assert float(optax.tree.norm(got)) == pytest.approx(2.0, rel=1e-6)
  jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-7, atol=0), got, want)


def test_clip_by_global_norm_zero_gradient_and_bad_max_norm():
  got, _ = clip_by_global_norm(1.0).update({"w": jnp.zeros(3)}, optax.EmptyState())
  np.testing.assert_array_equal(got["w"], np.zeros(3))  # 1 / 0 = inf -> scale 1, no NaN
  for bad in (0.0, -1.0, float("nan"), float("inf"), "1", True):
    with pytest.raises(ValueError, match=r"clip_by_global_norm\.max_norm must be"):
      clip_by_global_norm(bad)


def test_clipped_adamw_does_not_write_out_the_clipped_gradient():
  """Why our clip exists: optax's select(|g| < c, g, g / |g| * c) makes XLA write g / |g| out
  and AdamW's two moment passes read g and it; g * min(1, c / |g|) fuses into them. XLA's
  bytes accessed of the compiled update (params, moments, grads in; params, moments out)."""
  shapes = {"w": jax.ShapeDtypeStruct((64, 256, 64), jnp.float32),
            "b": jax.ShapeDtypeStruct((256,), jnp.float32)}

  def bytes_accessed(clip):
    tx = optax.chain(clip, optax.adamw(1e-3))
    update = jax.jit(lambda p, s, g: tx.update(g, s, p))
    cost = update.lower(shapes, jax.eval_shape(tx.init, shapes), shapes).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]

  ours, theirs = (bytes_accessed(c) for c in _clip_pair(1.0))
  one_pass = 4 * 64 * 256 * 64  # bytes of one read or write of the [64, 256, 64] leaf
  assert theirs - ours >= 2 * one_pass, (ours, theirs, one_pass)
