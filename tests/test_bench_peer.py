"""experiments/bench_peer.py --quick: the JSON line is complete and both sides compute the same model.

No assertions on timings (they describe a shared machine): only that every
figure exists, is positive and finite, and that the comparison is apples to
apples: on the shared weights transformers and our model give the same loss
and logits, train the same (loss trace) and decode the same greedy tokens.
It runs in a subprocess: the benchmark needs the real device count, while
this test process has conftest's 8 fake devices.
"""

import json
import math
import subprocess
import sys

import pytest

POSITIVE = ("train_speedup", "decode_speedup", "mfu", "ours_train_tokens_per_s",
            "torch_train_tokens_per_s", "ours_decode_tokens_per_s", "torch_decode_tokens_per_s",
            "peak_flops_per_s", "train_model_flops", "train_xla_flops", "train_model_flops_per_s")


@pytest.mark.slow  # ~40-60 s on 2 shared cores, mostly XLA compiles
def test_bench_peer_quick(tmp_path):
  out = tmp_path / "peer.json"
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_peer", "--quick", f"--out={out}"],
                        check=True, capture_output=True, text=True, timeout=300)
  line = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in POSITIVE:
    assert math.isfinite(line[key]) and line[key] > 0, (key, line[key])
  assert set(line["targets_met"]) == {"train_speedup", "decode_speedup", "mfu"}
  assert line["torch_impl"]["experts"]  # which transformers kernels were compared is recorded
  # The same weights through the converter: same loss and logits before any step.
  assert line["initial_loss_abs_diff"] < 1e-5
  assert line["initial_logits_max_abs_diff"] < 1e-4
  assert abs(line["initial_loss_ours"] - line["initial_loss_torch"]) < 1e-5
  # Same optimizer too: the losses of the timed steps follow the same trace.
  assert line["train_loss_trace_max_abs_diff"] < 1e-4
  assert line["decode_first_token_agreement"] == 1.0
  assert json.loads(out.read_text())["mfu"] == line["mfu"]
