"""Hugging Face checkpoints against the oracle, transformers' Qwen3MoeForCausalLM.

Random tiny transformers models (every weight random, norms included, so a
swapped or mis-transposed tensor shows) are saved with `save_pretrained`,
loaded with ours and compared in float32: logits within 1e-4, top-k expert
sets equal for every token and MoE layer; then written by ours, reloaded by
transformers, and compared again.
"""

import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers
from jax.sharding import PartitionSpec
from safetensors import safe_open

from pr2_jax.config import ModelConfig
from pr2_jax.hf.checkpoint import abstract_params, load_hf_checkpoint, save_hf_checkpoint
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import logical_sharding, make_mesh

# jax and torch share the 2 CPU cores: torch's thread pool spinning beside XLA's
# makes both ~100x slower here.
torch.set_num_threads(1)

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3, head_dim=8,
            moe_intermediate_size=16, max_position_embeddings=64, initializer_range=0.1,
            rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
CASES = {
    "e8_k2_norm_gqa2": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                            num_attention_heads=4, num_key_value_heads=2),
    "e4_k1_nonorm_mha_tied": dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=False,
                                  num_attention_heads=4, num_key_value_heads=4,
                                  tie_word_embeddings=True),
    "e6_k3_norm_mqa_dense0": dict(num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                                  num_attention_heads=8, num_key_value_heads=1,
                                  mlp_only_layers=[0]),
    "e16_k4_nonorm_gqa3_step2_tied": dict(num_experts=16, num_experts_per_tok=4,
                                          norm_topk_prob=False,
                                          num_attention_heads=6, num_key_value_heads=2,
                                          decoder_sparse_step=2, num_hidden_layers=4,
                                          tie_word_embeddings=True),
}


def hf_model(seed: int = 0, **overrides) -> transformers.Qwen3MoeForCausalLM:
  torch.manual_seed(seed)
  model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**BASE, **overrides}))
  with torch.no_grad():  # transformers initialises norms to ones: randomise them too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  return model.eval()


def hf_forward(model, tokens, mask=None, positions=None):
  with torch.no_grad():
    out = model(torch.tensor(tokens), attention_mask=None if mask is None else torch.tensor(mask),
                position_ids=None if positions is None else torch.tensor(positions),
                output_router_logits=True)
  return out.logits.numpy(), [r.numpy() for r in out.router_logits]


def our_forward(cfg, params, tokens, valid=None, positions=None):
  out = jax.jit(lambda p, t, v, q: MoETransformer(cfg).apply(
      {"params": p}, t, valid=v, positions=q, return_router_logits=True))(
          params, tokens, valid, positions)
  return np.asarray(out.logits), np.asarray(out.routes), np.asarray(out.router_logits)


def hf_topk_sets(router_logits, k, shape):
  """Sorted top-k expert ids per token and MoE layer, [B, T, L, K], as transformers routes."""
  ids = [torch.topk(torch.softmax(torch.tensor(r), -1), k, -1).indices.numpy()
         for r in router_logits]
  return np.sort(np.stack(ids, axis=1).reshape(shape + (len(ids), k)), axis=-1)


def tokens_for(vocab, batch=3, length=16, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (batch, length)).astype(np.int32)


def assert_parity(hf, cfg, params, tokens, mask=None, positions=None):
  """Logits within 1e-4 and identical top-k expert sets on every real token."""
  ref_logits, ref_router = hf_forward(hf, tokens, mask, positions)
  logits, routes, router_logits = our_forward(cfg, params, tokens, mask, positions)
  real = np.ones(tokens.shape, bool) if mask is None else mask.astype(bool)
  assert np.abs(logits - ref_logits)[real].max() < 1e-4
  want = hf_topk_sets(ref_router, cfg.top_k, tokens.shape)
  assert np.array_equal(np.sort(routes, -1)[real], want[real])
  ours_router = router_logits.reshape(-1, cfg.num_moe_layers, cfg.num_experts)
  for layer, ref in enumerate(ref_router):
    assert np.abs(ours_router[:, layer] - ref)[real.reshape(-1)].max() < 1e-5
  return ref_logits


