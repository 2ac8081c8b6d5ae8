"""HFTokenizer on a byte-level BPE trained here (Qwen-style special tokens), no downloads.

Oracles: exact round trips, hand-written special-token files, and
transformers' PreTrainedTokenizerFast reading the same tokenizer.json.
"""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pr2_jax.hf.tokenizer import HFTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Reverse the digits 1 2 3 4 5 6 7 8.",
         "Mixture-of-experts models route every token to a few experts.",
         "Predictive routing replay keeps the same experts in training."] * 20


def train_bpe() -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  return tok


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
  """tokenizer.json plus the three files special tokens come from, as in a Qwen3 checkpoint."""
  path = tmp_path_factory.mktemp("tok")
  tok = train_bpe()
  tok.save(str(path / "tokenizer.json"))
  end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
  im_start = tok.token_to_id("<|im_start|>")  # bos differs from pad, so a swap of the two shows
  (path / "tokenizer_config.json").write_text(json.dumps({
      "eos_token": "<|im_end|>", "bos_token": None, "chat_template": "{{ messages }}",
      "pad_token": {"content": "<|endoftext|>", "special": True, "lstrip": False}}))
  # Qwen3 lists [im_end, end] here; reversed, tokenizer_config's eos must still come first.
  (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, im_end]}))
  # A pad id here too: the name in tokenizer_config wins over it.
  (path / "config.json").write_text(json.dumps({"eos_token_id": im_end, "bos_token_id": im_start,
                                                "pad_token_id": im_end}))
  return path


def test_special_tokens_from_all_three_files(checkpoint_dir):
  """eos: tokenizer_config's first, then generation_config's extra stop id; pad by name;
  bos by id."""
  tok = HFTokenizer.from_dir(str(checkpoint_dir))
  end, im_end = tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|im_end|>")
  im_start = tok.token_to_id("<|im_start|>")
  assert len({end, im_end, im_start}) == 3
  assert tok.eos_ids == (im_end, end) and tok.eos_id == im_end
  assert tok.pad_id == end and tok.bos_id == im_start
  assert tok.chat_template == "{{ messages }}"
  assert tok.id_to_token(im_end) == "<|im_end|>"
  assert 256 + len(SPECIALS) < tok.vocab_size <= 400  # bytes + specials + learned merges


def test_pad_and_bos_follow_the_same_file_order_as_eos(checkpoint_dir, tmp_path):
  """When generation_config.json and config.json disagree, pad and bos take
  generation_config's id, as EOS does and as transformers' generate() does (pad and bos read
  config.json first)."""
  (tmp_path / "tokenizer.json").write_text((checkpoint_dir / "tokenizer.json").read_text())
  (tmp_path / "generation_config.json").write_text(json.dumps(
      {"eos_token_id": 3, "pad_token_id": 4, "bos_token_id": 5}))
  (tmp_path / "config.json").write_text(json.dumps(
      {"eos_token_id": 6, "pad_token_id": 7, "bos_token_id": 8}))
  tok = HFTokenizer.from_dir(str(tmp_path))
  assert (tok.eos_ids, tok.pad_id, tok.bos_id) == ((3, 6), 4, 5)
  # A name in tokenizer_config.json still comes first.
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|im_start|>"}))
  assert HFTokenizer.from_dir(str(tmp_path)).pad_id == tok.token_to_id("<|im_start|>")


@pytest.mark.parametrize("text", [TEXTS[0], "unseen wordz, naïve café 🙂\n\ttabs", ""])
def test_encode_decode_round_trip_and_matches_transformers(checkpoint_dir, text):
  """Byte-level BPE round-trips any text; ids equal transformers' fast tokenizer's."""
  import transformers
  tok = HFTokenizer.from_dir(str(checkpoint_dir))
  ids = tok.encode(text)
  assert tok.decode(ids) == text
  oracle = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(checkpoint_dir / "tokenizer.json"))
  assert ids == oracle(text)["input_ids"]
  assert tok.encode_batch([text, TEXTS[1]]) == [ids, tok.encode(TEXTS[1])]
  assert tok.decode_batch([ids]) == [text]


def test_padding_and_truncation_stored_in_the_file_are_ignored_as_transformers_does(
    checkpoint_dir, tmp_path):
  """A tokenizer.json saved with padding or truncation on padded "Hello" to the batch's longest
  (pads then marked valid by `pad`) or cut the text; transformers' fast tokenizer ignores both."""
  import transformers
  stored = Tokenizer.from_file(str(checkpoint_dir / "tokenizer.json"))
  end = stored.token_to_id("<|endoftext|>")
  stored.enable_padding(pad_id=end, pad_token="<|endoftext|>")
  stored.enable_truncation(max_length=4)
  stored.save(str(tmp_path / "tokenizer.json"))
  tok = HFTokenizer.from_dir(str(tmp_path))
  oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  texts = ["Hello", TEXTS[2]]
  assert tok.encode_batch(texts) == [oracle(t)["input_ids"] for t in texts]
  assert len(tok.encode(TEXTS[2])) > 4 and tok.decode(tok.encode(TEXTS[2])) == TEXTS[2]


def test_special_tokens_encode_as_one_id_and_are_skipped_on_decode(checkpoint_dir):
  tok = HFTokenizer.from_dir(str(checkpoint_dir))
  ids = tok.encode("<|im_start|>hi<|im_end|>")
  assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.eos_id
  assert tok.decode(ids) == "hi"
  assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


