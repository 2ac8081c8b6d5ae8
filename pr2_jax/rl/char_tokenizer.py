"""A fixed character-level tokenizer for the procedural RL tasks.

Dimension legend: B batch (number of texts), T padded length (tokens).

Ids 0, 1, 2 are PAD, BOS, EOS; every other id is one character of `CHARS`.
The vocabulary is fixed (not learned from data) so that a checkpoint trained
on one task stays valid for every other task: 24 ids, which fits the tiny
model's vocabulary of 32 (ids 24..31 are simply never produced by encode;
decode rejects them so a sampler bug cannot pass silently).

Pure host-side Python/numpy: the sampler encodes prompts before the jitted
decode loop and decodes responses after it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
# Everything the tasks write: digits, operators, brackets and separators.
CHARS = "0123456789+-*/=() ,:?"


class CharTokenizer:
  """Maps task text to int ids and back; see the module docstring for ids."""

  def __init__(self):
    self.chars = CHARS
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    self.stop_ids = (EOS_ID,)  # what generation stops on
    self.vocab_size = NUM_SPECIAL + len(CHARS)
    self._char_to_id = {c: NUM_SPECIAL + i for i, c in enumerate(CHARS)}

  def __repr__(self):
    return f"CharTokenizer(vocab_size={self.vocab_size}, chars={self.chars!r})"

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Ids of `text`, optionally wrapped in BOS/EOS; unknown characters raise."""
    ids = [self.bos_id] if bos else []
    for pos, ch in enumerate(text):
      tok = self._char_to_id.get(ch)
      if tok is None:
        raise ValueError(f"character {ch!r} at position {pos} of {text!r} is not in the "
                         f"vocabulary {self.chars!r}")
      ids.append(tok)
    if eos:
      ids.append(self.eos_id)
    return ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`: stops at the first EOS, skips PAD and BOS.

    Skipping (rather than stopping at) PAD lets a left-padded row or a
    prompt+response row be decoded as is.
    """
    out = []
    for tok in ids:
      tok = int(tok)
      if tok == self.eos_id:
        break
      if tok in (self.pad_id, self.bos_id):
        continue
      if not NUM_SPECIAL <= tok < self.vocab_size:
        raise ValueError(f"token id {tok} is outside the vocabulary [0, {self.vocab_size})")
      out.append(self.chars[tok - NUM_SPECIAL])
    return "".join(out)

  def decode_batch(self, ids_BT) -> list[str]:
    """`decode` of every row of a [B, T] array."""
    return [self.decode(row) for row in np.asarray(ids_BT)]

  def encode_batch(self, texts: Sequence[str], length: int, *, left_pad: bool = True,
                   bos: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Pads encoded `texts` to `length`: (ids int32 [B, T], valid bool [B, T]).

    Left padding (the default) puts every prompt's last token in column T-1,
    so a batched decoder starts generating at the same position for all rows.
    `valid` is True exactly on real tokens (BOS included).
    """
    if length < 0:
      raise ValueError(f"length={length} must be >= 0")
    ids_BT = np.full((len(texts), length), self.pad_id, np.int32)
    valid_BT = np.zeros((len(texts), length), np.bool_)
    for b, text in enumerate(texts):
      ids = self.encode(text, bos=bos)
      if len(ids) > length:
        raise ValueError(f"prompt {text!r} is {len(ids)} tokens long "
                         f"({'with' if bos else 'without'} BOS), more than length={length}")
      cols = slice(length - len(ids), length) if left_pad else slice(0, len(ids))
      ids_BT[b, cols] = ids
      valid_BT[b, cols] = True
    return ids_BT, valid_BT
