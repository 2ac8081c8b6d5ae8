"""Host-side batch assembly: prompts, warm-up sequences and the learner's batch.

Dimension legend: B sequences, P prompt slots (left-padded, BOS first),
N response slots, S = P + N, L MoE layers, K top-k, M micro-steps, b
sequences per micro-step.

Layout shared by the warm-up and RL so the policy sees the same positions in
both: `[PAD.. BOS prompt | response EOS PAD..]`.
"""

from __future__ import annotations

import numpy as np

from pr2_jax.rl.char_tokenizer import CHARS, CharTokenizer
from pr2_jax.rl.config import SetupError
from pr2_jax.rl.tasks import Problem, Task


# Problems whose text must survive encode -> decode (a fixed sample: checks are reproducible).
CHECK_PROBLEMS = 64


def check_task_tokenizer(tok, task: Task, vocab_size: int, where: str = "the tokenizer") -> None:
  """Raises ValueError unless `tok` fits the model and round-trips the task's text.

  Checks: at most `vocab_size` ids; every character of the task alphabet
  (`CHARS`, which also holds the '?' the loop substitutes for ids the
  tokenizer lacks) and a fixed sample of prompts and solutions decode back to
  themselves; prompts and solutions fit the task's slots (one per character).
  """
  if tok.vocab_size > vocab_size:
    raise ValueError(f"{where} has {tok.vocab_size} ids, more than the model's "
                     f"vocab_size={vocab_size}: ids beyond the embedding cannot be fed")
  for ch in CHARS:
    try:
      ids = tok.encode(ch)
    except ValueError as e:
      raise ValueError(f"{where} cannot encode the task character {ch!r}: {e}") from e
    if not ids or tok.decode(ids) != ch:
      raise ValueError(f"{where} cannot encode the task character {ch!r}: ids {ids} decode to "
                       f"{tok.decode(ids)!r}")
  for p in task.sample(np.random.default_rng(0), CHECK_PROBLEMS):
    for text, limit in ((p.prompt, task.max_prompt_len), (p.solution, task.max_answer_len)):
      ids = tok.encode(text)
      if tok.decode(ids) != text:
        raise ValueError(f"{where} does not round-trip the task text {text!r} (decodes to "
                         f"{tok.decode(ids)!r})")
      if len(ids) > limit:
        raise ValueError(f"{where} encodes {text!r} in {len(ids)} tokens, more than the task's "
                         f"{limit} slots (one per character)")


def char_tokenizer(task: Task, vocab_size: int) -> CharTokenizer:
  """The character tokenizer, checked before any compiling against the model's vocabulary and
  the task's text (`check_task_tokenizer`); raises SetupError naming the problem (a new task's
  character outside `char_tokenizer.CHARS` was a traceback at the warm-up)."""
  tok = CharTokenizer()
  if vocab_size < tok.vocab_size:
    raise SetupError(f"ModelConfig.vocab_size={vocab_size} is below the tokenizer's "
                     f"{tok.vocab_size} ids")
  try:
    check_task_tokenizer(tok, task, vocab_size, "the character tokenizer")
  except ValueError as e:
    raise SetupError(f"task {task.name!r}: {e}") from None
  return tok


def layout(task: Task, max_new_tokens: int) -> tuple[int, int]:
  """(P, N) slots for a task; raises if the response budget cannot hold a solution."""
  prompt_slots = 1 + task.max_prompt_len
  if max_new_tokens < task.max_answer_len + 1:
    raise SetupError(f"RLConfig.max_new_tokens={max_new_tokens} cannot hold the task's answers "
                     f"({task.max_answer_len} characters + EOS)")
  return prompt_slots, max_new_tokens


def positions_of(valid_BS: np.ndarray) -> np.ndarray:
  return np.maximum(np.cumsum(valid_BS, axis=1) - 1, 0).astype(np.int32)


def encode_prompts(tok: CharTokenizer, problems: list[Problem], prompt_slots: int):
  """Left-padded prompt ids and validity [B, P]."""
  return tok.encode_batch([p.prompt for p in problems], prompt_slots, left_pad=True, bos=True)


def sft_batch(tok: CharTokenizer, problems: list[Problem], prompt_slots: int, response_slots: int):
  """Warm-up sequences `prompt | solution EOS` with the loss on the response."""
  prompt_BP, pvalid_BP = encode_prompts(tok, problems, prompt_slots)
  resp_BN = np.full((len(problems), response_slots), tok.pad_id, np.int32)
  rvalid_BN = np.zeros_like(resp_BN, bool)
  for i, p in enumerate(problems):
    ids = tok.encode(p.solution, eos=True)
    resp_BN[i, :len(ids)] = ids
    rvalid_BN[i, :len(ids)] = True
  valid = np.concatenate([pvalid_BP, rvalid_BN], axis=1)
  return {"tokens": np.concatenate([prompt_BP, resp_BN], axis=1), "valid": valid,
          "positions": positions_of(valid),
          "loss_mask": np.concatenate([np.zeros_like(pvalid_BP), rvalid_BN], 1).astype(np.float32)}


def split_micro(batch: dict, num_chunks: int, order: np.ndarray | None = None) -> dict:
  """[B, ...] -> [num_chunks, B / num_chunks, ...], optionally permuting rows first (on the host;
  the loop does this on the devices: `parallel.shuffle.shuffle_into_chunks`)."""
  def one(x):
    x = np.asarray(x) if order is None else np.asarray(x)[order]
    return x.reshape((num_chunks, x.shape[0] // num_chunks) + x.shape[1:])
  return {k: one(v) for k, v in batch.items()}
