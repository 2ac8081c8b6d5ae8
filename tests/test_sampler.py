"""Tests for pr2_jax.rl.sampler: KV-cache decode vs full forward, routes, sampling rules."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.config import ModelConfig
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import sampler
from pr2_jax.train.state import create_train_state, make_optimizer

CFG = ModelConfig(vocab_size=24, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8,
                  expert_d_ff=32, num_experts=8, top_k=2)
B, P, N = 4, 5, 6


@functools.lru_cache(maxsize=None)
def _setup():
  prompts = np.asarray(jax.random.randint(jax.random.key(1), (B, P), 3, CFG.vocab_size))
  valid = np.ones((B, P), bool)
  valid[0, :2] = False  # left padding on row 0
  prompts = np.where(valid, prompts, 0).astype(np.int32)
  params = nn.unbox(MoETransformer(CFG).init(jax.random.key(0), prompts)["params"])
  return params, prompts, valid


def _generate(dtype, temperature=1.0, top_p=1.0, eos_id=5, seed=2):
  params, prompts, valid = _setup()
  model = MoETransformer(CFG.replace(dtype=dtype))
  config = sampler.SamplerConfig(max_new_tokens=N, temperature=temperature, top_p=top_p,
                                 eos_id=eos_id)
  return jax.jit(sampler.generate, static_argnums=(0, 5))(
      model, params, prompts, valid, jax.random.key(seed), config)


def _full_forward(roll, routes=None):
  params, _, _ = _setup()
  out = MoETransformer(CFG).apply({"params": params}, roll.tokens, routes=routes,
                                  positions=roll.positions, valid=roll.valid)
  logp = jnp.take_along_axis(jax.nn.log_softmax(out.logits[:, :-1]), roll.tokens[:, 1:, None], -1)
  return logp[..., 0], out


def test_kv_cache_logprobs_equal_full_forward_float32():
  """µ recorded by the decode loop equals the full-sequence forward's log-probs (float32)."""
  roll = _generate("float32")
  logp, _ = _full_forward(roll)
  mask = roll.response_mask[:, 1:]
  assert float(mask.sum()) > 0
  np.testing.assert_allclose(np.asarray(logp * mask), np.asarray(roll.logp[:, 1:] * mask),
                             atol=2e-5)


def test_float32_rollout_routes_match_live_training_routes():
  """Same dtype: the training engine's live router picks the rollout's expert sets."""
  roll = _generate("float32")
  _, out = _full_forward(roll)
  same = np.asarray(jnp.all(jnp.sort(out.routes, -1) == jnp.sort(roll.routes, -1), axis=(-1, -2)))
  assert same[np.asarray(roll.valid)].all()


def test_bfloat16_rollout_routes_replayed_in_float32():
  """Replaying bf16 rollout routes in the fp32 pass uses exactly those expert sets."""
  roll = _generate("bfloat16")
  _, out = _full_forward(roll, routes=roll.routes)
  np.testing.assert_array_equal(np.asarray(out.routes), np.asarray(roll.routes))
  logp, _ = _full_forward(roll, routes=roll.routes)
  mask = np.asarray(roll.response_mask[:, 1:]) > 0
  gap = np.abs(np.asarray(logp) - np.asarray(roll.logp[:, 1:]))[mask]
  assert gap.max() > 0, "bf16 engine should differ numerically from the fp32 one"


def test_layout_and_eos_handling():
  """Response after EOS is padding, masked out, with log-prob 0; prompts are kept."""
  params, prompts, valid = _setup()
  roll = _generate("float32", eos_id=5)
  toks, mask = np.asarray(roll.tokens), np.asarray(roll.response_mask)
  np.testing.assert_array_equal(toks[:, :P], prompts)
  assert (mask[:, :P] == 0).all()
  for row, m, lp in zip(toks[:, P:], mask[:, P:], np.asarray(roll.logp)[:, P:]):
    eos = np.flatnonzero(row == 5)
    end = eos[0] + 1 if eos.size else N
    assert (m[:end] == 1).all() and (m[end:] == 0).all()
    assert (row[end:] == 0).all() and (lp[end:] == 0).all()
  # Positions continue after the last real prompt token (row 0 has 3 real ones).
  np.testing.assert_array_equal(np.asarray(roll.positions)[0, P:P + 2], [3, 4])