def _with_bos_template(tmp_path, token: str):
  """(HFTokenizer, BOS id) of a tokenizer.json whose post-processor puts `token` first."""
  raw = train_bpe()
  bos = raw.token_to_id(token)
  raw.post_processor = processors.TemplateProcessing(single=f"{token} $A",
                                                     special_tokens=[(token, bos)])
  raw.save(str(tmp_path / "tokenizer.json"))
  return HFTokenizer.from_dir(str(tmp_path)), bos


def test_add_special_tokens_applies_the_post_processor(tmp_path):
  """A BOS template is applied only when asked, as transformers does."""
  tok, bos = _with_bos_template(tmp_path, "<|endoftext|>")
  assert tok.encode("fox")[0] == bos and tok.encode("fox", add_special_tokens=False)[0] != bos
  assert tok.eos_ids == () and tok.pad_id is None and tok.bos_id is None


def test_pad_right_and_left(checkpoint_dir):
  """pad() gives int32 tokens filled with pad_id and a bool valid mask, either side."""
  tok = HFTokenizer.from_dir(str(checkpoint_dir))
  batch = [[5, 6, 7], [8]]
  tokens, valid = tok.pad(batch, 4)
  assert tokens.dtype == np.int32 and valid.dtype == bool
  p = tok.pad_id
  np.testing.assert_array_equal(tokens, [[5, 6, 7, p], [8, p, p, p]])
  np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [1, 0, 0, 0]])
  tokens, valid = tok.pad(batch, left=True)
  np.testing.assert_array_equal(tokens, [[5, 6, 7], [p, p, 8]])
  np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 0, 1]])
  with pytest.raises(ValueError, match="longer than length=2"):
    tok.pad(batch, 2)


def test_ids_outside_the_vocabulary_raise(checkpoint_dir):
  """tokenizers decoded an unknown id to '' and pad() wrote it into model inputs, silently."""
  tok = HFTokenizer.from_dir(str(checkpoint_dir))
  v = tok.vocab_size
  for call in (lambda: tok.decode([5, v]), lambda: tok.decode_batch([[5], [6, -1]]),
               lambda: tok.pad([[5], [v + 100]])):
    with pytest.raises(ValueError, match=r"sequence [01] has token id (-1|\d+) outside the "
                                         rf"vocabulary \[0, {v}\)"):
      call()
  assert tok.decode_batch([[5], [6]]) == [tok.decode([5]), tok.decode([6])]


def test_chat_template_from_transformers_5s_jinja_file(checkpoint_dir, tmp_path):
  """transformers 5 saves the template as chat_template.jinja, not in tokenizer_config.json:
  it was read as None."""
  import transformers
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(checkpoint_dir / "tokenizer.json"), eos_token="<|im_end|>")
  fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  fast.save_pretrained(str(tmp_path))
  assert (tmp_path / "chat_template.jinja").is_file()  # the layout this test is about
  assert HFTokenizer.from_dir(str(tmp_path)).chat_template == fast.chat_template


def test_chat_template_file_wins_over_the_config_entry_as_in_transformers(checkpoint_dir,
                                                                          tmp_path):
  """With both a chat_template.jinja and a tokenizer_config.json entry, transformers takes the
  file; we took the entry (a checkpoint re-saved with a new template kept its old one)."""
  import transformers
  (tmp_path / "tokenizer.json").write_text((checkpoint_dir / "tokenizer.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": "<|im_end|>", "chat_template": "FROM_CONFIG"}))
  (tmp_path / "chat_template.jinja").write_text("FROM_JINJA")
  fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
  assert fast.chat_template == "FROM_JINJA"  # the oracle
  assert HFTokenizer.from_dir(str(tmp_path)).chat_template == "FROM_JINJA"


def test_bad_directories_raise_value_error(checkpoint_dir, tmp_path):
  with pytest.raises(ValueError, match="no tokenizer.json"):
    HFTokenizer.from_dir(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text((checkpoint_dir / "tokenizer.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(ValueError, match="eos_token='</s>' is not in the vocabulary"):
    HFTokenizer.from_dir(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text("{}")
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 10_000}))
  with pytest.raises(ValueError, match=r"eos_ids \[10000\] outside the vocabulary"):
    HFTokenizer.from_dir(str(tmp_path))
  # Were a JSONDecodeError naming no file and an AttributeError.
  (tmp_path / "config.json").write_text("{")
  with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
    HFTokenizer.from_dir(str(tmp_path))
  (tmp_path / "config.json").write_text("[]")
  with pytest.raises(ValueError, match=r"config.json holds a JSON list, not an object"):
    HFTokenizer.from_dir(str(tmp_path))
  # tokenizers raised a bare Exception naming no file: a traceback past SetupError.
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "tokenizer.json").write_text((checkpoint_dir / "tokenizer.json").read_text()[:500])
  with pytest.raises(ValueError, match=r"cannot read .*tokenizer.json: "):
    HFTokenizer.from_dir(str(tmp_path))


def test_encode_batch_passes_add_special_tokens_through(tmp_path):
  """encode_batch(add_special_tokens=False) must leave out the post-processor's BOS, as
  encode() and transformers do; dropping the argument prepended it to every text."""
  import transformers
  tok, bos = _with_bos_template(tmp_path, "<|im_start|>")
  oracle = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
  texts = ["fox", TEXTS[1]]
  bare = [oracle(t, add_special_tokens=False)["input_ids"] for t in texts]
  assert all(ids[0] != bos for ids in bare)
  assert tok.encode_batch(texts, add_special_tokens=False) == bare
  assert tok.encode_batch(texts) == [[bos] + ids for ids in bare]
