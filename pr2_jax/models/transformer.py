"""`MoETransformer`: a Qwen3-MoE-style decoder with route record and replay.

Dimension legend:
  B batch, T length, D d_model, V vocab, L MoE layers, K top-k, E experts,
  X expert slots per layer, G kv heads, Z head_dim, S KV cache length (max_len).

`model.apply({'params': p}, tokens, routes=None)` returns a `ModelOutput`
whose `.routes [B, T, L, K]` are the routes actually used; feeding them back
as `routes=` reproduces the forward exactly (replay), except after a `predictor=`
forward with `predicted_gates=True`: its live rows were gated by the predictive q̂,
replayed rows are always gated by the router's ρ (DESIGN §3: training gates come from ρ).
A -1 row uses the live router for that (token, layer).
"""

from __future__ import annotations

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pr2_jax.balance.planner import Plan
from pr2_jax.checks import (check_finite, check_int_dtype, check_shape, is_concrete,
                            require_concrete)
from pr2_jax.config import ModelConfig, check_int, storage_dtype
from pr2_jax.models.experts import validate_slot_expert
from pr2_jax.models.layers import INIT, MLP, Attention, RMSNorm, cache_mask, causal_mask
from pr2_jax.models.moe import MoEBlock
from pr2_jax.models.routing import check_routes_shape, validate_routes
from pr2_jax.parallel.mesh import (EXPERT, axis_size, check_batch_split, check_mesh, constrain,
                                   partitioned)


