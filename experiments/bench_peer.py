"""Peer benchmark: our MoETransformer against transformers' Qwen3-MoE (PyTorch), same CPU.

    python -m experiments.bench_peer                  # the default config below, 1-2 min
    python -m experiments.bench_peer --decode_batch=16  # a smaller decode batch
    python -m experiments.bench_peer --quick          # test-sized, ~25 s (~1 min at high load)
    python -m experiments.bench_peer --cpu_devices=1  # ours on one device only
    python -m experiments.bench_peer --breakdown=3    # then profile 3 calls: where the time goes

Both sides hold the SAME weights: ours are initialised, written with
`save_hf_checkpoint` and read by `Qwen3MoeForCausalLM.from_pretrained`, and
both compute the loss and logits of one batch before anything is timed
(their difference is reported). Then, interleaved round by round so machine
load hits both alike (medians after warm-up):
  (a) train step on the same [B, T] batch: forward, backward, clip 1.0, AdamW
      (ours: `supervised.make_train_step`, jitted and donated; torch: the same
      optimizer settings in eager PyTorch);
  (b) rollout decode with a KV cache: greedy, exactly N new tokens after the
      same [B, P] prompts (ours: the jitted `rl.sampler.generate`; torch:
      `model.generate(use_cache=True)`); tokens/s = B*N / time of the call;
  (c) MFU: our train step's model FLOP/s over the best rate of a large jitted
      float32 matmul timed in the same rounds. Model FLOPs are analytic (PaLM
      appendix B): 6 * active params * tokens + 12 * L * H * Z * T * tokens,
      active = attention + router + top-k experts + LM head (the embedding is
      a lookup). XLA's own count of the compiled step is reported beside it.
Both sides use every usable core: torch as that many threads, ours as that
many JAX CPU devices (one per core; `--cpu_devices`, by default the usable
cores that divide the batches and the experts) with the experts split over
them (`--mesh_expert`, 0 = all devices). XLA:CPU runs many of a decode
step's small ops on one thread each, so one device leaves a core idle where
two devices each run their own half. Ours on ONE device is timed in the same
rounds as a second reference column (`--one_device_too`).
Prints a table; the last line is one JSON object (also written to --out).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import cli, common, outputs, peer_torch
from experiments import model_flags  # defines the model-shape flags read below
from pr2_jax.config import EXPERT_IMPLS

_QUICK = flags.DEFINE_bool("quick", False, "Test-sized model and batch, 2 rounds.")
_EXPERT_IMPL = flags.DEFINE_enum("expert_impl", "capacity", EXPERT_IMPLS,
                                 "Our expert path (ModelConfig).")
_BATCH = flags.DEFINE_integer("batch", 8, "Train sequences per step.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Train tokens per sequence.")
_DEC_BATCH = flags.DEFINE_integer("decode_batch", 64,
                                  "Sequences decoded together (an RL rollout batch).")
_PROMPT = flags.DEFINE_integer("prompt_len", 32, "Prompt tokens (no padding).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (each times both sides once).")
_WARMUP = flags.DEFINE_integer(
    "warmup", 3, "Untimed rounds first: our first few train steps run up to 1.8x slower "
    "(docs/benchmark_rounds.md, fifth round).")
_PEAK_N = flags.DEFINE_integer("peak_n", 1024, "Square f32 matmul size for the peak rate.")
_LR = flags.DEFINE_float("lr", 1e-4, "AdamW learning rate (both sides).")
_SEED = flags.DEFINE_integer("seed", 0, "Parameter and token seed.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_peer.json", "JSON result path.")
_MESH_EXPERT = flags.DEFINE_integer(
    "mesh_expert", 0, "Our 'expert' mesh axis over the devices (0 = all of them, 1 = data "
    "parallel); the rest is 'data'.")
_ONE_DEVICE = flags.DEFINE_bool("one_device_too", True,
                                "Also time ours on one device, in the same rounds.")
_BREAKDOWN = flags.DEFINE_integer(
    "breakdown", 0, "If > 0, after the timing profile this many train steps and decodes of ours "
    "and of transformers and print where the time goes by kind (experiments/profile_breakdown).")
cli.at_least(1, "batch", "seq_len", "decode_batch", "prompt_len", "new_tokens", "rounds",
                "peak_n")
cli.at_least(0, "warmup", "mesh_expert", "breakdown")

TARGETS = {"train_speedup": 2.0, "decode_speedup": 3.0, "mfu": 0.25}
QUICK = dict(d_model=64, num_layers=2, num_experts=8, top_k=2, expert_d_ff=64, num_heads=4,
             num_kv_heads=2, head_dim=16, vocab_size=256, batch=2, seq_len=32, decode_batch=2,
             prompt_len=8, new_tokens=8, rounds=2, warmup=1, peak_n=256)


def settings() -> dict:
  """The run's sizes: the flags, with --quick's test sizes where a flag was left at its default."""
  names = list(QUICK) + ["expert_impl", "lr", "seed"]
  s = {n: flags.FLAGS[n].value for n in names}
  if _QUICK.value:
    s.update({n: v for n, v in QUICK.items() if not flags.FLAGS[n].present})
  return s


def mesh_shape(devices: int, s: dict) -> tuple[int, int]:
  """Our (data, expert) mesh over `devices` (--mesh_expert=0: all of them, `common.auto_axis`);
  where it does not split, a UsageError naming the flags the user gave, or the derived values."""
  given = lambda name: model_flags.given(name, s[name], QUICK if _QUICK.value else None)
  expert = common.auto_axis(_MESH_EXPERT.value, devices)
  cpu = flags.FLAGS["cpu_devices"]
  where = f"the {devices} devices " + (f"of --cpu_devices={devices}" if cpu.present and cpu.value
                                       else "(the backend's)" if cpu.present
                                       else "(one per usable core by default)")
  if _MESH_EXPERT.value and devices % expert:
    raise app.UsageError(f"--mesh_expert={expert} must divide {where}")
  if s["num_experts"] % expert:
    raise app.UsageError(
        f"--mesh_expert={expert} must divide {given('num_experts')}" if _MESH_EXPERT.value else
        f"{where} must divide {given('num_experts')}: --mesh_expert=0 puts the experts over "
        "every device (--mesh_expert=1: data parallel)")
  for name in ("batch", "decode_batch"):
    if s[name] % devices:
      raise app.UsageError(f"{given(name)} must be divisible by {where}")
  return devices // expert, expert


def model_config(s):
  from pr2_jax.config import ModelConfig
  return ModelConfig(vocab_size=s["vocab_size"], num_layers=s["num_layers"], d_model=s["d_model"],
                     num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
                     head_dim=s["head_dim"], expert_d_ff=s["expert_d_ff"],
                     num_experts=s["num_experts"], top_k=s["top_k"], expert_impl=s["expert_impl"])


def train_model_flops(cfg, batch: int, seq_len: int) -> float:
  """Analytic train-step FLOPs: 6 N_active per token plus attention's 12 L H Z T (PaLM, app. B)."""
  d, z = cfg.d_model, cfg.head_dim
  attn = d * z * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)      # q, k, v, o projections
  moe = d * cfg.num_experts + cfg.top_k * 3 * d * cfg.expert_d_ff  # router + active experts
  active = cfg.num_layers * (attn + moe) + d * cfg.vocab_size     # + LM head
  tokens = batch * seq_len
  return 6.0 * active * tokens + 12.0 * cfg.num_layers * cfg.num_heads * z * seq_len * tokens


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


