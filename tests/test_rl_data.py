"""Tests for pr2_jax.rl.data: the shared prompt | response layout and micro-batch splitting."""

import numpy as np
import pytest

from pr2_jax.rl import data, tasks
from pr2_jax.rl.char_tokenizer import CharTokenizer
from pr2_jax.rl.tasks import Problem, make_task


def test_sft_batch_layout():
  tok = CharTokenizer()
  problems = [Problem(prompt="1+2=", answer="3", solution="3", meta=()),
              Problem(prompt="12+3=", answer="15", solution="15", meta=())]
  b = data.sft_batch(tok, problems, 6, 3)
  pad, bos, eos = tok.pad_id, tok.bos_id, tok.eos_id
  np.testing.assert_array_equal(b["tokens"][0],
                                [pad, bos] + tok.encode("1+2=") + tok.encode("3") + [eos, pad])
  np.testing.assert_array_equal(b["tokens"][1],
                                [bos] + tok.encode("12+3=") + tok.encode("15") + [eos])
  np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(b["positions"][0], [0, 0, 1, 2, 3, 4, 5, 6, 6])
  np.testing.assert_array_equal(b["valid"][0], [0, 1, 1, 1, 1, 1, 1, 1, 0])


def test_split_micro_takes_the_rows_in_order_chunk_by_chunk():
  x = np.arange(12).reshape(6, 2)  # row i = [2i, 2i + 1]
  order = np.array([4, 0, 5, 2, 1, 3])
  micro = data.split_micro({"x": x}, 3, order)["x"]
  np.testing.assert_array_equal(micro, [[[8, 9], [0, 1]], [[10, 11], [4, 5]],
                                        [[2, 3], [6, 7]]])
  np.testing.assert_array_equal(data.split_micro({"x": x}, 2)["x"], [x[:3], x[3:]])


def test_layout_needs_room_for_answers():
  task = make_task("arithmetic", num_digits=2, ops="+")
  assert data.layout(task, 4) == (1 + task.max_prompt_len, 4)
  with pytest.raises(ValueError, match="max_new_tokens=3 cannot hold"):
    data.layout(task, 3)


def test_char_tokenizer_is_checked_against_the_model_and_the_task():
  """A task writing a character outside CHARS failed at the warm-up with a traceback; the
  check names it (and the task) before any compiling, as the vocabulary check does."""
  from pr2_jax.rl import tasks
  from pr2_jax.rl.config import SetupError

  class Arrows(tasks.Task):
    name, max_prompt_len, max_answer_len = "arrows", 4, 1

    def _generate(self, rng):
      a = int(rng.integers(0, 10))
      return Problem(f"{a}>3:", "1", "1", (a,))

    def reward(self, problem, completion):
      return 0.0

  tok = data.char_tokenizer(make_task("arithmetic"), 32)
  assert isinstance(tok, CharTokenizer) and tok.vocab_size == 24
  with pytest.raises(SetupError, match=r"task 'arrows': character '>' at position 1 of '\d>3:' "
                                       r"is not in the vocabulary"):
    data.char_tokenizer(Arrows(), 32)
  with pytest.raises(SetupError, match="ModelConfig.vocab_size=16 is below the tokenizer's 24"):
    data.char_tokenizer(make_task("arithmetic"), 16)


class _SometimesLong(tasks.Task):
  """Prompts "d+1=" (4 characters) but "dd+1=" (5, one over its 4 slots) when the digit is 7:
  about one problem in ten, not the first of the checked sample."""
  name, max_prompt_len, max_answer_len = "sometimes_long", 4, 2

  def _generate(self, rng):
    d = int(rng.integers(0, 10))
    return Problem(f"{d}{d}+1=" if d == 7 else f"{d}+1=", str(d + 1), str(d + 1), (d,))

  def reward(self, problem, completion):
    return 0.0


def test_tokenizer_check_takes_a_vocabulary_filled_exactly_and_text_one_slot_too_long():
  """The character tokenizer's 24 ids fit a 24-row embedding exactly (23 do not); a prompt one
  token over its task's slots is refused even when only some sampled problems have it (the
  check reads a fixed sample of CHECK_PROBLEMS, not one problem)."""
  task = _SometimesLong()
  first = task.sample(np.random.default_rng(0), data.CHECK_PROBLEMS)
  assert first[0].prompt != "77+1=" and "77+1=" in [p.prompt for p in first]
  assert data.char_tokenizer(make_task("arithmetic"), 24).vocab_size == 24
  data.check_task_tokenizer(CharTokenizer(), make_task("arithmetic"), 24)
  with pytest.raises(ValueError, match="has 24 ids, more than the model's vocab_size=23"):
    data.check_task_tokenizer(CharTokenizer(), make_task("arithmetic"), 23)
  with pytest.raises(ValueError, match=r"encodes '77\+1=' in 5 tokens, more than the task's 4 "
                                       r"slots"):
    data.check_task_tokenizer(CharTokenizer(), task, 24)