def test_a_tuple_of_eos_ids_stops_a_row_at_the_first_of_any():
  """Qwen3 stops on two ids; with one, the loss trained on tokens after the second that the
  reward never saw. Greedy rows are the same up to each row's first stop either way."""
  free = np.asarray(_generate("float32", temperature=0.0, eos_id=-1).tokens)[:, P:]
  a, b = int(free[0, 1]), int(free[1, 2])  # rows 0 and 1 meet these at steps 1 and 2 (or before)
  roll = _generate("float32", temperature=0.0, eos_id=(a, b))
  toks, mask = np.asarray(roll.tokens)[:, P:], np.asarray(roll.response_mask)[:, P:]
  for row, free_row, m in zip(toks, free, mask):
    hits = np.flatnonzero((free_row == a) | (free_row == b))
    end = hits[0] + 1 if hits.size else N
    np.testing.assert_array_equal(row[:end], free_row[:end])
    assert (m[:end] == 1).all() and (m[end:] == 0).all() and (row[end:] == 0).all()
  assert mask[0, 2:].sum() == 0 and mask[1, 3:].sum() == 0  # both ids stopped a row
  assert sampler.SamplerConfig(eos_id=(a, b)).stop_ids == (a, b)
  assert sampler.SamplerConfig(eos_id=-1).stop_ids == ()


def test_greedy_is_argmax_and_deterministic():
  a, b = (_generate("float32", temperature=0.0, seed=1),
          _generate("float32", temperature=0.0, seed=9))
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  logp, _ = _full_forward(a)
  mask = np.asarray(a.response_mask[:, 1:]) > 0
  params, _, _ = _setup()
  out = MoETransformer(CFG).apply({"params": params}, a.tokens, positions=a.positions,
                                  valid=a.valid)
  argmax = np.asarray(jnp.argmax(out.logits[:, :-1], -1))
  np.testing.assert_array_equal(argmax[mask], np.asarray(a.tokens)[:, 1:][mask])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sample_token_draws_what_jax_random_categorical_draws(temperature):
  logits = 3 * jax.random.normal(jax.random.key(3), (256, 40))
  logp = sampler.tempered_logprobs(logits, temperature)
  for seed in range(4):
    token, token_logp = sampler.sample_token(jax.random.key(seed), logits, temperature, 1.0)
    want = jax.random.categorical(jax.random.key(seed), logp, axis=-1)
    np.testing.assert_array_equal(np.asarray(token), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(token_logp),
                                  np.asarray(jnp.take_along_axis(logp, want[:, None], -1)[:, 0]))


def test_top_p_keeps_only_the_nucleus():
  """With logits [3, 2, 1, -inf...], top_p=0.6 keeps only the first token."""
  logits = jnp.array([[3.0, 2.0, 1.0, -1e9]] * 64)
  probs = jax.nn.softmax(logits[0])
  assert float(probs[0]) > 0.6
  toks, logp = sampler.sample_token(jax.random.key(0), logits, 1.0, 0.6)
  assert set(np.asarray(toks).tolist()) == {0}
  np.testing.assert_allclose(np.asarray(logp), np.log(float(probs[0])), rtol=1e-5)
  toks, _ = sampler.sample_token(jax.random.key(0), logits, 1.0, 0.9)
  assert set(np.asarray(toks).tolist()) == {0, 1}


