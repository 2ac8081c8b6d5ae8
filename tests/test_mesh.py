"""The ('data', 'expert') mesh, the logical-axis rules table and sharding helpers."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from pr2_jax import LOGICAL_RULES, ModelConfig, MoETransformer
from pr2_jax.parallel import mesh as pm


@pytest.mark.parametrize("data, expert", [(2, 4), (1, 8), (8, 1), (4, 2)])
def test_make_mesh_shapes(data, expert):
  """A mesh over all 8 devices with named Auto axes of the requested sizes."""
  mesh = pm.make_mesh(data, expert)
  assert mesh.axis_names == ("data", "expert")
  assert dict(mesh.shape) == {"data": data, "expert": expert}
  assert mesh.devices.shape == (data, expert)
  assert set(mesh.devices.flat) == set(jax.devices())
  assert tuple(mesh.axis_types) == (AxisType.Auto, AxisType.Auto)
  assert pm.num_token_shards(mesh) == 8
  assert pm.axis_size(mesh, "expert") == expert


def test_make_mesh_on_a_device_subset():
  """Explicit devices: data*expert must equal their number."""
  mesh = pm.make_mesh(2, 2, devices=jax.devices()[:4])
  assert dict(mesh.shape) == {"data": 2, "expert": 2}
  assert set(mesh.devices.flat) == set(jax.devices()[:4])


@pytest.mark.parametrize("data, expert, pattern", [
    (2, 2, r"data=2 x expert=2 = 4 devices, but 8 are available"),
    (4, 4, r"data=4 x expert=4 = 16 devices, but 8 are available"),
    (0, 8, r"mesh axis 'data' size must be a positive int, got 0"),
    (8, 1.0, r"mesh axis 'expert' size must be a positive int, got 1.0"),
    (True, 8, r"mesh axis 'data' size must be a positive int, got True"),
])
def test_make_mesh_errors(data, expert, pattern):
  """Sizes that do not multiply to the device count (or are not positive ints) raise."""
  with pytest.raises(ValueError, match=pattern):
    pm.make_mesh(data, expert)


def test_make_mesh_takes_numpy_int_sizes():
  """Sizes computed from array shapes are numpy ints: the same mesh as from Python ints."""
  mesh = pm.make_mesh(np.int64(2), np.int32(4))
  assert dict(mesh.shape) == {"data": 2, "expert": 4}
  assert mesh.devices.shape == (2, 4)


def test_the_model_refuses_a_mesh_it_cannot_use():
  """A mesh without the 'expert' axis was a bare KeyError deep in the forward pass, and
  jax.make_mesh's default Explicit axes failed inside with_sharding_constraint."""
  cfg = ModelConfig(vocab_size=16, d_model=16, num_heads=2, num_kv_heads=1, head_dim=8,
                    expert_d_ff=8, num_experts=4, top_k=2, num_layers=1)
  devices = jax.devices()[:8]
  for bad, got in [
      (jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,), devices=devices),
       r"got axes \('data',\) of types \('Auto',\)"),
      (jax.make_mesh((2, 4), ("data", "expert"), devices=devices),
       r"got axes \('data', 'expert'\) of types \('Explicit', 'Explicit'\)"),
      (jax.make_mesh((2, 4), ("expert", "data"), axis_types=(AxisType.Auto,) * 2,
                     devices=devices), r"got axes \('expert', 'data'\)")]:
    with pytest.raises(ValueError, match=r"the model needs a \('data', 'expert'\) mesh of Auto "
                                         r"axes \(pr2_jax.parallel.mesh.make_mesh\(data, "
                                         r"expert\)\), " + got):
      MoETransformer(cfg, bad)
  with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh .* got dict"):
    MoETransformer(cfg, {"data": 2, "expert": 4})
  pm.check_mesh(None)
  pm.check_mesh(pm.make_mesh(2, 4))


def test_no_mesh_is_one_shard():
  """Without a mesh every axis has size 1 and there is one token shard."""
  assert pm.axis_size(None, "expert") == 1
  assert pm.num_token_shards(None) == 1


