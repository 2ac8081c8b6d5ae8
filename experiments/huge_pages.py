"""Transparent huge pages for XLA:CPU's buffers: our entry points re-execute themselves with
glibc's `glibc.malloc.hugetlb=1` tunable.

XLA:CPU allocates a program's temporary buffer on every call (270 MB a device for the peer
benchmark's train step). glibc serves an allocation that large from freshly mapped memory, and
with 4 KiB pages the kernel takes a page fault for every 4 KiB the step first touches: ~66,000
faults a call before the work itself, and every later access walks 4 KiB-page translations.
With the tunable, malloc asks the kernel for transparent huge pages (2 MiB) on its large
mappings (`madvise(MADV_HUGEPAGE)`): 512 times fewer faults and TLB entries. The peer
benchmark's train steps run ~25 % faster with it back to back; on a VM that hands freed memory
back to its host, a step after other work can lose that again (docs/benchmarks.md, tenth round).

glibc reads its tunables once, when the process starts, so the only way in is the environment
of a new process: `run` in `experiments/common.py` calls `reexec_if_useful()` first, which
`execve`s the same command line with the tunable added when it would change anything (Linux,
glibc >= 2.35, THP in `madvise` mode, the tunable not set yet). The Makefile exports it for the
test suite and `make run`. PR2_JAX_HUGE_PAGES=0 turns the re-execution off. Library users
running their own scripts set `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` themselves (README).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PR2_JAX_HUGE_PAGES"
_THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_ENABLED) -> str:
  """The kernel's transparent-huge-page mode, the bracketed word of `path` ("always",
  "madvise" or "never"); "" where there is no such file (not Linux, no THP)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ""
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else ""


def glibc_version() -> tuple[int, int] | None:
  """(major, minor) of the C library if it is glibc, else None."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):
    return None


def environ_with_huge_pages(environ: Mapping[str, str], mode: str,
                            glibc: tuple[int, int] | None) -> dict[str, str] | None:
  """The environment to re-execute with, or None when the tunable would change nothing: the
  user opted out (PR2_JAX_HUGE_PAGES=0), the C library is not glibc >= 2.35 (older ones ignore
  the tunable), THP is "always" (every mapping gets huge pages already) or "never" (none can),
  or a `glibc.malloc.hugetlb` setting is already there (the user's, or ours after a re-exec)."""
  if environ.get(OPT_OUT, "1") == "0" or glibc is None or glibc < (2, 35) or mode != "madvise":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, TUNABLE])))


def reexec_if_useful(entry_dir: str):
  """Replaces this process by the same command line with the tunable, when it helps and the
  process was started as a script or module in `entry_dir` (never a test runner or notebook
  that merely calls an entry point's function). The PID stays the same."""
  main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
  if os.path.dirname(os.path.abspath(main_file)) != os.path.abspath(entry_dir):
    return
  environ = environ_with_huge_pages(os.environ, thp_mode(), glibc_version())
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
