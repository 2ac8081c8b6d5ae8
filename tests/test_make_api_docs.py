"""docs/api.md must match the docstrings of the exported names."""

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
