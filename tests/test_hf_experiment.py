"""The RL experiment from a Hugging Face checkpoint (pr2_jax.hf.experiment,
ExperimentConfig.hf_checkpoint).

The checkpoint is `experiments/make_tiny_hf.py`'s: a random transformers
Qwen3-MoE saved with `save_pretrained` and a character tokenizer written by
the `tokenizers` library. The oracle for the initial policy is transformers.
"""

import json
import math
import os
import re
import shutil
import time

import jax
import numpy as np
import pytest
import torch
import transformers
from jax.experimental.compilation_cache import compilation_cache

from configs import hf_pr2
from experiments import make_tiny_hf
from pr2_jax.hf import experiment as hf_experiment
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import loop
from pr2_jax.rl.char_tokenizer import CHARS
from pr2_jax.rl.config import ExperimentConfig
from pr2_jax.rl.tasks import make_task

torch.set_num_threads(1)  # jax and torch share 2 cores: a spinning torch pool slows both


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  return make_tiny_hf.write_checkpoint(str(tmp_path_factory.mktemp("tiny_hf")), seed=0,
                                       initializer_range=0.1)


def _dict(path, **rl):
  c = hf_pr2.get_config()
  c.hf_checkpoint = path
  c.checkpoint_every = 1
  c.rl.update(dict(num_steps=2, prompts_per_step=4, group_size=2, off_policy_k=2, micro_steps=1,
                   eval_every=2, eval_size=8, learning_rate=1e-3), **rl)
  return c.to_dict()


def _mesh(data=1, expert=1):
  return make_mesh(data, expert, devices=jax.devices()[:data * expert])


def test_config_comes_from_the_checkpoint(ckpt):
  d = _dict(ckpt)
  d["model"]["dtype"] = "bfloat16"
  config = ExperimentConfig.from_dict(d)
  m = config.model
  assert (m.vocab_size, m.num_layers, m.d_model, m.num_experts, m.top_k) == (32, 2, 64, 8, 2)
  assert m.dtype == "bfloat16" and config.sft.num_steps == 0 and config.hf_checkpoint == ckpt
  del d["sft"]  # SFT defaults to off with a checkpoint
  assert ExperimentConfig.from_dict(d).sft.num_steps == 0
  d["model"]["num_experts"] = 8  # repeating the checkpoint's value is allowed
  assert ExperimentConfig.from_dict(d).model.num_experts == 8