def test_logical_rules_table():
  """'batch' goes over both mesh axes, 'expert' over 'expert', everything else replicated."""
  rules = dict(LOGICAL_RULES)
  assert rules["batch"] == ("data", "expert")
  assert rules["expert"] == "expert"
  assert {k for k, v in rules.items() if v is not None} == {"batch", "expert"}
  assert len(rules) == len(LOGICAL_RULES)  # no name listed twice
  assert pm.logical_spec(("batch", "length", "embed")) == P(("data", "expert"), None, None)
  assert pm.logical_spec(("expert", "embed", "mlp")) == P("expert", None, None)


def test_constrain_without_mesh_is_identity_and_with_mesh_shards():
  """constrain is a no-op without a mesh; under jit with a mesh it shards the token axis."""
  x = jnp.arange(16.0 * 4).reshape(16, 4)
  assert pm.constrain(x, None, ("batch", "embed")) is x
  mesh = pm.make_mesh(2, 4)
  y = jax.jit(lambda a: pm.constrain(a * 1.0, mesh, ("batch", "embed")))(x)
  np.testing.assert_array_equal(y, x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "expert"), None)), 2)
  assert {s.data.shape for s in y.addressable_shards} == {(2, 4)}


def test_tree_shardings_of_the_model_params():
  """Expert weights shard over 'expert'; router, attention and embeddings are replicated."""
  cfg = ModelConfig(vocab_size=32, num_layers=1, d_model=32, head_dim=8, expert_d_ff=16)
  mesh = pm.make_mesh(2, 4)
  boxed = jax.eval_shape(MoETransformer(cfg, mesh).init, jax.random.PRNGKey(0),
                         jnp.zeros((8, 4), jnp.int32))["params"]
  sh = pm.tree_shardings(mesh, boxed)
  mlp = sh["layers_0"]["mlp"]
  for name in ("gate_proj", "up_proj", "down_proj"):
    assert mlp[name].spec == P("expert", None, None), name
    assert mlp[name].mesh.shape == mesh.shape
  assert mlp["gate"].spec == P(None, None)
  assert sh["embed_tokens"].spec == P(None, None)
  assert sh["layers_0"]["self_attn"]["q_proj"]["kernel"].spec == P(None, None, None)
  # Every leaf got a sharding.
  assert len(jax.tree.leaves(sh)) == len(jax.tree.leaves(nn.unbox(boxed)))


def test_fsdp_param_rules_split_d_model_over_data():
  """Under fsdp every weight's 'embed' dim also goes over 'data' (experts keep 'expert');
  head_dim-only norms stay replicated; activations' rules are unchanged."""
  cfg = ModelConfig(vocab_size=32, num_layers=1, d_model=32, head_dim=8, expert_d_ff=16)
  mesh = pm.make_mesh(2, 4)
  boxed = jax.eval_shape(MoETransformer(cfg, mesh).init, jax.random.PRNGKey(0),
                         jnp.zeros((8, 4), jnp.int32))["params"]
  sh = pm.tree_shardings(mesh, boxed, fsdp=True)
  mlp, attn = sh["layers_0"]["mlp"], sh["layers_0"]["self_attn"]
  assert mlp["gate_proj"].spec == P("expert", "data", None)   # [E, D, F]
  assert mlp["down_proj"].spec == P("expert", None, "data")   # [E, F, D]
  assert mlp["gate"].spec == P("data", None)                  # router [D, E]
  assert sh["embed_tokens"].spec == P(None, "data")           # [V, D]
  assert sh["lm_head"]["kernel"].spec == P("data", None)      # [D, V]
  assert attn["q_proj"]["kernel"].spec == P("data", None, None)
  assert attn["o_proj"]["kernel"].spec == P(None, None, "data")
  assert attn["q_norm"]["scale"].spec == P(None)              # [Z]: nothing to split
  assert sh["norm"]["scale"].spec == P("data")
  assert pm.logical_spec(("batch", "length", "embed")) == P(("data", "expert"), None, None)


