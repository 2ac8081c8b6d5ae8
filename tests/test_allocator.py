"""experiments/allocator.py: when and how an entry point re-executes itself with jemalloc or
glibc's hugetlb tunable."""

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from experiments import allocator as alloc

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
  assert alloc.thp_mode(str(path)) == mode


def test_thp_mode_without_the_file_is_empty(tmp_path):
  assert alloc.thp_mode(str(tmp_path / "missing")) == ""


def test_glibc_version_matches_the_platform_module():
  name, version = platform.libc_ver()
  expected = tuple(int(p) for p in version.split(".")[:2]) if name == "glibc" else None
  assert alloc.glibc_version() == expected


GLIBC = (2, 36)


@pytest.mark.parametrize("environ, mode, glibc, tunables", [
    ({}, "madvise", GLIBC, alloc.TUNABLE),
    ({"PATH": "/bin"}, "madvise", (2, 35), alloc.TUNABLE),  # the first glibc with the tunable
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "madvise", GLIBC,
     "glibc.malloc.arena_max=2:" + alloc.TUNABLE),  # the user's tunables are kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", GLIBC, None),  # the user's choice
    ({"GLIBC_TUNABLES": alloc.TUNABLE}, "madvise", GLIBC, None),  # after the re-exec: no loop
    ({}, "always", GLIBC, None),  # huge pages everywhere already
    ({}, "never", GLIBC, None),  # none to be had
    ({}, "", GLIBC, None),
    ({}, "madvise", (2, 34), None),  # older glibc ignores the tunable
    ({}, "madvise", None, None),  # musl, macOS
])
def test_environ_with_huge_pages(environ, mode, glibc, tunables):
  new = alloc.environ_with_huge_pages(environ, mode, glibc)
  if tunables is None:
    assert new is None
  else:
    assert new == dict(environ, GLIBC_TUNABLES=tunables)


def test_a_missing_own_jemalloc_stops_only_the_choices_that_use_it(tmp_path):
  """PR2_JAX_MALLOC=off (the documented opt-out) or glibc with a PR2_JAX_JEMALLOC naming no
  file ended every entry point with 'is not a file' (the audit's reproducer)."""
  stale = {alloc.PATH_VAR: str(tmp_path / "nope.so")}
  for opt_out in ({alloc.CHOICE_VAR: "off"}, {alloc.CHOICE_VAR: "glibc"}, {alloc.OLD_OPT_OUT: "0"}):
    assert alloc.find_jemalloc({**stale, **opt_out}) is None
  for uses_it in ({}, {alloc.CHOICE_VAR: "auto"}, {alloc.CHOICE_VAR: "jemalloc"}):
    with pytest.raises(ValueError, match="nope.so' is not a file"):
      alloc.find_jemalloc({**stale, **uses_it})


def test_find_jemalloc_takes_the_first_directory_that_has_it(tmp_path):
  dirs = [tmp_path / d for d in ("a", "b", "c")]
  for d in dirs:
    d.mkdir()
  for d in dirs[1:]:
    (d / alloc.JEMALLOC).write_bytes(b"")
  (dirs[0] / alloc.JEMALLOC).mkdir()  # not a file
  assert alloc.find_jemalloc({}, [str(d) for d in dirs]) == str(dirs[1] / alloc.JEMALLOC)
  assert alloc.find_jemalloc({}, [str(dirs[0]), str(tmp_path / "missing")]) is None
  # The user's own, wherever it is; a path that is not a file is an error, not a silent default.
  own = tmp_path / "my" / "libjemalloc.so"
  own.parent.mkdir()
  own.write_bytes(b"")
  assert alloc.find_jemalloc({alloc.PATH_VAR: str(own)}, [str(dirs[1])]) == str(own)
  with pytest.raises(ValueError, match=r"PR2_JAX_JEMALLOC='.*/nope.so' is not a file"):
    alloc.find_jemalloc({alloc.PATH_VAR: str(tmp_path / "nope.so")}, [str(dirs[1])])
  with pytest.raises(ValueError, match=r"PR2_JAX_JEMALLOC='.*/my' is not a file"):
    alloc.find_jemalloc({alloc.PATH_VAR: str(own.parent)}, [str(dirs[1])])  # a directory


JE = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"