def assert_same_params(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers_and_round_trip(case, tmp_path):
  """Load a save_pretrained checkpoint, match transformers, write it back, transformers matches."""
  hf = hf_model(**CASES[case])
  hf.save_pretrained(tmp_path / "hf")
  cfg, params = load_hf_checkpoint(str(tmp_path / "hf"))
  hf_cfg = hf.config
  assert (cfg.num_experts, cfg.top_k, cfg.norm_topk_prob, cfg.num_kv_heads, cfg.tie_embeddings) == (
      hf_cfg.num_experts, hf_cfg.num_experts_per_tok, hf_cfg.norm_topk_prob,
      hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings)
  assert cfg.num_moe_layers == len(hf_forward(hf, tokens_for(96, 1, 2))[1])
  tokens = tokens_for(cfg.vocab_size)
  ref_logits = assert_parity(hf, cfg, params, tokens)

  save_hf_checkpoint(cfg, params, str(tmp_path / "ours"))
  reloaded = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path / "ours")).eval()
  np.testing.assert_array_equal(hf_forward(reloaded, tokens)[0], ref_logits)
  assert_same_params(load_hf_checkpoint(str(tmp_path / "ours"))[1], params)


@pytest.mark.parametrize("left", [False, True])
def test_parity_with_padding_mask(left, tmp_path):
  """Right or left padding: real tokens match transformers given the same mask and positions."""
  hf = hf_model(1, **CASES["e8_k2_norm_gqa2"])
  hf.save_pretrained(tmp_path)
  cfg, params = load_hf_checkpoint(str(tmp_path))
  tokens = tokens_for(cfg.vocab_size, seed=1)
  mask = np.ones(tokens.shape, np.int32)
  mask[1, 11:], mask[2, 4:] = 0, 0
  if left:
    mask = mask[:, ::-1].copy()
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
  assert_parity(hf, cfg, params, tokens, mask, positions)


def hub_and_fused_checkpoints(hf, path) -> tuple[str, str]:
  """The same model saved in the hub layout and in transformers' in-memory fused layout."""
  hf.save_pretrained(path / "hub")
  state = {k: v.contiguous() for k, v in hf.state_dict().items()}
  assert "model.layers.1.mlp.experts.gate_up_proj" in state
  os.makedirs(path / "fused")
  safetensors.torch.save_file(state, str(path / "fused" / "model.safetensors"))
  (path / "fused" / "config.json").write_text((path / "hub" / "config.json").read_text())
  return str(path / "hub"), str(path / "fused")


def test_fused_expert_layout_is_read(tmp_path):
  """transformers' in-memory fused experts ([E, 2F, D] gate_up) load to the same params."""
  hub, fused = hub_and_fused_checkpoints(hf_model(2, **CASES["e6_k3_norm_mqa_dense0"]), tmp_path)
  assert_same_params(load_hf_checkpoint(fused)[1], load_hf_checkpoint(hub)[1])


@pytest.mark.parametrize("fsdp", [False, True])
def test_fused_expert_layout_loads_onto_an_expert_mesh(fsdp, tmp_path):
  """Fused experts read shard by shard on a (data 2, expert 4) mesh, with or without fsdp:
  each expert shard holds its own 2 of the 8 experts (values equal the unsharded hub load),
  and d_model is also split over 'data' under fsdp (hand-worked specs and shard shapes)."""
  hub, fused = hub_and_fused_checkpoints(hf_model(4, **CASES["e8_k2_norm_gqa2"]), tmp_path)
  mesh = make_mesh(2, 4)
  cfg, sharded = load_hf_checkpoint(fused, mesh=mesh, fsdp=fsdp)
  assert cfg.fsdp == fsdp and (cfg.num_experts, cfg.d_model, cfg.expert_d_ff) == (8, 32, 16)
  assert_same_params(sharded, load_hf_checkpoint(hub)[1])
  assert_same_params(sharded, load_hf_checkpoint(hub, mesh=mesh, fsdp=fsdp)[1])
  d = "data" if fsdp else None
  d_shard = 16 if fsdp else 32
  want = {  # name: (spec, per-device shard shape); experts [E, D, F] / [E, F, D], E=8, D=32, F=16
      "gate_proj": (PartitionSpec("expert", d, None), (2, d_shard, 16)),
      "up_proj": (PartitionSpec("expert", d, None), (2, d_shard, 16)),
      "down_proj": (PartitionSpec("expert", None, d), (2, 16, d_shard)),
  }
  for layer in range(cfg.num_layers):
    for name, (spec, shard_shape) in want.items():
      x = sharded[f"layers_{layer}"]["mlp"][name]
      assert x.sharding.mesh == mesh and x.sharding.spec == spec, (layer, name, x.sharding)
      assert {s.data.shape for s in x.addressable_shards} == {shard_shape}
  embed = sharded["embed_tokens"]
  assert embed.sharding.spec == PartitionSpec(None, d)
  assert {s.data.shape for s in embed.addressable_shards} == {(96, d_shard)}


