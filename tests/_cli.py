"""Runs an entry point as a user does (`python -m experiments.X`), for the tests of its errors.

A bad flag must give exit code 2 and one `error:` line naming it, before any work: not a
traceback, not the whole help, and not a failure after minutes of compiling.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_REEXEC = {"PR2_JAX_MALLOC": "off"}  # a run that fails need not re-launch itself on jemalloc


def run(module: str, *argv: str, env: dict | None = None, timeout: float = 120):
  env = dict(os.environ if env is None else env, **NO_REEXEC)
  return subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def one_error_line(proc) -> str:
  """The run's only `error:` line, asserting exit code 2 and no traceback."""
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  return errors[0]


def fails_before_work(module: str, args, tmp_path, named: str, *fixed: str, env=None,
                      seconds: float = 60) -> None:
  """`module` with `fixed` + `args` fails with one error line naming `named`, within `seconds`
  and writing nothing. In `args`, {file} is a file in tmp_path (a path under it cannot be
  created); --out defaults to tmp_path/out.json, which must not appear."""
  (tmp_path / "file").write_text("")
  out = tmp_path / "out.json"
  argv = [a.format(file=tmp_path / "file") for a in args]
  argv += [] if any(a.startswith("--out=") for a in argv) else [f"--out={out}"]
  start = time.monotonic()
  line = one_error_line(run(module, *fixed, *argv, env=env))
  assert named in line, line
  assert time.monotonic() - start < seconds and not out.exists()  # nothing compiled or written


def says_it_is_a_library(module: str, user: str) -> None:
  """A library module of experiments/ run as a command, even with --help: nothing on stdout
  and one `error:` line that names the command using it (it used to do nothing at all)."""
  proc = run(module, "--help")
  line = one_error_line(proc)
  assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1
  assert line.startswith(f"error: {module} is a library module"), line
  assert f"python -m {user}" in line, line


def scripted_clock(module: str, durations_ms: list[float]) -> str:
  """Source for a child process (`python -c`): `experiments.<module>` imported as `b`, its
  clock scripted: each `jax.block_until_ready` advances `b.time.perf_counter` by the next of
  `durations_ms`, in call order, so a benchmark's medians and ratios can be worked by hand.
  The caller appends what to run (a child: the benchmarks' flags clash within one process)."""
  return (f"import json, sys, types\nimport jax\nfrom experiments import {module} as b\n"
          f"durations = {list(durations_ms)!r}\nnow = [0.0]\n"
          "def advance(x):\n  now[0] += durations.pop(0) / 1e3\n  return x\n"
          "jax.block_until_ready = advance\n"
          "b.time = types.SimpleNamespace(perf_counter=lambda: now[0])\n")
