"""experiments/balance_moe.py ((c) of bench_balance) as a command: its flags checked before any
work (as bench_balance checks its --moe_args, `args_error`), one `error:` line each, and a small
run that writes its JSON into a new directory and says so. The measurement itself runs in
tests/test_bench_balance.py."""

import json
import os
import subprocess
import sys

import numpy as np
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
  # The derived numbers are those of the measured ones: static / foresight, buffer slots x
  # capacity (E/D native slots static, one more foresight).
  assert (result["slots_static"], result["slots_foresight"]) == (2, 3)
  assert result["buffer_ratio"] == pytest.approx(
      2 * result["capacity_static"] / (3 * result["capacity_foresight"]))
  for key, times in (("forward_speedup", "forward_s"), ("train_speedup", "train_s")):
    assert result[key] == pytest.approx(result[times]["static"] / result[times]["foresight"])
  assert result["train_s"] != result["forward_s"]
  assert proc.stdout.splitlines() == [
      f"wrote {out}: 2 devices, 8 tokens, train speedup {result['train_speedup']:.3f}x, forward "
      f"{result['forward_speedup']:.3f}x (static / foresight capacity)"]


def test_capacity_is_the_largest_count_of_one_source_shard_in_one_slot():
  """Tokens are split over source shards in contiguous blocks (shard 0 holds the first N/D):
  [N=6, K=2] on 2 shards of 3 tokens. Shard 0 sends slot 1 three assignments (shard 1: at most
  2 to a slot): 3. Interleaved shards (token i on shard i % 2) would give 2, slot 1's total
  over both shards 4."""
  slot_ids_NK = np.array([[1, 0], [1, 2], [1, 3],    # shard 0: slot 1 x3
                          [0, 2], [0, 3], [3, 1]])   # shard 1: slots 0 x2, 3 x2, 2, 1
  assert balance_moe._capacity(slot_ids_NK, 4, 2) == 3
  assert balance_moe._capacity(slot_ids_NK[3:], 4, 1) == 2  # one shard: plain bincount max
  assert balance_moe._capacity(slot_ids_NK, 4, 6) == 1  # a token per shard, distinct slots
