"""A tokenizer for Hugging Face checkpoint directories, over the `tokenizers` library.

Dimension legend:
  B batch (texts), T padded length.

`tokenizer.json` holds the whole fast tokenizer (normalizer, pre-tokenizer,
model, added tokens), so the `tokenizers` library alone reproduces
transformers' encoding; no transformers or torch at run time. Special tokens
are spread over three files and we read all of them, because generation must
stop on every id the model was trained to end with: `tokenizer_config.json`
names tokens (`eos_token`, `pad_token`, `bos_token`), `generation_config.json`
and `config.json` give ids (Qwen3 stops on both <|im_end|> and <|endoftext|>).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Sequence

import numpy as np
import tokenizers

from pr2_jax.hf.config_map import read_json

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# Files consulted for special tokens, most specific first.
SPECIAL_FILES = ("tokenizer_config.json", "generation_config.json", "config.json")


def _read_json(path: str) -> dict[str, Any]:
  """A JSON object file's fields; {} when the file is absent (each of SPECIAL_FILES may be)."""
  return read_json(path, "fields") if os.path.isfile(path) else {}


def _ids(value) -> list[int]:
  """An `*_token_id` field (int, list of ints or null) as a list."""
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _token_id(tok: tokenizers.Tokenizer, value, field: str) -> int | None:
  """A `*_token` field (a string, an AddedToken dict or null) as an id."""
  if isinstance(value, dict):
    value = value.get("content")
  if value is None:
    return None
  token_id = tok.token_to_id(value)
  if token_id is None:
    raise ValueError(f"tokenizer_config.json field {field}={value!r} is not in the vocabulary")
  return token_id


def _unique(ids: Iterable[int]) -> tuple[int, ...]:
  return tuple(dict.fromkeys(ids))


class HFTokenizer:
  """Encode/decode with a checkpoint's `tokenizer.json` and its special tokens.

  Attributes:
    eos_ids: every end-of-sequence id (generation stops on any of them).
    pad_id / bos_id: padding and beginning-of-sequence ids, or None.
    chat_template: the raw Jinja chat template (chat_template.jinja, else
      tokenizer_config.json's entry, as transformers reads them), or None.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_ids: Sequence[int] = (),
               pad_id: int | None = None, bos_id: int | None = None,
               chat_template: str | None = None):
    self.tokenizer = tokenizer
    self.eos_ids = _unique(int(i) for i in eos_ids)
    self.pad_id, self.bos_id, self.chat_template = pad_id, bos_id, chat_template
    named_ids = (("eos_ids", self.eos_ids), ("pad_id", _ids(pad_id)), ("bos_id", _ids(bos_id)))
    for name, ids in named_ids:
      bad = [i for i in ids if not 0 <= i < self.vocab_size]
      if bad:
        raise ValueError(f"{name} {bad} outside the vocabulary [0, {self.vocab_size})")

  @classmethod
  def from_dir(cls, path: str) -> "HFTokenizer":
    """Reads `tokenizer.json` and the special tokens of a checkpoint directory."""
    file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.isfile(file):
      raise ValueError(f"no {TOKENIZER_FILE} in {path!r} (only fast tokenizers are supported)")
    try:
      tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # tokenizers raises a bare Exception on a truncated or foreign file
      raise ValueError(f"cannot read {file}: {e}") from e
    # A tokenizer.json may store padding or truncation settings; transformers' fast tokenizer
    # resets both on every call, and so do we once: kept, encode() padded "Hello" to 9 ids (the
    # pads then counted as real tokens) or cut the text short, silently.
    tok.no_padding()
    tok.no_truncation()
    tok_cfg, *id_cfgs = (_read_json(os.path.join(path, f)) for f in SPECIAL_FILES)

    def candidates(field: str) -> list[int]:
      """`field`'s ids in SPECIAL_FILES order: tokenizer_config's name, then the id files'."""
      named = _token_id(tok, tok_cfg.get(f"{field}_token"), f"{field}_token")
      return _ids(named) + [i for cfg in id_cfgs for i in _ids(cfg.get(f"{field}_token_id"))]

    def first(field: str) -> int | None:
      # Same precedence as EOS, and as transformers: its tokenizer reads tokenizer_config, its
      # generate() reads generation_config.json, config.json only when that file is absent.
      ids = candidates(field)
      return ids[0] if ids else None

    template = tok_cfg.get("chat_template")
    jinja = os.path.join(path, CHAT_TEMPLATE_FILE)  # where transformers 5 saves it
    if os.path.isfile(jinja):  # as in transformers, the file wins over tokenizer_config's entry
      with open(jinja, encoding="utf-8") as f:
        template = f.read()
    return cls(tok, eos_ids=candidates("eos"), pad_id=first("pad"), bos_id=first("bos"),
               chat_template=template if isinstance(template, str) else None)

  @property
  def vocab_size(self) -> int:
    """Ids in use, added tokens included (the model's vocab_size may be padded above it)."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def eos_id(self) -> int | None:
    """The primary end-of-sequence id (the one appended to targets)."""
    return self.eos_ids[0] if self.eos_ids else None

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(int(token_id))

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS)."""
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], *,
                   add_special_tokens: bool = True) -> list[list[int]]:
    return [e.ids for e in self.tokenizer.encode_batch(list(texts),
                                                       add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; an id outside the vocabulary is a ValueError (tokenizers drops it)."""
    return self.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

  def decode_batch(self, batch: Sequence[Sequence[int]], *,
                   skip_special_tokens: bool = True) -> list[str]:
    batch = [[int(i) for i in ids] for ids in batch]
    self._check_ids(batch)
    return self.tokenizer.decode_batch(batch, skip_special_tokens=skip_special_tokens)

  def _check_ids(self, batch: list[list[int]]) -> None:
    for b, ids in enumerate(batch):
      bad = [i for i in ids if not 0 <= i < self.vocab_size]
      if bad:
        raise ValueError(f"sequence {b} has token id {bad[0]} outside the vocabulary "
                         f"[0, {self.vocab_size})")

  def pad(self, batch: Sequence[Sequence[int]], length: int | None = None, *,
          left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pads id lists into model inputs.

    Args:
      batch: B id lists.
      length: T; default the longest list. Longer lists raise ValueError.
      left: pad on the left (prompts for generation) instead of the right.

    Returns:
      (tokens_BT int32, valid_BT bool); padding uses `pad_id` (else `eos_id`,
      else 0), and is False in `valid_BT`.
    """
    length = max((len(ids) for ids in batch), default=0) if length is None else length
    too_long = [i for i, ids in enumerate(batch) if len(ids) > length]
    if too_long:
      raise ValueError(f"sequences {too_long[:5]} are longer than length={length}")
    self._check_ids([[int(i) for i in ids] for ids in batch])
    fill = next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)
    tokens_BT = np.full((len(batch), length), fill, np.int32)
    valid_BT = np.zeros((len(batch), length), bool)
    for b, ids in enumerate(batch):
      cols = slice(length - len(ids), length) if left else slice(0, len(ids))
      tokens_BT[b, cols] = ids
      valid_BT[b, cols] = True
    return tokens_BT, valid_BT
