"""Where each of our parameters lives in a Hugging Face Qwen3-MoE checkpoint.

Dimension legend:
  V vocab, D d_model, H query heads, G kv heads, Z head_dim, E experts,
  F expert hidden width, M dense MLP hidden width.

torch `Linear` weights are [out, in]; ours are [in, out], with attention
kernels split per head:
  model.embed_tokens.weight [V, D]                 -> embed_tokens [V, D]
  model.layers.{i}.self_attn.q_proj.weight [HZ, D] -> layers_{i}/self_attn/q_proj/kernel [D, H, Z]
  model.layers.{i}.self_attn.o_proj.weight [D, HZ] -> layers_{i}/self_attn/o_proj/kernel [H, Z, D]
  model.layers.{i}.mlp.gate.weight [E, D]          -> layers_{i}/mlp/gate [D, E]
  model.layers.{i}.mlp.experts.{j}.gate_proj.weight [F, D]
                                                   -> layers_{i}/mlp/gate_proj [E, D, F] at j
  model.layers.{i}.mlp.experts.{j}.down_proj.weight [D, F]
                                                   -> layers_{i}/mlp/down_proj [E, F, D] at j
  lm_head.weight [V, D]                            -> lm_head/kernel [D, V] (absent when tied)
Norm weights are copied. transformers' in-memory fused expert layout
(`mlp.experts.gate_up_proj [E, 2F, D]`, `mlp.experts.down_proj [E, D, F]`) is
understood when reading; we always write the hub's per-expert layout.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from pr2_jax.config import ModelConfig

Path = tuple[str, ...]  # a parameter's path in our tree, e.g. ('layers_0', 'mlp', 'gate')
KINDS = ("copy", "linear", "experts", "fused")


@dataclasses.dataclass(frozen=True)
class Source:
  """The checkpoint tensors behind one of our parameters.

  kind: 'copy' (same layout); 'linear' (one [out, in] tensor, transposed then
  reshaped to ours); 'experts' (one [out, in] tensor per expert, each
  transposed, stacked on a leading E axis); 'fused' (one [E, out, in] tensor,
  `rows` of its out axis when gate and up share it).
  """
  kind: str
  keys: tuple[str, ...]
  hf_shape: tuple[int, ...]             # shape of each tensor in `keys`
  rows: tuple[int, int] | None = None   # fused gate_up: the half of axis 1 that is ours

  def __post_init__(self):
    # to_ours would read an unknown kind as 'fused' (its last branch), silently.
    if self.kind not in KINDS:
      raise ValueError(f"Source.kind={self.kind!r} must be one of {KINDS}")


def fused_gate_up_key(layer: int) -> str:
  return f"model.layers.{layer}.mlp.experts.gate_up_proj"


def _attention(cfg: ModelConfig, p: str, k: str) -> dict[Path, Source]:
  d, z = cfg.d_model, cfg.head_dim
  out = {}
  for name, width in (("q_proj", cfg.num_heads * z), ("k_proj", cfg.num_kv_heads * z),
                      ("v_proj", cfg.num_kv_heads * z)):
    out[(p, "self_attn", name, "kernel")] = Source("linear", (f"{k}.self_attn.{name}.weight",),
                                                   (width, d))
  out[(p, "self_attn", "o_proj", "kernel")] = Source(
      "linear", (f"{k}.self_attn.o_proj.weight",), (d, cfg.num_heads * z))
  for norm in ("q_norm", "k_norm"):
    out[(p, "self_attn", norm, "scale")] = Source("copy", (f"{k}.self_attn.{norm}.weight",), (z,))
  return out


def _moe(cfg: ModelConfig, layer: int, p: str, k: str, fused: bool) -> dict[Path, Source]:
  d, e, f = cfg.d_model, cfg.num_experts, cfg.expert_d_ff
  out = {(p, "mlp", "gate"): Source("linear", (f"{k}.mlp.gate.weight",), (e, d))}
  if fused:
    gate_up = (fused_gate_up_key(layer),)
    out[(p, "mlp", "gate_proj")] = Source("fused", gate_up, (e, 2 * f, d), (0, f))
    out[(p, "mlp", "up_proj")] = Source("fused", gate_up, (e, 2 * f, d), (f, 2 * f))
    out[(p, "mlp", "down_proj")] = Source("fused", (f"{k}.mlp.experts.down_proj",), (e, d, f))
    return out
  for name, shape in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
    keys = tuple(f"{k}.mlp.experts.{j}.{name}.weight" for j in range(e))
    out[(p, "mlp", name)] = Source("experts", keys, shape)
  return out


def _dense(cfg: ModelConfig, p: str, k: str) -> dict[Path, Source]:
  d, m = cfg.d_model, cfg.dense_d_ff
  return {(p, "mlp", name, "kernel"): Source("linear", (f"{k}.mlp.{name}.weight",), shape)
          for name, shape in (("gate_proj", (m, d)), ("up_proj", (m, d)), ("down_proj", (d, m)))}


def hf_sources(cfg: ModelConfig, fused_layers: Sequence[int] = ()) -> dict[Path, Source]:
  """Every parameter path of `MoETransformer(cfg)` -> its checkpoint tensors.

  Args:
    cfg: the model.
    fused_layers: MoE layer ids stored in the fused expert layout.
  """
  v, d = cfg.vocab_size, cfg.d_model
  src = {("embed_tokens",): Source("copy", ("model.embed_tokens.weight",), (v, d)),
         ("norm", "scale"): Source("copy", ("model.norm.weight",), (d,))}
  if not cfg.tie_embeddings:
    src[("lm_head", "kernel")] = Source("linear", ("lm_head.weight",), (v, d))
  for i in range(cfg.num_layers):
    p, k = f"layers_{i}", f"model.layers.{i}"
    for norm in ("input_layernorm", "post_attention_layernorm"):
      src[(p, norm, "scale")] = Source("copy", (f"{k}.{norm}.weight",), (d,))
    src.update(_attention(cfg, p, k))
    if i in cfg.dense_layers:
      src.update(_dense(cfg, p, k))
    else:
      src.update(_moe(cfg, i, p, k, fused=i in fused_layers))
  return src


def ours_shape(src: Source) -> tuple[int, ...]:
  """Shape of our parameter before the final reshape ('linear' kernels are reshaped after)."""
  if src.kind == "copy":
    return src.hf_shape
  if src.kind == "linear":
    return src.hf_shape[::-1]
  if src.kind == "experts":
    return (len(src.keys),) + src.hf_shape[::-1]
  e, out, inp = src.hf_shape
  rows = out if src.rows is None else src.rows[1] - src.rows[0]
  return (e, inp, rows)


def to_ours(src: Source, tensors: Sequence[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
  """Checkpoint tensors (for 'experts': a run of experts) -> our layout.

  `shape` is the target block shape; for expert kinds its leading E may be
  an expert shard. 'fused' tensors arrive already cut to those experts and rows.
  """
  if src.kind == "copy":
    return tensors[0].reshape(shape)
  if src.kind == "linear":
    return tensors[0].T.reshape(shape)
  if src.kind == "experts":
    return np.stack([t.T for t in tensors]).reshape(shape)
  return np.swapaxes(tensors[0], 1, 2).reshape(shape)


def to_hf(src: Source, param: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
  """Our parameter (a host array) -> (checkpoint name, contiguous tensor) pairs."""
  if src.kind == "copy":
    yield src.keys[0], np.ascontiguousarray(param.reshape(src.hf_shape))
  elif src.kind == "linear":
    yield src.keys[0], np.ascontiguousarray(param.reshape(-1, src.hf_shape[0]).T)
  elif src.kind == "experts":
    for key, expert in zip(src.keys, param):
      yield key, np.ascontiguousarray(expert.T)
  else:
    raise ValueError(f"writing the fused expert layout ({src.keys[0]}) is not supported; "
                     "checkpoints are written per expert")