def test_temperature_scales_logprobs():
  logits = jnp.array([[1.0, 0.0]])
  np.testing.assert_allclose(np.asarray(sampler.tempered_logprobs(logits, 0.5)),
                             np.asarray(jax.nn.log_softmax(logits * 2)), rtol=1e-6)
  # The one tempering rule (the learner's π_θ uses it too): 1/T, and 1 for greedy T = 0.
  assert [sampler.temperature_scale(t) for t in (0.5, 1.0, 0.0)] == [2.0, 1.0, 1.0]
  np.testing.assert_allclose(np.asarray(sampler.tempered_logprobs(logits, 0.0)),
                             np.asarray(jax.nn.log_softmax(logits)), rtol=1e-6)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), r"SamplerConfig.max_new_tokens must be a positive int, got 0"),
    (dict(max_new_tokens=2.5), r"SamplerConfig.max_new_tokens must be a positive int, got 2.5"),
    (dict(temperature=-1.0), r"SamplerConfig.temperature must be >= 0, got -1.0"),
    (dict(temperature=float("nan")), r"SamplerConfig.temperature must be a finite real .* nan"),
    (dict(top_p=0.0), r"SamplerConfig.top_p must be in \(0, 1\], got 0.0"),
    (dict(top_p=1.5), r"SamplerConfig.top_p must be in \(0, 1\], got 1.5"),
    (dict(top_p=float("nan")), r"SamplerConfig.top_p must be a finite real number, got nan"),
    (dict(eos_id=-2), r"SamplerConfig.eos_id must be an int >= -1, got -2"),
    (dict(eos_id=2.0), r"SamplerConfig.eos_id must be an int >= -1, got 2.0"),
    (dict(eos_id=(3, -1)), r"SamplerConfig.eos_id must be an int >= 0, got -1"),
    (dict(eos_id=()), r"SamplerConfig.eos_id=\(\) names no EOS id; use -1 for none"),
    (dict(pad_id=-1), r"SamplerConfig.pad_id must be an int >= 0, got -1"),
    (dict(feature_dtype="fp8"),
     r"SamplerConfig.feature_dtype='fp8' must be one of \('float32', 'bfloat16'\)"),
    (dict(predicted_gates=1), r"SamplerConfig.predicted_gates must be a bool, got 1"),
])
def test_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    sampler.SamplerConfig(**kwargs)


@pytest.mark.parametrize("kwargs, slots, message", [
    (dict(eos_id=24), None, r"SamplerConfig.eos_id=24 must be < ModelConfig.vocab_size=24 "
     r"\(or -1: no EOS\)"),
    (dict(pad_id=99), None, r"SamplerConfig.pad_id=99 must be < ModelConfig.vocab_size=24"),
    (dict(eos_id=(3, 30)), None, r"SamplerConfig.eos_id=\(3, 30\) must be < ModelConfig"),
    ({}, np.full((B, 2), P + N, np.int32),
     rf"feature_slots_BF has slot {P + N} at index \(0, 0\) outside the \[0, P \+ "
     rf"max_new_tokens = {P + N}\) slots"),
    ({}, np.array([[0, -1]] * B, np.int32), r"feature_slots_BF has slot -1 at index \(0, 1\)"),
    ({}, np.zeros((B, 2), np.float32), r"feature_slots_BF has dtype float32, expected an integer"),
    ({}, np.zeros((B + 1, 2), np.int32), rf"feature_slots_BF has shape \({B + 1}, 2\), expected "
     rf"\[B, F\] with B={B}"),
])
def test_generate_rejects_inputs_that_do_not_fit_the_model(kwargs, slots, message):
  """Checked before any compute, eagerly; the vocabulary checks also under jit."""
  params, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N, **kwargs)
  with pytest.raises(ValueError, match=message):
    sampler.generate(MoETransformer(CFG), params, prompts, valid, jax.random.key(0), config,
                     feature_slots_BF=slots)
  if kwargs:
    with pytest.raises(ValueError, match=message):
      jax.jit(sampler.generate, static_argnums=(0, 5))(
          MoETransformer(CFG), params, prompts, valid, jax.random.key(0), config)


def test_eager_generate_refuses_a_non_finite_predictor_and_takes_lists():
  """A NaN predictor routed every token by NaN scores with no error (route's own check cannot
  see it under generate's trace); nested lists were accepted by the checks, then crashed."""
  params, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=2, temperature=0.0)
  bad = jnp.zeros((CFG.num_moe_layers, CFG.d_model, CFG.num_experts)).at[1, 2, 3].set(jnp.nan)
  with pytest.raises(ValueError, match=r"predictor\[1, 2, 3\] = nan is not finite \(PR2"):
    sampler.generate(MoETransformer(CFG), params, prompts, valid, jax.random.key(0), config,
                     predictor=bad)
  as_lists = sampler.generate(MoETransformer(CFG), params, prompts.tolist(), valid.tolist(),
                              jax.random.key(0), config)
  as_arrays = sampler.generate(MoETransformer(CFG), params, prompts, valid, jax.random.key(0),
                               config)
  np.testing.assert_array_equal(as_lists.tokens, as_arrays.tokens)


