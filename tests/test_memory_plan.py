"""experiments/memory_plan.py: the per-device table for a config over mesh shapes."""

import json
import os
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


@pytest.mark.parametrize("args, named", [
    (["--cpu_devices=8", "--mesh_expert=3"], "--mesh_expert=3"),  # does not divide the devices
    (["--cpu_devices=3", "--mesh_expert=3"], "--mesh_expert=3"),  # nor the 8 experts
    (["--mesh_expert=abc"], "--mesh_expert"), (["--mesh_expert="], "--mesh_expert"),
    (["--config.model.top_k=99"], "top_k=99"),
])
def test_bad_flags_are_one_error_line(args, named):
  """Exit code 2 and one `error:` line naming the flag or config value, not a traceback."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  out = _cli.run("experiments.memory_plan", "--config=configs/tiny.py", *args, env=env,
                 timeout=300)
  assert named in _cli.one_error_line(out)
  assert "mesh (data x expert)" not in out.stdout  # every entry is checked before the table
