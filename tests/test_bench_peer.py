"""experiments/bench_peer.py --quick: the JSON line is complete and both sides compute the same
model.

No assertions on timings (they describe a shared machine): only that every
figure exists, is positive and finite, and that the comparison is apples to
apples: on the shared weights transformers and our model give the same loss
and logits, train the same (loss trace) and decode the same greedy tokens. The formulas from
times to figures (medians, speedups, tokens/s, FLOPs, MFU, the table) are checked by hand on
scripted times, in test_run_figures_from_scripted_times.
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


# bench_peer.mesh_shape reads bench_peer's flags, which clash with bench_model's (see below):
# called in a child, one (devices, --mesh_expert) case per line.
_MESH_SHAPE = """
from absl import flags
from experiments import bench_peer
S = dict(num_experts=16, batch=8, decode_batch=64)
for devices, expert in ((2, 0), (4, 2), (2, 1), (6, 3), (16, 16)):
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["bench_peer", f"--mesh_expert={expert}", "--batch=8"])
  try:
    print(bench_peer.mesh_shape(devices, S))
  except Exception as e:
    print(f"{type(e).__name__}: {e}")
"""


def test_default_devices_and_mesh_shape():
  """One device per core where the batches and experts split evenly; bad meshes name the flag.
  (This tested common.split_mesh_shape, a copy of mesh_shape that no benchmark ran.)"""
  assert [common.devices_dividing(cores, 8, 64, 16) for cores in (1, 2, 3, 4, 6)] == [
      1, 2, 2, 4, 4]
  assert common.devices_dividing(4, 2, 64, 16) == 2
  assert [common.auto_axis(0, 8, 2), common.auto_axis(0, 8), common.auto_axis(3, 8, 2)] == [
      4, 8, 3]
  proc = subprocess.run([sys.executable, "-c", _MESH_SHAPE], capture_output=True, text=True,
                        timeout=120, cwd=_cli.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.splitlines() == [
      "(1, 2)",   # --mesh_expert=0: the experts over every device
      "(2, 2)",
      "(2, 1)",   # data parallel
      "UsageError: --mesh_expert=3 must divide num_experts 16 (default)",
      "UsageError: --batch=8 must be divisible by the 16 devices (one per usable core by "
      "default)"]


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


# bench_peer defines flags (--batch, --seq_len) that bench_model, imported by another test in
# the same worker, defines too: `run` is exercised in a child. Every side is a fake whose calls
# return scripted durations (`timed` returns what the call returns), so each figure of the JSON
# line can be worked by hand. The first call of each is the warm-up round: 100 ms, which would
# move every median it leaked into. Durations in ms; the peak matmul does 1e8 FLOPs a call.
_FAKE_RUN = """
import json, sys, types
import numpy as np
from pr2_jax.parallel.distributed import use_cpu_devices
use_cpu_devices(2)
from experiments import bench_peer, peer_torch
import pr2_jax.hf.checkpoint

MS = {"train": {2: [100, 2, 4, 3], 1: [100, 6, 5, 7], "torch": [100, 12, 9, 10],
                "peak": [100, 0.5, 0.25, 1.0]},
      "decode": {2: [100, 1, 2, 1.5], 1: [100, 3, 3.6, 3], "torch": [100, 6, 3, 4.5]}}
S = dict(bench_peer.QUICK, expert_impl="capacity", lr=1e-4, seed=0, batch=2, seq_len=32,
         decode_batch=2, prompt_len=8, new_tokens=4, rounds=3, warmup=1)
PROMPTS = np.arange(16).reshape(2, 8)
PEER_NEW = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
OURS_NEW = {2: np.array([[1, 2, 3, 0], [0, 6, 7, 8]]),   # first tokens 1 of 2 agree, all 6 of 8
            1: np.array([[1, 2, 3, 4], [5, 6, 7, 0]])}   # 2 of 2 and 7 of 8

def script(times):
  times = [t / 1e3 for t in times]
  return lambda: times.pop(0)

class Ours:
  def __init__(self, cfg, s, tokens_BT, prompts_BP, devices, shape):
    n = len(devices)
    self.mesh = types.SimpleNamespace(shape={"data": shape[0], "expert": shape[1]})
    self.params0, self.batch = None, {"tokens": tokens_BT}
    self.xla_train_flops, self.compile_train_s, self.compile_decode_s = 5e7, 1.0, 2.0
    self.losses, self.train_ms, self.decode_ms = [], script(MS["train"][n]), script(
        MS["decode"][n])
    self.decoded = np.concatenate([PROMPTS, OURS_NEW[n]], axis=1)
    self.loss_offset = 0.001 * n  # the loss trace differs from torch's by this
  def loss(self, params, tokens):
    return 2.5, np.zeros((2, 32, 256))
  def train(self):
    self.losses.append(1.0 + self.loss_offset * len(self.losses))
    return self.train_ms()
  def decode(self):
    return self.decode_ms()

class Torch:
  def __init__(self, path, s, tokens_BT, prompts_BP):
    self.impl, self.losses = {"experts": "eager", "attention": "sdpa"}, []
    self.train_ms, self.decode_ms = script(MS["train"]["torch"]), script(MS["decode"]["torch"])
    self.decoded = np.concatenate([PROMPTS, PEER_NEW], axis=1)
  def forward(self):
    logits = np.zeros((2, 32, 256))
    logits[1, 2, 3] = 0.25
    return 2.5 + 2 ** -10, logits
  def train(self):
    self.losses.append(1.0)
    return self.train_ms()
  def decode(self):
    return self.decode_ms()

class Peak:
  def __init__(self, n):
    self.flops_per_call, self.call = 1e8, script(MS["train"]["peak"])
  def __call__(self):
    return self.call()

