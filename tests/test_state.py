"""Train state: born sharded, and its per-device memory computed from shapes alone."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec

from pr2_jax.config import ModelConfig
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.train.state import create_train_state, predictor_initializer, state_memory

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