class Ours:
  """Our side on a (data, expert) mesh of `devices`: the jitted, donated train step and the
  jitted sampler."""

  def __init__(self, cfg, s, tokens_BT, prompts_BP, devices, shape: tuple[int, int]):
    from pr2_jax.models.transformer import MoETransformer
    from pr2_jax.parallel.mesh import logical_sharding, make_mesh
    from pr2_jax.rl.sampler import SamplerConfig, generate
    from pr2_jax.train.state import create_train_state, make_optimizer
    from pr2_jax.train.supervised import make_train_step, next_token_loss
    self.mesh = make_mesh(*shape, devices)
    self.model, tx = MoETransformer(cfg, self.mesh), make_optimizer(s["lr"], grad_clip=1.0)
    self.state, shardings = create_train_state(self.model, tx, jax.random.key(s["seed"]), self.mesh)
    self.params0 = jax.tree.map(lambda x: x.copy(), self.state.params)  # the step donates state
    rows = logical_sharding(self.mesh, ("batch", "length"))
    self.batch = {"tokens": jax.device_put(tokens_BT, rows),
                  "loss_mask": jax.device_put(np.ones(tokens_BT.shape, np.float32), rows)}
    t0 = time.perf_counter()
    self.step = make_train_step(self.model, tx, self.mesh, shardings).lower(
        self.state, self.batch).compile()
    self.compile_train_s = time.perf_counter() - t0
    cost = self.step.cost_analysis()
    self.xla_train_flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    def loss(params, tokens):
      logits = self.model.apply({"params": params}, tokens).logits
      return next_token_loss(logits, tokens, jnp.ones(tokens.shape))[0], logits
    self.loss = jax.jit(loss)
    self.prompts = jax.device_put(prompts_BP, rows)
    self.prompt_valid = jax.device_put(np.ones(prompts_BP.shape, bool), rows)
    sampling = SamplerConfig(max_new_tokens=s["new_tokens"], temperature=0.0, eos_id=-1)
    t0 = time.perf_counter()
    self.generate = jax.jit(functools.partial(generate, self.model, config=sampling)).lower(
        self.params0, self.prompts, self.prompt_valid, jax.random.key(0)).compile()
    self.compile_decode_s = time.perf_counter() - t0
    self.losses = []

  def train(self):
    self.state, metrics = self.step(self.state, self.batch)
    self.losses.append(float(metrics["loss"]))  # a host sync: the step has finished

  def decode(self):
    self.decoded = np.asarray(
        self.generate(self.params0, self.prompts, self.prompt_valid, jax.random.key(0)).tokens)