def random_params(cfg, seed=0):
  """Random float32 host arrays in the model's tree (no init compile, no torch)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: 0.1 * rng.standard_normal(x.shape, np.float32),
                      nn.unbox(abstract_params(cfg)))


def random_checkpoint(path, cfg=None, **save_kwargs):
  """A checkpoint written by us from random parameters."""
  cfg = cfg or ModelConfig(num_layers=3, dense_layers=(1,), dense_d_ff=24)
  params = random_params(cfg)
  save_hf_checkpoint(cfg, params, str(path), **save_kwargs)
  return cfg, params


def test_sharded_index_round_trip_and_transformers_loads_it(tmp_path):
  """Past max_shard_bytes: several files plus an index; both we and transformers read it."""
  cfg, params = random_checkpoint(tmp_path, max_shard_bytes=300_000)
  names = sorted(os.listdir(tmp_path))
  shards = [n for n in names if n.startswith("model-")]
  assert (len(shards) > 2 and "model.safetensors.index.json" in names
          and "model.safetensors" not in names)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  loaded_cfg, loaded = load_hf_checkpoint(str(tmp_path))
  assert loaded_cfg == cfg
  assert_same_params(loaded, params)
  hf = transformers.Qwen3MoeForCausalLM.from_pretrained(str(tmp_path)).eval()
  tokens = tokens_for(cfg.vocab_size, 2, 8)
  np.testing.assert_allclose(hf_forward(hf, tokens)[0], our_forward(cfg, params, tokens)[0],
                             atol=1e-4)
  save_hf_checkpoint(cfg, params, str(tmp_path))  # one file now: old shards must go
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_bfloat16_save_and_load(tmp_path):
  """bfloat16 files hold BF16 tensors; loading widens exactly or keeps bfloat16 on request."""
  cfg, params = random_checkpoint(tmp_path, dtype=jnp.bfloat16)
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  _, wide = load_hf_checkpoint(str(tmp_path))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(wide))
  assert_same_params(wide, jax.tree.map(lambda x: x.astype(np.float32), rounded))
  _, narrow = load_hf_checkpoint(str(tmp_path), dtype=jnp.bfloat16)
  assert_same_params(narrow, rounded)


def test_mesh_places_each_expert_shard_on_its_devices(tmp_path):
  """With a (data 2, expert 4) mesh experts are split 4 ways, the rest replicated, values equal."""
  cfg, params = random_checkpoint(tmp_path)
  mesh = make_mesh(2, 4)
  _, sharded = load_hf_checkpoint(str(tmp_path), mesh=mesh)
  assert_same_params(sharded, params)
  experts = sharded["layers_0"]["mlp"]["gate_proj"]
  assert experts.sharding.spec[0] == "expert"
  assert {s.data.shape for s in experts.addressable_shards} == {(cfg.num_experts // 4, 64, 64)}
  embed = sharded["embed_tokens"]
  assert embed.sharding.is_fully_replicated and embed.sharding.mesh == mesh


def test_sharded_load_and_forward_match_transformers(tmp_path):
  """Loaded straight into a (data 2, expert 4) mesh, the expert-parallel forward matches too."""
  hf = hf_model(3, **CASES["e8_k2_norm_gqa2"])
  hf.save_pretrained(tmp_path)
  mesh = make_mesh(2, 4)
  cfg, params = load_hf_checkpoint(str(tmp_path), mesh=mesh)
  tokens = tokens_for(cfg.vocab_size, batch=8, length=8, seed=3)
  tokens_sharding = logical_sharding(mesh, ("batch", "length"))
  forward = jax.jit(lambda p, t: MoETransformer(cfg, mesh).apply({"params": p}, t),
                    in_shardings=(jax.tree.map(lambda x: x.sharding, params), tokens_sharding))
  out = forward(params, jax.device_put(tokens, tokens_sharding))
  ref_logits, ref_router = hf_forward(hf, tokens)
  assert np.abs(np.asarray(out.logits) - ref_logits).max() < 1e-4
  assert np.array_equal(np.sort(np.asarray(out.routes), -1),
                        hf_topk_sets(ref_router, cfg.top_k, tokens.shape))


def test_expert_axis_must_divide_experts(tmp_path):
  random_checkpoint(tmp_path, ModelConfig(num_experts=6, top_k=2))
  with pytest.raises(ValueError, match="num_experts=6"):
    load_hf_checkpoint(str(tmp_path), mesh=make_mesh(2, 4))


def rewrite_tensors(path, edit):
  """Applies `edit(dict)` to the tensors of a single-file checkpoint."""
  file = str(path / "model.safetensors")
  tensors = safetensors.numpy.load_file(file)
  edit(tensors)
  safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})


def edit_config(path, **changes):
  hf = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**hf, **changes}))


@pytest.mark.parametrize("breakage, message", [
    (lambda p: rewrite_tensors(p, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight")),
     r"missing 1 tensors.*model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"),
    (lambda p: rewrite_tensors(p, lambda t: t.update(
        {"model.layers.0.mlp.experts.8.up_proj.weight": np.zeros((64, 64), np.float32)})),
     r"unexpected tensors: model\.layers\.0\.mlp\.experts\.8\.up_proj\.weight"),
    (lambda p: rewrite_tensors(p, lambda t: t.update(
        {"model.norm.weight": np.zeros((63,), np.float32)})),
     r"model\.norm\.weight has shape \[63\], expected \[64\]"),
    (lambda p: edit_config(p, moe_intermediate_size=32), r"shape mismatch.*experts\.0\.\w+_proj"),
    (lambda p: edit_config(p, model_type="qwen2_moe"), "model_type='qwen2_moe'"),
    (lambda p: edit_config(p, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (lambda p: edit_config(p, attention_bias=True), "attention_bias"),
    (lambda p: edit_config(p, use_sliding_window=True, sliding_window=8), "use_sliding_window"),
    (lambda p: os.remove(p / "model.safetensors"), "only safetensors"),
    (lambda p: os.remove(p / "config.json"), "no config.json"),
    (lambda p: (p / "config.json").write_text("[1, 2]"), "holds a JSON list, not an object"),
    (lambda p: (p / "config.json").write_text('{"vocab_size": 64,'),
     "config.json is not valid JSON"),
    # A truncated download: safetensors alone said "incomplete metadata", naming no file.
    (lambda p: os.truncate(p / "model.safetensors", 1000),
     r"cannot read .*model\.safetensors: SafetensorError"),
    (lambda p: rewrite_tensors(p, lambda t: t["model.layers.2.mlp.experts.3.down_proj.weight"]
                               .__setitem__((0, 0), np.nan)),
     r"model\.layers\.2\.mlp\.experts\.0\.down_proj\.weight.* hold non-finite values"),
    (lambda p: rewrite_tensors(p, lambda t: t["model.norm.weight"].__setitem__(0, np.inf)),
     r"model\.norm\.weight hold non-finite values"),
])
def test_bad_checkpoints_raise_value_error_naming_the_problem(breakage, message, tmp_path):
  random_checkpoint(tmp_path)
  breakage(tmp_path)
  with pytest.raises(ValueError, match=message):
    load_hf_checkpoint(str(tmp_path))


def test_load_rejects_a_non_float_dtype(tmp_path):
  random_checkpoint(tmp_path)  # a cast to int8 would silently give all-zero weights
  with pytest.raises(ValueError, match="dtype=int8 is not supported; use one of"):
    load_hf_checkpoint(str(tmp_path), dtype=jnp.int8)


def test_tied_checkpoint_may_store_the_duplicate_head(tmp_path):
  """Some tied checkpoints still hold lm_head.weight (= the embedding): it is accepted, unused."""
  cfg, params = random_checkpoint(tmp_path, ModelConfig(tie_embeddings=True))
  rewrite_tensors(tmp_path, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"]}))
  assert_same_params(load_hf_checkpoint(str(tmp_path))[1], params)
  random_checkpoint(tmp_path)  # untied: lm_head.weight is required
  rewrite_tensors(tmp_path, lambda t: t.pop("lm_head.weight"))
  with pytest.raises(ValueError, match="missing 1 tensors.*lm_head.weight"):
    load_hf_checkpoint(str(tmp_path))


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
  random_checkpoint(tmp_path, max_shard_bytes=300_000)
  os.remove(tmp_path / "model-00002-of-{:05d}.safetensors".format(
      len([n for n in os.listdir(tmp_path) if n.startswith("model-")])))
  with pytest.raises(ValueError, match="does not exist"):
    load_hf_checkpoint(str(tmp_path))
  # Were a JSONDecodeError naming no file and an AttributeError on .get.
  index = tmp_path / "model.safetensors.index.json"
  for text, message in (('{"weight_map": {', r"index\.json is not valid JSON"),
                        ("[]", r"index\.json has no 'weight_map' object")):
    index.write_text(text)
    with pytest.raises(ValueError, match=message):
      load_hf_checkpoint(str(tmp_path))


def test_save_rejects_params_that_do_not_fit_the_config(tmp_path):
  cfg, params = random_checkpoint(tmp_path / "ok")
  missing = {k: v for k, v in params.items() if k != "norm"}
  with pytest.raises(ValueError, match="missing \\[norm/scale\\]"):
    save_hf_checkpoint(cfg, missing, str(tmp_path / "bad"))
  wrong = dict(params, embed_tokens=np.zeros((65, 64), np.float32))
  with pytest.raises(ValueError, match=r"param embed_tokens has shape \[65, 64\], "
                                       r"expected \[64, 64\]"):
    save_hf_checkpoint(cfg, wrong, str(tmp_path / "bad"))


def test_a_missing_directory_or_a_file_is_named_as_such(tmp_path):
  """Both read as a checkpoint without config.json."""
  with pytest.raises(ValueError, match=r"checkpoint directory '.*nope' does not exist"):
    load_hf_checkpoint(str(tmp_path / "nope"))
  (tmp_path / "file").write_text("")
  with pytest.raises(ValueError, match=r"checkpoint path '.*file' is a file, expected a dir"):
    load_hf_checkpoint(str(tmp_path / "file"))



def test_save_to_a_file_is_named_as_such_and_writes_nothing(tmp_path):
  """os.makedirs raised a bare FileExistsError (NotADirectoryError under a file). A directory
  that exists, or does not yet, is written as before: the same files, loading the same params."""
  cfg, params = random_checkpoint(tmp_path / "ok")
  (tmp_path / "file").write_text("not a checkpoint")
  with pytest.raises(ValueError, match=r"output path '.*file' is a file, expected a directory"):
    save_hf_checkpoint(cfg, params, str(tmp_path / "file"))
  with pytest.raises(ValueError, match=r"output path '.*file/a/b' is under '.*file', which is a "
                                       r"file, expected a directory"):
    save_hf_checkpoint(cfg, params, str(tmp_path / "file" / "a" / "b"))
  assert (tmp_path / "file").read_text() == "not a checkpoint"
  save_hf_checkpoint(cfg, params, str(tmp_path / "new" / "dir"))
  new = tmp_path / "new" / "dir"
  assert sorted(os.listdir(new)) == sorted(os.listdir(tmp_path / "ok"))
  for name in os.listdir(new):
    assert (new / name).read_bytes() == (tmp_path / "ok" / name).read_bytes()

def test_save_refuses_non_finite_params_and_keeps_the_old_checkpoint(tmp_path):
  """It wrote them, and load_hf_checkpoint then refused the checkpoint it had written."""
  cfg, params = random_checkpoint(tmp_path / "ok")
  before = {f: (tmp_path / "ok" / f).read_bytes() for f in os.listdir(tmp_path / "ok")}
  bad = dict(params, norm={"scale": np.asarray(params["norm"]["scale"]).copy()})
  bad["norm"]["scale"][3] = np.nan
  with pytest.raises(ValueError, match=r"params norm.scale hold non-finite values: not written"):
    save_hf_checkpoint(cfg, bad, str(tmp_path / "ok"))
  assert {f: (tmp_path / "ok" / f).read_bytes() for f in os.listdir(tmp_path / "ok")} == before


class _OtherProcesses(np.ndarray):
  """A host array that says what a jax.Array spanning other processes' devices says."""
  is_fully_addressable = False


