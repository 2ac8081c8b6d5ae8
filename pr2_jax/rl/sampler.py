"""The rollout "inference engine": jitted autoregressive sampling with a KV cache.

Dimension legend:
  B sequences, P prompt length (left-padded), N new tokens, S = P + N slots,
  V vocab, L MoE layers, K top-k, F cached feature slots, D d_model, E experts.

It runs in its own dtype (bfloat16 by default: weights cast once, as a
separate serving engine would hold them), so its log-probs differ from the
training engine (`model.dtype`, float32 by default) the way a real disaggregated stack's
do. The whole decode loop is one `lax.scan` inside jit: no Python dispatch per token. On CPU
the KV cache holds its bfloat16 values in float32 storage
(`pr2_jax.config.storage_dtype(dtype)`: XLA:CPU has no in-place bfloat16 cache write), with
the same tokens and log-probs.

Per token it records the behaviour log-prob µ (under the tempered, unfiltered
distribution, the convention of verl/OpenRLHF: top-p only shapes what is
sampled) and the routes used, for prompt and response tokens alike.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.checks import as_array, check_finite, check_int_dtype, check_rank, is_concrete
from pr2_jax.config import DTYPES, check_int, check_real, check_temperature
from pr2_jax.models.layers import first_argmax
from pr2_jax.models.transformer import MoETransformer, init_cache, validate_tokens


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  max_new_tokens: int = 8     # N, response budget (EOS included)
  temperature: float = 1.0    # 0 = greedy
  top_p: float = 1.0          # nucleus mass kept when sampling
  # stops a sequence (and is part of its response); a tuple: any of them (Qwen3 has two);
  # -1 = no EOS, every row decodes max_new_tokens (benchmarks)
  eos_id: int | tuple[int, ...] = 2
  pad_id: int = 0             # written after EOS (a vocabulary id the model may also sample:
                              # Rollout.valid, not the id, tells padding apart)
  predicted_gates: bool = True  # PR2: gate by the predictive q̂ (paper) or by the router's ρ
  feature_dtype: str = "bfloat16"  # dtype of the cached PR2 router features

  def __post_init__(self):
    # The vocabulary bound of eos_id / pad_id is the model's: `generate` checks it.
    check_int("SamplerConfig", "max_new_tokens", self.max_new_tokens)
    if isinstance(self.eos_id, tuple):
      if not self.eos_id:
        raise ValueError("SamplerConfig.eos_id=() names no EOS id; use -1 for none")
      for i in self.eos_id:
        check_int("SamplerConfig", "eos_id", i, minimum=0)
    else:
      check_int("SamplerConfig", "eos_id", self.eos_id, minimum=-1)
    check_int("SamplerConfig", "pad_id", self.pad_id, minimum=0)
    check_temperature("SamplerConfig", "temperature", self.temperature)
    check_real("SamplerConfig", "top_p", self.top_p)
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplerConfig.top_p must be in (0, 1], got {self.top_p}")
    if not isinstance(self.predicted_gates, bool):
      raise ValueError(
          f"SamplerConfig.predicted_gates must be a bool, got {self.predicted_gates!r}")
    if self.feature_dtype not in DTYPES:
      raise ValueError(
          f"SamplerConfig.feature_dtype={self.feature_dtype!r} must be one of {DTYPES}")

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end a sequence (none for eos_id=-1)."""
    ids = self.eos_id if isinstance(self.eos_id, tuple) else (self.eos_id,)
    return tuple(i for i in ids if i >= 0)


