"""MoETransformer: record/replay, -1 rows, router gradients under foreign routes, sharding,
dtypes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax import ModelConfig, MoETransformer
from pr2_jax.models import routing, transformer
from pr2_jax.parallel.mesh import make_mesh, tree_shardings
from test_grouped import count_lowerings

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
  params = nn.unbox(
      jax.jit(MoETransformer(cfg).init)(jax.random.PRNGKey(seed), _tokens()))["params"]
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
  """Random distinct ids drawn from experts [0, num_used) only: experts >= num_used are
  never used."""
  rng = np.random.default_rng(seed)
  r = np.stack([rng.permutation(num_used)[:K] for _ in range(B * T * L)])
  return jnp.asarray(r.reshape(B, T, L, K), jnp.int32)


def test_output_shapes_dtypes_and_router_outputs():
  """.logits [B,T,V] f32, .routes [B,T,L,K] int32, router logits/inputs [B,T,L,E/D];
  top-k(logits) = routes."""
  params = _params()
  out = _apply(params, _tokens())
  assert out.logits.shape == (B, T, 64) and out.logits.dtype == jnp.float32
  assert out.routes.shape == (B, T, L, K) and out.routes.dtype == jnp.int32
  assert out.router_logits.shape == (B, T, L, E) and out.router_logits.dtype == jnp.float32
  assert out.router_inputs.shape == (B, T, L, 32)
  assert out.dropped.shape == (L,) and int(jnp.sum(out.dropped)) == 0
  assert out.aux_loss.shape == ()
  np.testing.assert_array_equal(routing.top_k_experts(jax.nn.softmax(out.router_logits), K),
                                out.routes)
  # The router logits are the router inputs times each layer's router weights.
  for l, layer in enumerate(CFG.moe_layers):
    w = params[f"layers_{layer}"]["mlp"]["gate"]
    np.testing.assert_allclose(out.router_logits[:, :, l], out.router_inputs[:, :, l] @ w,
                               rtol=1e-5, atol=1e-4)
  # aux_loss is the mean over layers of the Switch loss of each layer's routing.
  per_layer = [routing.switch_aux_loss(jax.nn.softmax(out.router_logits[:, :, l]).reshape(-1, E),
                                       out.routes[:, :, l].reshape(-1, K)) for l in range(L)]
  np.testing.assert_allclose(out.aux_loss, np.mean(per_layer), rtol=1e-5)
  # Router outputs are only returned on request (checked abstractly, no compile).
  plain = jax.eval_shape(lambda p, t: MoETransformer(CFG).apply({"params": p}, t), params,
                         _tokens())
  assert plain.router_logits is None and plain.router_inputs is None
  assert plain.routes.shape == (B, T, L, K) and plain.routes.dtype == jnp.int32


def test_eager_apply_with_the_same_shapes_compiles_once():
  """`model.apply` outside jit (the README's first example): a second call with other tokens
  builds no XLA program. The grouped expert path's lax.cond had closures made per call as
  branches and compiled them again every call (2 compilations, ~3.5 s a call)."""
  model, params = MoETransformer(CFG), _params()
  model.apply({"params": params}, _tokens())
  tokens = _tokens(1)  # other values, outside the count
  with count_lowerings() as built:
    logits = model.apply({"params": params}, tokens).logits
  assert built == []
  np.testing.assert_allclose(logits, _apply(params, tokens).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("replicas", [None, "slot_map", "plan"])
def test_eager_apply_on_a_mesh_with_the_same_shapes_compiles_once(replicas):
  """The same on a (2, 4) mesh, also with a slot map of replicas or a balance plan: outside
  jit, shard_map runs its body op by op and compiled every op again on each call (the
  routing's and the experts': 104 compilations, ~5 s a call; 190 and ~8 s with the slot map);
  a plan closed over by the replica split compiled one program per layer and call."""
  from pr2_jax.balance.planner import plan_placement
  mesh = make_mesh(2, 4)
  model, params = MoETransformer(CFG, mesh), _params()
  kw = {}
  if replicas == "slot_map":  # 3 slots per device: its 2 experts plus a copy of a hot one
    kw["slot_expert"] = jnp.asarray([[0, 1, 5, 2, 3, 0, 4, 5, 1, 6, 7, 0],
                                     [0, 1, 7, 2, 3, 7, 4, 5, 2, 6, 7, 3]], jnp.int32)
  elif replicas == "plan":  # expert 3 hot: split over replicas by the plan's shares
    kw["slot_expert"] = plan_placement(jnp.ones((L, E)).at[:, 3].set(5.0), 4, 3)
  model.apply({"params": params}, _tokens(), **kw)
  tokens = _tokens(1)  # other values, outside the count
  with count_lowerings() as built:
    out = model.apply({"params": params}, tokens, **kw)
  assert built == []
  ref = _apply(params, tokens)
  np.testing.assert_array_equal(out.routes, ref.routes)
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref.logits))))


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
  """A static capacity of 1 drops (token, k) pairs in each layer and changes the logits.

  By hand: B*T*K = 8*8*2 = 128 (token, k) pairs per layer, one slot per expert (no mesh: one
  shard), so each layer keeps one pair per expert it uses: 8 kept, 128 - 8 = 120 dropped when
  all E = 8 experts get a pair. The numpy count from the routes says the same per layer:
  dropped_l = sum_e max(load_le - 1, 0)."""
  params, tokens = _params(), _tokens(5)
  out = _apply(params, tokens, capacity=1)
  routes = np.asarray(out.routes)
  load_LE = np.stack([np.bincount(routes[:, :, l].ravel(), minlength=E) for l in range(L)])
  assert np.all(load_LE > 0)  # every expert is used in both layers: the 120 above applies
  np.testing.assert_array_equal(out.dropped, np.maximum(load_LE - 1, 0).sum(-1))
  np.testing.assert_array_equal(out.dropped, [B * T * K - E] * L)  # [120, 120]
  full = _apply(params, tokens, out.routes)
  assert float(jnp.max(jnp.abs(out.logits - full.logits))) > 0


def _sharded(cfg, mesh):
  """Params placed with the mesh model's logical shardings."""
  boxed = jax.eval_shape(MoETransformer(cfg, mesh).init, jax.random.PRNGKey(0), _tokens())["params"]
  return jax.device_put(_params(cfg), tree_shardings(mesh, boxed))


@pytest.mark.parametrize("shape, impl",
                         [((2, 4), "capacity"), ((1, 8), "capacity"), ((2, 4), "ragged")])
def test_sharded_model_equals_single_device(shape, impl):
  """On 8 fake devices the jitted sharded model equals the single-device one: routes,
  logits, grads."""
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
  for path, a in jax.tree.leaves_with_path(g):
    b = functools.reduce(lambda t, k: t[k.key], path, g_ref)
    scale = float(jnp.max(jnp.abs(b)))
    assert scale > 0, jax.tree_util.keystr(path)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


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
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5,
                             atol=1e-5 * float(jnp.max(jnp.abs(ref.logits))))


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
  # really lower precision
  assert not np.array_equal(np.asarray(out16.logits), np.asarray(ref.logits))


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


