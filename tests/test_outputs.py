"""Tests for experiments/outputs.py: --out paths checked before any work, atomic JSON, the
command line as typed."""

import json
import os
import sys

import pytest

from experiments import outputs


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
  (tmp_path / "afile").write_text("x")
  for path, want_dir, message in [
      (tmp_path / "afile" / "out.json", False,
       f"cannot be created: {tmp_path / 'afile'} is a file"),
      (tmp_path, False, "is a directory; give a file path"),
      (tmp_path / "afile", True, "is a file; give a directory")]:
    with pytest.raises(SystemExit) as e:
      outputs._check_writable("out", str(path), want_dir)
    assert e.value.code == 2 and message in capsys.readouterr().err
  outputs._check_writable("out", str(tmp_path / "new" / "deeper" / "out.json"), False)
  assert not (tmp_path / "new").exists(), "a check creates nothing"


def test_the_nearest_existing_ancestor_decides(tmp_path, capsys, monkeypatch):
  """Missing directories are walked up one at a time: a file two levels up must still stop the
  path (skipping past it would find tmp_path, a directory, and pass). An ancestor that is not
  writable stops it too (os.access is faked: the suite may run as root, who may write anywhere)."""
  (tmp_path / "afile").write_text("x")
  with pytest.raises(SystemExit) as e:
    outputs._check_writable("out", str(tmp_path / "afile" / "sub" / "out.json"), False)
  assert e.value.code == 2
  assert f"cannot be created: {tmp_path / 'afile'} is a file" in capsys.readouterr().err
  monkeypatch.setattr(outputs.os, "access", lambda path, mode: path != str(tmp_path))
  with pytest.raises(SystemExit) as e:
    outputs._check_writable("out_dir", str(tmp_path / "new" / "deeper"), True)
  assert e.value.code == 2
  assert capsys.readouterr().err == (f"error: --out_dir={tmp_path / 'new' / 'deeper'} cannot be "
                                     f"created: {tmp_path} is not writable\n")
  # An existing directory or file the run cannot write (a read-only mount of a finished run)
  # ended in an OSError traceback at the workdir's lock file; now one line, before any work.
  (tmp_path / "run").mkdir()
  monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
  for name, path, want_dir in (("workdir", tmp_path / "run", True),
                               ("out", tmp_path / "afile", False)):
    with pytest.raises(SystemExit) as e:
      outputs._check_writable(name, str(path), want_dir)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: --{name}={path} is not writable\n"



def test_quick_runs_write_under_the_temp_dir_unless_given_out(tmp_path, monkeypatch):
  from absl import flags as absl_flags
  values = absl_flags.FlagValues()
  out = absl_flags.DEFINE_string("out", "experiments/results/bench_x.json", "", flag_values=values)
  values(["prog"])
  monkeypatch.setattr(outputs.flags, "FLAGS", values)
  assert outputs.output_file(out, quick=True).endswith("pr2_jax_quick/bench_x.json")
  assert outputs.output_file(out) == "experiments/results/bench_x.json"
  values(["prog", f"--out={tmp_path / 'mine.json'}"])
  assert outputs.output_file(out, quick=True) == str(tmp_path / "mine.json")



def test_write_json_replaces_the_file_atomically(tmp_path):
  path = tmp_path / "sub" / "r.json"
  outputs.write_json(str(path), {"b": 1, "a": [1, 2]}, sort_keys=True)
  assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
  assert os.listdir(tmp_path / "sub") == ["r.json"]
  # The caller's json.dump options win over the default indent (make_tiny_hf passes indent=2).
  outputs.write_json(str(path), {"a": [1]}, indent=None)
  assert path.read_text() == '{"a": [1]}\n'
  # A payload json cannot write leaves the old file whole and no temporary file behind.
  with pytest.raises(TypeError):
    outputs.write_json(str(path), {"a": object()})
  assert path.read_text() == '{"a": [1]}\n' and os.listdir(tmp_path / "sub") == ["r.json"]



def test_command_line_is_the_module_form(monkeypatch):
  import types
  main = types.ModuleType("__main__")
  main.__spec__ = types.SimpleNamespace(name="experiments.bench_peer")
  monkeypatch.setitem(sys.modules, "__main__", main)
  monkeypatch.setattr(sys, "argv", ["/work/main/experiments/bench_peer.py", "--quick"])
  assert outputs.command_line() == "python -m experiments.bench_peer --quick"


def test_command_line_of_a_script_run_by_path(monkeypatch):
  """Without a module spec (`python experiments/x.py ...`) it is the script path, then the
  arguments as given."""
  import types
  monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
  monkeypatch.setattr(sys, "argv", ["experiments/bench_peer.py", "--quick", "--out=x.json"])
  assert outputs.command_line() == "python experiments/bench_peer.py --quick --out=x.json"


def test_an_existing_directory_needs_write_and_search_permission(tmp_path, capsys, monkeypatch):
  """A run creates files inside its directory, which takes both write and search (x) access:
  a directory with write but no search access (mode 0o600) failed at the first file written.
  A file needs only write access. os.access is faked to grant everything but X_OK."""
  (tmp_path / "run").mkdir()
  (tmp_path / "out.json").write_text("{}")
  monkeypatch.setattr(outputs.os, "access", lambda path, mode: not mode & os.X_OK)
  outputs._check_writable("out", str(tmp_path / "out.json"), False)  # W_OK alone: passes
  with pytest.raises(SystemExit) as e:
    outputs._check_writable("workdir", str(tmp_path / "run"), True)
  assert e.value.code == 2
  assert capsys.readouterr().err == f"error: --workdir={tmp_path / 'run'} is not writable\n"