@flax.struct.dataclass
class KVCache:
  """Keys/values of every layer for decoding; slot `index` is the next to write.

  One array per layer, not one [L, ...] array: a layer's attention reads its cache
  in place, where slicing a layer out of a stacked cache copied it every step.
  """
  k: tuple[jax.Array, ...]  # num_layers x [B, G, Z, S]: attend's layouts (see layers.attend)
  v: tuple[jax.Array, ...]  # num_layers x [B, G, S, Z]
  valid: jax.Array   # [B, S] bool, True where a slot holds a real (non-padding) token
  index: jax.Array   # int32 scalar


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `max_len` tokens (prompt + response) of `dtype` values (default: the
  compute dtype). A cache of compute-dtype values is stored in
  `pr2_jax.config.storage_dtype(dtype)` (float32 for 16-bit floats on CPU: the same numbers,
  written in place); another dtype as it is, since the stored type is what rounds the keys and
  values written."""
  check_int("init_cache", "batch", batch)
  check_int("init_cache", "max_len", max_len)
  dtype = jnp.dtype(dtype or config.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):  # an int8 cache would truncate every key
    raise ValueError(f"init_cache: dtype={dtype} must be a floating dtype (e.g. float32, "
                     "bfloat16)")
  if dtype == jnp.dtype(config.dtype):
    dtype = storage_dtype(dtype)
  b, g, s, z = batch, config.num_kv_heads, max_len, config.head_dim
  zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(zeros((b, g, z, s)), zeros((b, g, s, z)),
                 jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def validate_tokens(tokens, vocab_size: int) -> None:
  """Host-side check that token ids are ints in [0, vocab_size); raises ValueError naming
  the bad id.

  The embedding lookup would not fail on a bad id: `jnp.take` returns NaN for
  ids >= vocab_size and wraps negative ones, silently. Call it before jit: a traced
  `tokens` is a TypeError.
  """
  require_concrete("tokens", tokens, "validate_tokens")
  t = np.asarray(tokens)
  if not np.issubdtype(t.dtype, np.integer):
    raise ValueError(f"token ids have dtype {t.dtype}, expected an integer dtype (int32)")
  bad = (t < 0) | (t >= vocab_size)
  if np.any(bad):
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"token id {int(t[idx])} at index {idx} is outside the vocabulary "
                     f"[0, ModelConfig.vocab_size={vocab_size})")


def _check_slot_expert(slot_expert, config: ModelConfig, mesh: Mesh | None) -> None:
  """Static: a slot map [L, X] or a Plan (slot_expert [L, D, S]) for every MoE layer.

  JAX clamps out-of-range indexes, so a map with too few layers would silently
  reuse its last layer, and one with fewer than E slots leaves experts without a slot.
  """
  n_layers, n_experts = config.num_moe_layers, config.num_experts
  is_plan = isinstance(slot_expert, Plan)
  if is_plan:
    name, slots, dims = "plan.slot_expert", slot_expert.slot_expert, "[L, D, S]"
    shape = tuple(np.shape(slots))
    ok = len(shape) == 3 and shape[0] == n_layers
    num_slots = int(np.prod(shape[1:])) if ok else 0
  else:
    name, slots, dims = "slot_expert", slot_expert, "[L, X]"
    shape = tuple(np.shape(slots))
    ok = len(shape) == 2 and shape[0] == n_layers
    num_slots = shape[1] if ok else 0
  if not ok:
    raise ValueError(f"{name} has shape {shape}, expected {dims} with L = {n_layers} "
                     f"(ModelConfig.num_moe_layers)")
  check_int_dtype(name, slots, error=ValueError)
  if is_plan:
    check_shape("plan.replica_share", slot_expert.replica_share, shape, "slot_expert's [L, D, S]")
    check_shape("plan.replica_count", slot_expert.replica_count, (n_layers, n_experts), "[L, E]")
  shards = axis_size(mesh, EXPERT)
  if is_plan and mesh is not None and shape[1] != shards:
    # D·S slots would still split evenly, regrouped: the plan's loads would not be what runs.
    raise ValueError(f"plan.slot_expert has shape {shape}: a plan for D = {shape[1]} devices, "
                     f"but the mesh's 'expert' axis has {shards} (plan_placement's num_devices)")
  if num_slots < n_experts or num_slots % shards:
    raise ValueError(f"{name} has shape {shape}: {num_slots} slots per layer, expected at least "
                     f"num_experts={n_experts} (one per expert) and a multiple of the mesh's "
                     f"'expert' axis size {shards}")


def _check_cache(cache: KVCache, config: ModelConfig, batch: int, length: int, positions) -> None:
  """Static checks of a KV cache against the model and the tokens; the write position too
  when the cache index is concrete (an eager call)."""
  if positions is None:
    raise ValueError("cache= needs positions [B, T]: the tokens' positions in their sequences "
                     "(with left padding they differ from the cache slots); got positions=None")
  if len(cache.k) != config.num_layers or len(cache.v) != config.num_layers:
    raise ValueError(f"KV cache has {len(cache.k)} key and {len(cache.v)} value layers, expected "
                     f"ModelConfig.num_layers={config.num_layers} (init_cache(config, ...))")
  if np.ndim(cache.valid) != 2:
    raise ValueError(f"cache.valid has shape {tuple(np.shape(cache.valid))}, expected [B, S]")
  cache_batch, max_len = cache.valid.shape
  if cache_batch != batch:
    raise ValueError(f"KV cache is for batch {cache_batch} (cache.valid has shape "
                     f"{tuple(cache.valid.shape)}), but tokens have shape {(batch, length)}; "
                     f"expected init_cache(config, batch={batch}, max_len)")
  g, z = config.num_kv_heads, config.head_dim
  for i in range(config.num_layers):
    check_shape(f"cache.k[{i}]", cache.k[i], (batch, g, z, max_len), "[B, G, Z, S]")
    check_shape(f"cache.v[{i}]", cache.v[i], (batch, g, max_len, z), "[B, G, S, Z]")
  if length > max_len:  # the write would be clipped silently
    raise ValueError(f"{length} tokens do not fit the KV cache of max_len={max_len} "
                     "(init_cache(..., max_len)); allowed: at most max_len tokens")
  if is_concrete(cache.index):  # eager: dynamic_update_slice would clamp
    index = int(cache.index)
    if index < 0:
      raise ValueError(f"cache index {index} is negative; allowed: 0 <= index <= max_len - tokens")
    if index + length > max_len:
      raise ValueError(f"cache index {index} + {length} tokens > max_len {max_len}: the write "
                       "would be clamped; allowed: 0 <= index <= max_len - tokens")

def _check_inputs(cfg: ModelConfig, mesh: Mesh | None, tokens_BT, routes, *, positions, valid,
                  slot_expert, cache, predictor, logits: str) -> None:
  """`MoETransformer.__call__`'s input checks: shapes, ranks and layer counts statically (also
  under jit: JAX clamps out-of-range indexes and broadcasts, so a wrong layer count or shape
  would otherwise run silently or fail deep inside a layer); token ids, routes, slot maps and
  the predictor's weights only when concrete (jitted callers check on the host). Raises
  ValueError."""
  if np.ndim(tokens_BT) != 2:
    raise ValueError(f"tokens have shape {tuple(np.shape(tokens_BT))}, expected rank 2 [B, T]")
  b, t = tokens_BT.shape
  n_moe = cfg.num_moe_layers
  if logits not in ("all", "last", "none"):
    raise ValueError(f"logits={logits!r} must be 'all', 'last' or 'none'")
  if positions is not None:
    check_shape("positions", positions, (b, t), "[B, T]")
  if valid is not None:
    check_shape("valid", valid, (b, t), "[B, T]")
  if routes is not None:
    check_routes_shape(routes, batch=b, length=t, num_layers=n_moe, top_k=cfg.top_k)
  if predictor is not None:
    check_shape("predictor", predictor, (n_moe, cfg.d_model, cfg.num_experts), "[L, D, E]")
    # A NaN or inf weight routes every token by NaN scores and the logits come out NaN, silently
    check_finite("predictor", predictor, "PR2 predictor weights W_p [L, D, E]")
  if slot_expert is not None:
    _check_slot_expert(slot_expert, cfg, mesh)
  if cache is not None:
    _check_cache(cache, cfg, b, t, positions)
  if is_concrete(tokens_BT):
    validate_tokens(tokens_BT, cfg.vocab_size)
  if routes is not None and is_concrete(routes):
    validate_routes(routes, batch=b, length=t, num_layers=n_moe, top_k=cfg.top_k,
                    num_experts=cfg.num_experts)
  slots = slot_expert.slot_expert if isinstance(slot_expert, Plan) else slot_expert
  if slots is not None and is_concrete(slots):
    for layer, map_X in enumerate(np.asarray(slots).reshape(n_moe, -1)):
      try:
        validate_slot_expert(map_X, cfg.num_experts)
      except ValueError as e:
        raise ValueError(f"MoE layer {layer}'s slot map: {e}") from None
  check_batch_split(b, mesh)


def _attention_mask(positions_BT, valid_BT, cache: KVCache | None):
  """(mask_BTS, key_valid_BS): causal over the tokens themselves (key_valid_BS None), or with a
  cache over its slots, these tokens' validity written at `cache.index` (S = max_len)."""
  if cache is None:
    return causal_mask(positions_BT, valid_BT), None
  b, t = positions_BT.shape
  step_valid_BT = jnp.ones((b, t), bool) if valid_BT is None else valid_BT.astype(bool)
  key_valid_BS = jax.lax.dynamic_update_slice_in_dim(cache.valid, step_valid_BT, cache.index, 1)
  return cache_mask(cache.index, t, key_valid_BS), key_valid_BS


