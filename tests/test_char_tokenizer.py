"""Tests for pr2_jax.rl.char_tokenizer: fixed ids, round trips, padding layout, errors."""

import numpy as np
import pytest

from pr2_jax.rl.char_tokenizer import CHARS, CharTokenizer


@pytest.fixture
def tok():
  return CharTokenizer()


def test_fixed_ids(tok):
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert tok.vocab_size == 3 + len(CHARS) == 24 <= 32  # fits the tiny model's vocab
  assert tok.encode("0") == [3] and tok.encode("9") == [12]
  # "12+34=" by hand: '1'->4, '2'->5, '+'->13, '3'->6, '4'->7, '='->17.
  assert tok.encode("12+34=") == [4, 5, 13, 6, 7, 17]
  assert tok.encode("7", bos=True, eos=True) == [1, 10, 2]


def test_round_trip_every_character(tok):
  ids = tok.encode(CHARS, bos=True, eos=True)
  assert len(set(ids)) == len(ids) == tok.vocab_size - 1  # every id but PAD
  assert tok.decode(ids) == CHARS


def test_decode_stops_at_eos_and_skips_pad_bos(tok):
  assert tok.decode([0, 0, 1, 4, 5, 2, 6, 7]) == "12"
  assert tok.decode(np.array([1, 4, 0, 5], np.int32)) == "12"
  assert tok.decode([]) == "" and tok.decode([2, 4]) == ""
  assert tok.decode_batch(np.array([[0, 1, 4, 2], [1, 5, 6, 7]])) == ["1", "234"]


def test_unknown_character_and_id(tok):
  with pytest.raises(ValueError, match=r"'x' at position 2 of '12x'"):
    tok.encode("12x")
  with pytest.raises(ValueError, match="token id 24"):
    tok.decode([4, 24])
  with pytest.raises(ValueError, match="token id -1"):
    tok.decode([-1])


def test_encode_batch_left_pad(tok):
  ids, valid = tok.encode_batch(["1+2=", "12+3="], 7)
  assert ids.dtype == np.int32 and valid.dtype == np.bool_ and ids.shape == valid.shape == (2, 7)
  np.testing.assert_array_equal(ids, [[0, 0, 1, 4, 13, 5, 17],
                                      [0, 1, 4, 5, 13, 6, 17]])
  np.testing.assert_array_equal(valid, [[0, 0, 1, 1, 1, 1, 1],
                                        [0, 1, 1, 1, 1, 1, 1]])


def test_encode_batch_right_pad_without_bos(tok):
  ids, valid = tok.encode_batch(["1", "23"], 3, left_pad=False, bos=False)
  np.testing.assert_array_equal(ids, [[4, 0, 0], [5, 6, 0]])
  np.testing.assert_array_equal(valid, [[1, 0, 0], [1, 1, 0]])
  assert tok.decode_batch(ids) == ["1", "23"]


def test_encode_batch_exact_fit_and_empty(tok):
  ids, valid = tok.encode_batch(["123"], 4)
  np.testing.assert_array_equal(ids, [[1, 4, 5, 6]])
  assert valid.all()
  ids, valid = tok.encode_batch([], 5)
  assert ids.shape == valid.shape == (0, 5)


def test_encode_batch_too_long(tok):
  msg = r"prompt '12\+34=' is 7 tokens long \(with BOS\), more than length=6"
  with pytest.raises(ValueError, match=msg):
    tok.encode_batch(["1=", "12+34="], 6)
  with pytest.raises(ValueError, match="unknown|not in the vocabulary"):
    tok.encode_batch(["a"], 6)


def test_generation_stops_on_eos_only(tok):
  """stop_ids feeds the sampler and the RL loop's response cut: PAD (0) or BOS (1) there would
  end a response at a token that is not EOS."""
  assert tok.stop_ids == (2,) == (tok.eos_id,)


def test_encode_batch_length_zero_is_allowed_negative_is_not(tok):
  """length=0 is a valid (empty) layout for texts that encode to nothing; only < 0 is an error."""
  ids, valid = tok.encode_batch(["", ""], 0, bos=False)
  assert ids.shape == valid.shape == (2, 0)
  with pytest.raises(ValueError, match="length=-1 must be >= 0"):
    tok.encode_batch([], -1)
