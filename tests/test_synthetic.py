"""Tests for pr2_jax.data.synthetic: the reverse-copy task layout."""

import numpy as np
import pytest

from pr2_jax.data import synthetic


def test_reverse_copy_layout():
  b = synthetic.reverse_copy_batch(np.random.default_rng(0), 4, 3)
  toks, mask = b["tokens"], b["loss_mask"]
  assert toks.shape == (4, 9) and toks.dtype == np.int32
  for row, m in zip(toks, mask):
    assert row[0] == synthetic.BOS and row[4] == synthetic.SEP and row[-1] == synthetic.EOS
    np.testing.assert_array_equal(row[5:8], row[1:4][::-1])
    assert np.all((row[1:4] >= synthetic.DIGIT0) & (row[1:4] < synthetic.DIGIT0 + 10))
    np.testing.assert_array_equal(m, [0, 0, 0, 0, 0, 1, 1, 1, 1])


def test_deterministic_for_a_seed():
  a = synthetic.reverse_copy_batch(np.random.default_rng(7), 2, 5)["tokens"]
  b = synthetic.reverse_copy_batch(np.random.default_rng(7), 2, 5)["tokens"]
  np.testing.assert_array_equal(a, b)


def test_bad_sizes():
  with pytest.raises(ValueError, match="num_digits=0"):
    synthetic.reverse_copy_batch(np.random.default_rng(0), 2, 0)


def test_digits_cover_0_to_9_and_fit_min_vocab():
  """Digits are uniform over all ten values (tokens 4..13): a draw from [0, 9) or [1, 10) never
  shows one of them. MIN_VOCAB (the model's smallest allowed vocab) is the largest token + 1."""
  toks = synthetic.reverse_copy_batch(np.random.default_rng(0), 64, 8)["tokens"]
  assert set(np.unique(toks[:, 1:9]).tolist()) == set(range(4, 14))
  assert toks.max() + 1 == synthetic.MIN_VOCAB == 14


def test_empty_batch_is_rejected():
  """batch=0 would return [0, T] arrays that silently train on nothing."""
  with pytest.raises(ValueError, match="batch=0"):
    synthetic.reverse_copy_batch(np.random.default_rng(0), 0, 3)
