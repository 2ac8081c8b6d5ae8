"""Frozen, validated model configuration.

Library code takes this dataclass, never a ConfigDict: `configs/*.py` build a
ConfigDict for the command line and `ModelConfig.from_dict` turns it into this.
Every check raises `ValueError` naming the field and the allowed values, so a
bad flag fails at start-up and never deep inside XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

EXPERT_IMPLS = ("capacity", "ragged", "grouped", "dense")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Qwen3-MoE-style decoder. Field names follow the paper/HF meaning."""

  vocab_size: int = 64            # tokens in the embedding and LM head
  num_layers: int = 2             # decoder layers (MoE or dense MLP)
  d_model: int = 64               # residual width (HF hidden_size)
  num_heads: int = 4              # query heads
  num_kv_heads: int = 2           # key/value heads (GQA); divides num_heads
  head_dim: int = 16              # per-head width (Qwen3 sets it explicitly)
  expert_d_ff: int = 64           # hidden width of one SwiGLU expert
  num_experts: int = 8            # routed experts per MoE layer
  top_k: int = 2                  # experts per token
  norm_topk_prob: bool = True     # renormalise the top-k gates to sum to 1
  rope_theta: float = 10_000.0    # rotary base
  rms_norm_eps: float = 1e-6      # RMSNorm epsilon
  tie_embeddings: bool = False    # LM head shares the embedding matrix
  dtype: str = "float32"          # computation dtype; params and router stay float32
  dense_layers: tuple[int, ...] = ()  # layer ids with a dense SwiGLU MLP (HF mlp_only_layers)
  dense_d_ff: int = 0             # hidden width of the dense MLP (HF intermediate_size)
  expert_impl: str = "capacity"   # 'capacity' (all_to_all), 'ragged' (ragged_dot), 'grouped'
                                  # (blocked dropless matmuls, the fast CPU path), 'dense' (reference)
  capacity_factor: float = 0.0    # slots' token capacity / even share; 0 = dropless
  aux_loss_coef: float = 0.0      # Switch-style load-balancing loss weight (off by default)
  fsdp: bool = False              # also split every parameter's d_model dim (and its AdamW
                                  # moments) over the mesh's 'data' axis (ZeRO-3 style)

  def __post_init__(self):
    # Accept lists (from ConfigDicts/JSON) but store a hashable tuple.
    object.__setattr__(self, "dense_layers", tuple(int(i) for i in self.dense_layers))
    positive = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
                "head_dim", "expert_d_ff", "num_experts", "top_k")
    for name in positive:
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
    for name in ("norm_topk_prob", "tie_embeddings", "fsdp"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
    for name in ("rope_theta", "rms_norm_eps", "capacity_factor", "aux_loss_coef"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"ModelConfig.{name} must be a number, got {value!r}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads={self.num_heads} must be divisible by "
          f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.top_k > self.num_experts:
      raise ValueError(f"ModelConfig.top_k={self.top_k} must be <= num_experts={self.num_experts}")
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even (rotary embeddings)")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r} must be one of {DTYPES}")
    if self.expert_impl not in EXPERT_IMPLS:
      raise ValueError(f"ModelConfig.expert_impl={self.expert_impl!r} must be one of {EXPERT_IMPLS}")
    if self.capacity_factor < 0:
      raise ValueError(f"ModelConfig.capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)")
    if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
      raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} and rms_norm_eps="
                       f"{self.rms_norm_eps} must be positive")
    bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"ModelConfig.dense_layers={self.dense_layers} has ids {bad} outside "
                       f"[0, num_layers={self.num_layers})")
    if len(set(self.dense_layers)) != len(self.dense_layers):
      raise ValueError(f"ModelConfig.dense_layers={self.dense_layers} has repeated ids")
    if self.dense_layers and self.dense_d_ff < 1:
      raise ValueError("ModelConfig.dense_d_ff must be a positive int when dense_layers="
                       f"{self.dense_layers} is set, got {self.dense_d_ff}")
    if self.aux_loss_coef < 0:
      raise ValueError(f"ModelConfig.aux_loss_coef={self.aux_loss_coef} must be >= 0")
    if not self.moe_layers:
      raise ValueError("ModelConfig has no MoE layer: dense_layers covers every layer")

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Layer ids with an MoE block, in order; routes' L axis indexes this tuple."""
    return tuple(i for i in range(self.num_layers) if i not in self.dense_layers)

  @property
  def num_moe_layers(self) -> int:
    return len(self.moe_layers)

  def validate_mesh(self, expert_axis_size: int, data_axis_size: int = 1) -> None:
    """Raises if the experts cannot be split evenly over the expert axis, or (fsdp) the
    parameters' d_model dim over the data axis."""
    if self.num_experts % expert_axis_size:
      raise ValueError(
          f"ModelConfig.num_experts={self.num_experts} must be divisible by the mesh's "
          f"'expert' axis size {expert_axis_size}")
    if self.fsdp and self.d_model % data_axis_size:
      raise ValueError(
          f"ModelConfig.fsdp=True splits d_model={self.d_model} over the mesh's 'data' axis, "
          f"but its size {data_axis_size} does not divide it")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds from a mapping (e.g. `config.model` ConfigDict); unknown keys are errors."""
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown ModelConfig fields {unknown}; allowed: {sorted(known)}")
    return cls(**d)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