CFG3 = CFG.replace(num_layers=3, dense_layers=(0,), dense_d_ff=48)  # layer 0 dense, 1-2 MoE


def _with(params, layer, path, value):
  """`params` with params[layer][path...] set to `value` (a new tree; the cache is kept)."""
  def put(tree, keys):
    return {**tree, keys[0]: value if len(keys) == 1 else put(tree[keys[0]], keys[1:])}
  return put(params, (layer,) + tuple(path))


def test_with_every_output_projection_zero_the_logits_are_the_head_of_the_embedding():
  """Pre-norm residuals, x + attn(norm(x)) then + mlp(norm(.)): with every attention o_proj and
  every MLP's and expert's down_proj zero, each layer passes x on unchanged, and the logits are
  rms_norm(embed[tokens]) * norm.scale @ lm_head, worked here in float64. Every norm scale is
  random, so a residual added to a normed stream (h + f(h), in the attention, the dense MLP or
  the MoE block) shows: the dense one passed every other test of this file."""
  p = _params(CFG3)
  keys = iter(jax.random.split(jax.random.PRNGKey(8), 8))
  for layer in range(CFG3.num_layers):
    name, lp = f"layers_{layer}", p[f"layers_{layer}"]
    p = _with(p, name, ("self_attn", "o_proj", "kernel"),
              jnp.zeros_like(lp["self_attn"]["o_proj"]["kernel"]))
    down = ("mlp", "down_proj") + (("kernel",) if layer in CFG3.dense_layers else ())
    p = _with(p, name, down, jnp.zeros_like(functools.reduce(dict.get, down, lp)))
    for norm in ("input_layernorm", "post_attention_layernorm"):
      p = _with(p, name, (norm, "scale"), 1.0 + 0.5 * jax.random.normal(next(keys), (32,)))
  scale = 1.0 + 0.5 * np.asarray(jax.random.normal(next(keys), (32,)), np.float64)
  p = dict(p, norm={"scale": jnp.asarray(scale, jnp.float32)})
  tokens = _tokens(12)
  x = np.asarray(p["embed_tokens"], np.float64)[np.asarray(tokens)]
  normed = x / np.sqrt(np.mean(x * x, -1, keepdims=True) + CFG3.rms_norm_eps) * scale
  want = normed @ np.asarray(p["lm_head"]["kernel"], np.float64)
  np.testing.assert_allclose(_apply(p, tokens, cfg=CFG3).logits, want, rtol=1e-4, atol=1e-5)