@flax.struct.dataclass
class ModelOutput:
  logits: Optional[jax.Array]              # [B, T, V] float32 ([B, 1, V] with logits='last')
  routes: jax.Array                        # [B, T, L, K] int32, routes actually used
  dropped: jax.Array                       # [L] int32, (token, k) pairs over capacity per layer
  aux_loss: jax.Array                      # scalar, mean Switch loss over MoE layers (1.0
                                           # when even), unweighted: the trainers add
                                           # ModelConfig.aux_loss_coef times it to their loss
  router_logits: Optional[jax.Array] = None  # [B, T, L, E] float32, on request
  router_inputs: Optional[jax.Array] = None  # [B, T, L, D], on request (PR2 features)
  cache: Optional[KVCache] = None            # updated cache when decoding
  hidden: Optional[jax.Array] = None         # [B, T, D] final normed hidden, with logits='none'


class DecoderLayer(nn.Module):
  """Pre-norm attention then MLP or MoE block. Returns (x_BTD, MoEAux or None, the MoE
  block's input h_BTD (PR2's router features) or None, this layer's updated cache or None)."""
  config: ModelConfig
  is_moe: bool
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, routes_BTK, slot_expert_X, capacity, kv,
               predictor_DE=None, predicted_gates=True, valid_BT=None):
    cfg = self.config
    h_BTD = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x_BTD)
    a_BTD, kv = Attention(cfg, self.mesh, name="self_attn")(h_BTD, positions_BT, mask_BTS, kv)
    x_BTD = x_BTD + a_BTD
    h_BTD = RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(x_BTD)
    if not self.is_moe:
      return x_BTD + MLP(cfg, name="mlp")(h_BTD), None, None, kv
    y_BTD, aux = MoEBlock(config=cfg, mesh=self.mesh, name="mlp")(
        h_BTD, routes_BTK=routes_BTK, slot_expert_X=slot_expert_X, capacity=capacity,
        predictor_DE=predictor_DE, predicted_gates=predicted_gates, valid_BT=valid_BT)
    return x_BTD + y_BTD, aux, h_BTD, kv


