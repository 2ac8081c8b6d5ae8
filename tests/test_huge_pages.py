"""experiments/huge_pages.py: when an entry point re-executes itself with glibc's hugetlb tunable."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from experiments import huge_pages as hp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("text, mode", [
    ("always [madvise] never\n", "madvise"),
    ("[always] madvise never\n", "always"),
    ("always madvise [never]\n", "never"),
    ("garbled\n", ""),
])
def test_thp_mode_is_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hp.thp_mode(str(path)) == mode


def test_thp_mode_without_the_file_is_empty(tmp_path):
  assert hp.thp_mode(str(tmp_path / "missing")) == ""


def test_glibc_version_matches_the_platform_module():
  name, version = platform.libc_ver()
  expected = tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
  assert hp.glibc_version() == expected


GLIBC = (2, 36)


@pytest.mark.parametrize("environ, mode, glibc, tunables", [
    ({}, "madvise", GLIBC, hp.TUNABLE),
    ({"PATH": "/bin"}, "madvise", (2, 35), hp.TUNABLE),  # the first glibc with the tunable
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     "glibc.malloc.arena_max=2:" + hp.TUNABLE),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's choice
    ({"GLIBC_TUNABLES": hp.TUNABLE}, "madvise", GLIBC, None),  # after the re-exec: no loop
    ({hp.OPT_OUT: "0"}, "madvise", GLIBC, None),
    ({}, "always", GLIBC, None),  # huge pages everywhere already
    ({}, "never", GLIBC, None),  # none to be had
    ({}, "", GLIBC, None),
    ({}, "madvise", (2, 34), None),  # older glibc ignores the tunable
    ({}, "madvise", None, None),  # musl, macOS
])
def test_environ_with_huge_pages(environ, mode, glibc, tunables):
  new = hp.environ_with_huge_pages(environ, mode, glibc)
  if tunables is None:
    assert new is None
  else:
    assert new == dict(environ, GLIBC_TUNABLES=tunables)


def _script(path, entry_dir):
  path.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {ROOT!r})
      from experiments import huge_pages
      print("before", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), flush=True)
      huge_pages.reexec_if_useful({str(entry_dir)!r})
      print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], flush=True)
      """))


def _run(path, environ):
  return subprocess.run([sys.executable, str(path), "--flag=1", "x y"], env=environ, check=True,
                        capture_output=True, text=True, timeout=60).stdout.splitlines()


def test_an_entry_point_reexecutes_itself_once_with_the_same_pid_and_arguments(tmp_path):
  environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hp.OPT_OUT)}
  _script(tmp_path / "entry.py", tmp_path)
  lines = _run(tmp_path / "entry.py", environ)
  pid = lines[0].split()[1]
  assert lines[0] == f"before {pid} "
  if hp.environ_with_huge_pages(environ, hp.thp_mode(), hp.glibc_version()) is None:
    assert lines[1:] == [f"after {pid}  ['--flag=1', 'x y']"]  # nothing to gain here: no exec
  else:  # the new image starts from the top, with the tunable, once
    assert lines[1:] == [f"before {pid} {hp.TUNABLE}",
                         f"after {pid} {hp.TUNABLE} ['--flag=1', 'x y']"]
  # Opted out: no exec.
  lines = _run(tmp_path / "entry.py", dict(environ, **{hp.OPT_OUT: "0"}))
  pid = lines[0].split()[1]
  assert lines == [f"before {pid} ", f"after {pid}  ['--flag=1', 'x y']"]


def test_a_script_outside_the_entry_directory_is_never_reexecuted(tmp_path):
  environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  (tmp_path / "other").mkdir()
  _script(tmp_path / "entry.py", tmp_path / "other")  # e.g. pytest or a notebook calling run()
  lines = _run(tmp_path / "entry.py", environ)
  pid = lines[0].split()[1]
  assert lines == [f"before {pid} ", f"after {pid}  ['--flag=1', 'x y']"]