def test_input_layernorm_feeds_attention_and_post_attention_layernorm_the_mlp():
  """HF's names say where each norm sits: input_layernorm before the attention,
  post_attention_layernorm before the MLP. With the dense MLP of layer 0 zeroed (down_proj),
  its post_attention_layernorm reaches nothing, so scaling it leaves the logits bit-equal,
  while scaling its input_layernorm changes them. The params here are born with norms of
  ones, so the two swapped passed every other test of this file (a Hugging Face checkpoint
  would load each norm into the other's place)."""
  p = _params(CFG3)
  down = p["layers_0"]["mlp"]["down_proj"]["kernel"]
  p = _with(p, "layers_0", ("mlp", "down_proj", "kernel"), jnp.zeros_like(down))
  scale = 1.0 + 0.5 * jax.random.normal(jax.random.PRNGKey(7), (CFG3.d_model,))
  tokens = _tokens(13)
  ref = _apply(p, tokens, cfg=CFG3).logits
  post = _with(p, "layers_0", ("post_attention_layernorm", "scale"), scale)
  np.testing.assert_array_equal(_apply(post, tokens, cfg=CFG3).logits, ref)
  pre = _with(p, "layers_0", ("input_layernorm", "scale"), scale)
  assert float(jnp.max(jnp.abs(_apply(pre, tokens, cfg=CFG3).logits - ref))) > 1e-2


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