def test_partitioned_attaches_logical_names():
  """partitioned() wraps an initializer so the param is LogicallyPartitioned with the names."""
  init = pm.partitioned(nn.initializers.ones, ("expert", "embed"))
  boxed = init(jax.random.PRNGKey(0), (4, 3))
  assert isinstance(boxed, nn.LogicallyPartitioned)
  assert boxed.names == ("expert", "embed")
  np.testing.assert_array_equal(boxed.unbox(), np.ones((4, 3)))


def test_check_batch_split_names_the_batch_and_the_shards():
  mesh = pm.make_mesh(2, 4)
  pm.check_batch_split(16, mesh)
  pm.check_batch_split(3, None)  # no mesh: one shard
  with pytest.raises(ValueError, match=r"batch size 12 must be divisible by the 8 token shards "
                                       r"of the mesh \{'data': 2, 'expert': 4\}"):
    pm.check_batch_split(12, mesh)


def _all_gathers(compiled_text: str) -> list[str]:
  import re
  return [l for l in compiled_text.splitlines() if re.search(r"= \S+ all-gather(-start)?\(", l)]


def test_on_token_shards_is_fn_itself_without_a_split():
  fn = lambda x: x
  assert pm.on_token_shards(fn, None) is fn
  assert pm.on_token_shards(fn, pm.make_mesh(1, 1, jax.devices()[:1])) is fn


def test_on_token_shards_routes_each_shard_without_gathering_the_batch():
  """`route` (top-k) per token shard on a (4, 2) mesh: the same routing as on one device, a
  None argument passed through, gradients equal, and no all-gather in the compiled program
  (plain jit gathers lax.top_k's whole operand to every device)."""
  from pr2_jax.models import routing
  mesh = pm.make_mesh(4, 2)
  logits = jax.random.normal(jax.random.key(0), (16, 8))
  bias = jax.random.normal(jax.random.key(1), (16, 8))
  rows = pm.logical_sharding(mesh, ("batch", None))
  sharded = [jax.device_put(a, rows) for a in (logits, bias)]

  def routed(l, b, mesh):
    fn = lambda l, r, b: routing.route(l, 3, True, r, b, check_values=False)
    return pm.on_token_shards(fn, mesh)(l, None, b)

  ref = routed(logits, bias, None)
  f = jax.jit(functools.partial(routed, mesh=mesh))
  out = f(*sharded)
  np.testing.assert_array_equal(np.asarray(out.expert_ids), np.asarray(ref.expert_ids))
  np.testing.assert_allclose(np.asarray(out.gates), np.asarray(ref.gates), rtol=1e-6)
  assert out.expert_ids.sharding.spec == P(pm.TOKEN_AXES, None)  # rows stay split
  assert _all_gathers(f.lower(*sharded).compile().as_text()) == []
  loss = lambda mesh: lambda l, b: jnp.sum(routed(l, b, mesh).gates ** 2)
  grads = jax.jit(jax.grad(loss(mesh), argnums=(0, 1)))(*sharded)
  ref_grads = jax.grad(loss(None), argnums=(0, 1))(logits, bias)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)


