"""experiments/make_tiny_hf.py as a command: a bad --out is one `error:` line before torch loads
(an --out that is a file failed inside save_pretrained). What it writes is tested, loaded by
both sides, in tests/test_hf_experiment.py."""

import os
import subprocess
import sys

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
