"""Frozen, validated model configuration.

Library code takes this dataclass, never a ConfigDict: `configs/*.py` build a
ConfigDict for the command line and `ModelConfig.from_dict` turns it into this.
Every check raises `ValueError` naming the field and the allowed values, so a
bad flag fails at start-up and never deep inside XLA.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax
import jax.numpy as jnp

EXPERT_IMPLS = ("capacity", "ragged", "grouped", "dense")
DTYPES = ("float32", "bfloat16")
# ModelConfig fields that are training knobs, not architecture: they may differ from a
# checkpoint's config.json (a model section of only these takes the rest from a checkpoint).
RUNTIME_FIELDS = ("dtype", "expert_impl", "capacity_factor", "aux_loss_coef", "fsdp",
                  "attention_blocks")


def storage_dtype(dtype) -> jnp.dtype:
  """The dtype a KV cache (or a loop-carried buffer) of `dtype` values is stored in: `dtype`,
  except 16-bit floats on CPU, which are stored in float32.

  XLA:CPU has no 16-bit-float dynamic-update-slice or attention dot: it converts the whole
  cache to float32 and back for every write and once more for the dots that read it, three
  passes over the cache per layer and decode step where a float32 cache is written in place.
  The values stay those of `dtype` (only `dtype` values are written, and `attend` rounds its
  products to the queries' dtype), so the tokens and log-probs are the same. The grouped
  expert path's block loop keeps its per-block outputs in it for the same reason.
  """
  dtype = jnp.dtype(dtype)
  narrow_float = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4
  return jnp.dtype(jnp.float32) if narrow_float and jax.default_backend() == "cpu" else dtype


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> None:
  """Raises ValueError unless `value` is an int >= `minimum` (a bool or a whole float is not:
  2.0 in an int field is a typo that would break shapes deep inside jit)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
    expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    raise ValueError(f"{owner}.{name} must be {expected}, got {value!r}")


def check_real(owner: str, name: str, value: Any, low: float | None = None, *,
               inclusive: bool = True) -> None:
  """Raises ValueError unless `value` is a finite real number (not a bool or a string) and,
  with `low`, >= low (`inclusive`) or > low. NaN would pass every `<`/`>` range check and
  silently poison training, hence the explicit isfinite."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
    raise ValueError(f"{owner}.{name} must be a finite real number, got {value!r}")
  if low is not None and (value < low if inclusive else value <= low):
    raise ValueError(f"{owner}.{name} must be {'>=' if inclusive else '>'} {low}, got {value!r}")


# Sampling temperatures in (0, MIN_TEMPERATURE) are refused: the logits are multiplied by 1/T
# in float32, and at T ~ 1e-37 that overflows to inf and the log-probs to NaN. 0 is greedy.
MIN_TEMPERATURE = 1e-6


def check_temperature(owner: str, name: str, value: Any) -> None:
  """A sampling temperature: 0 (greedy) or a finite real >= MIN_TEMPERATURE."""
  check_real(owner, name, value, 0)
  if 0 < value < MIN_TEMPERATURE:
    raise ValueError(f"{owner}.{name}={value!r} is below {MIN_TEMPERATURE:g}: its 1/T overflows "
                     "float32 logits; use 0 for greedy decoding")


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
  # computation dtype; in training params and router stay float32 (the RL rollout engine
  # casts every weight to rl.rollout_dtype once, as an inference engine holds them)
  dtype: str = "float32"
  dense_layers: tuple[int, ...] = ()  # layer ids with a dense SwiGLU MLP (HF mlp_only_layers)
  dense_d_ff: int = 0             # hidden width of the dense MLP (HF intermediate_size)
  expert_impl: str = "capacity"   # 'capacity' (all_to_all of capacity buffers when
                                  # capacity_factor > 0 or a bucket caps them below the
                                  # shard's tokens; dropless runs the grouped path),
                                  # 'ragged' (ragged_dot), 'grouped' (blocked dropless
                                  # matmuls, the fast CPU path), 'dense' (reference)
  # slots' token capacity / even share; 0 = dropless. The RL rollout engine is always dropless
  capacity_factor: float = 0.0
  aux_loss_coef: float = 0.0      # Switch-style load-balancing loss weight (off by default)
  fsdp: bool = False              # also split every parameter's d_model dim (and its AdamW
                                  # moments) over the mesh's 'data' axis (ZeRO-3 style)
  attention_blocks: int = 4       # attention without a KV cache splits the queries into up to
                                  # this many causal blocks (>= 64 queries each) that skip the
                                  # keys after them; 1 = one block (same result either way)

  def __post_init__(self):
    # Accept lists (from ConfigDicts/JSON) but store a hashable tuple.
    layers = self.dense_layers
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
      raise ValueError(f"ModelConfig.dense_layers must be a sequence of ints, got {layers!r}")
    not_ints = [i for i in layers if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if not_ints:
      raise ValueError(f"ModelConfig.dense_layers must hold int layer ids, got {not_ints!r} "
                       f"in {layers!r}")
    object.__setattr__(self, "dense_layers", tuple(int(i) for i in layers))
    positive = ("vocab_size", "num_layers", "d_model", "num_heads", "num_kv_heads",
                "head_dim", "expert_d_ff", "num_experts", "top_k", "attention_blocks")
    for name in positive:
      check_int("ModelConfig", name, getattr(self, name))
    check_int("ModelConfig", "dense_d_ff", self.dense_d_ff, minimum=0)
    for name in ("norm_topk_prob", "tie_embeddings", "fsdp"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"ModelConfig.{name} must be a bool, got {getattr(self, name)!r}")
    # The real fields, each checked once: finite, and rope_theta and rms_norm_eps > 0;
    # capacity_factor and aux_loss_coef >= 0, in messages that give the value and its meaning.
    for name, low in (("rope_theta", 0), ("rms_norm_eps", 0), ("capacity_factor", None),
                      ("aux_loss_coef", None)):
      check_real("ModelConfig", name, getattr(self, name), low, inclusive=False)
    for name, meaning in (("capacity_factor", " (0 = dropless)"), ("aux_loss_coef", "")):
      if getattr(self, name) < 0:
        raise ValueError(f"ModelConfig.{name}={getattr(self, name)} must be >= 0{meaning}")
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
      raise ValueError(f"ModelConfig.expert_impl={self.expert_impl!r} must be one of "
                       f"{EXPERT_IMPLS}")
    bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
    if bad:
      raise ValueError(f"ModelConfig.dense_layers={self.dense_layers} has ids {bad} outside "
                       f"[0, num_layers={self.num_layers})")
    if len(set(self.dense_layers)) != len(self.dense_layers):
      raise ValueError(f"ModelConfig.dense_layers={self.dense_layers} has repeated ids")
    if self.dense_layers and self.dense_d_ff < 1:
      raise ValueError("ModelConfig.dense_d_ff must be a positive int when dense_layers="
                       f"{self.dense_layers} is set, got {self.dense_d_ff}")
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
