"""The ('data', 'expert') mesh, the logical-axis rules table and sharding helpers."""

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
])
def test_make_mesh_errors(data, expert, pattern):
  """Sizes that do not multiply to the device count (or are not positive ints) raise."""
  with pytest.raises(ValueError, match=pattern):
    pm.make_mesh(data, expert)


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