class Peak:
  """A jitted n x n float32 matmul on one device: the machine's matrix-multiply rate."""

  def __init__(self, n: int):
    self.a, self.b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32) for i in (1, 2))
    self.matmul = jax.jit(jnp.matmul).lower(self.a, self.b).compile()
    self.flops_per_call = 2.0 * n ** 3

  def __call__(self):
    jax.block_until_ready(self.matmul(self.a, self.b))


def interleaved(pairs: dict, rounds: int, warmup: int) -> dict:
  """Times every callable once per round, alternating the order; {name: [seconds after warm-up]}."""
  times = {name: [] for name in pairs}
  names = list(pairs)
  for r in range(warmup + rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      t = timed(pairs[name])
      if r >= warmup:
        times[name].append(t)
    logging.info("round %d/%d %s", r + 1, warmup + rounds,
                 {n: round(t[-1], 3) for n, t in times.items() if t})
  return times


def run(s, shape: tuple[int, int], one_device_too: bool = True,
        breakdown_calls: int = 0) -> dict:
  """Both sides timed; `shape` is our (data, expert) mesh over all devices. With
  `breakdown_calls`, then profiled that many calls per phase (`profile_breakdown`)."""
  cfg = model_config(s)
  rng = np.random.default_rng(s["seed"])
  tokens_BT = rng.integers(0, cfg.vocab_size, (s["batch"], s["seq_len"])).astype(np.int32)
  prompts_BP = rng.integers(0, cfg.vocab_size,
                            (s["decode_batch"], s["prompt_len"])).astype(np.int32)
  logging.info("compiling our train step and sampler on %d device(s) ...", jax.device_count())
  sides = {"ours": Ours(cfg, s, tokens_BT, prompts_BP, jax.devices(), shape)}
  if one_device_too and jax.device_count() > 1:
    sides["ours_1dev"] = Ours(cfg, s, tokens_BT, prompts_BP, jax.devices()[:1], (1, 1))
  ours = sides["ours"]
  peak_fn = Peak(s["peak_n"])
  from pr2_jax.hf.checkpoint import save_hf_checkpoint
  with tempfile.TemporaryDirectory() as path:
    save_hf_checkpoint(cfg, ours.params0, path)
    peer = peer_torch.Torch(path, s, tokens_BT, prompts_BP)

  # Apples to apples: the same weights give the same loss and logits before any step.
  our_loss, our_logits = jax.device_get(ours.loss(ours.params0, ours.batch["tokens"]))
  peer_loss, peer_logits = peer.forward()
  parity = {"initial_loss_ours": float(our_loss), "initial_loss_torch": peer_loss,
            "initial_loss_abs_diff": abs(float(our_loss) - peer_loss),
            "initial_logits_max_abs_diff": float(np.max(np.abs(our_logits - peer_logits)))}
  logging.info("parity %s", parity)

  train = interleaved(dict({n: o.train for n, o in sides.items()}, torch=peer.train, peak=peak_fn),
                      s["rounds"], s["warmup"])
  decode = interleaved(dict({n: o.decode for n, o in sides.items()}, torch=peer.decode),
                       s["rounds"], s["warmup"])
  med = {k: statistics.median(v) for k, v in train.items()}
  dmed = {k: statistics.median(v) for k, v in decode.items()}
  tokens, new_tokens = s["batch"] * s["seq_len"], s["decode_batch"] * s["new_tokens"]
  model_flops = train_model_flops(cfg, s["batch"], s["seq_len"])
  peak = peak_fn.flops_per_call / min(train["peak"])
  peer_new = peer.decoded[:, s["prompt_len"]:]
  result = dict(
      parity, devices=jax.device_count(), mesh=dict(ours.mesh.shape),
      torch_train_tokens_per_s=tokens / med["torch"],
      torch_decode_tokens_per_s=new_tokens / dmed["torch"],
      peak_flops_per_s=peak, peak_flops_per_s_median=peak_fn.flops_per_call / med["peak"],
      train_model_flops=model_flops, train_xla_flops=ours.xla_train_flops,
      train_xla_flops_per_s=ours.xla_train_flops / med["ours"],
      torch_mfu=model_flops / med["torch"] / peak,  # the same count: what transformers achieves
      compile_train_s=ours.compile_train_s, compile_decode_s=ours.compile_decode_s,
      torch_impl=peer.impl, times_s={"train": train, "decode": decode})
  for name, side in sides.items():
    suffix = name[len("ours"):]  # "" for the headline side, "_1dev" for the reference
    new = side.decoded[:, s["prompt_len"]:]
    result.update({
        f"ours{suffix}_train_tokens_per_s": tokens / med[name],
        f"train_speedup{suffix}": med["torch"] / med[name],
        f"ours{suffix}_decode_tokens_per_s": new_tokens / dmed[name],
        f"decode_speedup{suffix}": dmed["torch"] / dmed[name],
        f"train_model_flops_per_s{suffix}": model_flops / med[name],
        f"mfu{suffix}": model_flops / med[name] / peak,
        f"train_loss_trace_max_abs_diff{suffix}": float(np.max(np.abs(
            np.asarray(side.losses) - np.asarray(peer.losses)))),
        f"decode_first_token_agreement{suffix}": float(np.mean(new[:, 0] == peer_new[:, 0])),
        f"decode_token_agreement{suffix}": float(np.mean(new == peer_new))})
  if breakdown_calls:  # after the timing and the loss traces, which it would disturb
    from experiments import profile_breakdown as pb
    devices = jax.device_count()
    result["breakdown_ms"] = {
        "ours": {"train": pb.jax_breakdown(ours.train, ours.step, breakdown_calls, devices),
                 "decode": pb.jax_breakdown(ours.decode, ours.generate, breakdown_calls,
                                            devices)},
        "torch": {"train": pb.torch_breakdown(peer.train, breakdown_calls),
                  "decode": pb.torch_breakdown(peer.decode, breakdown_calls)}}
  return result


def tokens_of(r: dict) -> int:
  return r["settings"]["batch"] * r["settings"]["seq_len"]


def format_table(r: dict) -> str:
  one = "ours_1dev_train_tokens_per_s" in r
  mesh = "x".join(str(v) for v in r["mesh"].values())
  head = f"| | ours ({r['devices']} dev, mesh {mesh}) |" + (" ours (1 device) |" if one else "")
  rows = [head + " transformers (torch) | ours / torch | target |",
          "|---|---|" + ("---|" if one else "") + "---|---|---|"]

  def row(label, key, fmt, ratio, target):
    cells = [fmt(r[f"ours{key}"])] + ([fmt(r[f"ours_1dev{key}"])] if one else [])
    ratios = f"{r[ratio]:.2f}x" + (f" ({r[ratio + '_1dev']:.2f}x)" if one else "")
    return (f"| {label} | " + " | ".join(cells)
            + f" | {fmt(r[f'torch{key}'])} | {ratios} | {target} |")

  count = lambda v: f"{v:,.0f}"
  rows += [row("train step tokens/s", "_train_tokens_per_s", count, "train_speedup", ">= 2x"),
           row("decode tokens/s", "_decode_tokens_per_s", count, "decode_speedup", ">= 3x")]
  peak = r["peak_flops_per_s"]
  mfu = lambda suffix: (f"{r['train_model_flops_per_s' + suffix] / 1e9:.1f} "
                        f"({100 * r['mfu' + suffix]:.1f}% of {peak / 1e9:.0f})")
  torch_rate = r["train_model_flops"] * r["torch_train_tokens_per_s"] / tokens_of(r)
  rows.append(f"| train model GFLOP/s (MFU) | {mfu('')} |" + (f" {mfu('_1dev')} |" if one else "")
              + f" {torch_rate / 1e9:.1f} ({100 * r['torch_mfu']:.1f}%) | | MFU >= 25% |")
  # The spread shows what a median hides, e.g. steps that re-fault their buffers after other work.
  spread = lambda name: " / ".join(f"{min(r['times_s'][phase][name]):.3f}-"
                                   f"{max(r['times_s'][phase][name]):.3f}"
                                   for phase in ("train", "decode"))
  rows.append(f"| train / decode s, min-max | {spread('ours')} |"
              + (f" {spread('ours_1dev')} |" if one else "") + f" {spread('torch')} | | |")
  rows.append(f"| initial loss | {r['initial_loss_ours']:.6f} |" + (" |" if one else "")
              + f" {r['initial_loss_torch']:.6f} | diff {r['initial_loss_abs_diff']:.1e}"
              + " | same weights |")
  return "\n".join(rows)


def main(argv):
  del argv
  s = settings()
  out = outputs.output_file(_OUT, quick=_QUICK.value)  # a bad path fails now, not after the run
  with model_flags.bad_sizes_exit(QUICK if _QUICK.value else None):  # before any compile
    model_config(s)
  threads = len(os.sched_getaffinity(0))
  if not flags.FLAGS["cpu_devices"].present:  # one JAX device per core torch has a thread on
    flags.FLAGS.cpu_devices = common.devices_dividing(
        threads, s["batch"], s["decode_batch"], s["num_experts"])
  common.setup_devices()
  shape = mesh_shape(jax.device_count(), s)
  import torch
  torch.set_num_threads(threads)
  load_start = os.getloadavg()
  machine = common.machine_info(torch=torch.__version__,
                                transformers=__import__("transformers").__version__)
  result = run(s, shape, _ONE_DEVICE.value, _BREAKDOWN.value)
  result.update(targets_met={k: bool(result[k] >= v) for k, v in TARGETS.items()},
                targets=TARGETS, settings=s, torch_threads=threads,
                load_avg_start=load_start, load_avg_end=os.getloadavg(),
                machine=machine,
                command=outputs.command_line())
  print(format_table(result), flush=True)
  if "breakdown_ms" in result:
    from experiments import profile_breakdown as pb
    print("\nwhere the time goes: op time by kind, ms per call (ours: per device); wall time")
    print(pb.format_table(result["breakdown_ms"]["ours"], result["breakdown_ms"]["torch"]),
          flush=True)
  outputs.write_json(out, result, sort_keys=True)
  logging.info("wrote %s", out)
  summary = {k: v for k, v in result.items()
             if k not in ("times_s", "settings", "machine", "breakdown_ms")}
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.run(main)