def test_generate_rejects_mismatched_prompt_mask():
  params, prompts, valid = _setup()
  with pytest.raises(ValueError, match=rf"prompt_valid_BP has shape \({B}, {P - 1}\), expected"):
    sampler.generate(MoETransformer(CFG), params, prompts, valid[:, 1:], jax.random.key(0),
                     sampler.SamplerConfig(max_new_tokens=N))


def test_generate_rejects_right_padded_prompts():
  """Sampling continues from the last slot: a right-padded prompt conditioned on padding."""
  params, prompts, valid = _setup()
  right = np.asarray(valid).copy()
  right[0] = right[0][::-1]  # row 0's padding moved to the end
  assert not right[0, -1]
  with pytest.raises(ValueError, match=r"prompt_valid_BP row 0 = \[1, .*0\] is not left-padded"):
    sampler.generate(MoETransformer(CFG), params, prompts, right, jax.random.key(0),
                     sampler.SamplerConfig(max_new_tokens=N))


def test_generate_rejects_an_empty_prompt_axis():
  """P = 0 was an IndexError from jax indexing: sampling continues from the last prompt slot.
  Under jit too (the shape is static); a one-slot prompt still passes."""
  params, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N)
  match = rf"prompts_BP has shape \({B}, 0\), expected \[B, P\] with P >= 1"
  with pytest.raises(ValueError, match=match):
    sampler.generate(MoETransformer(CFG), params, prompts[:, :0], valid[:, :0],
                     jax.random.key(0), config)
  with pytest.raises(ValueError, match=match):
    jax.jit(sampler.generate, static_argnums=(0, 5))(
        MoETransformer(CFG), params, prompts[:, :0], valid[:, :0], jax.random.key(0), config)
  sampler.validate_generate_inputs(CFG.vocab_size, prompts[:, -1:], valid[:, -1:], config)


def test_generate_rejects_an_empty_batch():
  """B = 0 was init_cache's "batch must be a positive int, got 0": the message now names
  prompts_BP's batch size, eagerly and under jit (the shape is static)."""
  params, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N)
  match = rf"prompts_BP has shape \(0, {P}\): batch size B = 0, expected \[B, P\] with B >= 1"
  with pytest.raises(ValueError, match=match):
    sampler.generate(MoETransformer(CFG), params, prompts[:0], valid[:0], jax.random.key(0),
                     config)
  with pytest.raises(ValueError, match=match):
    jax.jit(sampler.generate, static_argnums=(0, 5))(
        MoETransformer(CFG), params, prompts[:0], valid[:0], jax.random.key(0), config)


@pytest.mark.parametrize("row, col, token", [(0, 2, CFG.vocab_size), (3, 4, -1)])
def test_validate_generate_inputs_rejects_token_ids_outside_the_vocabulary(row, col, token):
  """A jitted generate cannot read its prompts: an id >= V embedded as NaN (NaN log-probs, pad
  tokens sampled) and a negative one wrapped. The host-side check names the id and its index."""
  _, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N)
  bad = np.asarray(prompts).copy()
  bad[row, col] = token
  with pytest.raises(ValueError, match=rf"token id {token} at index \({row}, {col}\) is outside "
                                       rf"the vocabulary \[0, ModelConfig.vocab_size=24\)"):
    sampler.validate_generate_inputs(CFG.vocab_size, bad, valid, config)
  bad[row, col] = CFG.vocab_size - 1  # the largest id is fine
  sampler.validate_generate_inputs(CFG.vocab_size, bad, valid, config)


@pytest.mark.parametrize("dtype", [np.float32, np.bool_])
def test_generate_rejects_non_integer_prompts_eagerly_and_under_jit(dtype):
  """Float ids were truncated silently under jit (5.5 -> token 5): the dtype is static."""
  params, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N)
  bad = np.asarray(prompts).astype(dtype)
  match = rf"prompts_BP has dtype {np.dtype(dtype).name}, expected an integer dtype \(token ids"
  with pytest.raises(ValueError, match=match):
    sampler.validate_generate_inputs(CFG.vocab_size, bad, valid, config)
  with pytest.raises(ValueError, match=match):
    jax.jit(sampler.generate, static_argnums=(0, 5))(
        MoETransformer(CFG), params, bad, valid, jax.random.key(0), config)