@pytest.mark.parametrize("environ, preload, conf", [
    ({}, JE, alloc.JEMALLOC_CONF),
    # The user's preloads and settings are kept, theirs after ours: jemalloc's later ones win.
    ({"LD_PRELOAD": "/x/libfoo.so", "MALLOC_CONF": "narenas:4,dirty_decay_ms:100"},
     JE + " /x/libfoo.so", alloc.JEMALLOC_CONF + ",narenas:4,dirty_decay_ms:100"),
    ({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, None, None),  # the user's jemalloc
    ({"LD_PRELOAD": JE, "MALLOC_CONF": alloc.JEMALLOC_CONF}, None, None),  # after the re-exec
])
def test_environ_with_jemalloc(environ, preload, conf):
  new = alloc.environ_with_jemalloc(environ, JE)
  if preload is None:
    assert new is None
  else:
    assert new == dict(environ, LD_PRELOAD=preload, MALLOC_CONF=conf)


@pytest.mark.parametrize("choice, jemalloc, expected", [
    (None, JE, "jemalloc"),  # auto: jemalloc when installed
    ("auto", JE, "jemalloc"),
    ("auto", None, "glibc"),  # else huge pages
    ("jemalloc", JE, "jemalloc"),
    ("glibc", JE, "glibc"),
    ("off", JE, None),
    ("off", None, None),
])
def test_reexec_environ_follows_the_choice(choice, jemalloc, expected):
  environ = {"PATH": "/bin"} if choice is None else {
      "PATH": "/bin", alloc.CHOICE_VAR: choice}
  new = alloc.reexec_environ(environ, "madvise", GLIBC, jemalloc)
  want = {"jemalloc": alloc.environ_with_jemalloc(environ, JE),
          "glibc": alloc.environ_with_huge_pages(environ, "madvise", GLIBC), None: None}[expected]
  assert new == want
  assert alloc.reexec_environ(dict(environ, **{alloc.OLD_OPT_OUT: "0"}), "madvise", GLIBC,
                           jemalloc) is None  # the earlier opt-out still turns it all off
  # Only its "0" meant off: "1" (on, as it was by default) changes nothing.
  on = {alloc.OLD_OPT_OUT: "1"}
  assert alloc.reexec_environ(dict(environ, **on), "madvise", GLIBC, jemalloc) == (
      None if want is None else dict(want, **on))


def test_reexec_environ_rejects_a_bad_choice_and_a_missing_jemalloc():
  with pytest.raises(ValueError, match=r"PR2_JAX_MALLOC='tcmalloc': expected one of auto, "):
    alloc.reexec_environ({alloc.CHOICE_VAR: "tcmalloc"}, "madvise", GLIBC, JE)
  with pytest.raises(ValueError, match=r"no libjemalloc.so.2 in .*apt-get install libjemalloc2"):
    alloc.reexec_environ({alloc.CHOICE_VAR: "jemalloc"}, "madvise", GLIBC, None)


def test_describe_names_the_allocator():
  assert alloc.describe({"LD_PRELOAD": JE, "MALLOC_CONF": "x:1"}) == {
      "allocator": "jemalloc", "ld_preload": JE, "malloc_conf": "x:1", "glibc_tunables": ""}
  tcmalloc = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # a user's own choice
  assert alloc.describe({"LD_PRELOAD": tcmalloc})["allocator"] == "tcmalloc"
  assert alloc.describe({"LD_PRELOAD": "/x/libfoo.so"})["allocator"] == "glibc"
  assert alloc.describe({"GLIBC_TUNABLES": alloc.TUNABLE}) == {
      "allocator": "glibc", "ld_preload": "", "malloc_conf": "", "glibc_tunables": alloc.TUNABLE}


_SETTINGS = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", alloc.CHOICE_VAR,
             alloc.PATH_VAR, alloc.OLD_OPT_OUT)


