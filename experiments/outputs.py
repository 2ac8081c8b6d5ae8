"""Where entry points write: output paths checked before any work, atomic JSON, the command.

A bad `--out` used to fail only when the results were written, after minutes of work; a
`--quick` smoke run wrote over the recorded results in experiments/results/.
"""

import json
import os
import sys
import tempfile

from absl import flags

from experiments.cli import exit_with_error


def _check_writable(name: str, path: str, want_dir: bool) -> None:
  """Exits with an error line unless `path` is, or can be created as, a file (or directory):
  checked before any work, since a bad --out used to fail only when the results were written.
  Creates nothing (bad input must not leave directories behind)."""
  kind = "a directory" if want_dir else "a file path"
  if os.path.exists(path):
    if os.path.isdir(path) != want_dir:
      exit_with_error(f"--{name}={path} is {'a file' if want_dir else 'a directory'}; give {kind}")
    if not os.access(path, os.W_OK | os.X_OK if want_dir else os.W_OK):
      exit_with_error(f"--{name}={path} is not writable")
    return
  ancestor = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(ancestor):
    ancestor = os.path.dirname(ancestor)
  if not os.path.isdir(ancestor):
    exit_with_error(f"--{name}={path} cannot be created: {ancestor} is a file")
  if not os.access(ancestor, os.W_OK | os.X_OK):
    exit_with_error(f"--{name}={path} cannot be created: {ancestor} is not writable")


def output_file(flag, quick: bool = False) -> str:
  """The file a `--out`-style flag names, checked before any work (`_check_writable`). A
  `--quick` smoke run not given the flag writes under the temp directory instead of over the
  recorded results in experiments/results/."""
  path = flag.value
  if quick and not flags.FLAGS[flag.name].present:
    path = os.path.join(tempfile.gettempdir(), "pr2_jax_quick", os.path.basename(path))
  _check_writable(flag.name, path, want_dir=False)
  return path


def output_dir(name: str, path: str) -> str:
  """A directory flag's value (`--out_dir`, `--workdir`), checked before any work."""
  _check_writable(name, path, want_dir=True)
  return path


def command_line() -> str:
  """How this run was started, as a user would retype it: `python -m experiments.X ARGS`
  (sys.argv[0] is the script's absolute path under `-m`)."""
  main = sys.modules.get("__main__")
  module = getattr(getattr(main, "__spec__", None), "name", None)
  start = ["python", "-m", module] if module else ["python", sys.argv[0]]
  return " ".join(start + sys.argv[1:])


def write_json(path: str, payload: dict, **dump_kwargs) -> None:
  """Writes JSON atomically (a temporary file renamed over `path`): an interrupted write
  never leaves a torn results file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "w") as f:
      json.dump(payload, f, **{"indent": 1, **dump_kwargs})
      f.write("\n")
    os.replace(tmp, path)
  finally:  # a payload json cannot write (or a full disk) leaves no temporary file behind
    if os.path.exists(tmp):
      os.remove(tmp)
