"""The C allocator our entry points run with on CPU: jemalloc that keeps freed memory where it
is installed, else glibc's malloc on transparent huge pages.

XLA:CPU allocates a program's temporary buffer on every call (251 MB a device for the peer
benchmark's train step) and frees it afterwards. glibc hands a block that large back to the
kernel on free, so the next call faults every page in again: ~66,000 faults a call with 4 KiB
pages, and on a VM whose host has taken the memory back, a slow step now and then (0.75 s where
0.38 is usual; docs/benchmark_rounds.md, thirteenth round). Two remedies, best first:

- **jemalloc** (`libjemalloc.so.2`, Debian/Ubuntu package `libjemalloc2`) preloaded with
  `MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1`: freed pages stay with the process and the
  next call reuses them, no faults and no slow steps (the peer benchmark's train step 12 %
  faster than the next remedy at its median, fifteenth round). The process keeps its peak
  memory until it exits.
- glibc's `glibc.malloc.hugetlb=1` tunable: malloc asks for 2 MiB transparent huge pages on its
  large mappings, 512 times fewer faults (~25 % faster train steps back to back, tenth round);
  a step after other work can still be slow on such a VM.

Both are read once, when the process starts, so the only way in is the environment of a new
process: `run` in `experiments/cli.py` calls `reexec_if_useful()` first, which `execve`s
the same command line with the settings added when they change anything. `PR2_JAX_MALLOC`
chooses: `auto` (the default: jemalloc if found, else huge pages), `jemalloc` (an error if it
is not installed), `glibc` (huge pages only) or `off`; `PR2_JAX_JEMALLOC` names a jemalloc
outside the system's library directories. The Makefile exports the glibc tunable
for the test suite. Library users running their own scripts set the environment themselves
(README).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
CHOICE_VAR = "PR2_JAX_MALLOC"
PATH_VAR = "PR2_JAX_JEMALLOC"
OLD_OPT_OUT = "PR2_JAX_HUGE_PAGES"  # "0" still means off, as before the choice existed
CHOICES = ("auto", "jemalloc", "glibc", "off")
JEMALLOC = "libjemalloc.so.2"
# No decay: jemalloc otherwise returns pages unused for 10 s to the kernel, and an RL loop's
# train step often comes back to its buffer later than that (after a rollout, an evaluation).
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
            "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu")
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


def find_jemalloc(environ: Mapping[str, str], dirs: Sequence[str] = LIB_DIRS) -> str | None:
  """`PR2_JAX_JEMALLOC` (a jemalloc of the user's) if set, else the first `libjemalloc.so.2`
  in `dirs`, else None; None without looking when `PR2_JAX_MALLOC` does not use jemalloc
  (off, glibc). Raises ValueError if `PR2_JAX_JEMALLOC` names no file."""
  if environ.get(CHOICE_VAR, "auto") in ("off", "glibc") or environ.get(OLD_OPT_OUT) == "0":
    return None  # a stale PR2_JAX_JEMALLOC stopped every entry point, the opt-outs too
  path = environ.get(PATH_VAR)
  if path is not None:
    if not os.path.isfile(path):
      raise ValueError(f"{PATH_VAR}={path!r} is not a file")
    return path
  for d in dirs:
    path = os.path.join(d, JEMALLOC)
    if os.path.isfile(path):
      return path
  return None


def environ_with_huge_pages(environ: Mapping[str, str], mode: str,
                            glibc: tuple[int, int] | None) -> dict[str, str] | None:
  """The environment with glibc's hugetlb tunable, or None when it would change nothing: the C
  library is not glibc >= 2.35 (older ones ignore the tunable), THP is "always" (every mapping
  gets huge pages already) or "never" (none can), or a `glibc.malloc.hugetlb` setting is
  already there (the user's, or ours after a re-exec)."""
  if glibc is None or glibc < (2, 35) or mode != "madvise":
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" in tunables:
    return None
  return dict(environ, GLIBC_TUNABLES=":".join(filter(None, [tunables, TUNABLE])))


def environ_with_jemalloc(environ: Mapping[str, str], path: str) -> dict[str, str] | None:
  """The environment with jemalloc preloaded ahead of the user's `LD_PRELOAD` and our
  `MALLOC_CONF` ahead of theirs (jemalloc applies the settings in order, so theirs win); None
  when a jemalloc is preloaded already (the user's, or ours after a re-exec)."""
  preload = environ.get("LD_PRELOAD", "")
  if "jemalloc" in preload:
    return None
  return dict(environ, LD_PRELOAD=" ".join(filter(None, [path, preload])),
              MALLOC_CONF=",".join(filter(None, [JEMALLOC_CONF, environ.get("MALLOC_CONF", "")])))


def reexec_environ(environ: Mapping[str, str], mode: str, glibc: tuple[int, int] | None,
                   jemalloc: str | None) -> dict[str, str] | None:
  """The environment to re-execute with under `PR2_JAX_MALLOC` (module docstring), or None for
  no re-execution. `mode`: `thp_mode()`, `glibc`: `glibc_version()`, `jemalloc`: its path or
  None. Raises ValueError for an unknown choice, or `jemalloc` asked for and not found."""
  choice = environ.get(CHOICE_VAR, "auto")
  if choice not in CHOICES:
    raise ValueError(f"{CHOICE_VAR}={choice!r}: expected one of {', '.join(CHOICES)}")
  if choice == "off" or environ.get(OLD_OPT_OUT) == "0":
    return None
  if choice == "jemalloc" and jemalloc is None:
    raise ValueError(f"{CHOICE_VAR}=jemalloc, but no {JEMALLOC} in {', '.join(LIB_DIRS)} "
                     "(Debian/Ubuntu: apt-get install libjemalloc2)")
  if choice != "glibc" and jemalloc is not None:
    return environ_with_jemalloc(environ, jemalloc)
  return environ_with_huge_pages(environ, mode, glibc)


def describe(environ: Mapping[str, str]) -> dict[str, str]:
  """What a benchmark records of the allocator this process runs with: the first well-known
  malloc library in `LD_PRELOAD`, else glibc's."""
  preload = environ.get("LD_PRELOAD", "")
  name = next((n for n in ("jemalloc", "tcmalloc", "mimalloc") if n in preload), "glibc")
  return {"allocator": name,
          "ld_preload": preload, "malloc_conf": environ.get("MALLOC_CONF", ""),
          "glibc_tunables": environ.get("GLIBC_TUNABLES", "")}


def reexec_if_useful(entry_dir: str):
  """Replaces this process by the same command line with `reexec_environ`'s settings, when
  there are any and the process was started as a script or module in `entry_dir` (never a
  test runner or notebook that merely calls an entry point's function). The PID stays the
  same. A bad `PR2_JAX_MALLOC` ends the process with a one-line error."""
  main_file = getattr(sys.modules.get("__main__"), "__file__", None) or ""
  if os.path.dirname(os.path.abspath(main_file)) != os.path.abspath(entry_dir):
    return
  try:
    environ = reexec_environ(os.environ, thp_mode(), glibc_version(), find_jemalloc(os.environ))
  except ValueError as e:
    sys.exit(f"error: {e}")
  if environ is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