def test_task_tokenizer_has_the_char_tokenizer_interface(ckpt):
  tok = hf_experiment.task_tokenizer(ckpt, make_task("countdown"), vocab_size=32)
  end, im_end = tok.hf.token_to_id("<|endoftext|>"), tok.hf.token_to_id("<|im_end|>")
  assert (tok.eos_id, tok.pad_id, tok.bos_id, tok.vocab_size) == (im_end, end, None, 24)
  three, plus = tok.encode("3+")
  assert tok.encode("3+", bos=True, eos=True) == [three, plus, im_end]  # no BOS to add
  # Decoding stops at either stop id (Qwen3 generation stops on both), as a response would.
  assert tok.decode_batch([[three, plus, end, three], [three, im_end, plus, plus]]) == ["3+", "3"]
  assert sorted(tok.stop_ids) == sorted([end, im_end])  # and so does generation
  ids_BT, valid_BT = tok.encode_batch(["3+", "3"], 4)
  np.testing.assert_array_equal(ids_BT, [[end, end, three, plus], [end, end, end, three]])
  np.testing.assert_array_equal(valid_BT, [[0, 0, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match="token id 30 is outside the vocabulary"):
    tok.decode([three, 30])
  with pytest.raises(ValueError, match="prompt '3\\+3\\+3' is 5 tokens long, more than length=4"):
    tok.encode_batch(["3+3+3"], 4)


def test_initial_policy_is_the_checkpoint(ckpt):
  """Our model at step 0 computes transformers' logits on a task prompt (float32)."""
  engine = loop.Engine(ExperimentConfig.from_dict(_dict(ckpt)), _mesh(2, 2))  # experts sharded
  # The rollout stops on either of Qwen3's stop ids: it stopped on one only, and the loss
  # trained on the tokens after the other, which the reward's decode had cut.
  stops = [engine.tok.hf.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>")]
  assert sorted(engine.programs.sampling.stop_ids) == sorted(stops)
  problems = engine.eval_problems[:4]
  ids = [engine.tok.encode(p.prompt) for p in problems]
  prompts_BP, valid_BP = engine.tok.encode_batch([p.prompt for p in problems], engine.prompt_slots)
  assert [engine.tok.decode(r[v]) for r, v in zip(prompts_BP, valid_BP)] == [
      p.prompt for p in problems]
  assert (prompts_BP[~valid_BP] == engine.tok.pad_id).all() and engine.tok.bos_id is None
  hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(ckpt)
  assert ids == [hf_tok(p.prompt)["input_ids"] for p in problems]
  # 4 prompts of one length (no padding: plain causal attention), 4 = the mesh's token shards.
  same = [engine.tok.encode(p.prompt) for p in engine.eval_problems if len(p.prompt) == 9][:4]
  tokens = np.array(same, np.int32)
  assert tokens.shape == (4, 9)
  forward = jax.jit(lambda p, t: engine.model.apply({"params": p}, t).logits)  # eager: 6x slower
  ours = forward(engine.state.params, tokens)
  hf = transformers.Qwen3MoeForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert np.abs(theirs).max() > 0.1  # a real comparison, not of two near-zero tensors
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4, rtol=1e-4)
  m = engine.config.model
  assert engine.state.predictor.shape == (m.num_moe_layers, m.d_model, m.num_experts)
  assert not np.asarray(engine.state.predictor).any()  # W_p = 0: PR2 starts as R3
  assert int(engine.state.step) == 0  # a fresh state, as a random init's


def test_bos_is_the_id_the_post_processor_prepends():
  """A tokenizer whose post-processor puts <|im_start|> first has that BOS (the checkpoint's
  own has none, so taking the last id of the encoded '0', itself, passed every test)."""
  from tokenizers import processors
  from pr2_jax.hf.tokenizer import HFTokenizer
  raw = make_tiny_hf.char_tokenizer()
  bos, eos = raw.token_to_id("<|im_start|>"), raw.token_to_id("<|im_end|>")
  raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                     special_tokens=[("<|im_start|>", bos)])
  tok = hf_experiment.TaskTokenizer(HFTokenizer(raw, eos_ids=[eos]))
  three, plus = tok.encode("3+")
  assert tok.bos_id == bos and tok.encode("3+", bos=True, eos=True) == [bos, three, plus, eos]
  assert tok.decode([bos, three, plus, eos, three]) == "3+"


def test_encode_batch_puts_bos_first_and_fills_every_slot_of_a_full_prompt():
  """Like CharTokenizer, encode_batch adds BOS unless told not to, and a prompt of exactly
  `length` ids (BOS included: rl.data sizes prompt_slots as 1 + the longest prompt) fits with
  no padding; one more id is an error."""
  from tokenizers import processors
  from pr2_jax.hf.tokenizer import HFTokenizer
  raw = make_tiny_hf.char_tokenizer()
  bos, eos = raw.token_to_id("<|im_start|>"), raw.token_to_id("<|im_end|>")
  end = raw.token_to_id("<|endoftext|>")
  raw.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                     special_tokens=[("<|im_start|>", bos)])
  tok = hf_experiment.TaskTokenizer(HFTokenizer(raw, eos_ids=[eos], pad_id=end))
  three, plus = tok.encode("3+")
  ids_BT, valid_BT = tok.encode_batch(["3+", "3"], 3)
  np.testing.assert_array_equal(ids_BT, [[bos, three, plus], [end, bos, three]])
  np.testing.assert_array_equal(valid_BT, [[1, 1, 1], [0, 1, 1]])
  ids_BT, valid_BT = tok.encode_batch(["3+"], 2, bos=False)
  np.testing.assert_array_equal(ids_BT, [[three, plus]])
  assert valid_BT.all()
  with pytest.raises(ValueError, match="prompt '3\\+' is 3 tokens long, more than length=2"):
    tok.encode_batch(["3+"], 2)


@pytest.fixture
def compile_cache(tmp_path):
  """A persistent compilation cache: the resumed run reuses the first run's executables.

  reset_cache before and after: JAX decides once per process whether it uses a cache.
  """
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {n: getattr(jax.config, n) for n in names}
  compilation_cache.reset_cache()
  for name, value in zip(names, (str(tmp_path / "xla_cache"), 0.0, 0)):
    jax.config.update(name, value)
  yield
  for name, value in old.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.mark.slow