class MoETransformer(nn.Module):
  """Qwen3-MoE decoder. `mesh=None` runs on one device; a ('data','expert') mesh shards it."""
  config: ModelConfig     # shapes and numerics (validated when built)
  mesh: Mesh | None = None  # None: one device; else `make_mesh(data, expert)`'s mesh

  def __post_init__(self):
    check_mesh(self.mesh)  # a foreign mesh failed deep inside JAX
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens_BT, routes=None, *, positions=None, valid=None,
               return_router_logits=False, return_router_inputs=False,
               slot_expert=None, capacity=None, cache: KVCache | None = None,
               predictor=None, predicted_gates: bool = True,
               logits: str = "all") -> ModelOutput:
    """Forward pass.

    Args:
      tokens_BT: int32 token ids.
      routes: optional [B, T, L, K] replayed expert ids (-1 rows = live), int32 or any other
        integer dtype (numpy's int64 from np.argsort, say). L counts the MoE layers only
        (`config.num_moe_layers`), here and in every per-layer input and output.
      positions: optional int32 [B, T] positions (default 0..T-1; set for left padding).
      valid: optional bool [B, T], False on padding (masked as attention keys).
      return_router_logits / return_router_inputs: also return per-layer router
        logits [B, T, L, E] / router inputs [B, T, L, D].
      slot_expert: optional int32 [L, X] slot -> expert map per MoE layer, or a
        `pr2_jax.balance.Plan` (replicas plus the planned token split).
      capacity: optional static per-slot capacity (overrides capacity_factor).
      cache: optional KVCache; the T tokens are written at `cache.index` and
        attend to everything before them (prefill and decode). `positions`
        must then be given; the output carries the updated cache.
      predictor: optional PR2 weights [L, D, E]: live routes become the
        predicted ones, TopK(softmax(p + h W_p)); replayed rows are unaffected.
      predicted_gates: with `predictor`, gate by q̂ (True) or by ρ (False).
      logits: 'all' [B, T, V]; 'last' [B, 1, V], all a prefill samples from; 'none': no LM
        head, the output carries `hidden` instead (`lm_head_kernel` turns it into logits, e.g.
        chunk by chunk). At a real vocabulary the [B, T, V] float32 logits are the largest
        buffer of a forward pass (151,936 columns: 0.6 MB per token).

    Raises ValueError on a wrong shape, rank or layer count (also under jit) and, on
    eager calls only, on bad values: token ids, routes (`validate_routes`), cache index, a
    predictor holding a NaN or inf.
    """
    cfg = self.config
    _check_inputs(cfg, self.mesh, tokens_BT, routes, positions=positions, valid=valid,
                  slot_expert=slot_expert, cache=cache, predictor=predictor, logits=logits)
    b, t = tokens_BT.shape
    if routes is not None and routes.dtype != jnp.int32:  # ids checked (eager) fit in int32
      routes = jnp.asarray(routes, jnp.int32)
    embed_VD = self.param("embed_tokens", partitioned(INIT, ("vocab", "embed")),
                       (cfg.vocab_size, cfg.d_model), jnp.float32)
    # Under FSDP the table's D is split over 'data': gather it for the lookup, as FSDP does
    # every weight at use. Otherwise the lookup's gradient, split by batch, was replicated to
    # every device to be scattered into the D-split table (XLA's "Involuntary full
    # rematerialization" of the [B, T, D] cotangent). Without FSDP this is a no-op.
    table_VD = constrain(embed_VD, self.mesh, ("vocab", "embed"))
    x_BTD = jnp.take(table_VD, tokens_BT, axis=0).astype(cfg.dtype)
    x_BTD = constrain(x_BTD, self.mesh, ("batch", "length", "embed"))
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask_BTS, key_valid_BS = _attention_mask(positions, valid, cache)
    auxes, inputs, new_k, new_v = [], [], [], []  # the last two: each layer's updated cache
    for i in range(cfg.num_layers):
      moe_idx = len(auxes)
      is_moe = i in cfg.moe_layers
      layer_routes = routes[:, :, moe_idx] if (routes is not None and is_moe) else None
      layer_slots = (jax.tree.map(lambda a: a[moe_idx], slot_expert)
                     if (slot_expert is not None and is_moe) else None)
      layer_pred = predictor[moe_idx] if (predictor is not None and is_moe) else None
      kv = None if cache is None else (cache.k[i], cache.v[i], cache.index)
      x_BTD, aux, h_BTD, kv = DecoderLayer(config=cfg, is_moe=is_moe, mesh=self.mesh,
                                           name=f"layers_{i}")(
          x_BTD, positions_BT=positions, mask_BTS=mask_BTS, routes_BTK=layer_routes,
          slot_expert_X=layer_slots, capacity=capacity, kv=kv, predictor_DE=layer_pred,
          predicted_gates=predicted_gates, valid_BT=valid)
      if cache is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
      if is_moe:
        auxes.append(aux)
        inputs.append(h_BTD)
      x_BTD = constrain(x_BTD, self.mesh, ("batch", "length", "embed"))
    x_BTD = RMSNorm(cfg.rms_norm_eps, name="norm")(x_BTD)
    if cache is not None:
      cache = KVCache(tuple(new_k), tuple(new_v), key_valid_BS, cache.index + t)
    return self._head_and_output(x_BTD, embed_VD, auxes, inputs, cache, logits=logits,
                                 router_logits=return_router_logits,
                                 router_inputs=return_router_inputs)

  def _head_and_output(self, x_BTD, embed_VD, auxes, inputs, cache, *, logits: str,
                       router_logits: bool, router_inputs: bool) -> ModelOutput:
    """The LM head on the final normed hidden states (per `logits`) and the `ModelOutput`
    stacking the MoE layers' `auxes` and router `inputs` (h_BTD each) along axis 2 (L)."""
    cfg = self.config
    logits_BTV = None
    head_in_BTD = x_BTD[:, -1:] if logits == "last" else x_BTD
    if logits != "none" and cfg.tie_embeddings:
      logits_BTV = jnp.einsum("btd,vd->btv", head_in_BTD, embed_VD.astype(cfg.dtype))
    elif logits != "none":
      logits_BTV = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, name="lm_head",
                            kernel_init=partitioned(INIT, ("embed", "vocab")))(head_in_BTD)
    return ModelOutput(
        logits=None if logits_BTV is None else logits_BTV.astype(jnp.float32),
        hidden=x_BTD if logits == "none" else None,
        routes=jnp.stack([a.routes_BTK for a in auxes], axis=2),
        dropped=jnp.stack([a.dropped for a in auxes]),
        aux_loss=jnp.mean(jnp.stack([a.aux_loss for a in auxes])),
        router_logits=(jnp.stack([a.logits_BTE for a in auxes], axis=2)
                       if router_logits else None),
        router_inputs=jnp.stack(inputs, axis=2) if router_inputs else None,
        cache=cache)


def lm_head_kernel(params, config: ModelConfig) -> jax.Array:
  """The LM head's [D, V] weights in `params`: its own, or the embedding's with tied
  embeddings. `logits = hidden @ kernel` in the model's dtype, as `MoETransformer` computes
  them (for callers that take `logits='none'` and apply the head themselves).

  Raises ValueError naming the missing key and the keys `params` has (e.g. a tied model's
  params with an untied config, or the {'params': ...} wrapper instead of its content)."""
  key = "embed_tokens" if config.tie_embeddings else "lm_head"
  if key not in params:
    where = "the tied embeddings" if config.tie_embeddings else "its own weights (not tied)"
    raise ValueError(f"params has no {key!r}: with config.tie_embeddings={config.tie_embeddings} "
                     f"the LM head is {where}; params has keys {sorted(params)}")
  if config.tie_embeddings:
    return params["embed_tokens"].T
  return params["lm_head"]["kernel"]
