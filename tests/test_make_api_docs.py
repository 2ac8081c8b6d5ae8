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
  assert make_api_docs.main(["x", "--help"]) == 2 and not written
  assert capsys.readouterr().err.startswith("error: unknown argument(s) --help; usage:")


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
