"""Tensor-name map: hand-worked index identities between torch [out, in] and our layouts."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from pr2_jax.config import ModelConfig
from pr2_jax.hf import layout
from pr2_jax.models.transformer import MoETransformer

CFG = ModelConfig(vocab_size=11, num_layers=3, d_model=6, num_heads=4, num_kv_heads=2, head_dim=2,
                  expert_d_ff=5, num_experts=3, top_k=2, dense_layers=(1,), dense_d_ff=7)


def arange(shape):
  return np.arange(math.prod(shape), dtype=np.float32).reshape(shape)


def abstract(cfg):
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  params = jax.eval_shape(MoETransformer(cfg).init, jax.random.key(0), tokens)["params"]
  return traverse_util.flatten_dict(nn.unbox(params))


@pytest.mark.parametrize("tied, fused", [(False, ()), (True, (0, 2))])
def test_sources_cover_the_model_tree_exactly(tied, fused):
  """Every parameter has one source, of the parameter's shape, and names are hub names."""
  cfg = CFG.replace(tie_embeddings=tied)
  src = layout.hf_sources(cfg, fused)
  params = abstract(cfg)
  assert set(src) == set(params)
  for path, s in src.items():
    assert math.prod(layout.ours_shape(s)) == math.prod(params[path].shape), path
  keys = {k for s in src.values() for k in s.keys}
  assert ("lm_head.weight" in keys) == (not tied)
  per_expert = 0 if fused else 2 * 3 * 3  # 2 MoE layers x 3 experts x 3 projections
  fused_keys = 2 * 2 if fused else 0      # gate_up_proj and down_proj per MoE layer
  # embed, norm, 3 layers x (2 norms + 4 attn + 2 qk norms), dense 3, routers 2.
  assert len(keys) == 2 + (not tied) + 3 * 8 + 3 + 2 + per_expert + fused_keys
  assert "model.layers.2.mlp.experts.1.down_proj.weight" in keys or fused


def test_attention_kernels_split_heads_in_hf_order():
  """q_proj row h*Z+z is our [:, h, z]; o_proj column h*Z+z is our [h, z, :]."""
  src = layout.hf_sources(CFG)
  q_hf = arange((4 * 2, 6))
  q = layout.to_ours(src[("layers_0", "self_attn", "q_proj", "kernel")], [q_hf], (6, 4, 2))
  assert q[5, 3, 1] == q_hf[3 * 2 + 1, 5] and q[0, 1, 0] == q_hf[2, 0]
  o_hf = arange((6, 4 * 2))
  o = layout.to_ours(src[("layers_0", "self_attn", "o_proj", "kernel")], [o_hf], (4, 2, 6))
  assert o[3, 1, 5] == o_hf[5, 3 * 2 + 1] and o[1, 0, 2] == o_hf[2, 2]


def test_router_and_experts_transpose_per_expert():
  """Router [E, D] -> [D, E]; expert j's [F, D] gate -> our [j, D, F]; down [D, F] -> [j, F, D]."""
  src = layout.hf_sources(CFG)
  gate_hf = arange((3, 6))
  assert np.array_equal(layout.to_ours(src[("layers_0", "mlp", "gate")], [gate_hf], (6, 3)),
                        gate_hf.T)
  experts = [arange((5, 6)) + 100 * j for j in range(3)]
  ours = layout.to_ours(src[("layers_0", "mlp", "gate_proj")], experts, (3, 6, 5))
  assert ours[2, 4, 1] == experts[2][1, 4]
  downs = [arange((6, 5)) + 100 * j for j in range(3)]
  ours = layout.to_ours(src[("layers_0", "mlp", "down_proj")], downs, (3, 5, 6))
  assert ours[1, 3, 0] == downs[1][0, 3]


def test_fused_gate_up_halves():
  """gate_up_proj [E, 2F, D]: rows [0, F) are gate, [F, 2F) are up (transformers' chunk(2))."""
  src = layout.hf_sources(CFG, fused_layers=(0,))
  gate, up = src[("layers_0", "mlp", "gate_proj")], src[("layers_0", "mlp", "up_proj")]
  assert gate.rows == (0, 5) and up.rows == (5, 10) and gate.hf_shape == (3, 10, 6)
  gate_up = arange((3, 10, 6))
  ours_up = layout.to_ours(up, [gate_up[:, 5:10]], (3, 6, 5))
  assert ours_up[2, 4, 1] == gate_up[2, 5 + 1, 4]
  with pytest.raises(ValueError, match="fused"):
    list(layout.to_hf(gate, ours_up))


def test_to_hf_inverts_to_ours():
  """Writing then reading every kind gives back the same array."""
  rng = np.random.default_rng(0)
  params = abstract(CFG)
  for path, s in layout.hf_sources(CFG).items():
    ours = rng.standard_normal(params[path].shape).astype(np.float32)
    pairs = list(layout.to_hf(s, ours))
    assert [k for k, _ in pairs] == list(s.keys)
    assert all(t.shape == s.hf_shape and t.flags.c_contiguous for _, t in pairs)
    back = layout.to_ours(s, [t for _, t in pairs], params[path].shape)
    assert np.array_equal(back, ours), path


def test_ours_shape_hand_values_for_every_kind():
  """The shape to_hf reshapes our parameter to before transposing: hub [out, in] reversed, per
  expert behind a leading E, and for a fused half [E, D, F] (rows F of gate_up's 2F)."""
  src = layout.hf_sources(CFG)
  assert layout.ours_shape(src[("norm", "scale")]) == (6,)
  assert layout.ours_shape(src[("layers_0", "self_attn", "q_proj", "kernel")]) == (6, 8)
  assert layout.ours_shape(src[("layers_0", "self_attn", "o_proj", "kernel")]) == (8, 6)
  assert layout.ours_shape(src[("layers_1", "mlp", "up_proj", "kernel")]) == (6, 7)
  assert layout.ours_shape(src[("layers_1", "mlp", "down_proj", "kernel")]) == (7, 6)
  assert layout.ours_shape(src[("layers_0", "mlp", "gate_proj")]) == (3, 6, 5)
  assert layout.ours_shape(src[("layers_0", "mlp", "down_proj")]) == (3, 5, 6)
  fused = layout.hf_sources(CFG, fused_layers=(0,))
  assert layout.ours_shape(fused[("layers_0", "mlp", "up_proj")]) == (3, 6, 5)
  assert layout.ours_shape(fused[("layers_0", "mlp", "down_proj")]) == (3, 5, 6)


def test_hub_shapes_are_torch_out_in():
  """Each Source's hf_shape is the hub tensor's torch [out, in]: o_proj [D, H*Z], dense up
  [M, D] and down [D, M] (a swapped pair reshapes consistently both ways, so only the
  checkpoint's own shapes can tell)."""
  src = layout.hf_sources(CFG)
  want = {("layers_0", "self_attn", "q_proj", "kernel"): (8, 6),
          ("layers_0", "self_attn", "k_proj", "kernel"): (4, 6),
          ("layers_0", "self_attn", "o_proj", "kernel"): (6, 8),
          ("layers_1", "mlp", "gate_proj", "kernel"): (7, 6),
          ("layers_1", "mlp", "up_proj", "kernel"): (7, 6),
          ("layers_1", "mlp", "down_proj", "kernel"): (6, 7),
          ("layers_0", "mlp", "gate"): (3, 6), ("layers_0", "mlp", "up_proj"): (5, 6),
          ("layers_0", "mlp", "down_proj"): (6, 5), ("lm_head", "kernel"): (11, 6)}
  assert {p: src[p].hf_shape for p in want} == want