def test_pr2_run_from_checkpoint_writes_metrics_and_resumes(ckpt, tmp_path, compile_cache):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  rows = []

  def write(m):
    rows.append(m)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(m, sort_keys=True) + "\n")

  mesh = _mesh()
  t0 = time.perf_counter()
  loop.run(ExperimentConfig.from_dict(_dict(ckpt, num_steps=1)), mesh, workdir, on_metrics=write)
  print(f"first run {time.perf_counter() - t0:.1f}s")
  t0 = time.perf_counter()
  assert [(r["phase"], r["step"]) for r in rows] == [("sft_eval", 0), ("rl", 1)]  # no SFT
  sft_dir = os.path.join(workdir, "checkpoints", "sft")
  assert not os.path.exists(sft_dir) or not os.listdir(sft_dir)  # no copy of the checkpoint
  rows.clear()
  out = loop.run(ExperimentConfig.from_dict(_dict(ckpt, num_steps=2)), mesh, workdir,
                 on_metrics=write)
  print(f"resumed run {time.perf_counter() - t0:.1f}s")
  assert [(r["phase"], r["step"]) for r in rows] == [("rl", 2)]  # resumed after step 1
  assert out["warmup_eval_reward"] is None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rl_rows = [r for r in map(json.loads, f) if r["phase"] == "rl"]
  assert [r["step"] for r in rl_rows] == [1, 2]
  for r in rl_rows:
    for key in ("loss", "k3_kl", "topk_agreement", "pred_loss", "reward_mean", "grad_norm"):
      assert math.isfinite(r[key]), (key, r[key])
    assert r["skipped_updates"] == 0
  assert 0 <= rl_rows[1]["eval_reward"] <= 1
  # W_p starts at 0 and only a predictor update moves it (mini-step 2 of each RL step):
  # pred_loss > 0 alone held without any update (bf16 features differ from the live logits).
  assert np.abs(np.asarray(out["state"].predictor)).max() > 0
  assert len(rl_rows[1]["pred_loss_per_ministep"]) == 2


def _copy(src, dst, *, without=()):
  shutil.copytree(src, dst, ignore=lambda d, names: [n for n in names if n in without])
  return str(dst)


def test_a_bad_checkpoint_on_the_command_line_is_one_error_line(ckpt, tmp_path):
  """A checkpoint without tokenizer.json, or with a damaged weights file or tokenizer.json,
  stopped experiments.main with a traceback; it is a setup error, like the config's."""
  import _cli
  no_tok = _copy(ckpt, tmp_path / "no_tok", without=("tokenizer.json",))
  cut = _copy(ckpt, tmp_path / "cut")
  with open(os.path.join(cut, "model.safetensors"), "r+b") as f:
    f.truncate(1000)
  cut_tok = _copy(ckpt, tmp_path / "cut_tok")
  with open(os.path.join(cut_tok, "tokenizer.json"), "r+b") as f:
    f.truncate(100)
  for path, message in ((no_tok, "no tokenizer.json in"),
                        (cut, "cannot read .*model.safetensors: SafetensorError"),
                        (cut_tok, "cannot read .*tokenizer.json: ")):
    proc = _cli.run("experiments.main", "--config=configs/hf_pr2.py",
                    f"--workdir={tmp_path / 'runs' / os.path.basename(path)}",
                    f"--config.hf_checkpoint={path}")
    assert re.match(f"error: {message}", _cli.one_error_line(proc)), proc.stderr[-2000:]


def _engine(path):
  return loop.Engine(ExperimentConfig.from_dict(_dict(path)), make_mesh(1, 1, jax.devices()[:1]))


def test_bad_checkpoints_fail_early_with_clear_errors(ckpt, tmp_path):
  with pytest.raises(ValueError, match="hf_checkpoint='/no/such/dir' is not a directory"):
    ExperimentConfig.from_dict(_dict("/no/such/dir"))
  d = _dict(ckpt)
  d["model"]["num_experts"] = 4
  with pytest.raises(ValueError, match=r"conflict with .*config.json: "
                                       r"num_experts=4 \(checkpoint: 8\)"):
    ExperimentConfig.from_dict(d)

  no_tok = _copy(ckpt, tmp_path / "no_tok", without=("tokenizer.json",))
  with pytest.raises(ValueError, match="no tokenizer.json in"):
    _engine(no_tok)

  no_star = _copy(ckpt, tmp_path / "no_star", without=("tokenizer.json",))
  # 'x' in place of '*': the same ids (the special tokens keep theirs), no '*' to encode.
  make_tiny_hf.write_tokenizer(no_star, make_tiny_hf.char_tokenizer(CHARS.replace("*", "x")))
  with pytest.raises(ValueError, match="cannot encode the task character '\\*'"):
    _engine(no_star)

  big = _copy(ckpt, tmp_path / "big", without=("tokenizer.json",))
  tok = make_tiny_hf.char_tokenizer()
  tok.add_special_tokens([f"<|extra_{i}|>" for i in range(16)])  # 24 + 16 = 40 ids > 32 rows
  make_tiny_hf.write_tokenizer(big, tok)
  with pytest.raises(ValueError, match="has 40 ids, more than the model's vocab_size=32"):
    _engine(big)

  other = ExperimentConfig.from_dict(_dict(ckpt))
  other = ExperimentConfig(**{**other.__dict__, "model": other.model.replace(d_model=32)})
  with pytest.raises(ValueError, match=r"holds another model .*'d_model': \(32, 64\)"):
    loop.Engine(other, make_mesh(1, 1, jax.devices()[:1]))
