"""The docs as published: the Python examples in README.md and docs/results/balance.md run and
do what the text says, and every `python -m experiments.X ...` command in README.md and docs/
names flags and config keys that exist, with values they accept.

Examples and commands are read from the Markdown files themselves, so an edit to the docs (or a
renamed flag or config field) is tested as written. (docs/checkpoints.md's example runs at tiny
size in tests/test_hf_checkpoint.py; docs/api.md is generated and checked by
tests/test_make_api_docs.py.)
"""

import contextlib
import io
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))

# Runs an entry point as a script up to its flag parsing: cli.run parses and validates the
# flags (and the --config.* overrides, at definition), then returns instead of running main.
_PARSE_ONLY = """
import runpy, sys
from experiments import cli
module, sys.argv = sys.argv[1], ["prog"] + sys.argv[2:]
cli.run = lambda main: cli.parse_flags(sys.argv)
names = runpy.run_module("experiments." + module, run_name="__main__")
config = names.get("_CONFIG")
if config is not None and "rl" in config.value:  # an RL experiment (not a model-only config)
  from pr2_jax.rl.config import ExperimentConfig
  try:
    ExperimentConfig.from_dict(cli.config_value(config).to_dict())
  except ValueError as e:
    if "is not a directory" not in str(e):  # the docs' checkpoint paths are placeholders
      raise
"""


def _python_blocks(relpath: str) -> list[str]:
  """The ```python blocks of a Markdown file, dedented (a block may sit in a list item)."""
  text = (ROOT / relpath).read_text()
  found = re.findall(r"^( *)```python\n(.*?)^\1```", text, re.S | re.M)
  return [textwrap.dedent(code) for _, code in found]


def _run(code: str) -> tuple[dict, str]:
  """The names the example defines and what it prints."""
  names, printed = {}, io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(code, names)  # noqa: S102 - our own docs
  return names, printed.getvalue()


def test_readme_has_the_examples_tested_here():
  assert len(_python_blocks("README.md")) == 3, "README.md's examples changed: test each one"


def test_readme_example_replays_the_same_logits():
  names, _ = _run(_python_blocks("README.md")[0])
  out, again, config = names["out"], names["again"], names["config"]
  assert out.logits.shape == (2, 8, config.vocab_size)
  assert out.routes.shape == (2, 8, config.num_layers, config.top_k)
  # "replay: same logits": replaying the recorded routes reproduces the forward pass
  np.testing.assert_array_equal(np.asarray(again.logits), np.asarray(out.logits))
  np.testing.assert_array_equal(np.asarray(again.routes), np.asarray(out.routes))
  # The decode lines: the prefill's last logits are the forward's, and the cached step's are
  # those of a forward over the 9 tokens (no cache) at the last position.
  pre, step, model, params = names["pre"], names["step"], names["model"], names["params"]
  np.testing.assert_allclose(pre.logits[:, 0], out.logits[:, -1], rtol=1e-5, atol=1e-5)
  nine = np.concatenate([np.asarray(names["tokens"]), np.asarray(names["next_token"])], 1)
  full = model.apply({"params": params}, nine)
  assert step.logits.shape == (2, 1, config.vocab_size)
  np.testing.assert_allclose(step.logits[:, 0], full.logits[:, -1], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(step.routes[:, 0]), np.asarray(full.routes[:, -1]))


def test_readme_pr2_example_prints_what_the_text_says():
  _, printed = _run(_python_blocks("README.md")[1])
  # The line after the example: "prints `top-2 agreement with the moved router: R3 ..., PR2 ...`"
  claimed = re.search(r"```\nprints `(.*?)`", (ROOT / "README.md").read_text()).group(1)
  number = lambda text, label: float(re.search(label + r" (\d\.\d+)", text).group(1))  # noqa: E731
  for label in ("R3", "PR2"):  # within a few of the 1,024 choices (another CPU may round apart)
    assert abs(number(printed, label) - number(claimed, label)) <= 0.005, (printed, claimed)
  assert number(printed, "PR2") > number(printed, "R3") + 0.1  # the predictor recovers the drift


def test_readme_balance_example_prints_what_the_text_says():
  _, printed = _run(_python_blocks("README.md")[2])
  claimed = re.search(r"```\nprints `(max / mean device load.*?)`",
                      (ROOT / "README.md").read_text()).group(1)
  assert printed.strip() == claimed  # numpy's seeded routes and a deterministic planner


def test_balance_doc_example_prints_the_numbers_in_the_text():
  path = "docs/results/balance.md"
  blocks = _python_blocks(path)
  assert len(blocks) == 1, f"{path}'s Python examples changed: test each one here"
  _, printed = _run(blocks[0])
  got = [float(line.rsplit(" ", 1)[1]) for line in printed.splitlines()]
  # The sentence after the example: "prints 1.267 (stickiness 0), 1.143 (...), ..."
  sentence = re.search(r"```\n\n\s*prints (.*?)\. ", (ROOT / path).read_text(), re.S).group(1)
  claimed = [float(x) for x in re.findall(r"(\d+\.\d+) \(", sentence)]
  assert len(claimed) == 4 and got == claimed, (got, sentence)


def _commands() -> list[tuple[str, str, tuple[str, ...]]]:
  """(file, entry point, args) of every distinct `python -m experiments.X` command in the docs:
  continuation lines joined, comments dropped, the multi-host examples' placeholders filled."""
  found = {}
  for relpath in DOCS:
    text = (ROOT / relpath).read_text()
    for m in re.finditer(r"python -m experiments\.(\w+)((?:[^\n`&;|\\]|\\\n)*)", text):
      raw = re.sub(r"#.*", "", m.group(2).replace("\\\n", " "))
      raw = raw.replace("$i", "0").replace("=N ", "=2 ").replace("=RANK", "=0")
      found.setdefault((m.group(1), tuple(shlex.split(raw))), relpath)
  return [(relpath, module, args) for (module, args), relpath in found.items()]


def test_the_docs_have_commands():
  files = {relpath for relpath, _, _ in _commands()}
  assert {"README.md", "docs/benchmarks.md", "docs/scaling.md"} <= files


@pytest.mark.parametrize("relpath,module,args", _commands(),
                         ids=lambda v: v if isinstance(v, str) else " ".join(v)[:60])
def test_doc_command_parses(relpath, module, args):
  proc = subprocess.run([sys.executable, "-c", _PARSE_ONLY, module, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, f"{relpath}: python -m experiments.{module} {' '.join(args)}\n" \
                               f"{proc.stderr[-2000:]}"


def test_real_checkpoint_doc_says_what_a_moved_checkpoint_does():
  # The page said the checkpoint directory's path was not part of a run's identity, "so a moved
  # checkpoint still resumes"; the resume compares it and refuses (pr2_jax/rl/records.py).
  from pr2_jax.rl import records
  from pr2_jax.rl.config import ExperimentConfig
  config = ExperimentConfig.from_dict({"model": {}, "sft": {}, "rl": {}, "pr2": {}})
  text = " ".join((ROOT / "docs/real_checkpoint.md").read_text().split())
  assert "hf_checkpoint" in records.run_identity(config)
  assert "The directory's path is part of that identity too" in text
  assert "a moved checkpoint still resumes" not in text
