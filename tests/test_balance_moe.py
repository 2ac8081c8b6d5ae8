"""experiments/balance_moe.py ((c) of bench_balance) as a command: its flags checked before any
work (as bench_balance checks its --moe_args, `args_error`), one `error:` line each, and a small
run that writes its JSON into a new directory and says so. The measurement itself runs in
tests/test_bench_balance.py."""

import json
import os
import subprocess
import sys

import pytest

from experiments import balance_moe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--experts=4", "--top_k=2", "--seqs=1", "--seq_len=8", "--cluster=2", "--d_model=4",
         "--d_ff=4", "--repeats=1"]


def _run(*args):
  return subprocess.run([sys.executable, "-m", "experiments.balance_moe", *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args, want", [
    (["--experts=0"], "flag --experts=0: --experts must be >= 1"),
    (["--experts=6"], "--experts=6 must be a multiple of the 4 devices"),
    (["--experts=8", "--cluster=20"], "--cluster=20 must be at most --experts=8"),
    (["--experts=8", "--top_k=8"], "--top_k=8 must be below --experts=8"),
    (["--seqs=1", "--seq_len=3"], "--seqs x --seq_len = 1 x 3 = 3 tokens must split evenly over "
     "the 4 devices"),
    (["--bogus"], "Unknown command line flag 'bogus'")])
def test_args_error_names_the_flag(args, want):
  """Each of these failed in numpy or the layout code after JAX had started."""
  assert want in balance_moe.args_error(["--cpu_devices=4", *args], 8)
  assert balance_moe.args_error(SMALL, 4) is None


@pytest.mark.parametrize("args, want", [
    (["--cpu_devices=4", "--experts=6"], "error: --experts=6 must be a multiple of the 4 devices"),
    (["--top_k=0"], "error: flag --top_k=0: --top_k must be >= 1"),
    (["--out=FILE/x.json"], "cannot be created")])
def test_bad_flag_is_one_error_line_before_any_work(tmp_path, args, want):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  proc = _run(f"--out={tmp_path / 'x.json'}",
              *(a.replace("FILE", str(a_file)) for a in args))
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and want in line, line
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_writes_json_into_a_new_directory_and_says_so(tmp_path):
  out = tmp_path / "new" / "moe.json"
  proc = _run("--cpu_devices=2", f"--out={out}", *SMALL)
  assert proc.returncode == 0, proc.stderr[-2000:]
  result = json.loads(out.read_text())
  assert result["devices"] == 2 and result["tokens"] == 8 and result["max_abs_diff"] < 1e-5
  assert proc.stdout.splitlines() == [
      f"wrote {out}: 2 devices, 8 tokens, train speedup {result['train_speedup']:.3f}x, forward "
      f"{result['forward_speedup']:.3f}x (static / foresight capacity)"]