@flax.struct.dataclass
class Rollout:
  tokens: jax.Array         # int32 [B, S], prompt then response
  valid: jax.Array          # bool [B, S], real tokens (prompt and response incl. EOS)
  positions: jax.Array      # int32 [B, S], RoPE positions (padding repeats a neighbour's)
  response_mask: jax.Array  # float32 [B, S], 1 on response tokens incl. EOS
  logp: jax.Array           # float32 [B, S], behaviour log-prob µ of each response token
  routes: jax.Array         # int32 [B, S, L, K], routes the engine used per token
  # At `generate`'s feature_slots_BF (the caller's own array: not returned again):
  feature_h: jax.Array | None = None      # [B, F, L, D] router inputs h_old there
  feature_p: jax.Array | None = None      # [B, F, L, E] router logits p_old there


def temperature_scale(temperature: float) -> float:
  """The factor both engines multiply logits by before the softmax: 1 / T (T = 0, greedy: 1,
  the untempered distribution). The sampler's behaviour log-prob µ and the learner's π_θ must
  be tempered alike, or the importance ratio π_θ / µ is off by the difference."""
  return 1.0 if temperature == 0 else 1.0 / temperature


def tempered_logprobs(logits_BV: jax.Array, temperature: float) -> jax.Array:
  """log-softmax of logits / T (T = 0: the untempered distribution, for greedy)."""
  return jax.nn.log_softmax(logits_BV.astype(jnp.float32) * temperature_scale(temperature),
                            axis=-1)


def sample_token(rng: jax.Array, logits_BV: jax.Array, temperature: float, top_p: float):
  """Samples one token per row; returns (token int32 [B], behaviour log-prob [B])."""
  logp_BV = tempered_logprobs(logits_BV, temperature)
  if temperature == 0:
    token_B = first_argmax(logp_BV)
  else:
    filtered_BV = logp_BV
    if top_p < 1:
      sorted_BV = jnp.sort(logp_BV, axis=-1)[:, ::-1]
      mass_before_BV = jnp.cumsum(jnp.exp(sorted_BV), axis=-1) - jnp.exp(sorted_BV)
      # The smallest logit still inside the nucleus: everything below it is cut.
      cutoff_B = jnp.min(jnp.where(mass_before_BV < top_p, sorted_BV, jnp.inf), axis=-1)
      filtered_BV = jnp.where(logp_BV >= cutoff_B[:, None], logp_BV, -jnp.inf)
    # The Gumbel-max draw of `jax.random.categorical` (same key, same noise, same token).
    token_B = first_argmax(jax.random.gumbel(rng, filtered_BV.shape, filtered_BV.dtype)
                           + filtered_BV)
  token_B = token_B.astype(jnp.int32)
  return token_B, jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]


def prompt_positions(valid_BP: jax.Array) -> jax.Array:
  """0, 1, 2, ... over real tokens of a left-padded prompt (padding gets 0)."""
  return jnp.maximum(jnp.cumsum(valid_BP.astype(jnp.int32), axis=1) - 1, 0)


def _gather_slots(x_BPL_: jax.Array, slots_BF: jax.Array) -> jax.Array:
  """Rows of x at prompt slots (zeros for slots beyond the prompt)."""
  p = x_BPL_.shape[1]
  idx_BF = jnp.clip(slots_BF, 0, p - 1)
  idx_BF_ = idx_BF.reshape(idx_BF.shape + (1,) * (x_BPL_.ndim - 2))
  rows = jnp.take_along_axis(x_BPL_, idx_BF_, axis=1)
  return jnp.where((slots_BF < p).reshape(slots_BF.shape + (1,) * (x_BPL_.ndim - 2)), rows, 0)