def test_cached_features_equal_the_full_forward_router_inputs_and_logits():
  """feature_h / feature_p at prompt and response slots are the router inputs / logits a full
  float32 forward of the rollout (its routes replayed) computes there."""
  params, prompts, valid = _setup()
  # Real slots only (row 0's prompt slots 0, 1 are padding); no EOS: every response slot is live.
  # Slot P - 1 comes from the prefill, P and P + N - 1 from the first and last decode steps.
  slots = np.array([[2, 4, 5, 10], [0, 6, 9, 3], [4, 8, 1, 5], [10, 2, 7, 3]], np.int32)
  assert slots.max() == P + N - 1 and (slots < P).any() and (slots >= P).any()
  config = sampler.SamplerConfig(max_new_tokens=N, eos_id=-1, feature_dtype="float32")
  roll = jax.jit(sampler.generate, static_argnums=(0, 5))(
      MoETransformer(CFG), params, prompts, valid, jax.random.key(3), config,
      feature_slots_BF=slots)
  assert np.take_along_axis(np.asarray(roll.valid), slots, axis=1).all()
  out = MoETransformer(CFG).apply(
      {"params": params}, roll.tokens, routes=roll.routes, positions=roll.positions,
      valid=roll.valid, return_router_inputs=True, return_router_logits=True)
  idx = slots[:, :, None, None]
  want_h = np.take_along_axis(np.asarray(out.router_inputs, np.float32), idx, axis=1)
  want_p = np.take_along_axis(np.asarray(out.router_logits, np.float32), idx, axis=1)
  assert roll.feature_h.dtype == jnp.float32 and roll.feature_p.dtype == jnp.float32
  assert want_h.shape == (B, 4, CFG.num_layers, CFG.d_model)
  assert want_p.shape == (B, 4, CFG.num_layers, CFG.num_experts)
  assert np.abs(want_h).min(axis=-1).max() > 0 and np.abs(want_p).max() > 0.1
  np.testing.assert_allclose(np.asarray(roll.feature_h), want_h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(roll.feature_p), want_p, rtol=1e-5, atol=1e-5)


def test_decode_loop_updates_the_kv_cache_in_place():
  """No whole-cache copy inside the compiled decode loop (one per layer and step cost more
  than half of a B=64 decode step on XLA:CPU): the caches are written in place."""
  params, prompts, valid = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N, temperature=0.0)
  hlo = jax.jit(sampler.generate, static_argnums=(0, 5)).lower(
      MoETransformer(CFG), params, prompts, valid, jax.random.key(0), config).compile().as_text()
  g, s, z = CFG.num_kv_heads, P + N, CFG.head_dim
  cache_shapes = (f"f32[{B},{g},{z},{s}]", f"f32[{B},{g},{s},{z}]")  # keys, values
  entry = hlo[hlo.index("\nENTRY"):]
  loop_code = hlo.replace(entry, "")
  assert all(shape in loop_code for shape in cache_shapes)  # the loop does hold the caches ...
  copies = [line for line in loop_code.splitlines()
            if any(f"{shape}{{" in line for shape in cache_shapes) and " copy(" in line]
  assert not copies, copies  # ... but never copies them


