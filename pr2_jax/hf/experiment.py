"""The RL experiment from a Hugging Face checkpoint directory (`ExperimentConfig.hf_checkpoint`).

Dimension legend: B texts, T padded length (tokens), V vocabulary ids.

Setting `hf_checkpoint = DIR` changes three things of the experiment and
nothing else (tasks, rewards, sampler, learner, checkpoints are the same code):

* the model config is DIR/config.json's architecture; the config file's
  `model` section may only set our run-time knobs (`RUNTIME_FIELDS`), and an
  architecture field it repeats must equal the checkpoint's (a conflict is an
  error, not silently ignored: it would describe another model);
* the tokenizer is DIR/tokenizer.json behind `TaskTokenizer`, which gives it
  the interface `rl.data` and `rl.loop` use from `CharTokenizer`;
* the initial policy is the checkpoint's weights, loaded straight into the
  mesh's shardings (`create_state`), and the SFT warm-up is off unless
  `sft.num_steps > 0` (then it starts from those weights).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh

from pr2_jax.config import RUNTIME_FIELDS, ModelConfig
from pr2_jax.hf.checkpoint import load_hf_checkpoint
from pr2_jax.hf.config_map import config_from_hf, read_hf_config
from pr2_jax.hf.tokenizer import TOKENIZER_FILE, HFTokenizer
from pr2_jax.rl.config import SetupError
from pr2_jax.rl.data import check_task_tokenizer
from pr2_jax.train.state import TrainState, state_initializer


def check_dir(path: str) -> None:
  """Raises ValueError unless `path` (ExperimentConfig.hf_checkpoint) is a directory: the
  message names the config field and what the directory holds, before any file is read."""
  if not os.path.isdir(path):
    raise ValueError(f"hf_checkpoint={path!r} is not a directory (a local Hugging Face "
                     "checkpoint: config.json, *.safetensors, tokenizer.json)")


def architecture(config: ModelConfig) -> dict[str, Any]:
  """The fields that fix what the weights compute (everything but `RUNTIME_FIELDS`)."""
  return {k: v for k, v in dataclasses.asdict(config).items() if k not in RUNTIME_FIELDS}


def model_config(path: str, section: Mapping[str, Any] | None = None) -> ModelConfig:
  """DIR/config.json's model with the run-time knobs of a config file's `model` section.

  Raises:
    ValueError: a missing directory or config.json, an unknown field, or an
      architecture field whose value differs from the checkpoint's.
  """
  check_dir(path)
  config = config_from_hf(read_hf_config(path))
  section = dict(section or {})
  merged = ModelConfig.from_dict({**dataclasses.asdict(config), **section})  # validates names
  ours, theirs = architecture(merged), architecture(config)
  conflicts = [f"{k}={ours[k]!r} (checkpoint: {theirs[k]!r})" for k in ours if ours[k] != theirs[k]]
  if conflicts:
    raise ValueError(f"config model fields conflict with {path}/config.json: "
                     f"{', '.join(conflicts)}; with hf_checkpoint set, `model` may only set "
                     f"{RUNTIME_FIELDS} (leave the architecture fields out)")
  return config.replace(**{k: section[k] for k in RUNTIME_FIELDS if k in section})


def prepended_id(hf: HFTokenizer) -> int | None:
  """The special id the post-processor puts before a text (BOS), else None."""
  try:
    bare = hf.encode("0", add_special_tokens=False)
    full = hf.encode("0", add_special_tokens=True)
  except Exception:  # cannot encode '0': check_task_tokenizer reports it by name
    return None
  return full[0] if len(full) > len(bare) and full[1:1 + len(bare)] == bare else None


class TaskTokenizer:
  """An `HFTokenizer` with `CharTokenizer`'s interface (encode, encode_batch, decode_batch).

  BOS is the id the tokenizer's own post-processor puts before a text, or none
  (Qwen3's adds none, although its config.json names a bos_token_id: the model
  never saw it first; the prompt's first slot is then padding). Padding is
  `pad_id`, else the EOS id. Decoding stops at the first of *any* of the
  checkpoint's EOS ids, as generation would.
  """

  def __init__(self, hf: HFTokenizer):
    if hf.eos_id is None:
      raise ValueError("the tokenizer has no EOS token (tokenizer_config.json eos_token or "
                       "config.json / generation_config.json eos_token_id): responses need one")
    self.hf = hf
    self.vocab_size = hf.vocab_size
    self.eos_id, self.bos_id = hf.eos_id, prepended_id(hf)
    self.pad_id = hf.pad_id if hf.pad_id is not None else hf.eos_id
    self._stop = frozenset(hf.eos_ids)
    self.stop_ids = tuple(hf.eos_ids)  # generation stops on any of them (decode cuts there)
    self._skip = frozenset(i for i in (self.pad_id, self.bos_id) if i is not None)

  def __repr__(self):
    return (f"TaskTokenizer(vocab_size={self.vocab_size}, eos_ids={sorted(self._stop)}, "
            f"pad_id={self.pad_id}, bos_id={self.bos_id})")

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of `text` (no post-processor specials), optionally with BOS (if any) and EOS."""
    try:
      ids = self.hf.encode(text, add_special_tokens=False)
    except Exception as e:  # tokenizers raises a bare Exception (e.g. WordLevel without unk)
      raise ValueError(f"the tokenizer cannot encode {text!r}: {e}") from e
    return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + (
        [self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to the first EOS id, without PAD/BOS and other special tokens.

    Meant for responses. A left-padded prompt row decodes to '' when PAD is
    also a stop id (Qwen3: <|endoftext|>): decode `row[valid]` instead.
    """
    kept = []
    for tok in ids:
      tok = int(tok)
      if tok in self._stop:
        break
      if not 0 <= tok < self.vocab_size:
        raise ValueError(f"token id {tok} is outside the vocabulary [0, {self.vocab_size})")
      if tok not in self._skip:
        kept.append(tok)
    return self.hf.decode(kept, skip_special_tokens=True)

  def decode_batch(self, ids_BT) -> list[str]:
    return [self.decode(row) for row in np.asarray(ids_BT)]

  def encode_batch(self, texts: Sequence[str], length: int, *, left_pad: bool = True,
                   bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, T], valid bool [B, T]) padded to T = `length`, left by default."""
    ids = [self.encode(t, bos=bos) for t in texts]
    too_long = [(t, len(i)) for t, i in zip(texts, ids) if len(i) > length]
    if too_long:
      raise ValueError(f"prompt {too_long[0][0]!r} is {too_long[0][1]} tokens long, more than "
                       f"length={length}")
    return self.hf.pad(ids, length, left=left_pad)


def task_tokenizer(path: str, task, vocab_size: int) -> TaskTokenizer:
  """DIR's tokenizer, checked against the task and the model's vocabulary. A problem is a
  SetupError naming it (the entry points' one `error:` line; it was a traceback)."""
  try:
    check_dir(path)
    tok = TaskTokenizer(HFTokenizer.from_dir(path))
    check_task_tokenizer(tok, task, vocab_size, f"{path}/{TOKENIZER_FILE}")
  except ValueError as e:
    raise SetupError(str(e)) from None
  return tok


def create_state(path: str, model: nn.Module, tx: optax.GradientTransformation,
                 mesh: Mesh) -> tuple[TrainState, TrainState]:
  """`create_train_state` with the checkpoint's params instead of a random init.

  Never initialises random weights: the shardings come from `eval_shape`, the
  params are read shard by shard into them, the optimizer state is born sharded.
  Raises SetupError (a ValueError) if DIR's weights do not load (missing, misshapen or
  non-finite tensors, ...) or its architecture is not `model.config`'s.
  """
  try:
    config, params = load_hf_checkpoint(path, mesh=mesh, fsdp=model.config.fsdp)
  except ValueError as e:  # a damaged or foreign checkpoint: the user's to fix, one line
    raise SetupError(str(e)) from None
  want, got = architecture(model.config), architecture(config)
  if want != got:
    diff = {k: (want[k], got[k]) for k in want if want[k] != got[k]}
    raise SetupError(f"{path} holds another model than ExperimentConfig.model: "
                     f"{{field: (config, checkpoint)}} = {diff}")
  # Only the shardings: the jitted random init is never called.
  _, shardings = state_initializer(model, tx, mesh, jax.random.key(0))
  params = jax.device_put(params, shardings.params)  # no copy: the loader used these shardings
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=shardings.step)()
  return TrainState(step=step, params=params, opt_state=opt_state), shardings
