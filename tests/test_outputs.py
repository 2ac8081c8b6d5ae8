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



def test_command_line_is_the_module_form(monkeypatch):
  import types
  main = types.ModuleType("__main__")
  main.__spec__ = types.SimpleNamespace(name="experiments.bench_peer")
  monkeypatch.setitem(sys.modules, "__main__", main)
  monkeypatch.setattr(sys, "argv", ["/work/main/experiments/bench_peer.py", "--quick"])
  assert outputs.command_line() == "python -m experiments.bench_peer --quick"