def validate_generate_inputs(vocab_size: int, prompts_BP, prompt_valid_BP, config: SamplerConfig,
                             feature_slots_BF=None) -> None:
  """Checks `generate`'s inputs against the model's vocabulary; raises ValueError naming the bad
  value. Shapes, dtypes and the config's eos/pad ids are static (checked under jit too); prompt
  token ids, the padding layout and slot values only when concrete."""
  if any(i >= vocab_size for i in config.stop_ids):  # never drawn: no row would ever stop
    raise ValueError(f"SamplerConfig.eos_id={config.eos_id} must be < ModelConfig.vocab_size="
                     f"{vocab_size} (or -1: no EOS)")
  if config.pad_id >= vocab_size:
    raise ValueError(f"SamplerConfig.pad_id={config.pad_id} must be < ModelConfig.vocab_size="
                     f"{vocab_size}")
  check_rank("prompts_BP", prompts_BP, 2, "[B, P]")
  if jnp.shape(prompts_BP)[0] == 0:  # else init_cache's "batch must be a positive int"
    raise ValueError(f"prompts_BP has shape {jnp.shape(prompts_BP)}: batch size B = 0, expected "
                     "[B, P] with B >= 1 (no prompts, nothing to sample)")
  if jnp.shape(prompts_BP)[1] == 0:  # sampling continues from the last prompt slot's logits
    raise ValueError(f"prompts_BP has shape {jnp.shape(prompts_BP)}, expected [B, P] with P >= 1 "
                     "(an all-padding row is fine; an empty prompt axis is not)")
  check_int_dtype("prompts_BP", prompts_BP, "an integer dtype (token ids; a float would be "
                  "truncated)", ValueError)
  if is_concrete(prompts_BP):  # under jit an id >= V embeds as NaN: jitted callers check first
    validate_tokens(prompts_BP, vocab_size)
  if jnp.shape(prompt_valid_BP) != jnp.shape(prompts_BP):
    raise ValueError(f"prompt_valid_BP has shape {jnp.shape(prompt_valid_BP)}, expected [B, P] "
                     f"of prompts_BP = {jnp.shape(prompts_BP)}")
  if is_concrete(prompt_valid_BP) and jnp.size(prompt_valid_BP):
    valid = np.asarray(prompt_valid_BP).astype(bool)
    # Sampling continues from the last slot: right padding would condition on a pad token.
    # (All-padding rows, e.g. filling a batch, pass.)
    bad = valid.any(1) & (~valid[:, -1] | np.any(valid[:, :-1] & ~valid[:, 1:], axis=1))
    if np.any(bad):
      row = int(np.argmax(bad))
      raise ValueError(f"prompt_valid_BP row {row} = {valid[row].astype(int).tolist()} is not "
                       "left-padded (padding first, then the prompt up to the last slot)")
  if feature_slots_BF is None:
    return
  b, p = jnp.shape(prompts_BP)
  s = p + config.max_new_tokens
  if jnp.ndim(feature_slots_BF) != 2 or jnp.shape(feature_slots_BF)[0] != b:
    raise ValueError(f"feature_slots_BF has shape {jnp.shape(feature_slots_BF)}, expected "
                     f"[B, F] with B={b}")
  if not jnp.issubdtype(jnp.result_type(feature_slots_BF), jnp.integer):
    raise ValueError(f"feature_slots_BF has dtype {jnp.result_type(feature_slots_BF)}, "
                     "expected an integer dtype (slot ids)")
  if is_concrete(feature_slots_BF):
    slots = np.asarray(feature_slots_BF)
    bad = (slots < 0) | (slots >= s)
    if np.any(bad):  # out-of-range slots would silently cache all-zero features
      idx = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"feature_slots_BF has slot {int(slots[idx])} at index {idx} outside "
                       f"the [0, P + max_new_tokens = {s}) slots of a sequence")