def _script(path, entry_dir):
  path.write_text(textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, {ROOT!r})
      from experiments import allocator
      names = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
      show = lambda: [os.environ.get(k, "") for k in names]
      # Not flushed: stdout is a pipe, so only reexec_if_useful's flush keeps this line.
      print("before", os.getpid(), *show(), sep="|")
      allocator.reexec_if_useful({str(entry_dir)!r})
      print("after", os.getpid(), *show(), sys.argv[1:], sep="|", flush=True)
      """))


def _run(path, environ, check=True):
  return subprocess.run([sys.executable, str(path), "--flag=1", "x y"], env=environ, check=check,
                        capture_output=True, text=True, timeout=60)


def _clean_environ(**settings):
  # Buffered stdout, as an entry point's in a pipe: what it printed before the exec is kept
  # only if reexec_if_useful flushes it.
  environ = {k: v for k, v in os.environ.items() if k not in _SETTINGS + ("PYTHONUNBUFFERED",)}
  return dict(environ, **settings)


def test_an_entry_point_reexecutes_itself_once_with_the_same_pid_and_arguments(tmp_path):
  # A stand-in for jemalloc: the dynamic loader reports that it cannot preload an empty file and
  # goes on, so what the re-execution passes on is visible on any machine.
  fake = tmp_path / "libjemalloc.so.2"
  fake.write_bytes(b"")
  _script(tmp_path / "entry.py", tmp_path)
  for settings, want in [
      ({alloc.PATH_VAR: str(fake)}, [str(fake), alloc.JEMALLOC_CONF, ""]),
      ({alloc.CHOICE_VAR: "glibc"}, ["", "", alloc.TUNABLE]),
  ]:
    environ = _clean_environ(**settings)
    expected = alloc.reexec_environ(environ, alloc.thp_mode(), alloc.glibc_version(), str(fake))
    lines = _run(tmp_path / "entry.py", environ).stdout.splitlines()
    pid = lines[0].split("|")[1]
    assert lines[0] == f"before|{pid}|||"
    if expected is None:  # huge pages change nothing on this machine: no exec
      assert settings == {alloc.CHOICE_VAR: "glibc"}
      assert lines[1:] == [f"after|{pid}||||['--flag=1', 'x y']"]
    else:  # the new image starts from the top, with the settings, once
      assert [expected.get(k, "") for k in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")] == want
      shown = "|".join(want)
      assert lines[1:] == [f"before|{pid}|{shown}", f"after|{pid}|{shown}|['--flag=1', 'x y']"]
  # Opted out: no exec.
  for opt_out in ({alloc.CHOICE_VAR: "off"}, {alloc.OLD_OPT_OUT: "0"}):
    lines = _run(tmp_path / "entry.py", _clean_environ(**opt_out, **{alloc.PATH_VAR: str(fake)}))
    lines = lines.stdout.splitlines()
    pid = lines[0].split("|")[1]
    assert lines == [f"before|{pid}|||", f"after|{pid}||||['--flag=1', 'x y']"]


def test_a_bad_setting_ends_the_entry_point_with_one_line(tmp_path):
  _script(tmp_path / "entry.py", tmp_path)
  done = _run(tmp_path / "entry.py", _clean_environ(**{alloc.CHOICE_VAR: "tcmalloc"}),
              check=False)
  assert done.returncode == 1
  assert done.stderr == ("error: PR2_JAX_MALLOC='tcmalloc': expected one of auto, jemalloc, "
                         "glibc, off\n")


def test_a_script_outside_the_entry_directory_is_never_reexecuted(tmp_path):
  (tmp_path / "other").mkdir()
  _script(tmp_path / "entry.py", tmp_path / "other")  # e.g. pytest or a notebook calling run()
  lines = _run(tmp_path / "entry.py", _clean_environ()).stdout.splitlines()
  pid = lines[0].split("|")[1]
  assert lines == [f"before|{pid}|||", f"after|{pid}||||['--flag=1', 'x y']"]


def test_a_module_run_with_dash_m_is_reexecuted_as_a_module(tmp_path):
  """Entry points run as `python -m experiments.X`: the new image must be started the same way
  (sys.orig_argv). Re-executed as the file (sys.argv[0]), its directory, not the current one,
  heads sys.path: `experiments` then came from wherever else it was installed (another
  checkout) or not at all. The script above is a file either way, so it cannot tell."""
  fake = tmp_path / "libjemalloc.so.2"
  fake.write_bytes(b"")
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  _script(pkg / "entry.py", pkg)
  with open(pkg / "entry.py", "a") as f:
    f.write("print('spec', __spec__ and __spec__.name, sys.orig_argv[1:3], sep='|')\n")
  environ = _clean_environ(**{alloc.PATH_VAR: str(fake)})
  lines = subprocess.run([sys.executable, "-m", "pkg.entry", "--flag=1"], env=environ, check=True,
                         capture_output=True, text=True, timeout=60, cwd=tmp_path).stdout
  lines = lines.splitlines()
  assert [line.split("|")[0] for line in lines] == ["before", "before", "after", "spec"]
  assert lines[1].split("|")[2] == str(fake)  # the re-executed image, with the preload
  assert lines[3] == "spec|pkg.entry|['-m', 'pkg.entry']"


def test_jemalloc_takes_our_settings():
  """The real jemalloc reads JEMALLOC_CONF as meant: no decay of dirty or muzzy pages (a typo
  in a key is only a warning on stderr, and the process runs on with jemalloc's 10 s decay).
  Its own report of the options in force, as JSON, at exit; the user's settings come after
  ours. Without a jemalloc on the machine, the settings are checked against its manual's
  option names (opt.dirty_decay_ms, opt.muzzy_decay_ms; -1 = never decay)."""
  assert dict(kv.split(":") for kv in alloc.JEMALLOC_CONF.split(",")) == {
      "dirty_decay_ms": "-1", "muzzy_decay_ms": "-1"}
  jemalloc = alloc.find_jemalloc({})
  if jemalloc is None:  # CI machines may lack it (apt-get install libjemalloc2)
    return
  user = {"MALLOC_CONF": "stats_print:true,stats_print_opts:J"}
  environ = dict(_clean_environ(), **alloc.environ_with_jemalloc(user, jemalloc))
  done = subprocess.run([sys.executable, "-c", "pass"], env=environ, check=True,
                        capture_output=True, text=True, timeout=60)
  assert "Invalid conf" not in done.stderr, done.stderr[:500]
  opt = json.loads(done.stderr)["jemalloc"]["opt"]
  assert (opt["dirty_decay_ms"], opt["muzzy_decay_ms"]) == (-1, -1)
