"""experiments/memory_plan.py: the per-device table for a config over mesh shapes."""

import json
import os
import re
import subprocess
import sys

import pytest

import _cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_memory_plan_table_and_json():
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-m", "experiments.memory_plan", "--config=configs/tiny.py",
                        "--cpu_devices=8", "--mesh_expert=1,4,8"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  rows = result["rows"]
  assert (result["devices"] == 8
          and [(r["data"], r["expert"]) for r in rows] == [(8, 1), (2, 4), (1, 8)])
  # More expert parallelism, less per device; AdamW keeps two moments per parameter.
  assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
  for r in rows:
    assert abs(r["opt_state"] - 2 * r["params"]) <= 16  # plus a step counter
  # The tiny config's experts: 2 layers x 8 experts x 3 x 64 x 64 float32, split 8 ways at 1 x 8.
  expert_bytes = 2 * 8 * 3 * 64 * 64 * 4
  assert rows[0]["params"] - rows[2]["params"] == expert_bytes - expert_bytes // 8
  # fsdp splits d_model over 'data' as well: less per device wherever 'data' > 1, the
  # same at 1 x 8; params, AdamW moments and gradients alike.
  assert rows[0]["fsdp_total"] < rows[1]["fsdp_total"] < rows[1]["total"]
  assert rows[2]["fsdp_total"] == rows[2]["total"]


def test_memory_plan_table_shows_the_json_in_gib():
  """A 2^21-token vocabulary makes the tiny model's embedding and LM head 2 x 2^21 x 64 float32
  = 1 GiB (the rest is ~0.4 MiB; shapes only, nothing is allocated). Hand-worked, every row
  reads params 1.00, AdamW 2.00 (two moments), grads 1.00 (one per parameter), total 4.00; fsdp
  at 2 x 4 splits both over 'data' (2.00). The test above sees only the JSON, so a column
  showing another field, or GiB taken as 10^9 bytes, passed it."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  args = ["--config=configs/tiny.py", "--cpu_devices=8", "--mesh_expert=4,8",
          "--config.model.vocab_size=2097152"]
  out = subprocess.run([sys.executable, "-m", "experiments.memory_plan", *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  rows = json.loads(lines[-1])["rows"]
  start = next(i for i, line in enumerate(lines) if "mesh (data x expert)" in line) + 1
  table = [line.split() for line in lines[start:-2]]
  assert table == [["2", "x", "4", "1.00", "2.00", "1.00", "4.00", "2.00"],
                   ["1", "x", "8", "1.00", "2.00", "1.00", "4.00", "4.00"]]
  assert "params GiB" in lines[start - 1]
  assert re.fullmatch(r"parameters: 268\.\d\dM", lines[-2])  # 2 x 2^21 x 64 = 268.4 M, + 0.2 M
  for row, cells in zip(rows, table):
    assert row["grads"] == row["params"]
    want = [row[k] / 2**30 for k in ("params", "opt_state", "grads", "total", "fsdp_total")]
    assert [float(c) for c in cells[3:]] == pytest.approx(want, abs=0.005)


def test_a_small_config_is_shown_in_a_unit_it_fills():
  """configs/tiny.py's state is ~1 MiB: in GiB every cell read 0.00 and the count 0.00B."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = subprocess.run([sys.executable, "-m", "experiments.memory_plan", "--config=configs/tiny.py",
                        "--mesh_expert=1"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  (row,) = json.loads(lines[-1])["rows"]
  assert 2**20 <= row["total"] < 2**30 and "total MiB" in lines[-4]
  assert float(lines[-3].split()[6]) == pytest.approx(row["total"] / 2**20, abs=0.005)
  assert re.fullmatch(r"parameters: \d+\.\d\dK", lines[-2]), lines[-2]


@pytest.mark.parametrize("args, named", [
    (["--cpu_devices=8", "--mesh_expert=3"], "--mesh_expert=3"),  # does not divide the devices
    (["--cpu_devices=3", "--mesh_expert=3"], "--mesh_expert=3"),  # nor the 8 experts
    (["--mesh_expert=abc"], "--mesh_expert"), (["--mesh_expert="], "--mesh_expert"),
    (["--mesh_expert=0"], "--mesh_expert"),  # was n % 0 if the validator let it through
    (["--cpu_devices=8", "--mesh_expert=8,3"], "--mesh_expert=3"),  # the 2nd entry too, first
    (["--config.model.top_k=99"], "top_k=99"),
])
def test_bad_flags_are_one_error_line(args, named):
  """Exit code 2 and one `error:` line naming the flag or config value, not a traceback."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = _cli.run("experiments.memory_plan", "--config=configs/tiny.py", *args, env=env,
                 timeout=300)
  assert named in _cli.one_error_line(out)
  assert "mesh (data x expert)" not in out.stdout  # every entry is checked before the table
