"""Tests for pr2_jax.rl.expressions: values, numbers used, and malformed input of the parser."""

import pytest

from pr2_jax.rl import expressions


@pytest.mark.parametrize("text, value, used", [
    ("3*5+8", 23, [3, 5, 8]),
    ("3+5*8", 43, [3, 5, 8]),
    ("(3+5)*8", 64, [3, 5, 8]),
    ("8-5-3", 0, [8, 5, 3]),      # left-associative
    ("8-(5-3)", 6, [8, 5, 3]),
    (" 2 * ( 3 + 4 ) ", 14, [2, 3, 4]),
    ("((7))", 7, [7]),
    ("12*10-3", 117, [12, 10, 3]),
])
def test_evaluate_expression(text, value, used):
  assert expressions.evaluate_expression(text) == (value, used)


@pytest.mark.parametrize("text", ["", "3+", "+3", "-3+5", "3**5", "(3+5", "3+5)", "()", "3 5",
                                  "3/5", "3+5=8", "a", "((((((((((((((((((((((((((((((((((1"
                                  "))))))))))))))))))))))))))))))))))"])
def test_evaluate_expression_malformed(text):
  with pytest.raises(ValueError):
    expressions.evaluate_expression(text)


@pytest.mark.parametrize("text, value", [
    ("2*3*4", 24),
    ("9*9*9", 729),     # the largest default countdown target, as its solution writes it
    ("2*3*4+1", 25),
    ("1+2*3*4", 25),
    ("(1+1)*3*(2+2)", 24),
])
def test_chained_products(text, value):
  """A term is a product of any number of factors: parsing only one '*' per term would reject
  "9*9*9" (a generated Countdown solution) as malformed."""
  assert expressions.evaluate_expression(text)[0] == value


def test_nesting_limit_is_exactly_max_depth():
  """`_MAX_DEPTH` (32) pairs of brackets parse; one more pair is rejected, not 2 more."""
  depth = expressions._MAX_DEPTH
  assert depth == 32
  assert expressions.evaluate_expression("(" * depth + "5" + ")" * depth) == (5, [5])
  with pytest.raises(ValueError, match="nested deeper than 32"):
    expressions.evaluate_expression("(" * (depth + 1) + "5" + ")" * (depth + 1))


def test_number_length_limit_is_18_digits():
  """18 digits (an int64 operand of Arithmetic) parse; a 19-digit number is rejected."""
  assert expressions.evaluate_expression("9" * 18 + "+1") == (10**18, [10**18 - 1, 1])
  with pytest.raises(ValueError, match="too long"):
    expressions.evaluate_expression("1" * 19)


@pytest.mark.parametrize("text", ["\uff13*5+8", "3*\u0665+8", "\u00b2+1", "3\t+5"])
def test_only_ascii_digits_and_spaces(text):
  """Full-width '３', Arabic-Indic '٥' and superscript '²' are str.isdigit() and int() reads
  the first two as 3 and 5; they are not the task's digits, so they are malformed, as a tab is."""
  with pytest.raises(ValueError, match="unexpected character"):
    expressions.evaluate_expression(text)