@pytest.mark.parametrize("tied", [False, True])
def test_last_and_no_logits_agree_with_the_full_logits(tied):
  """logits='last' is the last position of 'all'; 'none' returns the normed hidden states,
  which `lm_head_kernel` turns into the same logits."""
  cfg = CFG.replace(tie_embeddings=tied)
  params = _params()
  if tied:
    params = {k: v for k, v in params.items() if k != "lm_head"}
  tokens = _tokens()
  full = _apply(params, tokens, cfg=cfg)
  run = lambda logits: MoETransformer(cfg).apply({"params": params}, tokens, LIVE, positions=POS,
                                                 valid=VALID, logits=logits)
  last, none = run("last"), run("none")
  assert last.logits.shape == (B, 1, CFG.vocab_size) and last.hidden is None
  np.testing.assert_allclose(last.logits[:, 0], full.logits[:, -1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(last.routes, full.routes)  # every position still routed
  assert none.logits is None and none.hidden.shape == (B, T, CFG.d_model)
  head = transformer.lm_head_kernel(params, cfg)
  assert head.shape == (CFG.d_model, CFG.vocab_size)
  np.testing.assert_allclose(none.hidden @ head, full.logits, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="logits='first' must be 'all', 'last' or 'none'"):
    run("first")


def test_left_padding_matches_unpadded():
  """Left-padded prompts (positions + valid) give the unpadded logits and routes on the real
  tokens."""
  params, tokens = _params(), _tokens(9)
  ref = _apply(params, tokens)  # causal: logits at t < 6 depend on tokens[:, :6] only
  padded = jnp.concatenate([jnp.full((B, 2), 7, jnp.int32), tokens[:, :6]], axis=1)
  valid = jnp.concatenate([jnp.zeros((B, 2), bool), jnp.ones((B, 6), bool)], axis=1)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  out = _apply(params, padded, pos=positions, valid=valid)
  np.testing.assert_array_equal(out.routes[:, 2:], ref.routes[:, :6])
  np.testing.assert_allclose(out.logits[:, 2:], ref.logits[:, :6], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- PR2 predictor


@functools.lru_cache(maxsize=None)
def _jit_predict(predicted_gates):
  model = MoETransformer(CFG)
  return jax.jit(lambda p, tok, w: model.apply(
      {"params": p}, tok, predictor=w, predicted_gates=predicted_gates,
      return_router_logits=True, return_router_inputs=True))


def _predicted_routes_oracle(out, w):
  """TopK(p + h W_p) per layer in float64 numpy from a forward's router inputs and logits."""
  h = np.asarray(out.router_inputs, np.float64)
  scores = np.asarray(out.router_logits, np.float64) + np.einsum(
      "btld,lde->btle", h, np.asarray(w, np.float64))
  top = -np.sort(-scores, axis=-1)
  assert np.min(np.abs(np.diff(top[..., :K + 1], axis=-1))) > 1e-3  # no near-ties: float32 agrees
  return np.argsort(-scores, axis=-1, kind="stable")[..., :K]


@pytest.mark.parametrize("predicted_gates", [True, False])
def test_nonzero_predictor_routes_are_topk_of_the_predicted_distribution(predicted_gates):
  """With a random W_p the routes used are TopK(p + h W_p) per layer, computed in float64 numpy
  (and by predicted_topk) from the router inputs h and logits p the same forward returns.
  Gates: ρ at those routes (predicted_gates=False) is exactly a replay of them; q̂ is not."""
  from pr2_jax.pr2.predictor import predicted_topk
  params, tokens = _params(), _tokens(10)
  w = jax.random.normal(jax.random.PRNGKey(5), (L, 32, E)) * 3.0
  out = _jit_predict(predicted_gates)(params, tokens, w)
  np.testing.assert_array_equal(out.routes, _predicted_routes_oracle(out, w))
  flat = lambda a: a.reshape((B * T,) + a.shape[2:])
  np.testing.assert_array_equal(
      predicted_topk(w, flat(out.router_inputs), flat(out.router_logits), K).reshape(B, T, L, K),
      out.routes)
  live = _apply(params, tokens)
  assert np.mean(np.asarray(out.routes) != np.asarray(live.routes)) > 0.5
  replayed = _apply(params, tokens, out.routes)
  if predicted_gates:
    assert float(jnp.max(jnp.abs(out.logits - replayed.logits))) > 1e-3
  else:
    np.testing.assert_allclose(out.logits, replayed.logits, rtol=1e-5, atol=1e-5)


def test_predictor_slices_follow_moe_layers_not_model_layers():
  """dense_layers=(0,): predictor[l] biases MoE layer l = model layer l + 1. Indexing it by the
  model layer (W_p[1] at layer 1, W_p[2] clamped to W_p[1] at layer 2) passed every other test,
  whose configs have no dense layer."""
  cfg = CFG.replace(num_layers=3, dense_layers=(0,), dense_d_ff=48)
  w = jax.random.normal(jax.random.PRNGKey(6), (2, 32, E)) * 3.0
  out = jax.jit(lambda p, tok, w: MoETransformer(cfg).apply(
      {"params": p}, tok, predictor=w, return_router_logits=True, return_router_inputs=True))(
          _params(cfg), _tokens(11), w)
  np.testing.assert_array_equal(out.routes, _predicted_routes_oracle(out, w))


def test_plan_layers_follow_moe_layers_not_model_layers():
  """dense_layers=(0,): plan layer l splits MoE layer l's tokens. Hand-worked drops at
  capacity 22 of 64 tokens (k=2): MoE layer 0 sends every token's first pick to expert 3,
  which its plan splits over 3 replicas (21-22 tokens each) and second picks over 7 experts
  (<= 10 each): 0 dropped. MoE layer 1 sends all to experts 0 and 1, 2 replicas each at
  half shares: 32 a replica, 4 x 10 = 40 dropped. Slicing the plan by model layer gave MoE
  layer 0 layer 1's plan (42 dropped): values stay right (replicas are copies), so only the
  drops tell, and every other test's config has no dense layer."""
  from pr2_jax.balance.planner import Plan
  cfg = CFG.replace(num_layers=3, dense_layers=(0,), dense_d_ff=48)
  slots = jnp.asarray([[list(range(8)) + [3, 3]], [list(range(8)) + [0, 1]]], jnp.int32)
  count = jnp.ones((2, E), jnp.int32).at[0, 3].set(3).at[1, :2].set(2)
  share = 1.0 / count[jnp.arange(2)[:, None, None], slots]
  plan = Plan(slot_expert=slots, replica_count=count, replica_share=share, slot_load=share,
              device_load=share.sum(-1))
  second = np.asarray([0, 1, 2, 4, 5, 6, 7])[np.arange(B * T) % 7].reshape(B, T)
  routes = np.zeros((B, T, 2, K), np.int32)
  routes[:, :, 0] = np.stack([np.full((B, T), 3), second], -1)
  routes[:, :, 1] = [0, 1]
  out = jax.jit(lambda p, tok, r, s: MoETransformer(cfg).apply(
      {"params": p}, tok, r, slot_expert=s, capacity=22))(
          _params(cfg), _tokens(), jnp.asarray(routes), plan)
  np.testing.assert_array_equal(out.dropped, [0, 40])


# --------------------------------------------------------------------------- bad input


def _eager(*args, cfg=CFG, **kwargs):
  return MoETransformer(cfg).apply({"params": _params(cfg)}, *args, **kwargs)


def _traced(*args, cfg=CFG, mesh=None, **kwargs):
  """Abstract call (as under jit): every array argument is a tracer, nothing is compiled."""
  model = MoETransformer(cfg, mesh)
  return jax.eval_shape(lambda p, a, k: model.apply({"params": p}, *a, **k), _params(cfg), args,
                        kwargs)


@pytest.mark.parametrize("edit, pattern", [
    (lambda r: r.at[0, 0, 0, 0].set(99), r"routes has expert id 99 >= num_experts=8"),
    (lambda r: r.at[0, 0, 0, 0].set(-5), r"routes has value -5 < -1"),
    (lambda r: r.at[0, 1, 1].set(jnp.array([-1, 6])),
     r"routes row \(b, t, l\)=\(0, 1, 1\) mixes -1 and expert ids: \[-1, 6\]"),
    (lambda r: r.at[2, 0, 0].set(jnp.array([6, -1])),
     r"routes row \(b, t, l\)=\(2, 0, 0\) mixes -1 and expert ids: \[6, -1\]"),
    (lambda r: r.at[1, 3, 0].set(3),
     r"routes row \(b, t, l\)=\(1, 3, 0\) repeats an expert: \[3, 3\]"),
    (lambda r: r.astype(jnp.float32), r"routes has dtype float32, expected int32"),
    (lambda r: r >= 0, r"routes has dtype bool, expected int32 or another integer dtype"),
])
def test_bad_route_values_raise_on_eager_calls(edit, pattern):
  """Replayed routes are validated on eager calls (jnp.take would give NaN or clamp silently)."""
  routes = _apply(_params(), _tokens()).routes
  with pytest.raises(ValueError, match=pattern):
    _eager(_tokens(), edit(routes))


def test_valid_routes_with_live_rows_are_accepted_on_eager_calls():
  """-1 rows (live router) pass the eager validation; eager equals the jitted forward."""
  tokens = _tokens(11)
  routes = np.full((B, T, L, K), -1, np.int32)
  routes[:, : T // 2] = np.asarray(_foreign_routes(seed=5))[:, : T // 2]
  ref = _apply(_params(), tokens, jnp.asarray(routes))
  out = _eager(tokens, jnp.asarray(routes), positions=POS, valid=VALID)
  np.testing.assert_array_equal(out.routes, ref.routes)
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_int64_routes_replay_as_int32():
  """numpy's default int (np.argsort's dtype, as in the README's balance example) was refused;
  checked, then cast to int32, it replays exactly as int32 routes do."""
  tokens = _tokens(12)
  routes = np.full((B, T, L, K), -1, np.int64)
  routes[:, : T // 2] = np.asarray(_foreign_routes(seed=6))[:, : T // 2]
  ref = _eager(tokens, jnp.asarray(routes, jnp.int32))
  out = _eager(tokens, routes)
  assert out.routes.dtype == jnp.int32
  np.testing.assert_array_equal(out.routes, ref.routes)
  np.testing.assert_array_equal(out.logits, ref.logits)
  routes[0, 0, 0, 0] = E
  with pytest.raises(ValueError, match=r"routes has expert id 8 >= num_experts=8"):
    _eager(tokens, routes)


@pytest.mark.parametrize("value, shown", [(np.nan, "nan"), (np.inf, "inf")])
def test_eager_apply_refuses_a_non_finite_predictor(value, shown):
  """A NaN or inf W_p gave NaN logits with no error (generate refused it, apply did not). Finite
  weights give the jitted forward's logits; under jit the weights are not read."""
  tokens = _tokens(10)
  w = jax.random.normal(jax.random.PRNGKey(5), (L, 32, E)) * 3.0
  with pytest.raises(ValueError, match=rf"predictor\[1, 2, 3\] = {shown} is not finite \(PR2"):
    _eager(tokens, predictor=w.at[1, 2, 3].set(value))
  ref = _jit_predict(True)(_params(), tokens, w)
  out = _eager(tokens, predictor=w, return_router_logits=True, return_router_inputs=True)
  np.testing.assert_array_equal(out.routes, ref.routes)
  np.testing.assert_allclose(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
  assert _traced(tokens, predictor=w.at[1, 2, 3].set(value)).logits.shape == (B, T, CFG.vocab_size)


def _plan(slot_LDS, replica_count_LE=None):
  from pr2_jax.balance.planner import Plan
  slot_LDS = jnp.asarray(slot_LDS, jnp.int32)
  count = jnp.ones((L, E), jnp.int32) if replica_count_LE is None else replica_count_LE
  share = jnp.ones(slot_LDS.shape, jnp.float32)
  return Plan(slot_expert=slot_LDS, replica_count=count, replica_share=share,
              slot_load=share, device_load=share.sum(-1))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(routes=LIVE[:, :, :1]),
     r"routes has shape \(8, 8, 1, 2\), expected \[B, T, L, K\] = \(8, 8, 2, 2\)"),
    (dict(routes=jnp.concatenate([LIVE, LIVE[:, :, :1]], 2)), r"routes has shape \(8, 8, 3, 2\)"),
    (dict(routes=LIVE[:4]), r"routes has shape \(4, 8, 2, 2\), expected"),
    (dict(routes=LIVE[:, :5]), r"routes has shape \(8, 5, 2, 2\), expected"),
    (dict(routes=LIVE[..., :1]), r"routes has shape \(8, 8, 2, 1\), expected"),
    (dict(routes=LIVE.astype(jnp.float32)), r"routes has dtype float32, expected int32"),
    (dict(predictor=jnp.zeros((1, 32, E))),
     r"predictor has shape \(1, 32, 8\), expected \[L, D, E\] = \(2, 32, 8\)"),
    (dict(predictor=jnp.zeros((L, 32, 4))), r"predictor has shape \(2, 32, 4\)"),
    (dict(slot_expert=jnp.zeros((2, 4), jnp.int32)),
     r"slot_expert has shape \(2, 4\): 4 slots per layer, expected at least num_experts=8"),
    (dict(slot_expert=jnp.tile(jnp.arange(E, dtype=jnp.int32), (1, 1))),
     r"slot_expert has shape \(1, 8\), expected \[L, X\] with L = 2"),
    (dict(slot_expert=jnp.arange(E, dtype=jnp.int32)),
     r"slot_expert has shape \(8,\), expected \[L, X\] with L = 2"),
    (dict(slot_expert=jnp.zeros((L, E), jnp.float32)), r"slot_expert has dtype float32, expected"),
    (dict(slot_expert=_plan(jnp.zeros((1, 4, 2)))),
     r"plan.slot_expert has shape \(1, 4, 2\), expected \[L, D, S\] with L = 2"),
    (dict(slot_expert=_plan(jnp.zeros((L, 2, 3)))),
     r"plan.slot_expert has shape \(2, 2, 3\): 6 slots per layer, expected at least num_experts=8"),
    (dict(slot_expert=_plan(jnp.zeros((L, 4, 2)), jnp.ones((L, 4), jnp.int32))),
     r"plan.replica_count has shape \(2, 4\), expected \[L, E\] = \(2, 8\)"),
    (dict(positions=POS[0]), r"positions has shape \(8,\), expected \[B, T\] = \(8, 8\)"),
    (dict(positions=POS[:, :5]), r"positions has shape \(8, 5\), expected \[B, T\] = \(8, 8\)"),
    (dict(valid=VALID[:1]), r"valid has shape \(1, 8\), expected \[B, T\] = \(8, 8\)"),
])
def test_wrong_shapes_and_layer_counts_raise_under_jit(kwargs, pattern):
  """Static checks: JAX would clamp a missing layer's index (routes/predictor/slot map of layer 0
  reused in layer 1) or broadcast; they raise while tracing, naming the shape and the expected."""
  with pytest.raises(ValueError, match=pattern):
    _traced(_tokens(), **kwargs)


def test_slot_map_not_a_multiple_of_the_expert_axis_raises():
  """On a (2, 4) mesh a slot map needs a multiple of 4 slots per layer."""
  with pytest.raises(ValueError, match=r"slot_expert has shape \(2, 10\): 10 slots per layer, "
                                       r".* multiple of the mesh's 'expert' axis size 4"):
    _traced(_tokens(), slot_expert=jnp.zeros((L, 10), jnp.int32), mesh=make_mesh(2, 4))


def test_a_plan_for_another_number_of_devices_than_the_expert_axis_raises():
  """An [L, 8, 2] plan has 16 slots, a multiple of a 4-way 'expert' axis: it ran, regrouped as
  4 devices x 4 slots, so its planned loads and token split described something else."""
  slots = jnp.tile(jnp.arange(E, dtype=jnp.int32).reshape(8, 1), (L, 1, 2))
  with pytest.raises(ValueError, match=r"plan.slot_expert has shape \(2, 8, 2\): a plan for "
                                       r"D = 8 devices, but the mesh's 'expert' axis has 4"):
    _traced(_tokens(), slot_expert=_plan(slots), mesh=make_mesh(2, 4))


@pytest.mark.parametrize("check, args", [
    (transformer.validate_tokens, (8,)),
    (functools.partial(routing.validate_routes, batch=B, length=T, num_layers=L, top_k=K,
                       num_experts=E), ()),
])
def test_host_side_validators_refuse_tracers(check, args):
  """validate_routes passed silently inside jit (a bad route went through); validate_tokens
  failed with numpy's TracerArrayConversionError. Both say what to do."""
  x = jnp.zeros((B, T), jnp.int32) if check is transformer.validate_tokens else LIVE
  with pytest.raises(TypeError, match=r"checks the values of (tokens|routes) on the host, but "
                                      r"got .*Tracer.*: call it before jit"):
    jax.jit(lambda a: check(a, *args))(x)


def test_tokens_of_wrong_rank_raise():
  with pytest.raises(ValueError, match=r"tokens have shape \(5,\), expected rank 2 \[B, T\]"):
    _eager(jnp.ones((5,), jnp.int32))
  with pytest.raises(ValueError, match=r"tokens have shape \(8, 8, 1\), expected rank 2"):
    _traced(_tokens()[..., None])


def test_kv_cache_boundary_write_equals_full_forward():
  """Eager prefill of 5 tokens then 3 more at index 5 of a max_len-8 cache (index + T = max_len,
  the largest allowed write) gives the full forward's logits."""
  from pr2_jax.models.transformer import init_cache
  tokens = _tokens(12)
  ref = _apply(_params(), tokens)
  first = _eager(tokens[:, :5], positions=POS[:, :5], cache=init_cache(CFG, B, T))
  second = _eager(tokens[:, 5:], positions=POS[:, 5:], cache=first.cache)
  assert int(second.cache.index) == T
  np.testing.assert_allclose(second.logits, ref.logits[:, 5:], rtol=1e-4, atol=1e-4)


def test_kv_cache_remembers_left_padding_of_the_prefill():
  """A left-padded prefill (2 padding slots, then 3 real tokens) and 3 more tokens through
  the cache give the unpadded forward's logits: the cache must keep the prefill's padding
  masked for later queries. Recording every written slot as valid passed every test (the
  cache tests had no padding), though then decoding attends to the padding."""
  from pr2_jax.models.transformer import init_cache
  tokens = _tokens(13)
  ref = _apply(_params(), tokens)
  padded = jnp.concatenate([jnp.full((B, 2), 7, jnp.int32), tokens[:, :6]], axis=1)
  valid = jnp.arange(T)[None, :] >= jnp.full((B, 1), 2)
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
  first = _eager(padded[:, :5], positions=positions[:, :5], valid=valid[:, :5],
                 cache=init_cache(CFG, B, T))
  second = _eager(padded[:, 5:], positions=positions[:, 5:], valid=valid[:, 5:],
                  cache=first.cache)
  np.testing.assert_array_equal(second.cache.valid, np.broadcast_to(valid, (B, T)))
  np.testing.assert_allclose(first.logits[:, 2:], ref.logits[:, :3], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(second.logits, ref.logits[:, 3:6], rtol=1e-4, atol=1e-4)


def _decode_step(cfg, cache_len, storage):
  """jit of one bfloat16 decode step (one token per row) on a KV cache stored in `storage`."""
  model = MoETransformer(cfg)
  params = jax.tree.map(lambda w: w.astype(jnp.bfloat16), _params(CFG))
  def step(cache, tok, pos):
    out = model.apply({"params": params}, tok, positions=pos, cache=cache)
    return out.logits, out.cache
  cache = transformer.init_cache(cfg, B, cache_len)
  cache = cache.replace(k=tuple(a.astype(storage) for a in cache.k),
                        v=tuple(a.astype(storage) for a in cache.v))
  return jax.jit(step, donate_argnums=0), cache


def test_bfloat16_kv_cache_stored_in_float32_on_cpu_gives_the_same_logits_in_place():
  """On CPU `init_cache` stores a bfloat16 engine's cache in float32 (`config.storage_dtype`).
  Oracle: a cache held in bfloat16, as before. Prefill and two decode steps give bit-equal
  logits and caches; the float32 cache's decode step is written in place, where XLA:CPU
  converted the whole bfloat16 cache to float32 and back for each write and again for the
  attention dots (here >= 3x the cache's bytes more per step)."""
  cfg = CFG.replace(dtype="bfloat16")
  assert transformer.init_cache(cfg, B, 4).k[0].dtype == jnp.float32
  # Values of another dtype than the compute dtype: stored as asked (the storage rounds them).
  assert transformer.init_cache(CFG, B, 4, jnp.bfloat16).v[0].dtype == jnp.bfloat16
  tokens = _tokens(13)
  results, costs = {}, {}
  for storage in (jnp.bfloat16, jnp.float32):
    step, cache = _decode_step(cfg, T, storage)
    logits = []
    for t0, t1 in ((0, 5), (5, 6), (6, 7)):
      out, cache = step(cache, tokens[:, t0:t1], POS[:, t0:t1])
      logits.append(np.asarray(out, np.float32))
    results[storage] = (logits, [np.asarray(a, np.float32) for a in cache.k + cache.v])
    # One decode step's compiled memory traffic on a longer cache.
    long_step, long_cache = _decode_step(cfg, 512, storage)
    compiled = long_step.lower(long_cache, tokens[:, :1], POS[:, :1]).compile()
    cost = compiled.cost_analysis()
    costs[storage] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]
  for a, b in zip(*(results[s][0] + results[s][1] for s in (jnp.bfloat16, jnp.float32))):
    np.testing.assert_array_equal(a, b)
  bf16_cache_bytes = 2 * CFG.num_layers * B * CFG.num_kv_heads * CFG.head_dim * 512 * 2
  assert costs[jnp.bfloat16] - costs[jnp.float32] >= 3 * bf16_cache_bytes, costs


def test_kv_cache_misuse_raises():
  """No positions, a write past the end (eager: concrete index), and caches built for another
  batch size, number of layers or head_dim each raise naming the values."""
  from pr2_jax.models.transformer import init_cache
  tok3, pos3 = _tokens()[:, :3], POS[:, :3]
  cache = init_cache(CFG, B, 5)
  with pytest.raises(ValueError, match=r"cache= needs positions \[B, T\].*got positions=None"):
    _traced(tok3, cache=cache)
  with pytest.raises(ValueError, match=r"cache index 3 \+ 3 tokens > max_len 5"):
    _eager(tok3, positions=pos3, cache=cache.replace(index=jnp.array(3, jnp.int32)))
  with pytest.raises(ValueError, match=r"cache index -1 is negative"):
    _eager(tok3, positions=pos3, cache=cache.replace(index=jnp.array(-1, jnp.int32)))
  # Under jit the index is unknown: only static checks run (no host sync).
  model = MoETransformer(CFG)
  jax.eval_shape(lambda p, c: model.apply({"params": p}, tok3, positions=pos3, cache=c),
                 _params(), cache.replace(index=jnp.array(3, jnp.int32)))
  with pytest.raises(ValueError, match=r"KV cache is for batch 4 \(cache.valid has shape "
                                       r"\(4, 5\)\), but tokens have shape \(8, 3\)"):
    _traced(tok3, positions=pos3, cache=init_cache(CFG, 4, 5))
  with pytest.raises(ValueError, match=r"KV cache has 3 key and 3 value layers, expected "
                                       r"ModelConfig.num_layers=2"):
    _traced(tok3, positions=pos3, cache=init_cache(CFG.replace(num_layers=3), B, 5))
  with pytest.raises(ValueError, match=r"cache.k\[0\] has shape \(8, 2, 16, 5\), expected "
                                       r"\[B, G, Z, S\] = \(8, 2, 8, 5\)"):
    _traced(tok3, positions=pos3, cache=init_cache(CFG.replace(head_dim=16), B, 5))
  with pytest.raises(ValueError, match=r"cache.valid has shape \(5,\), expected \[B, S\]"):
    _traced(tok3, positions=pos3, cache=cache.replace(valid=cache.valid[0]))


def test_eager_slot_map_values_are_checked_per_layer():
  """A map naming expert 20 (of 8) gave NaN logits; a map without some expert sent its tokens
  to another expert's weights. Eager calls name the layer and the bad entry."""
  cfg = ModelConfig(num_layers=2, num_experts=8, top_k=2)
  model = MoETransformer(cfg)
  tokens = jnp.ones((2, 5), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  good = np.tile(np.arange(8, dtype=np.int32), (2, 1))
  model.apply({"params": params}, tokens, slot_expert=jnp.asarray(good))
  bad = good.copy()
  bad[1, 3] = 20
  with pytest.raises(ValueError, match=r"MoE layer 1's slot map: slot_expert_X\[3\] = 20"):
    model.apply({"params": params}, tokens, slot_expert=jnp.asarray(bad))
  bad = good.copy()
  bad[0, 5] = 4
  with pytest.raises(ValueError, match=r"MoE layer 0's slot map: .* no slot for expert\(s\) \[5\]"):
    model.apply({"params": params}, tokens, slot_expert=jnp.asarray(bad))


def test_aux_loss_counts_only_valid_tokens():
  """The model's Switch loss is the mean over MoE layers of `switch_aux_loss` on the valid
  tokens' router softmax and routes (padding was counted before)."""
  params, tokens = _params(), _tokens()
  valid = VALID.at[0, :3].set(False)
  out = MoETransformer(CFG).apply({"params": params}, tokens, valid=valid,
                                  return_router_logits=True)
  keep = np.asarray(valid).reshape(-1)
  per_layer = [routing.switch_aux_loss(
      jax.nn.softmax(out.router_logits[:, :, l].reshape(B * T, -1)[keep]),
      out.routes[:, :, l].reshape(B * T, -1)[keep]) for l in range(L)]
  np.testing.assert_allclose(out.aux_loss, np.mean(per_layer), rtol=1e-5)
  everything = MoETransformer(CFG).apply({"params": params}, tokens, valid=VALID)
  assert not np.isclose(everything.aux_loss, out.aux_loss)


def test_init_cache_refuses_sizes_that_are_not_positive_ints():
  from pr2_jax import init_cache
  with pytest.raises(ValueError, match=r"init_cache.batch must be a positive int, got -1"):
    init_cache(CFG, -1, 6)
  with pytest.raises(ValueError, match=r"init_cache.max_len must be a positive int, got 2.0"):
    init_cache(CFG, 2, 2.0)


def test_lm_head_kernel_names_the_missing_key():
  """{} raised KeyError 'lm_head'; the message says which key the config needs and what
  params holds (e.g. the {'params': ...} wrapper, or an untied model's params when tied)."""
  with pytest.raises(ValueError, match=r"params has no 'lm_head': with config.tie_embeddings="
                                       r"False the LM head is its own weights \(not tied\); "
                                       r"params has keys \[\]"):
    transformer.lm_head_kernel({}, CFG)
  with pytest.raises(ValueError, match=r"params has no 'embed_tokens': with config.tie_embeddings"
                                       r"=True the LM head is the tied embeddings; params has "
                                       r"keys \['params'\]"):
    transformer.lm_head_kernel({"params": _params()}, CFG.replace(tie_embeddings=True))
  assert transformer.lm_head_kernel(_params(), CFG).shape == (CFG.d_model, CFG.vocab_size)


def test_init_cache_refuses_a_non_float_dtype():
  """An int8 or bool cache truncated every key and value: logits off by 0.08 (bool: 0.30)."""
  config = CFG
  for dtype in ("int8", "bool", jnp.int32):
    with pytest.raises(ValueError, match=r"init_cache: dtype=.* must be a floating dtype"):
      transformer.init_cache(config, 1, 4, dtype=dtype)
  assert transformer.init_cache(config, 1, 4, dtype="bfloat16").k[0].dtype == jnp.bfloat16
