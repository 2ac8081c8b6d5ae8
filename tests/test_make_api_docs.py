"""docs/api.md must match the docstrings of the exported names."""

import dataclasses

import pr2_jax
from experiments import make_api_docs


def test_api_page_is_current():
  assert make_api_docs.main(["x", "--check"]) == 0, \
      "docs/api.md is stale: run python -m experiments.make_api_docs"


def test_every_export_is_documented():
  text = make_api_docs.render()
  for name in make_api_docs.public_names():
    assert f"### `{name}`" in text
  assert "plan_placement" in text or "route" in text


def test_an_unknown_argument_is_refused_without_writing(capsys, monkeypatch):
  written = []
  monkeypatch.setattr("builtins.open", lambda *a, **k: written.append(a) or 1 / 0)
  assert make_api_docs.main(["x", "--chek"]) == 2 and not written
  assert capsys.readouterr().err.startswith("error: unknown argument(s) --chek; usage:")
  assert make_api_docs.main(["x", "--help"]) == 0 and not written  # help: the usage, exit 0
  assert capsys.readouterr().out.startswith(make_api_docs.__doc__.strip()[:40])


@dataclasses.dataclass(frozen=True)
class _Toy:
  """A toy.

  width: a docstring line that looks like a field
  """
  width: int = 2          # columns of the thing
  # the mode, above its field:
  mode: str = "a"         # a | b
  depth: int = 3          # rows, with a note that
                          # goes on below
  bare: float = 0.0
  sep: str = "a # b"      # the separator


def test_field_table_reads_the_comments_on_every_field():
  """Fields' meanings live in source comments: trailing, above the field, continued below."""
  table = make_api_docs.field_table(_Toy)
  assert table.splitlines()[1:] == [
      "| field | meaning |", "|---|---|",
      "| `width` | columns of the thing |",
      "| `mode` | the mode, above its field: a / b |",
      "| `depth` | rows, with a note that goes on below |",
      "| `bare` |  |",
      "| `sep` | the separator |"]
  assert make_api_docs.field_table(make_api_docs.render) == ""
  assert "`parent`" not in make_api_docs.field_table(pr2_jax.MoETransformer)  # flax's own


class _WithMethods:
  """A class with methods of every kind."""

  def __call__(self, x, *, scale: float = 1.0):
    """Applies the thing."""

  def shown(self, y):
    """A public method."""

  @staticmethod
  def build(z: int):
    """A static constructor."""

  def undocumented(self):
    pass

  def _private(self):
    """Not part of the API."""


_WithMethods.attached = lambda self: None  # defined elsewhere (a dataclass's replace, say)
_WithMethods.attached.__doc__ = "Not in the class body."


def test_method_entries_list_the_documented_methods_of_the_class_body():
  """A Flax module's forward arguments are in `__call__`'s docstring only: api.md left them
  out (a library user learned that `cache=` needs `positions=` from the error)."""
  text = make_api_docs.method_entries(_WithMethods)
  assert [line for line in text.splitlines() if line.startswith(("####", "def "))] == [
      "#### `_WithMethods.__call__`", "def __call__(x, *, scale: float = 1.0)",
      "#### `_WithMethods.shown`", "def shown(y)",
      "#### `_WithMethods.build`", "def build(z: int)"]
  assert "Applies the thing." in text and "Not part" not in text and "Not in the" not in text
  assert make_api_docs.method_entries(make_api_docs.render) == ""
  page = make_api_docs.render()
  for name in ("MoETransformer.__call__", "Plan.layer"):
    assert f"#### `{name}`" in page
  assert "`positions`\n    must then be given" in page.split("#### `MoETransformer.__call__`")[1]