def test_fsdp_weights_are_gathered_once_per_rollout_not_per_token():
  """With model.fsdp the compiled sampler all-gathers every split weight in the entry
  computation, before the decode loop: no loop body gathers a weight-shaped array."""
  mesh = make_mesh(4, 2)
  model = MoETransformer(CFG.replace(fsdp=True), mesh)
  state, _ = create_train_state(model, make_optimizer(1e-3), jax.random.key(0), mesh)
  prompts, valid = np.ones((8, P), np.int32), np.ones((8, P), bool)
  hlo = jax.jit(sampler.generate, static_argnums=(0, 5)).lower(
      model, state.params, prompts, valid, jax.random.key(0),
      sampler.SamplerConfig(max_new_tokens=N)).compile().as_text()
  # A weight as gathered over 'data': whole, or (experts) one 'expert' shard's worth.
  shapes = [x.shape for x in jax.tree.leaves(state.params)]
  shapes += [(s[0] // 2,) + s[1:] for s in shapes if s[0] == CFG.num_experts]
  weight_shapes = {f"f32[{','.join(map(str, s))}]" for s in shapes}
  gathered = {"entry": [], "elsewhere": []}
  where = None
  for line in hlo.splitlines():
    if not line.startswith(" ") and line.endswith("{"):
      where = "entry" if line.startswith("ENTRY") else "elsewhere"
    found = re.search(r"= (\w+\[[\d,]*\])\S* all-gather\(", line)
    if found:
      gathered[where].append(found.group(1))
  assert sum(s in weight_shapes for s in gathered["entry"]) >= 10  # the weights, once
  assert not [s for s in gathered["elsewhere"] if s in weight_shapes], gathered["elsewhere"]


def test_prefill_computes_only_the_last_positions_logits():
  """The compiled sampler never builds [B, P, V] logits: at a real vocabulary they would be the
  rollout's largest buffer, and the prefill samples from the last position only."""
  cfg = CFG.replace(vocab_size=4096)
  prompts = np.full((B, 64), 3, np.int32)
  valid = np.ones_like(prompts, bool)
  model = MoETransformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), prompts[:, :2])["params"])
  compiled = jax.jit(sampler.generate, static_argnums=(0, 5)).lower(
      model, params, prompts, valid, jax.random.key(0),
      sampler.SamplerConfig(max_new_tokens=2)).compile()
  whole = f"f32[{B},64,4096]"
  assert whole not in compiled.as_text()
  assert f"f32[{B},1,4096]" in compiled.as_text() or f"f32[{B},4096]" in compiled.as_text()
  # The buffer it would have been (4 MiB) is larger than all of the program's temporaries.
  assert compiled.memory_analysis().temp_size_in_bytes < B * 64 * 4096 * 4


def test_a_temperature_whose_inverse_overflows_is_refused():
  """1/T multiplies float32 logits: T = 1e-40 made every log-prob NaN. 0 is greedy."""
  with pytest.raises(ValueError, match=r"SamplerConfig.temperature=1e-40 is below 1e-06.*use 0"):
    sampler.SamplerConfig(max_new_tokens=2, temperature=1e-40)
  for ok in (0.0, 1e-6, 0.7):
    assert sampler.SamplerConfig(max_new_tokens=2, temperature=ok).temperature == ok


def _nucleus_np(probs_V, top_p):
  """The smallest most-probable set whose mass reaches top_p (HF's TopPLogitsWarper rule)."""
  order = np.argsort(-probs_V, kind="stable")
  mass_before = np.cumsum(probs_V[order]) - probs_V[order]
  return set(order[mass_before < top_p].tolist())