def test_data_parallel_forward_has_no_collective():
  """Weights whole on every device, tokens split: the model's forward needs no communication
  at all; the router's top-k once gathered the batch's logits in every MoE layer."""
  cfg = ModelConfig(vocab_size=32, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                    expert_d_ff=32, num_experts=8, top_k=2)
  mesh = pm.make_mesh(8, 1)
  model = MoETransformer(cfg, mesh)
  tokens = jax.device_put(jnp.zeros((8, 16), jnp.int32),
                          pm.logical_sharding(mesh, ("batch", "length")))
  params = nn.unbox(MoETransformer(cfg).init(jax.random.key(0), tokens)["params"])
  text = jax.jit(lambda p, t: model.apply({"params": p}, t).logits).lower(params, tokens).compile()
  collectives = [l for l in text.as_text().splitlines()
                 if any(f" {op}(" in l or f" {op}-start(" in l
                        for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all"))]
  assert collectives == []


def test_on_token_shards_names_rows_that_do_not_split():
  mesh = pm.make_mesh(4, 2)
  with pytest.raises(ValueError, match=r"batch size 12 must be divisible by the 8 token shards"):
    pm.on_token_shards(lambda x: x, mesh)(jnp.zeros((12, 3)))


@dataclasses.dataclass(frozen=True)
class _Scale:
  factor: float

  def __call__(self, x_n):
    return x_n * self.factor


def test_on_token_shards_eager_calls_reuse_the_program_of_an_equal_function():
  """Outside jit, a function compared by value (a new but equal instance per call, as MoEBlock
  makes) builds no second program; another value builds its own; a new lambda per call gets a
  program of its own every call, never another lambda's."""
  from test_grouped import count_lowerings
  mesh = pm.make_mesh(2, 4)
  x = jnp.arange(16.0).reshape(8, 2)
  np.testing.assert_array_equal(pm.on_token_shards(_Scale(2.0), mesh)(x), x * 2)
  with count_lowerings() as built:
    np.testing.assert_array_equal(pm.on_token_shards(_Scale(2.0), mesh)(x), x * 2)
  assert built == []
  np.testing.assert_array_equal(pm.on_token_shards(_Scale(3.0), mesh)(x), x * 3)
  for offset in (jnp.ones(2), jnp.full(2, 5.0)):
    with count_lowerings() as built:
      out = pm.on_token_shards(lambda x_n: x_n * 2.0 + offset, mesh)(x)
    np.testing.assert_array_equal(out, x * 2 + offset)
    assert len(built) == 1  # one program for the whole shard_map, not one per op


def _scaled_by_table(x_n, table_2):
  return x_n * table_2


def test_on_token_shards_passes_whole_arguments_unsplit_and_reuses_the_program():
  """`num_whole` trailing arguments reach every shard whole (a [2] table against [1, 2] rows
  per shard), under jit and eagerly; a module-level function with new whole values builds no
  second program (a closure over them compiled one per call: a balance plan per MoE layer)."""
  from test_grouped import count_lowerings
  mesh = pm.make_mesh(2, 4)
  x = jnp.arange(16.0).reshape(8, 2)
  shards = pm.on_token_shards(_scaled_by_table, mesh, num_whole=1)
  np.testing.assert_array_equal(shards(x, jnp.asarray([1.0, 10.0])), x * jnp.asarray([1, 10]))
  with count_lowerings() as built:
    out = shards(x, jnp.asarray([2.0, 3.0]))
  assert built == []
  np.testing.assert_array_equal(out, x * jnp.asarray([2, 3]))
  jitted = jax.jit(shards)(x, jnp.asarray([-1.0, 4.0]))
  np.testing.assert_array_equal(jitted, x * jnp.asarray([-1, 4]))
  with pytest.raises(ValueError, match=r"batch size 12 must be divisible"):  # rows still checked
    shards(jnp.zeros((12, 2)), jnp.ones(2))


def test_check_mesh_refuses_one_explicit_axis():
  """Every axis must be Auto: a mesh with one Explicit axis fails inside
  with_sharding_constraint as an all-Explicit one does."""
  devices = jax.devices()[:8]
  for types in ((AxisType.Auto, AxisType.Explicit), (AxisType.Explicit, AxisType.Auto)):
    mixed = jax.make_mesh((2, 4), ("data", "expert"), axis_types=types, devices=devices)
    names = tuple(t.name for t in types)
    with pytest.raises(ValueError, match=rf"of types \('{names[0]}', '{names[1]}'\)"):
      pm.check_mesh(mixed)


def test_on_token_shards_keeps_no_closure_alive_after_an_eager_call():
  """A function made per call (a closure over a balance plan) runs in a program of its own
  that no cache keeps: were it a jit static argument, the cache would pin the closure and
  everything it holds, one entry per call."""
  import gc
  import weakref
  mesh = pm.make_mesh(2, 4)
  x = jnp.arange(16.0).reshape(8, 2)

  def run():
    offset = jnp.ones(2)
    fn = lambda x_n: x_n + offset
    np.testing.assert_array_equal(pm.on_token_shards(fn, mesh)(x), x + 1)
    return weakref.ref(fn)

  ref = run()
  gc.collect()
  assert ref() is None