def test_save_refuses_params_spanning_other_processes(tmp_path):
  """device_get fails on such an array deep inside jax, after the old checkpoint was removed,
  and every process would write the same files: refused first, naming the parameter."""
  cfg, params = random_checkpoint(tmp_path / "ok")
  before = {f: (tmp_path / "ok" / f).read_bytes() for f in os.listdir(tmp_path / "ok")}
  remote = dict(params, norm={"scale": np.asarray(params["norm"]["scale"]).view(_OtherProcesses)})
  with pytest.raises(ValueError, match=r"params norm.scale span devices of other processes: "
                                       r"save_hf_checkpoint is single process"):
    save_hf_checkpoint(cfg, remote, str(tmp_path / "ok"))
  assert {f: (tmp_path / "ok" / f).read_bytes() for f in os.listdir(tmp_path / "ok")} == before
  assert jax.device_put(params["norm"]["scale"]).is_fully_addressable  # what the check reads


MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    from pr2_jax.hf.checkpoint import load_hf_checkpoint
    from pr2_jax.parallel.mesh import logical_sharding, make_mesh

    def status_mb(field):  # VmRSS now, VmHWM peak since the last reset
      for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
          return int(line.split()[1]) / 1024

    path, mesh_spec = sys.argv[1], sys.argv[2]
    mesh = None if mesh_spec == "none" else make_mesh(*map(int, mesh_spec.split("x")))
    jax.numpy.zeros(8).block_until_ready()  # backend start-up is not the loader's cost
    before = status_mb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # resets the peak (VmHWM) to the current RSS
    _, params = load_hf_checkpoint(path, mesh=mesh)
    jax.block_until_ready(params)
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    print(json.dumps({"before_mb": before, "peak_mb": status_mb("VmHWM"),
                      "after_mb": status_mb("VmRSS"), "device_mb": held / 2**20}))
