"""MoEBlock: float32 router, record/replay, the expert paths, dropping and the aux loss, against
numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax import ModelConfig
from pr2_jax.models import routing
from pr2_jax.models.moe import MoEBlock

CFG = ModelConfig(d_model=32, head_dim=8, expert_d_ff=24, num_experts=8, top_k=2)
B, T = 2, 8


def _init(cfg=CFG, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(100 + seed), (B, T, cfg.d_model))
  params = nn.unbox(MoEBlock(cfg).init(jax.random.PRNGKey(seed), x))["params"]
  # Larger router/expert weights than the 0.02 init so routing and outputs are far from ties.
  params = jax.tree.map(lambda w: w * 20.0, params)
  return x, params


def _silu(x):
  return x / (1.0 + np.exp(-x))


def np_moe(x_BTD, params, cfg, routes_BTK=None):
  """numpy oracle: softmax router, top-k (or replayed ids), gates from the full softmax,
  SwiGLU sum."""
  x = np.asarray(x_BTD, np.float64).reshape(-1, cfg.d_model)
  logits = x @ np.asarray(params["gate"], np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ids = np.argsort(-probs, -1, kind="stable")[:, :cfg.top_k]
  if routes_BTK is not None:
    r = np.asarray(routes_BTK).reshape(-1, cfg.top_k)
    ids = np.where(r[:, :1] >= 0, r, ids)
  g = np.take_along_axis(probs, ids, -1)
  if cfg.norm_topk_prob:
    g = g / g.sum(-1, keepdims=True)
  wg, wu, wd = (np.asarray(params[n], np.float64) for n in ("gate_proj", "up_proj", "down_proj"))
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for j, e in enumerate(ids[n]):
      y[n] += g[n, j] * (_silu(x[n] @ wg[e]) * (x[n] @ wu[e])) @ wd[e]
  return y.reshape(x_BTD.shape), ids.reshape(B, T, cfg.top_k), logits.reshape(B, T, -1)


def test_params_shapes_dtypes_and_logical_names():
  """Router 'gate' [D,E], experts stacked [E,D,F]/[E,F,D], all float32, experts on the
  'expert' axis."""
  x = jnp.zeros((B, T, 32), jnp.bfloat16)
  boxed = jax.eval_shape(MoEBlock(CFG.replace(dtype="bfloat16")).init,
                         jax.random.PRNGKey(0), x)["params"]
  shapes = {k: (v.value.shape, v.value.dtype, v.names) for k, v in boxed.items()}
  assert shapes == {
      "gate": ((32, 8), jnp.float32, ("embed", "experts_logits")),
      "gate_proj": ((8, 32, 24), jnp.float32, ("expert", "embed", "mlp")),
      "up_proj": ((8, 32, 24), jnp.float32, ("expert", "embed", "mlp")),
      "down_proj": ((8, 24, 32), jnp.float32, ("expert", "mlp", "embed")),
  }


@pytest.mark.parametrize("impl", ["capacity", "dense", "ragged"])
@pytest.mark.parametrize("norm", [True, False])
def test_live_forward_matches_numpy(impl, norm):
  """Output, recorded routes and router logits equal the numpy oracle for every expert path."""
  cfg = CFG.replace(expert_impl=impl, norm_topk_prob=norm)
  x, params = _init(cfg)
  y, aux = jax.jit(MoEBlock(cfg).apply)({"params": params}, x)
  y_ref, ids_ref, logits_ref = np_moe(x, params, cfg)
  assert y.shape == (B, T, 32) and y.dtype == jnp.float32
  assert aux.routes_BTK.dtype == jnp.int32
  np.testing.assert_array_equal(aux.routes_BTK, ids_ref)
  np.testing.assert_allclose(aux.logits_BTE, logits_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.abs(y_ref).max())
  assert int(aux.dropped) == 0


def test_replay_with_live_rows_matches_numpy():
  """Replayed rows use their ids with gates from the full softmax; -1 rows pick the live top-k."""
  x, params = _init()
  rng = np.random.default_rng(0)
  routes = (np.stack([rng.permutation(8)[:2] for _ in range(B * T)])
            .reshape(B, T, 2).astype(np.int32))
  routes[1, ::2] = -1
  y, aux = MoEBlock(CFG).apply({"params": params}, x, jnp.asarray(routes))
  y_ref, ids_ref, _ = np_moe(x, params, CFG, routes)
  np.testing.assert_array_equal(aux.routes_BTK, ids_ref)
  _, live, _ = np_moe(x, params, CFG)
  np.testing.assert_array_equal(aux.routes_BTK[1, ::2], live[1, ::2])
  np.testing.assert_array_equal(aux.routes_BTK[0], routes[0])
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4 * np.abs(y_ref).max())


def test_replaying_recorded_routes_is_bitwise_identical():
  """Feeding back the recorded routes gives exactly the same output (jitted)."""
  x, params = _init(seed=1)
  apply = jax.jit(MoEBlock(CFG).apply)
  y, aux = apply({"params": params}, x)
  y2, aux2 = apply({"params": params}, x, aux.routes_BTK)
  np.testing.assert_array_equal(y2, y)
  np.testing.assert_array_equal(aux2.routes_BTK, aux.routes_BTK)


def test_foreign_routes_router_gets_gradient_unused_experts_get_none():
  """Replaying routes that avoid experts 6, 7: router grad non-zero, those experts'
  grads exactly 0."""
  x, params = _init(seed=2)
  rng = np.random.default_rng(1)
  routes = jnp.asarray(np.stack([rng.permutation(6)[:2] for _ in range(B * T)]).reshape(B, T, 2),
                       jnp.int32)
  cot = jax.random.normal(jax.random.PRNGKey(3), (B, T, 32))
  loss = lambda p: jnp.sum(MoEBlock(CFG).apply({"params": p}, x, routes)[0] * cot)
  g = jax.jit(jax.grad(loss))(params)
  assert float(jnp.max(jnp.abs(g["gate"]))) > 0
  for name in ("gate_proj", "up_proj", "down_proj"):
    np.testing.assert_array_equal(g[name][6:], 0.0, err_msg=name)
    assert float(jnp.min(jnp.max(jnp.abs(g[name][:6]), axis=(1, 2)))) > 0, name


def test_small_capacity_drops_and_counts():
  """capacity=1 on one shard: dropped = Σ_e max(0, load_e - 1), the first arrival per
  expert kept."""
  x, params = _init(seed=3)
  y, aux = MoEBlock(CFG).apply({"params": params}, x, capacity=1)
  load = np.bincount(np.asarray(aux.routes_BTK).reshape(-1), minlength=8)
  assert int(aux.dropped) == int(np.maximum(load - 1, 0).sum()) > 0
  y_full, _ = MoEBlock(CFG).apply({"params": params}, x)
  assert float(jnp.max(jnp.abs(y - y_full))) > 1e-3


def test_padding_takes_no_capacity_from_real_tokens():
  """Row 0: 6 identical left pads then 2 real tokens; row 1: 8 real tokens, the first two with
  the pads' hidden state (so they pick the pads' experts). The capacity is the largest real
  load per expert, so nothing real overflows: real rows equal the dropless numpy oracle,
  dropped is 0 and pad rows are 0. Counted, the 6 pads arrived first (token order) at their
  two experts, which then held more than the capacity: real assignments were dropped."""
  x, params = _init(seed=6)
  x = x.at[0, :6].set(x[0, 0]).at[1, :2].set(x[0, 0])
  valid = np.ones((B, T), bool)
  valid[0, :6] = False
  y_ref, ids_ref, _ = np_moe(x, params, CFG)
  load_E = np.bincount(ids_ref[valid].ravel(), minlength=8)
  capacity = int(load_E.max())
  pad_experts = ids_ref[0, 0]
  assert set(ids_ref[1, 0].tolist()) == set(pad_experts.tolist())
  assert load_E[pad_experts].max() + 6 > capacity  # the pads would overflow one
  y, aux = jax.jit(MoEBlock(CFG).apply, static_argnames="capacity")(
      {"params": params}, x, capacity=capacity, valid_BT=jnp.asarray(valid))
  assert int(aux.dropped) == 0
  np.testing.assert_array_equal(y[0, :6], 0.0)
  np.testing.assert_allclose(y[valid], y_ref[valid], rtol=1e-4,
                             atol=1e-4 * np.abs(y_ref).max())


def test_aux_loss_is_switch_loss_of_the_routing():
  """aux_loss = switch_aux_loss(softmax(router logits), routes used)."""
  x, params = _init(seed=4)
  _, aux = MoEBlock(CFG).apply({"params": params}, x)
  probs = jax.nn.softmax(aux.logits_BTE.reshape(-1, 8), -1)
  expected = routing.switch_aux_loss(probs, aux.routes_BTK.reshape(-1, 2))
  np.testing.assert_allclose(aux.aux_loss, expected, rtol=1e-6)
  assert float(aux.aux_loss) >= 1.0 - 1e-6  # minimum at perfectly even routing


def test_bfloat16_router_stays_float32():
  """With bfloat16 compute the router logits are float32, output bfloat16 and close to float32."""
  x, params = _init(seed=5)
  cfg16 = CFG.replace(dtype="bfloat16")
  y32, aux32 = MoEBlock(CFG).apply({"params": params}, x)
  y16, aux16 = MoEBlock(cfg16).apply({"params": params}, x.astype(jnp.bfloat16), aux32.routes_BTK)
  assert y16.dtype == jnp.bfloat16 and aux16.logits_BTE.dtype == jnp.float32
  logit_scale = float(jnp.max(jnp.abs(aux32.logits_BTE)))
  np.testing.assert_allclose(aux16.logits_BTE, aux32.logits_BTE, rtol=0.05, atol=0.05 * logit_scale)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=0.1,
                             atol=0.05 * float(jnp.max(jnp.abs(y32))))


def test_planned_replicas_match_no_replication_and_never_recompile():
  """A foresight Plan (replicas + token split) computed inside jit from the replayed routes
  gives the no-replication logits and gradients, balances devices, and 20 new plans reuse
  one compiled step."""
  import flax.linen as nn
  from pr2_jax.balance.loads import loads_from_routes
  from pr2_jax.balance.planner import plan_placement
  from pr2_jax.config import ModelConfig
  from pr2_jax.models.transformer import MoETransformer
  from pr2_jax.parallel.mesh import make_mesh

  cfg = ModelConfig(vocab_size=32, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                    expert_d_ff=32, num_experts=8, top_k=2)
  mesh = make_mesh(2, 4)
  model = MoETransformer(cfg, mesh)
  tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, 32)
  params = nn.unbox(MoETransformer(cfg).init(jax.random.key(0), tokens)["params"])

  def loss(p, routes, plan_it):
    plan = None
    if plan_it:
      plan = plan_placement(loads_from_routes(routes, None, cfg.num_experts), 4, 3)
    out = model.apply({"params": p}, tokens, routes=routes, slot_expert=plan)
    return out.logits.sum(), (out.logits, None if plan is None else plan.device_load)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=2)
  def routes_for(seed):
    first = jax.random.randint(jax.random.key(seed), (8, 16, 2, 1), 0, 8)
    shift = jax.random.randint(jax.random.key(seed + 1), (8, 16, 2, 1), 1, 8)
    return jnp.concatenate([first, (first + shift) % 8], axis=-1).astype(jnp.int32)

  routes = routes_for(0)
  (_, (ref_logits, _)), ref_grads = step(params, routes, False)
  (_, (logits, device_load)), grads = step(params, routes, True)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-4, rtol=1e-4)
  load = np.asarray(device_load)
  assert (load.max(1) / load.mean(1)).max() < 1.1
  before = step._cache_size()
  for seed in range(2, 42, 2):
    step(params, routes_for(seed), True)
  assert step._cache_size() == before


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(routes_BTK=jnp.zeros((B, T, 3), jnp.int32)),
     r"routes_BTK has shape \(2, 8, 3\), expected \[B, T, K\] = \(2, 8, 2\)"),
    (dict(routes_BTK=jnp.zeros((B * T, 2), jnp.int32)),
     r"routes_BTK has shape \(16, 2\), expected"),
    (dict(predictor_DE=jnp.zeros((1, 32, 8))),
     r"predictor_DE has shape \(1, 32, 8\), expected \[D, E\] = \(32, 8\)"),
])
def test_wrong_routes_or_predictor_shape_raises_under_jit(kwargs, pattern):
  """Static checks name the shape (a reshape would fail obscurely, [1, D, E] would broadcast)."""
  x, params = _init()
  with pytest.raises(ValueError, match=pattern):
    jax.eval_shape(lambda p, k: MoEBlock(CFG).apply({"params": p}, x, **k), params, kwargs)


def test_planned_replica_split_leaves_padding_out():
  """A hand Plan on one device: 9 slots, experts 0-7 then a second replica of e0 in slot 8,
  shares 1/2 and 1/2. Replayed routes: row 0 is 4 left pads (0, 1) then 4 real tokens with e0
  first; row 1 is 5 real tokens, then 3 right pads. The 4 real e0 assignments split 2 | 2 over
  slots 0 and 8 (the pads split among themselves), so every slot holds at most 2 real ones:
  capacity 2 drops nothing and real rows equal the dropless forward. Had the block split e0's
  8 assignments (pads included) by rank, the pads took slot 0's half and slot 8 got all 4 real
  ones: 2 of them dropped."""
  from pr2_jax.balance import assign_replicas, slot_counts
  from pr2_jax.balance.planner import Plan
  x, params = _init(seed=4)
  routes = np.array([[[0, 1]] * 4 + [[0, 1], [0, 2], [0, 3], [0, 4]],
                     [[5, 6], [5, 6], [7, 1], [7, 2], [3, 4]] + [[6, 7]] * 3], np.int32)
  valid = np.ones((B, T), bool)
  valid[0, :4] = False
  valid[1, 5:] = False
  share = np.array([[0.5] + [1.0] * 7 + [0.5]], np.float32)
  plan = Plan(slot_expert=np.array([list(range(8)) + [0]], np.int32),
              replica_count=np.array([2] + [1] * 7, np.int32), replica_share=share,
              slot_load=share, device_load=np.ones((1,), np.float32))
  ids, real = routes.reshape(B * T, 2), valid.reshape(-1)
  slots = np.asarray(assign_replicas(jnp.asarray(ids), jnp.asarray(real), plan))
  np.testing.assert_array_equal(slots[4:8, 0], [0, 0, 8, 8])  # real e0: 2 | 2
  assert int(np.max(slot_counts(jnp.asarray(slots), 9, 1, jnp.asarray(real)))) == 2
  apply = jax.jit(MoEBlock(CFG).apply, static_argnames="capacity")
  y, aux = apply({"params": params}, x, routes_BTK=jnp.asarray(routes), slot_expert_X=plan,
                 capacity=2, valid_BT=jnp.asarray(valid))
  y_ref, _ = apply({"params": params}, x, routes_BTK=jnp.asarray(routes))
  assert int(aux.dropped) == 0
  np.testing.assert_array_equal(np.asarray(y)[~valid], 0.0)
  np.testing.assert_allclose(np.asarray(y)[valid], np.asarray(y_ref)[valid], rtol=1e-5,
                             atol=1e-5 * float(np.abs(y_ref).max()))


def test_aux_loss_leaves_padding_out():
  """With valid_BT, the Switch loss E * sum_e f_e P_e is over the real tokens only (numpy:
  f_e = real assignments to e / (real tokens * K), P_e = mean real softmax): padding is no
  routed work. Here 5 of the 16 tokens are padding, so the loss over all tokens differs."""
  x, params = _init(seed=4)
  valid = np.ones((B, T), bool)
  valid[0, :3] = False
  valid[1, 6:] = False
  _, aux = MoEBlock(CFG).apply({"params": params}, x, valid_BT=jnp.asarray(valid))
  _, ids, logits = np_moe(x, params, CFG)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)

  def switch(keep):
    f = np.bincount(ids[keep].ravel(), minlength=8) / (keep.sum() * CFG.top_k)
    return 8 * np.sum(f * probs[keep].mean(0))

  want, unmasked = switch(valid), switch(np.ones_like(valid))
  assert abs(want - unmasked) > 1e-3  # the test can tell the two apart
  np.testing.assert_allclose(float(aux.aux_loss), want, rtol=1e-5)
