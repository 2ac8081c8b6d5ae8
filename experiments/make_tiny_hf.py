r"""Writes a tiny random Hugging Face Qwen3-MoE checkpoint with a task tokenizer.

    python -m experiments.make_tiny_hf --out=/tmp/tiny_qwen3_moe
    python -m experiments.main --config=configs/hf_pr2.py --workdir=/tmp/runs/hf_pr2 \
        --config.hf_checkpoint=/tmp/tiny_qwen3_moe

A stand-in for a real checkpoint directory (nothing can be downloaded here),
written the way a real one is: the model by `transformers`'
`Qwen3MoeForCausalLM.save_pretrained` (config.json, generation_config.json,
model.safetensors) and the tokenizer by the `tokenizers` library
(tokenizer.json + tokenizer_config.json). Needs the test extras (torch,
transformers).

The tokenizer is character-level over the task alphabet
(`pr2_jax.rl.char_tokenizer.CHARS`), with Qwen3's special tokens and Qwen3's
choices for them: EOS `<|im_end|>`, PAD `<|endoftext|>` (also a stop id in
generation_config.json), no BOS. Its 24 ids sit below the model's vocab_size
of 32, as Qwen3's 151,669 ids sit below its 151,936-row embedding.
"""

from __future__ import annotations

import os

from absl import flags

from pr2_jax.rl.char_tokenizer import CHARS

# Qwen3's names for the special tokens (ids differ: ours follow the characters).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = (ENDOFTEXT, IM_START, IM_END)
# The architecture of configs/tiny.py, as a Qwen3-MoE config.json.
MODEL = dict(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=8,
             num_experts_per_tok=2, norm_topk_prob=True, intermediate_size=128,
             max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def _define_flags():
  """Flags exist only when run as a script: tests import the writers beside other scripts'
  flags (a second '--out' would be a DuplicateFlagError)."""
  flags.DEFINE_string("out", "/tmp/tiny_qwen3_moe", "Checkpoint directory to write.")
  flags.DEFINE_integer("seed", 0, "torch seed of the random weights.")
  flags.DEFINE_float("initializer_range", 0.02, "Std of the random weights (transformers' "
                     "default).")


def char_tokenizer(chars: str = CHARS, specials=SPECIALS):
  """A `tokenizers.Tokenizer`: one token per character, exact decode (no spaces added)."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers

  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({s: len(chars) + i for i, s in enumerate(specials)})
  # No unk token: a character outside the alphabet fails to encode instead of becoming an id.
  tok = tokenizers.Tokenizer(models.WordLevel(vocab))
  # Every character its own piece (spaces included); Fuse joins pieces back without separators.
  tok.pre_tokenizer = pre_tokenizers.Split(tokenizers.Regex("."), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(specials))
  return tok


def write_tokenizer(out: str, tok) -> None:
  from experiments import outputs
  tok.save(os.path.join(out, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": IM_END,
            "pad_token": ENDOFTEXT, "bos_token": None, "model_max_length": 128}
  outputs.write_json(os.path.join(out, "tokenizer_config.json"), config, indent=2)


def write_checkpoint(out: str, *, seed: int = 0, initializer_range: float = 0.02,
                     **model_overrides) -> str:
  """Writes the random model and the tokenizer to `out`; returns `out`."""
  import torch
  import transformers

  os.makedirs(out, exist_ok=True)
  tok = char_tokenizer()
  eos, pad = tok.token_to_id(IM_END), tok.token_to_id(ENDOFTEXT)
  config = transformers.Qwen3MoeConfig(**{**MODEL, **model_overrides},
                                       initializer_range=initializer_range,
                                       eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
  torch.manual_seed(seed)
  model = transformers.Qwen3MoeForCausalLM(config)
  # Qwen3 stops on both <|im_end|> and <|endoftext|>.
  model.generation_config = transformers.GenerationConfig(eos_token_id=[eos, pad],
                                                          pad_token_id=pad)
  model.save_pretrained(out)
  write_tokenizer(out, tok)
  return out


def main(argv):
  del argv
  from experiments import outputs
  f = flags.FLAGS
  # Before torch loads: an --out that is a file failed inside save_pretrained.
  out = outputs.output_dir("out", f.out)
  import torch
  torch.set_num_threads(1)  # the machine's 2 cores are shared: no spinning thread pool
  out = write_checkpoint(out, seed=f.seed, initializer_range=f.initializer_range)
  for name in sorted(os.listdir(out)):
    print(f"{os.path.getsize(os.path.join(out, name)):>9,d}  {os.path.join(out, name)}")


if __name__ == "__main__":
  from experiments import cli
  _define_flags()
  cli.at_least(0, "initializer_range")
  cli.run(main)