""")


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec", ["none", "1x8"])
def test_peak_host_memory_stays_under_1_5x_checkpoint(mesh_spec, tmp_path):
  """A ~250 MB float32 checkpoint: peak RSS growth < 1.5x the bytes the devices end up holding.

  On fake CPU devices every replica is host memory, so with a mesh the bound
  is on the device bytes (the checkpoint plus its replicated copies).
  """
  cfg = ModelConfig(vocab_size=8192, num_layers=4, d_model=512, num_heads=8, num_kv_heads=2,
                    head_dim=64, expert_d_ff=256, num_experts=32, top_k=4)
  save_hf_checkpoint(cfg, random_params(cfg), str(tmp_path))
  size_mb = os.path.getsize(tmp_path / "model.safetensors") / 2**20
  out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), mesh_spec],
                       capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  m = json.loads(out.stdout.strip().splitlines()[-1])
  growth = m["peak_mb"] - m["before_mb"]
  print(f"\nmesh={mesh_spec}: checkpoint {size_mb:.0f} MB, devices hold {m['device_mb']:.0f} MB, "
        f"RSS before {m['before_mb']:.0f} MB, peak {m['peak_mb']:.0f} MB, "
        f"after {m['after_mb']:.0f} MB, growth {growth:.0f} MB "
        f"= {growth / size_mb:.2f}x checkpoint")
  assert m["device_mb"] >= size_mb * 0.99
  assert growth < 1.5 * m["device_mb"]


def test_plan_shards_fills_a_file_up_to_exactly_max_shard_bytes():
  """Greedy in write order, float32: a 40 B + b 20 B fill a 60 B file exactly (a file may reach
  max_shard_bytes, as transformers' shards do), c0 and c1 (20 B each) start the next. Under a
  30 B cap a tensor larger than the cap gets a file of its own, and no file is empty."""
  from pr2_jax.hf import checkpoint, layout
  sources = {("a",): layout.Source("copy", ("a",), (10,)),
             ("b",): layout.Source("linear", ("b",), (5, 1)),
             ("c",): layout.Source("experts", ("c0", "c1"), (5,))}
  assert checkpoint.plan_shards(sources, 4, 60) == [["a", "b"], ["c0", "c1"]]
  assert checkpoint.plan_shards(sources, 4, 30) == [["a"], ["b"], ["c0"], ["c1"]]
  assert checkpoint.plan_shards(sources, 2, 10**6) == [["a", "b", "c0", "c1"]]


def test_sharded_index_names_files_from_one_and_totals_the_bytes(tmp_path):
  """transformers' naming: model-00001-of-0000n ... model-0000n-of-0000n, and the index's
  metadata.total_size is the bytes of every stored tensor (4 per float32 parameter entry)."""
  cfg, params = random_checkpoint(tmp_path, max_shard_bytes=300_000)
  shards = sorted(n for n in os.listdir(tmp_path) if n.startswith("model-"))
  n = len(shards)
  assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert index["metadata"]["total_size"] == 4 * sum(x.size for x in jax.tree.leaves(params))


def test_save_stores_bfloat16_params_as_bfloat16_by_default(tmp_path):
  """dtype=None keeps the parameters' own dtype (the embedding's): bfloat16 params are written
  as BF16 tensors with torch_dtype bfloat16, not widened to float32."""
  cfg = ModelConfig(num_layers=2)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), random_params(cfg))
  save_hf_checkpoint(cfg, params, str(tmp_path))
  assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
  with safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
    assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
