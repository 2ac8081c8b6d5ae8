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