def generate(model: MoETransformer, params, prompts_BP: jax.Array, prompt_valid_BP: jax.Array,
             rng: jax.Array, config: SamplerConfig, predictor=None,
             feature_slots_BF: jax.Array | None = None) -> Rollout:
  """Samples N tokens after each left-padded prompt. Jit it with `model`/`config` static.

  `params` are the (float32) training parameters; they are cast to the model's
  compute dtype here, the weight sync into the inference engine. With a PR2
  `predictor [L, D, E]` every token is routed by the predicted distribution.
  With `feature_slots_BF`, the router inputs and logits at those slots are
  cached (PR2's predictor is trained on them). Bad inputs raise ValueError
  (see `validate_generate_inputs`), as does a concrete predictor holding a NaN or inf.
  """
  prompts_BP, prompt_valid_BP = as_array(prompts_BP), as_array(prompt_valid_BP)
  feature_slots_BF = None if feature_slots_BF is None else as_array(feature_slots_BF)
  validate_generate_inputs(model.config.vocab_size, prompts_BP, prompt_valid_BP, config,
                           feature_slots_BF)
  if predictor is not None:  # under jit the routes would follow NaN scores, silently
    check_finite("predictor", predictor, "PR2 predictor weights W_p [L, D, E]")
  b, p = prompts_BP.shape
  n = config.max_new_tokens
  dtype = jnp.dtype(model.config.dtype)
  fdtype = jnp.dtype(config.feature_dtype)
  record = feature_slots_BF is not None
  engine_params = jax.tree.map(lambda w: w.astype(dtype), params)
  # logits='last': a prefill samples from its last position only (decode steps have one).
  apply = lambda tok, pos, valid, cache: model.apply(
      {"params": engine_params}, tok, positions=pos, valid=valid, cache=cache, predictor=predictor,
      predicted_gates=config.predicted_gates, return_router_logits=record,
      return_router_inputs=record, logits="last")

  pos_BP = prompt_positions(prompt_valid_BP)
  first = apply(prompts_BP, pos_BP, prompt_valid_BP, init_cache(model.config, b, p + n, dtype))
  feats = None
  if record:
    feats = (_gather_slots(first.router_inputs, feature_slots_BF).astype(fdtype),
             _gather_slots(first.router_logits, feature_slots_BF).astype(fdtype))

  def decode(carry, xs):
    cache, logits_BV, pos_B, done_B, feats = carry
    rng_t, slot = xs
    token_B, logp_B = sample_token(rng_t, logits_BV, config.temperature, config.top_p)
    token_B = jnp.where(done_B, config.pad_id, token_B)
    live_B = ~done_B
    out = apply(token_B[:, None], pos_B[:, None], live_B[:, None], cache)
    if record:
      hit_BF11 = (feature_slots_BF == slot)[:, :, None, None]
      feats = (jnp.where(hit_BF11, out.router_inputs[:, :1].astype(fdtype), feats[0]),
               jnp.where(hit_BF11, out.router_logits[:, :1].astype(fdtype), feats[1]))
    step = (token_B, jnp.where(live_B, logp_B, 0.0), live_B, pos_B, out.routes[:, 0])
    for stop in config.stop_ids:
      done_B = done_B | (token_B == stop)
    return (out.cache, out.logits[:, 0], pos_B + live_B, done_B, feats), step

  carry = (first.cache, first.logits[:, -1], pos_BP[:, -1] + 1, jnp.zeros((b,), bool), feats)
  xs = (jax.random.split(rng, n), p + jnp.arange(n))
  (_, _, _, _, feats), (tok_NB, logp_NB, live_NB, pos_NB, routes_NBLK) = jax.lax.scan(
      decode, carry, xs)
  live_BN = live_NB.T
  return Rollout(
      tokens=jnp.concatenate([prompts_BP, tok_NB.T], axis=1),
      valid=jnp.concatenate([prompt_valid_BP.astype(bool), live_BN], axis=1),
      positions=jnp.concatenate([pos_BP, pos_NB.T], axis=1),
      response_mask=jnp.concatenate([jnp.zeros((b, p)), live_BN], axis=1).astype(jnp.float32),
      logp=jnp.concatenate([jnp.zeros((b, p)), logp_NB.T], axis=1).astype(jnp.float32),
      routes=jnp.concatenate([first.routes, jnp.swapaxes(routes_NBLK, 0, 1)], axis=1),
      feature_h=None if feats is None else feats[0],
      feature_p=None if feats is None else feats[1])
