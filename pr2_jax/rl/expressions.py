"""Integer expressions over + - * and brackets: the tokenizer and recursive-descent evaluator.

Countdown (`tasks.py`) scores a completion such as "(8+3)*5-2" by parsing it, never with `eval`:
`evaluate_expression` returns its value and the numbers it used, and raises ValueError on
anything malformed (including nesting deeper than `_MAX_DEPTH`). The parser is self-contained, so
it lives here, apart from the task classes, with its own tests. `apply_op` (one binary operation
on ints; '/' is the exact integer division of `Arithmetic`) is defined here too, so that `tasks`
imports from this module and never the other way round.
"""

from __future__ import annotations

_MAX_DEPTH = 32  # bracket nesting; deeper input is rejected rather than recursing without bound


def apply_op(a: int, op: str, b: int) -> int:
  return {"+": a + b, "-": a - b, "*": a * b}[op] if op != "/" else a // b


def _tokenize(text: str) -> list:
  tokens, i = [], 0
  while i < len(text):
    ch = text[i]
    if ch == " ":
      i += 1
    elif "0" <= ch <= "9":
      j = i
      while j < len(text) and "0" <= text[j] <= "9":
        j += 1
      if j - i > 18:
        raise ValueError(f"number {text[i:j]!r} is too long")
      tokens.append(int(text[i:j]))
      i = j
    elif ch in "+-*()":
      tokens.append(ch)
      i += 1
    else:
      raise ValueError(f"unexpected character {ch!r} at position {i}")
  return tokens


def evaluate_expression(text: str) -> tuple[int, list[int]]:
  """(value, numbers used in order) of an expression over ints, + - * and ().

  Standard precedence, left-associative, no unary minus. Malformed input
  raises ValueError.
  """
  tokens, pos, used = _tokenize(text), 0, []

  def peek():
    return tokens[pos] if pos < len(tokens) else None

  def expr(depth):  # expr := term (('+'|'-') term)*
    nonlocal pos
    value = term(depth)
    while peek() in ("+", "-"):
      op = tokens[pos]
      pos += 1
      value = apply_op(value, op, term(depth))
    return value

  def term(depth):  # term := factor ('*' factor)*
    nonlocal pos
    value = factor(depth)
    while peek() == "*":
      pos += 1
      value *= factor(depth)
    return value

  def factor(depth):  # factor := INT | '(' expr ')'
    nonlocal pos
    tok = peek()
    if isinstance(tok, int):
      pos += 1
      used.append(tok)
      return tok
    if tok == "(":
      if depth >= _MAX_DEPTH:
        raise ValueError(f"brackets nested deeper than {_MAX_DEPTH}")
      pos += 1
      value = expr(depth + 1)
      if peek() != ")":
        raise ValueError(f"missing ')' in {text!r}")
      pos += 1
      return value
    raise ValueError(f"expected a number or '(' but got {'the end' if tok is None else repr(tok)} "
                     f"in {text!r}")

  value = expr(0)
  if pos != len(tokens):
    raise ValueError(f"unexpected {tokens[pos]!r} in {text!r}")
  return value, used