bench_peer.Ours, bench_peer.Peak, peer_torch.Torch = Ours, Peak, Torch
bench_peer.timed = lambda fn: fn()
pr2_jax.hf.checkpoint.save_hf_checkpoint = lambda cfg, params, path: None
result = bench_peer.run(S, (1, 2))
result["settings"] = S
print(json.dumps({"result": result, "table": bench_peer.format_table(result)}))
"""


def test_run_figures_from_scripted_times():
  """Every figure of the JSON line from known per-call times, worked by hand: medians over the
  timed rounds only (not the warm-up), speedups torch / ours (higher = ours faster), tokens/s =
  tokens / median, the peak from the FASTEST matmul call and MFU = model FLOP/s / peak, the
  agreement over the new tokens only (not the shared prompt), the table's cells."""
  proc = subprocess.run([sys.executable, "-c", _FAKE_RUN], capture_output=True, text=True,
                        timeout=120, cwd=_cli.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  r, approx = got["result"], pytest.approx
  flops = 38_141_952  # bench_peer.QUICK's model at batch 2 x 32: test_train_model_flops_by_hand
  # Medians (ms) of the timed rounds: ours 3 (1 device: 6), torch 10, peak 0.5 (min 0.25);
  # decode ours 1.5 (1 device: 3), torch 4.5. A train step has 2 x 32 = 64 tokens, a decode
  # 2 x 4 = 8 new ones.
  want = {"train_speedup": 10 / 3, "train_speedup_1dev": 10 / 6,
          "decode_speedup": 3.0, "decode_speedup_1dev": 1.5,
          "ours_train_tokens_per_s": 64 / 3e-3, "ours_1dev_train_tokens_per_s": 64 / 6e-3,
          "torch_train_tokens_per_s": 64 / 10e-3,
          "ours_decode_tokens_per_s": 8 / 1.5e-3, "ours_1dev_decode_tokens_per_s": 8 / 3e-3,
          "torch_decode_tokens_per_s": 8 / 4.5e-3,
          "train_model_flops": flops, "peak_flops_per_s": 1e8 / 0.25e-3,
          "peak_flops_per_s_median": 1e8 / 0.5e-3,
          "train_model_flops_per_s": flops / 3e-3, "train_model_flops_per_s_1dev": flops / 6e-3,
          "mfu": flops / 3e-3 / 4e11, "mfu_1dev": flops / 6e-3 / 4e11,
          "torch_mfu": flops / 10e-3 / 4e11,
          "train_xla_flops": 5e7, "train_xla_flops_per_s": 5e7 / 3e-3,
          "compile_train_s": 1.0, "compile_decode_s": 2.0,
          # The loss traces: ours drifts from torch's 1.0 by 0.002 (0.001) a step, 4 steps
          "train_loss_trace_max_abs_diff": 0.006, "train_loss_trace_max_abs_diff_1dev": 0.003,
          "decode_first_token_agreement": 0.5, "decode_first_token_agreement_1dev": 1.0,
          "decode_token_agreement": 6 / 8, "decode_token_agreement_1dev": 7 / 8,
          "initial_loss_ours": 2.5, "initial_loss_torch": 2.5 + 2 ** -10,
          "initial_loss_abs_diff": 2 ** -10, "initial_logits_max_abs_diff": 0.25}
  assert {k: r[k] for k in want} == approx(want, rel=1e-12)
  assert r["devices"] == 2 and r["mesh"] == {"data": 1, "expert": 2}
  # Only the timed rounds are kept: the 100 ms warm-up calls are in no list.
  assert r["times_s"]["train"]["ours"] == approx([2e-3, 4e-3, 3e-3])
  assert r["times_s"]["decode"]["torch"] == approx([6e-3, 3e-3, 4.5e-3])
  table = got["table"].splitlines()
  assert table[2] == "| train step tokens/s | 21,333 | 10,667 | 6,400 | 3.33x (1.67x) | >= 2x |"
  assert table[3] == "| decode tokens/s | 5,333 | 2,667 | 1,778 | 3.00x (1.50x) | >= 3x |"
  # GFLOP/s (MFU of the 400 GFLOP/s peak): 38.14 M FLOPs in 3, 6 and 10 ms
  assert table[4] == ("| train model GFLOP/s (MFU) | 12.7 (3.2% of 400) | 6.4 (1.6% of 400) "
                      "| 3.8 (1.0%) | | MFU >= 25% |")
  assert table[6] == ("| initial loss | 2.500000 | | 2.500977 | diff 9.8e-04 | same weights |")


def test_train_model_flops_by_hand():
  """PaLM's count at bench_peer's --quick model (d 64, 2 layers, 8 experts top-2 of d_ff 64,
  4 query / 2 kv heads of 16, vocab 256), 2 x 32 tokens: active parameters per layer
  q,o 2 x 64 x 64 + k,v 2 x 64 x 32 = 12,288, router 64 x 8 = 512, two experts 2 x 3 x 64 x 64
  = 24,576; two layers and the LM head 64 x 256: 91,136. 6 x 91,136 x 64 tokens = 34,996,224,
  plus attention 12 x 2 layers x 4 heads x 16 x 32 positions x 64 tokens = 3,145,728.
  In a child: bench_peer's flags (see _FAKE_RUN)."""
  code = ("from experiments import bench_peer as b; from pr2_jax.config import ModelConfig; "
          "s = dict(b.QUICK, expert_impl='capacity'); "
          "print(b.train_model_flops(b.model_config(s), 2, 32))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120, cwd=_cli.REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert float(proc.stdout) == 34_996_224 + 3_145_728
