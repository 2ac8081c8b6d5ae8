"""The Python examples in README.md and docs/results/balance.md run and do what the text says.

Each example is read from the Markdown file itself, so an edit to the docs is tested as
written. (docs/checkpoints.md's example runs at tiny size in tests/test_hf_checkpoint.py;
docs/api.md is generated and checked by tests/test_make_api_docs.py.)
"""

import contextlib
import io
import pathlib
import re
import textwrap

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks(relpath: str) -> list[str]:
  """The ```python blocks of a Markdown file, dedented (a block may sit in a list item)."""
  text = (ROOT / relpath).read_text()
  found = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
  return [textwrap.dedent(code) for _, code in found]


def test_readme_example_replays_the_same_logits():
  blocks = _python_blocks("README.md")
  assert len(blocks) == 1, "README.md's Python examples changed: test each one here"
  names = {}
  exec(blocks[0], names)  # noqa: S102 - our own README
  out, again, config = names["out"], names["again"], names["config"]
  assert out.logits.shape == (2, 8, config.vocab_size)
  assert out.routes.shape == (2, 8, config.num_layers, config.top_k)
  # "replay: same logits": replaying the recorded routes reproduces the forward pass
  np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(out.logits))
  np.testing.assert_array_equal(np.asarray(again.routes), np.asarray(out.routes))


def test_balance_doc_example_prints_the_numbers_in_the_text():
  path = "docs/results/balance.md"
  blocks = _python_blocks(path)
  assert len(blocks) == 1, f"{path}'s Python examples changed: test each one here"
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(blocks[0], {})  # noqa: S102 - our own docs
  got = [float(line.rsplit(" ", 1)[1]) for line in printed.getvalue().splitlines()]
  # The sentence after the example: "prints 1.267 (stickiness 0), 1.143 (...), ..."
  sentence = re.search(r"```\n\n\s*prints (.*?)\. ", (ROOT / path).read_text(), re.S).group(1)
  claimed = [float(x) for x in re.findall(r"(\d+\.\d+) \(", sentence)]
  assert len(claimed) == 4 and got == claimed, (got, sentence)
