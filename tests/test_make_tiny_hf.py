"""experiments/make_tiny_hf.py as a command: a bad --out or --initializer_range is one `error:`
line before torch loads (an --out that is a file failed inside save_pretrained), and --seed and
--initializer_range reach the weights. What it writes is tested, loaded by both sides, in
tests/test_hf_experiment.py."""

import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_out_that_is_a_file_is_one_error_line_before_any_work(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  for out, want in ((a_file, f"error: --out={a_file} is a file; give a directory\n"),
                    (a_file / "ckpt", f"error: --out={a_file / 'ckpt'} cannot be created: "
                                      f"{a_file} is a file\n")):
    proc = subprocess.run([sys.executable, "-m", "experiments.make_tiny_hf", f"--out={out}"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr == want, proc.stderr[-2000:]
  assert os.listdir(tmp_path) == ["a_file"] and a_file.read_text() == ""


def test_negative_initializer_range_is_one_error_line():
  proc = subprocess.run([sys.executable, "-m", "experiments.make_tiny_hf",
                         "--initializer_range=-0.1"], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  assert proc.returncode == 2 and proc.stderr == (
      "error: flag --initializer_range=-0.1: --initializer_range must be >= 0 (--helpfull "
      "lists every flag)\n"), proc.stderr[-2000:]


def test_seed_and_initializer_range_flags_reach_the_weights(tmp_path):
  """The command's weights are write_checkpoint's for the same seed and std, bit for bit: a
  flag read but not passed on left its default (seed 0, std 0.02) in force. The std on its
  own: a 64 x 64 projection drawn with std 0.5 has a sample std within 5 % of it."""
  from safetensors.numpy import load_file
  from experiments import make_tiny_hf
  proc = subprocess.run([sys.executable, "-m", "experiments.make_tiny_hf",
                         f"--out={tmp_path / 'cmd'}", "--seed=1", "--initializer_range=0.5"],
                        capture_output=True, text=True, timeout=300, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  cmd = load_file(str(tmp_path / "cmd" / "model.safetensors"))
  same = load_file(make_tiny_hf.write_checkpoint(str(tmp_path / "same"), seed=1,
                                                 initializer_range=0.5) + "/model.safetensors")
  name = "model.layers.0.self_attn.q_proj.weight"
  assert cmd.keys() == same.keys() and all(np.array_equal(cmd[k], same[k]) for k in cmd)
  assert cmd[name].std() == pytest.approx(0.5, rel=0.05)
