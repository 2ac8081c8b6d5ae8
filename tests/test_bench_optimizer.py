"""experiments/bench_optimizer.py --quick: both clips give the same parameters, ours reads less.

No assertions on timings (they describe a shared machine), only that they exist. In a
subprocess: the benchmark defines flags (--quick, --rounds) that bench_model, imported by
another test in the same worker, defines too.
"""

import json
import math
import subprocess
import sys

import pytest

import _cli


def test_bench_optimizer_quick(tmp_path):
  out = tmp_path / "opt.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_optimizer", "--quick",
                         f"--out={out}"], check=True, capture_output=True, text=True, timeout=300)
  line = json.loads(proc.stdout.strip().splitlines()[-1])
  assert line == {k: v for k, v in json.loads(out.read_text()).items()
                  if k not in ("machine", "model")}
  assert line["command"] == f"python -m experiments.bench_optimizer --quick --out={out}"
  assert "| bytes accessed, MB |" in proc.stdout
  # --quick's model: d_model 64, 2 layers of 8 experts (d_ff 64), 4/2 heads of 16, vocab 256
  attn = 64 * 16 * (4 + 2 + 2 + 4) + 2 * 16  # q, k, v, o and the q/k norms
  layer = attn + 64 * 8 + 8 * 3 * 64 * 64 + 2 * 64  # + router, experts, the two norms
  assert line["param_count"] == 2 * layer + 2 * 256 * 64 + 64  # + embed, LM head, final norm
  assert line["steps"] == 5
  assert line["grad_global_norm"] > 100  # the clip is active
  # the clip's scaled gradient is fused into AdamW's passes, not written out and read twice
  assert line["bytes_ratio"] < 0.8
  assert line["first_step_max_param_diff"] <= 1e-6  # params ~N(0, 1): an ulp or two
  assert line["max_param_diff"] <= 5 * 1e-6
  for side in ("optax", "ours"):
    for key in ("median_ms", "min_ms"):
      assert math.isfinite(line[key][side]) and line[key][side] > 0
    assert line["min_ms"][side] <= line["median_ms"][side]
  # ours / optax, as the table says (by hand: test_run_times_by_hand)
  assert line["time_ratio"] == pytest.approx(line["median_ms"]["ours"] / line["median_ms"]["optax"])


@pytest.mark.parametrize("args, named", [
    (["--top_k=9"], "top_k=9"), (["--num_heads=3"], "num_heads=3"),
    (["--out={file}/opt.json"], "--out="),
])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, args, named):
  """Exit code 2 and one `error:` line naming the value, not a traceback; a --out under a file
  fails before the benchmark, not after it."""
  _cli.fails_before_work("experiments.bench_optimizer", args, tmp_path, named, "--quick")


# In a child (bench_optimizer's flags): `run` at --quick's sizes on a scripted clock. Each
# jax.block_until_ready after an update advances it by the next duration, in call order; the
# sides alternate, ours first in round 0 (its warm-up, 100 ms each, which would move every
# median it leaked into). Durations in ms.
# Rounds 0-3 call ours, optax; optax, ours; ours, optax; optax, ours.
_SCRIPTED = _cli.scripted_clock("bench_optimizer", [100, 100, 4, 2, 3, 5, 10, 9]) + """
size = {k: v for k, v in b.QUICK.items() if k not in ("rounds", "warmup")}
size.update(num_heads=4, num_kv_heads=2, top_k=2)
r = b.run(size, rounds=3, warmup=1, lr=1e-4)
print(json.dumps({k: r[k] for k in ("median_ms", "min_ms", "time_ratio", "steps")}))
"""


def test_run_times_by_hand():
  """Medians and minimums of the timed rounds only, attributed to the side that ran (the order
  flips every round), and time_ratio = ours / optax (below 1: ours faster): optax's timed calls
  take 4, 5, 10 ms, ours 2, 3, 9."""
  proc = subprocess.run([sys.executable, "-c", _SCRIPTED], capture_output=True, text=True,
                        timeout=300, cwd=_cli.REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["median_ms"] == pytest.approx({"optax": 5.0, "ours": 3.0})  # means: 6.3, 4.7
  assert got["min_ms"] == pytest.approx({"optax": 4.0, "ours": 2.0})
  assert got["time_ratio"] == pytest.approx(3 / 5) and got["steps"] == 4
