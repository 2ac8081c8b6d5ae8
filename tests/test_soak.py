"""experiments/soak.py --quick runs end to end and reports what docs/results/soak.md relies on."""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = {"rss_growth_frac", "recompiles_after_warmup", "steps", "metrics_ok", "skipped_updates",
        "rss_current_growth_frac", "seconds_per_step_after_warmup"}


@pytest.mark.slow
def test_soak_quick_reports_json(tmp_path):
  out = tmp_path / "soak.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.soak", "--quick", f"--out={out}",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = json.loads(proc.stdout.strip().splitlines()[-1])
  assert set(last) == KEYS
  assert last["steps"] == 6 and last["metrics_ok"] and last["skipped_updates"] == 0
  # Everything compiles in the 3 warm-up steps (an evaluation and a checkpoint included):
  # a recompilation in steps 4-6 is a real regression (a shape or a static argument that changes).
  assert last["recompiles_after_warmup"] == 0
  saved = json.loads(out.read_text())
  assert KEYS <= set(saved)
  assert [s["step"] for s in saved["per_step"]] == list(range(1, 7))
  assert saved["peak_rss_mb_end"] >= saved["peak_rss_mb_after_warmup"] > 0
  assert saved["compiles_in_warmup"] > 0, "the compile counter must see the warm-up compiles"
  assert saved["metrics"]["rl_rows"] == 6 and not saved["metrics"]["problems"]