def test_generate_draws_each_step_from_its_own_key_tempered_and_nucleus_filtered():
  """Every decode step t draws with key split(rng, N)[t] from softmax(logits / T) cut to its
  top-p nucleus, and records µ = log softmax(logits / T) (unfiltered) at the token: rebuilt in
  numpy from a full float32 forward of the rollout. Catches generate dropping top_p, reusing
  one key for every step, or recording µ untempered (every other generate test runs T in
  {0, 1} with top_p = 1)."""
  temperature, top_p, seed = 0.7, 0.5, 4
  roll = _generate("float32", temperature=temperature, top_p=top_p, eos_id=-1, seed=seed)
  params, _, _ = _setup()
  out = MoETransformer(CFG).apply({"params": params}, roll.tokens, positions=roll.positions,
                                  valid=roll.valid)
  logits = np.asarray(out.logits, np.float64)[:, P - 1:P - 1 + N] / temperature  # [B, N, V]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  toks = np.asarray(roll.tokens)[:, P:]
  np.testing.assert_allclose(np.asarray(roll.logp)[:, P:],
                             np.take_along_axis(logp, toks[..., None], -1)[..., 0], atol=1e-4)
  keys = jax.random.split(jax.random.key(seed), N)
  cut = 0
  for t in range(N):
    noise = np.asarray(jax.random.gumbel(keys[t], (B, CFG.vocab_size), jnp.float32))
    for b in range(B):
      keep = _nucleus_np(np.exp(logp[b, t]), top_p)
      cut += CFG.vocab_size - len(keep)
      assert toks[b, t] in keep, (b, t)
      filtered = np.where(np.isin(np.arange(CFG.vocab_size), list(keep)), logp[b, t], -np.inf)
      assert toks[b, t] == int(np.argmax(noise[b] + filtered)), (b, t)
  assert cut > 0  # the nucleus did cut tokens


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_top_p():
  """Probabilities [1/2, 1/4, 1/8, 1/8] are exact in float32: top_p = 1/2 is reached by the
  first token alone (HF's rule: a token is kept iff the mass before it is < top_p), 3/4 by the
  first two, and just above 3/4 needs the third, which keeps the fourth too (a tie with the
  cutoff logit is kept)."""
  logits = jnp.tile(jnp.array([2.0, 1.0, 0.0, 0.0]) * np.log(2.0), (512, 1))
  for top_p, want in [(0.5, {0}), (0.75, {0, 1}), (0.76, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})]:
    drawn = set()
    for seed in range(2):
      toks, logp = sampler.sample_token(jax.random.key(seed), logits, 1.0, top_p)
      drawn |= set(np.asarray(toks).tolist())
      np.testing.assert_allclose(np.exp(np.asarray(logp)),
                                 np.array([0.5, 0.25, 0.125, 0.125])[np.asarray(toks)])
    assert drawn == want, (top_p, drawn)


def test_prompt_positions_count_real_tokens_and_give_padding_zero():
  """0, 1, 2, ... over a left-padded row's real tokens; padding slots get 0, not -1 (a
  negative RoPE position), and an all-padding row is all 0."""
  valid = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(
      np.asarray(sampler.prompt_positions(valid)),
      [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])


def test_positions_stop_advancing_after_eos():
  """After a row's EOS at position q every padding slot repeats q + 1 (Rollout.positions:
  padding repeats a neighbour's), so a finished row's positions never run past its length."""
  free = np.asarray(_generate("float32", temperature=0.0, eos_id=-1).tokens)[:, P:]
  eos = int(free[0, 1])  # row 0 stops at response step 1 or before
  roll = _generate("float32", temperature=0.0, eos_id=eos)
  pos, valid = np.asarray(roll.positions), np.asarray(roll.valid)
  stopped = 0
  for b in range(B):
    hits = np.flatnonzero(np.asarray(roll.tokens)[b, P:] == eos)
    if not hits.size or hits[0] >= N - 2:
      continue
    end = P + hits[0]  # the EOS slot
    assert not valid[b, end + 1:].any()
    np.testing.assert_array_equal(pos[b, end + 1:], pos[b, end] + 1)
    stopped += 1
  assert stopped >= 1
  np.testing.assert_array_equal(pos[0, P:P + 2], [3, 4])  # row 0 has 3 real prompt tokens


def test_eos_id_zero_is_a_stop_id():
  """Id 0 is a real EOS (GPT-NeoX / Pythia use it): only -1 means none, in a tuple too."""
  assert sampler.SamplerConfig(eos_id=0).stop_ids == (0,)
  assert sampler.SamplerConfig(eos_id=(0, 7)).stop_ids == (0, 7)
  assert sampler.SamplerConfig(eos_id=-1).stop_ids == ()


def test_validate_generate_inputs_accepts_all_padding_rows():
  """A row of padding only (filling a batch) is not right padding: it passes, next to a
  left-padded one, while a right-padded row is still refused."""
  _, prompts, _ = _setup()
  config = sampler.SamplerConfig(max_new_tokens=N)
  valid = np.ones((B, P), bool)
  valid[1] = False
  valid[2, :3] = False
  sampler.validate_generate_inputs(CFG.vocab_size, prompts, valid, config)
  valid[3, -1] = False
  with pytest.raises(ValueError, match=r"prompt_valid_BP row 3 = .* is not left-padded"):
    sampler.validate_generate_inputs(CFG.vocab_size, prompts, valid, config)
