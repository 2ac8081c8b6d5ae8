"""experiments/bench_peer.py --quick: the JSON line is complete and both sides compute the same
model.

No assertions on timings (they describe a shared machine): only that every
figure exists, is positive and finite, and that the comparison is apples to
apples: on the shared weights transformers and our model give the same loss
and logits, train the same (loss trace) and decode the same greedy tokens.
It runs in a subprocess: the benchmark sets its own device count (one per
core; 2 here, with the experts split over them, plus the one-device
reference), while this test process has conftest's 8 fake devices.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments import allocator, common

import _cli


POSITIVE = ("train_speedup", "decode_speedup", "mfu", "ours_train_tokens_per_s",
            "ours_decode_tokens_per_s", "train_model_flops_per_s",
            # the one-device reference, timed in the same rounds
            "train_speedup_1dev", "decode_speedup_1dev", "mfu_1dev", "ours_1dev_train_tokens_per_s",
            "ours_1dev_decode_tokens_per_s", "train_model_flops_per_s_1dev",
            "torch_train_tokens_per_s", "torch_decode_tokens_per_s", "peak_flops_per_s",
            "train_model_flops", "train_xla_flops")


@pytest.mark.slow  # ~40-60 s on 2 shared cores, mostly XLA compiles
def test_bench_peer_quick(tmp_path):
  out = tmp_path / "peer.json"
  environ = {k: v for k, v in os.environ.items()  # see it re-exec, whatever the caller set
             if k not in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", allocator.CHOICE_VAR)}
  proc = subprocess.run([sys.executable, "-m", "experiments.bench_peer", "--quick",
                         "--cpu_devices=2",
                         "--breakdown=1",
                         f"--out={out}"],
                        check=True, capture_output=True, text=True, timeout=300, env=environ)
  line = json.loads(proc.stdout.strip().splitlines()[-1])
  for key in POSITIVE:
    assert math.isfinite(line[key]) and line[key] > 0, (key, line[key])
  assert set(line["targets_met"]) == {"train_speedup", "decode_speedup", "mfu"}
  assert line["torch_impl"]["experts"]  # which transformers kernels were compared is recorded
  # The same weights through the converter: same loss and logits before any step.
  assert line["initial_loss_abs_diff"] < 1e-5
  assert line["initial_logits_max_abs_diff"] < 1e-4
  assert abs(line["initial_loss_ours"] - line["initial_loss_torch"]) < 1e-5
  assert line["devices"] == 2 and line["mesh"] == {"data": 1, "expert": 2}
  for suffix in ("", "_1dev"):  # two devices with split experts, and one device
    # Same optimizer too: the losses of the timed steps follow the same trace.
    assert line["train_loss_trace_max_abs_diff" + suffix] < 1e-4
    assert line["decode_first_token_agreement" + suffix] == 1.0
  written = json.loads(out.read_text())
  assert written["command"].startswith("python -m experiments.bench_peer --quick")
  assert written["mfu"] == line["mfu"]
  assert written["machine"]["torch"] and "cpu_model" in written["machine"]
  revision = common.source_revision()
  assert {k: written["machine"][k] for k in revision} == revision
  # Both sides ran with the allocator the entry point chose for this machine (allocator.py).
  reexec = allocator.reexec_environ(environ, allocator.thp_mode(), allocator.glibc_version(),
                                    allocator.find_jemalloc(environ))
  assert {k: written["machine"][k] for k in ("allocator", "ld_preload", "malloc_conf",
                                             "glibc_tunables")} == allocator.describe(
      reexec or environ)
  assert written["machine"]["transparent_hugepage"] == allocator.thp_mode()
  # --breakdown: where the time goes, by kind, both sides and phases; the kinds add up.
  breakdown = written["breakdown_ms"]
  for side, phase in [(s, p) for s in ("ours", "torch") for p in ("train", "decode")]:
    kinds = breakdown[side][phase]
    top = [kinds[k] for k in ("matmuls outside attention", "attention core", "other")]
    assert kinds["total"] == pytest.approx(sum(top)) and kinds["total"] > 0, (side, phase)
    assert kinds["matmuls outside attention"] > 0, (side, phase)
    if side == "ours":  # idle cores: part of the wall time of the profiled calls
      assert 0 <= kinds["no op running"] + kinds["one op running"] <= kinds["wall"], phase
  assert "where the time goes" in proc.stdout
  # The table's spread row: each side's fastest and slowest timed call, train then decode.
  times = written["times_s"]
  spread = " / ".join(f"{min(times[p]['ours']):.3f}-{max(times[p]['ours']):.3f}"
                      for p in ("train", "decode"))
  assert f"| train / decode s, min-max | {spread} |" in proc.stdout


def test_default_devices_and_mesh_shape():
  """One device per core where the batches and experts split evenly; bad meshes name the flag."""
  from experiments.common import devices_dividing, split_mesh_shape
  assert [devices_dividing(cores, 8, 64, 16) for cores in (1, 2, 3, 4, 6)] == [1, 2, 2, 4, 4]
  assert devices_dividing(4, 2, 64, 16) == 2
  batches = {"batch": 8, "decode_batch": 64}
  assert split_mesh_shape(2, 0, 16, batches) == (1, 2)   # 0: the experts over every device
  assert split_mesh_shape(4, 2, 16, batches) == (2, 2)
  assert split_mesh_shape(2, 1, 16, batches) == (2, 1)   # data parallel
  with pytest.raises(ValueError, match="--mesh_expert=3"):
    split_mesh_shape(6, 3, 16, batches)
  with pytest.raises(ValueError, match="--batch=8 must be divisible by the 16 devices"):
    split_mesh_shape(16, 16, 16, batches)


@pytest.mark.parametrize("args, named", [
    (["--expert_impl=bogus"], "--expert_impl=bogus"),
    (["--top_k=9"], "top_k=9"),
    (["--mesh_expert=3"], "--mesh_expert=3"),
    # --mesh_expert=0 (the default) splits the experts over the devices the user asked for: the
    # error names --cpu_devices, not a --mesh_expert=3 the user never gave
    (["--cpu_devices=3"], "the 3 devices of --cpu_devices=3 must divide num_experts 8 (--quick)"),
    (["--out={file}/peer.json"], "--out="),
])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, args, named):
  """Exit code 2 and one `error:` line naming the flag the user gave, before anything compiles
  (a --out under a file used to fail after the whole benchmark)."""
  _cli.fails_before_work("experiments.bench_peer", args, tmp_path, named, "--quick")
