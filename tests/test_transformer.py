"""MoETransformer: record/replay, -1 rows, router gradients under foreign routes, sharding, dtypes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax import ModelConfig, MoETransformer
from pr2_jax.models import routing
from pr2_jax.parallel.mesh import make_mesh, tree_shardings

CFG = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  expert_d_ff=32, num_experts=8, top_k=2)
B, T, L, K, E = 8, 8, 2, 2, 8  # B divisible by the 8 token shards
LIVE = jnp.full((B, T, L, K), -1, jnp.int32)
POS = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
VALID = jnp.ones((B, T), bool)


def _tokens(seed=0):
  return jax.random.randint(jax.random.PRNGKey(1000 + seed), (B, T), 0, CFG.vocab_size, jnp.int32)


@functools.lru_cache(maxsize=None)
def _params(cfg=CFG, seed=0):
  """Unboxed float32 params; router weights scaled up so routing is far from ties."""
  params = nn.unbox(jax.jit(MoETransformer(cfg).init)(jax.random.PRNGKey(seed), _tokens()))["params"]
  for layer in cfg.moe_layers:
    mlp = params[f"layers_{layer}"]["mlp"]
    mlp["gate"] = mlp["gate"] * 50.0
  return params


@functools.lru_cache(maxsize=None)
def _jit_apply(cfg=CFG, mesh=None, capacity=None):
  """One compiled forward per (config, mesh, capacity): routes (-1 = live), positions and valid
  are always passed, so live, replayed and padded calls share the compilation."""
  model = MoETransformer(cfg, mesh)
  return jax.jit(lambda p, tok, routes, pos, valid: model.apply(
      {"params": p}, tok, routes, positions=pos, valid=valid, capacity=capacity,
      return_router_logits=True, return_router_inputs=True))


def _apply(params, tokens, routes=LIVE, cfg=CFG, mesh=None, capacity=None, pos=POS, valid=VALID):
  return _jit_apply(cfg, mesh, capacity)(params, tokens, routes, pos, valid)


@functools.lru_cache(maxsize=None)
def _value_and_grad(cfg=CFG, mesh=None):
  """jit(value_and_grad) of next-token cross-entropy; aux = (logits, routes used)."""
  model = MoETransformer(cfg, mesh)
  def loss(p, tok, routes):
    out = model.apply({"params": p}, tok, routes)
    logp = jax.nn.log_softmax(out.logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tok[:, 1:, None], -1)), (out.logits, out.routes)
  return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _foreign_routes(num_used=6, seed=0):
  """Random distinct ids drawn from experts [0, num_used) only: experts >= num_used are never used."""
  rng = np.random.default_rng(seed)
  r = np.stack([rng.permutation(num_used)[:K] for _ in range(B * T * L)])
  return jnp.asarray(r.reshape(B, T, L, K), jnp.int32)


def test_output_shapes_dtypes_and_router_outputs():
  """.logits [B,T,V] f32, .routes [B,T,L,K] int32, router logits/inputs [B,T,L,E/D]; top-k(logits) = routes."""
  params = _params()
  out = _apply(params, _tokens())
  assert out.logits.shape == (B, T, 64) and out.logits.dtype == jnp.float32
  assert out.routes.shape == (B, T, L, K) and out.routes.dtype == jnp.int32
  assert out.router_logits.shape == (B, T, L, E) and out.router_logits.dtype == jnp.float32
  assert out.router_inputs.shape == (B, T, L, 32)
  assert out.dropped.shape == (L,) and int(jnp.sum(out.dropped)) == 0
  assert out.aux_loss.shape == ()
  np.testing.assert_array_equal(routing.top_k_experts(jax.nn.softmax(out.router_logits), K), out.routes)
  # The router logits are the router inputs times each layer's router weights.
  for l, layer in enumerate(CFG.moe_layers):
    w = params[f"layers_{layer}"]["mlp"]["gate"]
    np.testing.assert_allclose(out.router_logits[:, :, l], out.router_inputs[:, :, l] @ w, rtol=1e-5, atol=1e-4)
  # aux_loss is the mean over layers of the Switch loss of each layer's routing.
  per_layer = [routing.switch_aux_loss(jax.nn.softmax(out.router_logits[:, :, l]).reshape(-1, E),
                                       out.routes[:, :, l].reshape(-1, K)) for l in range(L)]
  np.testing.assert_allclose(out.aux_loss, np.mean(per_layer), rtol=1e-5)
  # Router outputs are only returned on request (checked abstractly, no compile).
  plain = jax.eval_shape(lambda p, t: MoETransformer(CFG).apply({"params": p}, t), params, _tokens())
  assert plain.router_logits is None and plain.router_inputs is None
  assert plain.routes.shape == (B, T, L, K) and plain.routes.dtype == jnp.int32


def test_replaying_recorded_routes_reproduces_logits_exactly():
  """routes=out.routes gives bitwise the same logits and routes as the recording forward."""
  params, tokens = _params(), _tokens(1)
  out = _apply(params, tokens)
  again = _apply(params, tokens, out.routes)
  np.testing.assert_array_equal(again.logits, out.logits)
  np.testing.assert_array_equal(again.routes, out.routes)
  np.testing.assert_array_equal(again.router_logits, out.router_logits)
  # routes=None (a separately compiled program) routes the same as all -1 rows.
  unreplayed = jax.jit(lambda p, t: MoETransformer(CFG).apply({"params": p}, t))(params, tokens)
  np.testing.assert_allclose(unreplayed.logits, out.logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(unreplayed.routes, out.routes)


def test_replaying_routes_of_another_model_changes_logits():
  """Routes recorded by another random model are used as given and change the logits."""
  tokens = _tokens(2)
  foreign = _apply(_params(seed=1), tokens).routes
  live = _apply(_params(), tokens)
  out = _apply(_params(), tokens, foreign)
  np.testing.assert_array_equal(out.routes, foreign)
  assert not np.array_equal(np.asarray(foreign), np.asarray(live.routes))
  assert float(jnp.max(jnp.abs(out.logits - live.logits))) > 1e-6


@pytest.mark.parametrize("impl", ["capacity", "dense", "ragged"])
def test_foreign_routes_router_gradient_and_zero_grad_for_unused_experts(impl):
  """Replaying routes that never use experts 6 and 7: every router gets gradient, those experts
  get exactly zero gradient, used experts get non-zero gradient."""
  cfg = CFG.replace(expert_impl=impl)
  routes = _foreign_routes(num_used=6)
  (_, (_, used)), grads = _value_and_grad(cfg)(_params(), _tokens(3), routes)
  np.testing.assert_array_equal(used, routes)
  for layer in cfg.moe_layers:
    g = grads[f"layers_{layer}"]["mlp"]
    assert float(jnp.max(jnp.abs(g["gate"]))) > 0, layer
    for name in ("gate_proj", "up_proj", "down_proj"):
      np.testing.assert_array_equal(g[name][6:], 0.0, err_msg=f"layer {layer} {name}")
      assert float(jnp.min(jnp.max(jnp.abs(g[name][:6]), axis=(1, 2)))) > 0, (layer, name)


def test_minus_one_rows_use_the_live_router():
  """Mixed routes: -1 rows get the live router's choice, replayed rows keep their ids.

  Foreign rows are put in layer 0 only for the first half of the positions; layer-0 router
  inputs do not depend on any MoE output, so the -1 rows of layer 0 must equal the live routes,
  and in every layer each -1 row equals the top-k of that same forward's router logits."""
  params, tokens = _params(), _tokens(4)
  live = _apply(params, tokens)
  foreign = np.asarray(_foreign_routes(num_used=8, seed=2))
  routes = np.full((B, T, L, K), -1, np.int32)
  routes[:, : T // 2, 0] = foreign[:, : T // 2, 0]
  routes[1:, T // 2:, 1] = foreign[1:, T // 2:, 1]
  out = _apply(params, tokens, jnp.asarray(routes))
  used = np.asarray(out.routes)
  replayed = routes[..., 0] >= 0
  np.testing.assert_array_equal(used[replayed], routes[replayed])
  np.testing.assert_array_equal(used[:, T // 2:, 0], np.asarray(live.routes)[:, T // 2:, 0])
  np.testing.assert_array_equal(out.router_logits[:, :, 0], live.router_logits[:, :, 0])
  own_top_k = np.asarray(routing.top_k_experts(jax.nn.softmax(out.router_logits), K))
  np.testing.assert_array_equal(used[~replayed], own_top_k[~replayed])
  assert not np.array_equal(used, np.asarray(live.routes))  # the replayed rows did change something


def test_capacity_argument_drops_per_layer():
  """A static capacity of 1 drops (token, k) pairs in each layer and changes the logits."""
  params, tokens = _params(), _tokens(5)
  out = _apply(params, tokens, capacity=1)
  assert out.dropped.shape == (L,) and bool(jnp.all(out.dropped > 0))
  full = _apply(params, tokens, out.routes)
  assert float(jnp.max(jnp.abs(out.logits - full.logits))) > 0


def _sharded(cfg, mesh):
  """Params placed with the mesh model's logical shardings."""
  boxed = jax.eval_shape(MoETransformer(cfg, mesh).init, jax.random.PRNGKey(0), _tokens())["params"]
  return jax.device_put(_params(cfg), tree_shardings(mesh, boxed))


@pytest.mark.parametrize("shape, impl", [((2, 4), "capacity"), ((1, 8), "capacity"), ((2, 4), "ragged")])
def test_sharded_model_equals_single_device(shape, impl):
  """On 8 fake devices the jitted sharded model equals the single-device one: routes, logits, grads."""
  cfg = CFG.replace(expert_impl=impl)
  mesh = make_mesh(*shape)
  params, tokens = _params(cfg), _tokens(6)
  p_sh = _sharded(cfg, mesh)
  expert_w = p_sh["layers_0"]["mlp"]["gate_proj"]
  assert expert_w.sharding.spec[0] == "expert"
  assert {s.data.shape[0] for s in expert_w.addressable_shards} == {E // shape[1]}
  (loss_ref, (logits_ref, routes_ref)), g_ref = _value_and_grad(cfg)(params, tokens, LIVE)
  (loss, (logits, routes)), g = _value_and_grad(cfg, mesh)(p_sh, tokens, LIVE)
  np.testing.assert_array_equal(routes, routes_ref)
  scale = float(jnp.max(jnp.abs(logits_ref)))
  np.testing.assert_allclose(logits, logits_ref, rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  for path, a in jax.tree_util.tree_leaves_with_path(g):
    b = functools.reduce(lambda t, k: t[k.key], path, g_ref)
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg=jax.tree_util.keystr(path))


def test_sharded_model_with_replica_slots():
  """A per-layer slot map with replica slots on the (2,4) mesh gives the single-device logits."""
  mesh = make_mesh(2, 4)
  tokens = _tokens(7)
  ref = _apply(_params(), tokens)
  # 3 slots per device: its 2 experts plus a copy of a hot expert (different per layer).
  slot_map = jnp.asarray([[0, 1, 5, 2, 3, 0, 4, 5, 1, 6, 7, 0],
                          [0, 1, 7, 2, 3, 7, 4, 5, 2, 6, 7, 3]], jnp.int32)
  model = MoETransformer(CFG, mesh)
  out = jax.jit(lambda p, t, s: model.apply({"params": p}, t, slot_expert=s))(
      _sharded(CFG, mesh), tokens, slot_map)
  np.testing.assert_array_equal(out.routes, ref.routes)
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(ref.logits))))


def test_bfloat16_runs_and_is_close_to_float32():
  """bfloat16 compute gives float32 logits close to the float32 model (same routes replayed)."""
  cfg16 = CFG.replace(dtype="bfloat16")
  params, tokens = _params(), _tokens(8)
  ref = _apply(params, tokens)
  live16 = _apply(params, tokens, cfg=cfg16)
  assert live16.logits.dtype == jnp.float32 and live16.router_logits.dtype == jnp.float32
  assert np.mean(np.asarray(live16.routes) == np.asarray(ref.routes)) > 0.8
  out16 = _apply(params, tokens, ref.routes, cfg=cfg16)
  scale = float(jnp.max(jnp.abs(ref.logits)))
  np.testing.assert_allclose(out16.logits, ref.logits, rtol=0.05, atol=0.05 * scale)
  assert not np.array_equal(np.asarray(out16.logits), np.asarray(ref.logits))  # really lower precision


def test_dense_layers_shrink_the_routes_layer_axis():
  """With dense_layers=(0,) of 3 layers, L = 2 MoE layers (model layers 1, 2); layer 0 has a
  dense MLP and no router; routes[:, :, l] drives model layer moe_layers[l]."""
  cfg = CFG.replace(num_layers=3, dense_layers=(0,), dense_d_ff=48)
  params = _params(cfg)
  assert set(params["layers_0"]["mlp"]) == {"gate_proj", "up_proj", "down_proj"}
  assert params["layers_0"]["mlp"]["gate_proj"]["kernel"].shape == (32, 48)
  assert "gate" in params["layers_1"]["mlp"] and "gate" in params["layers_2"]["mlp"]
  tokens = _tokens()
  out = _apply(params, tokens, LIVE, cfg=cfg)  # LIVE has L = 2 = num_moe_layers
  assert out.routes.shape == (B, T, 2, K)
  assert out.router_logits.shape == (B, T, 2, E) and out.router_inputs.shape == (B, T, 2, 32)
  assert out.dropped.shape == (2,)
  for l, layer in enumerate((1, 2)):
    np.testing.assert_allclose(out.router_logits[:, :, l], out.router_inputs[:, :, l] @
                               params[f"layers_{layer}"]["mlp"]["gate"], rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(_apply(params, tokens, out.routes, cfg=cfg).logits, out.logits)
  # Replaying only layer 2's routes (layer 1 live) changes layer 2's routes but not layer 1's.
  routes = np.full((B, T, 2, K), -1, np.int32)
  routes[:, :, 1] = np.asarray(_foreign_routes(seed=4))[:, :, 0]
  mixed = _apply(params, tokens, jnp.asarray(routes), cfg=cfg)
  np.testing.assert_array_equal(mixed.routes[:, :, 0], out.routes[:, :, 0])
  np.testing.assert_array_equal(mixed.routes[:, :, 1], routes[:, :, 1])


def test_tie_embeddings_has_no_lm_head():
  """Tied: no lm_head param, and the head is the embedding: zeroing a vocab row of the embedding
  that no input token uses sets exactly that logit column to zero."""
  tied = CFG.replace(tie_embeddings=True)
  boxed = jax.eval_shape(MoETransformer(tied).init, jax.random.PRNGKey(0), _tokens())["params"]
  assert "lm_head" not in boxed
  assert _params()["lm_head"]["kernel"].shape == (32, 64)
  params = {k: v for k, v in _params().items() if k != "lm_head"}
  assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(boxed))
  tokens = _tokens()
  out = _apply(params, tokens, cfg=tied)
  assert out.logits.shape == (B, T, 64)
  unused = int(np.setdiff1d(np.arange(64), np.asarray(tokens))[0])
  assert float(jnp.min(jnp.abs(out.logits[..., unused]))) > 0
  p2 = dict(params, embed_tokens=params["embed_tokens"].at[unused].set(0.0))
  np.testing.assert_array_equal(_apply(p2, tokens, cfg=tied).logits[..., unused], 0.0)


def test_left_padding_matches_unpadded():
  """Left-padded prompts (positions + valid) give the unpadded logits and routes on the real tokens."""
  params, tokens = _params(), _tokens(9)
  ref = _apply(params, tokens)  # causal: logits at t < 6 depend on tokens[:, :6] only
  padded = jnp.concatenate([jnp.full((B, 2), 7, jnp.int32), tokens[:, :6]], axis=1)
  valid = jnp.concatenate([jnp.zeros((B, 2), bool), jnp.ones((B, 6), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  out = _apply(params, padded, pos=positions, valid=valid)
  np.testing.assert_array_equal(out.routes[:, 2:], ref.routes[:, :6])
  np.testing.assert_allclose(out.logits[:, 2:], ref.logits[:, :6], rtol=1e-5, atol=1e-5)
