"""Benchmark: micro-step expert load balancing with routing foresight.

    python -m experiments.bench_balance            # Qwen3-30B-A3B shape, ~2-4 min on 2 CPUs
    python -m experiments.bench_balance --quick    # smoke test, ~40 s (longer at high load)

(a) planner time: `plan_placement` jitted on CPU for one micro-step (48 layers x
    128 experts, top-8, D=64, 3 slots per device, 4 x 2048 tokens), from loads
    and from routes (loads_from_routes + plan), with method="lpt" from loads,
    against `eplb_rebalance` (numpy) on the same loads. Medians of `--repeats`
    runs over different micro-steps, round-robin, so each planner call starts after
    ~30 ms of host work: XLA's threads have gone idle (on a VM their vCPUs halt) and
    waking them costs ~1-2 ms. `planner_warm` is the same planner in `--repeats`
    calls back to back, as inside a jitted micro-step, where the threads are busy.
(b) imbalance (max / mean device load per micro-step and layer) of the modes
    none / eplb_step / eplb_ema / foresight (+ foresight_lpt: plain LPT,
    stickiness 0; foresight_sticky_lpt: method="lpt") on a synthetic RL-like trace, for
    micro-steps of each of `--micro_seqs` sequences, and (`--rollout`) on a trace
    recorded from our own rollouts (configs/tiny.py's model, `--rollout_model`).
(c) measured wall time of one MoE layer (capacity path, all_to_all) on 8 fake CPU
    devices: dropless static capacity vs foresight capacity with one redundant slot
    per device (`experiments/balance_moe.py`, in a subprocess for its own devices).
(d) a cost model of one RL step (old-log-prob pass + update) at D GPUs for the
    Qwen3-30B-A3B shape: modelled speedup of every mode over `none`.
Prints tables, writes JSON to `--out`; the last line printed is one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from experiments import cli, common, outputs

_QUICK = flags.DEFINE_bool("quick", False, "Tiny sizes: a smoke test of every part (flags given "
                           "explicitly still win).")
_LAYERS = flags.DEFINE_integer("layers", 48, "MoE layers.")
_EXPERTS = flags.DEFINE_integer("experts", 128, "Routed experts per layer.")
_TOP_K = flags.DEFINE_integer("top_k", 8, "Experts per token.")
_DEVICES = flags.DEFINE_integer("devices", 64, "Expert-parallel devices D.")
_SLOTS = flags.DEFINE_integer("slots", 3, "Slots per device S (E/D native + redundant).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
_PLAN_SEQS = flags.DEFINE_integer("plan_seqs", 4, "(a): sequences in the timed micro-step.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "(a): timed planner calls.")
_STEPS = flags.DEFINE_integer("trace_steps", 4, "(b): RL steps in the synthetic trace.")
_SEQS = flags.DEFINE_integer("trace_seqs", 16, "(b): sequences per RL step.")
_MICRO = flags.DEFINE_list("micro_seqs", ["1", "2", "4"], "(b): sequences per micro-step.")
_SKEW = flags.DEFINE_float("skew", 0.3, "(b): std of the stable popularity logits.")
_CLUSTER = flags.DEFINE_integer("cluster", 16, "(b): experts each sequence prefers per layer.")
_BOOST = flags.DEFINE_float("boost", 1.5, "(b): logit boost of a sequence's preferred experts.")
_DRIFT = flags.DEFINE_float("drift", 0.1, "(b): per-step drift of the popularity logits.")
_EMA = flags.DEFINE_float("ema", 0.5, "(b): weight of the past in eplb_ema's average.")
_STICKINESS = flags.DEFINE_float("stickiness", 0.25, "Planner home-rule tolerance.")
_SWEEP = flags.DEFINE_list("sweep_stickiness", ["0", "0.05", "0.5", "1"],
                           "(b, d): other stickiness values tried at --sim_micro_seqs.")
_SWEEP_BW = flags.DEFINE_list("sweep_xfer_gbps", ["200", "450"],
                              "(d): other weight-transfer bandwidths tried.")
_SPLIT_ITERS = flags.DEFINE_integer("split_iters", 8, "Planner water-filling rounds.")
_SIM_MICRO = flags.DEFINE_integer("sim_micro_seqs", 4, "(d): sequences per micro-step.")
_GPU_TFLOPS = flags.DEFINE_float("gpu_tflops", 400.0, "(d): achieved bf16 TFLOP/s per GPU.")
_A2A_GBPS = flags.DEFINE_float("a2a_gbps", 50.0, "(d): all-to-all GB/s per GPU.")
_XFER_GBPS = flags.DEFINE_float("xfer_gbps", 50.0, "(d): weight-transfer GB/s per GPU.")
_MOE = flags.DEFINE_bool("moe", True, "(c): run the measured MoE-layer comparison.")
_MOE_ARGS = flags.DEFINE_list(
    "moe_args", ["--experts=32", "--top_k=4", "--seqs=2", "--seq_len=1024", "--d_model=128",
                 "--d_ff=256", "--repeats=9"], "(c): flags for experiments.balance_moe.")
_ROLLOUT = flags.DEFINE_bool("rollout", True, "(b): also a trace recorded from our own rollouts.")
_ROLLOUT_MODEL = flags.DEFINE_list(
    "rollout_model", ["32", "4", "8", "5", "50"],
    "(b) rollouts: experts, top_k, devices D, slots S, warm-up steps of configs/tiny.py's model.")
_ROLLOUT_BATCH = flags.DEFINE_list("rollout_batch", ["4", "16", "8"],
                                   "(b) rollouts: RL steps, prompts per step, group size.")
_ROLLOUT_MICRO = flags.DEFINE_list("rollout_micro_seqs", ["4", "16", "64"],
                                   "(b) rollouts: sequences per micro-step.")
_SEED = flags.DEFINE_integer("seed", 0, "Trace and shuffling seed.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_balance.json", "JSON output.")
cli.at_least(1, "layers", "experts", "top_k", "devices", "slots", "seq_len", "plan_seqs",
                "repeats", "trace_steps", "trace_seqs", "cluster", "split_iters",
                "sim_micro_seqs")
cli.at_least(0, "skew", "boost", "drift", "ema", "stickiness")
cli.at_least(1e-9, "gpu_tflops", "a2a_gbps", "xfer_gbps")
cli.non_empty("micro_seqs", "rollout_micro_seqs")


# A bad entry failed after JAX had started, a short --rollout_model after the synthetic trace.
cli.numbers_at_least(int, 1, "micro_seqs", "rollout_micro_seqs")
cli.numbers_at_least(int, 0, "rollout_model", count=5)  # warm-up may be 0; the rest below
cli.numbers_at_least(int, 1, "rollout_batch", count=3)
cli.numbers_at_least(float, 0, "sweep_stickiness")
cli.numbers_at_least(float, 1e-9, "sweep_xfer_gbps")

MOE_DEVICES = 8  # (c)'s fake CPU devices
QUICK_MOE = ["--experts=16", "--top_k=2", "--seqs=2", "--seq_len=64", "--d_model=16",
             "--d_ff=16", "--repeats=2"]
QUICK = dict(sweep_stickiness=[], sweep_xfer_gbps=["450"], layers=4, experts=16, top_k=2,
             devices=4, slots=6, seq_len=64, plan_seqs=2,
             repeats=3, trace_steps=2, trace_seqs=4, micro_seqs=["1", "2"], cluster=4,
             sim_micro_seqs=2, rollout_model=["8", "2", "4", "3", "2"],
             rollout_batch=["2", "4", "4"], rollout_micro_seqs=["4", "8"])


def _settings():
  from experiments import balance_traces as bt
  s = {f.name: f.value for f in (_LAYERS, _EXPERTS, _TOP_K, _DEVICES, _SLOTS, _SEQ_LEN,
                                 _PLAN_SEQS, _REPEATS, _STEPS, _SEQS, _MICRO, _SKEW, _CLUSTER,
                                 _BOOST, _DRIFT, _EMA, _STICKINESS, _SPLIT_ITERS, _SIM_MICRO,
                                 _GPU_TFLOPS, _A2A_GBPS, _XFER_GBPS, _SEED, _SWEEP, _SWEEP_BW,
                                 _ROLLOUT_MODEL, _ROLLOUT_BATCH, _ROLLOUT_MICRO)}
  s = {k.replace("trace_steps", "steps").replace("trace_seqs", "seqs"): v for k, v in s.items()}
  if _QUICK.value:  # flags given explicitly still win
    s.update({k.replace("trace_steps", "steps").replace("trace_seqs", "seqs"): v
              for k, v in QUICK.items() if not flags.FLAGS[k].present})
  s["micro_seqs"] = [int(m) for m in s["micro_seqs"]]
  for k in ("rollout_model", "rollout_batch", "rollout_micro_seqs"):
    s[k] = [int(x) for x in s[k]]
  s["sweep_stickiness"] = [float(x) for x in s["sweep_stickiness"]]
  s["sweep_xfer_gbps"] = [float(x) for x in s["sweep_xfer_gbps"]]
  if s["sim_micro_seqs"] not in s["micro_seqs"]:
    raise app.UsageError(f"--sim_micro_seqs={s['sim_micro_seqs']} must be one of --micro_seqs")
  if s["top_k"] >= s["experts"]:  # the synthetic trace draws top_k distinct experts (Gumbel)
    raise app.UsageError(f"--top_k={s['top_k']} must be below --experts={s['experts']}")
  if problem := bt.layout_error(s["experts"], s["top_k"], s["devices"], s["slots"]):
    raise app.UsageError(problem)
  if s["cluster"] > s["experts"]:
    raise app.UsageError(f"--cluster={s['cluster']} must be at most --experts={s['experts']}")
  # A micro-step size that does not divide a step's sequences dropped the rest of them (load
  # covered 96 of 128), one larger than them crashed in numpy after minutes of work.
  _check_divides("micro_seqs", s["micro_seqs"], s["seqs"], "--trace_seqs")
  if _ROLLOUT.value:
    experts, top_k, devices, slots, _ = s["rollout_model"]
    if problem := bt.layout_error(experts, top_k, devices, slots, "rollout_model"):
      raise app.UsageError(problem)
    _, prompts, group = s["rollout_batch"]
    if group < 2:  # GRPO needs two samples a prompt (RLConfig refused it after (a) and (b))
      raise app.UsageError(f"--rollout_batch's group size {group} must be >= 2")
    _check_divides("rollout_micro_seqs", s["rollout_micro_seqs"], prompts * group,
                   "--rollout_batch's prompts x group")
  return s


def _check_divides(name: str, sizes: list[int], total: int, what: str) -> None:
  if bad := [m for m in sizes if total % m]:
    raise app.UsageError(f"--{name} entries {bad} must divide {what} = {total}")


def time_planner(s, rng):
  """(a): ms per micro-step of the jitted planner (from loads, from routes) and of EPLB."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from experiments import balance_traces as bt
  from pr2_jax import balance
  e, d, slots = s["experts"], s["devices"], s["slots"]
  base = rng.normal(0.0, s["skew"], (s["layers"], e)).astype(np.float32)
  micro = [bt.synthetic_routes(rng, base, s["plan_seqs"], s["seq_len"], s["top_k"], s["cluster"],
                               s["boost"]) for _ in range(3)]
  valid = jnp.ones(micro[0].shape[:2], bool)
  prev = jnp.asarray(np.broadcast_to(balance.native_layout(e, d, slots),
                                     (s["layers"], d, slots)))
  kw = dict(stickiness=s["stickiness"], split_iters=s["split_iters"])
  from_loads = bt.plan_fn(d, slots, s["stickiness"], s["split_iters"])  # shared with (b)
  lpt = bt.plan_fn(d, slots, s["stickiness"], s["split_iters"], method="lpt")
  from_routes = jax.jit(lambda r, v, p: balance.plan_placement(
      balance.loads_from_routes(r, v, e), d, slots, p, **kw))
  routes = [jnp.asarray(r) for r in micro]
  loads = [balance.loads_from_routes(r, valid, e) for r in routes]
  t0 = time.perf_counter()
  jax.block_until_ready(from_loads(loads[0], prev))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(from_routes(routes[0], valid, prev))
  jax.block_until_ready(lpt(loads[0], prev))
  times = {"planner": [], "planner_lpt": [], "planner_from_routes": [], "eplb": []}
  timed = common.timed_call
  for i in range(s["repeats"]):  # round-robin, so machine load hits all alike
    j = i % len(routes)
    host_loads = np.asarray(loads[j])
    times["planner"].append(timed(lambda: from_loads(loads[j], prev)))
    # the same input, placed by LPT instead of rounds
    times["planner_lpt"].append(timed(lambda: lpt(loads[j], prev)))
    times["planner_from_routes"].append(timed(lambda: from_routes(routes[j], valid, prev)))
    times["eplb"].append(timed(lambda: balance.eplb_rebalance(host_loads, d * slots, 1, 1, d)))
  # Back to back: XLA's threads stay busy, as inside a jitted micro-step.
  times["planner_warm"] = [timed(lambda: from_loads(loads[i % len(loads)], prev))
                           for i in range(s["repeats"])]
  ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  ms.update({f"{k}_min": 1e3 * min(v) for k, v in times.items()})
  ms["planner_compile_s"] = compile_s
  return ms


def start_moe(args, tmp):
  """(c) in a subprocess with its own fake CPU devices, writing into `tmp`."""
  proc = subprocess.Popen([sys.executable, "-m", "experiments.balance_moe",
                           f"--cpu_devices={MOE_DEVICES}", f"--out={os.path.join(tmp, 'moe.json')}",
                           *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  return proc, tmp


def finish_moe(proc_tmp):
  """(c)'s result; the subprocess's own `error:` line (a bad --moe_args) is this run's error."""
  proc, tmp = proc_tmp
  log, _ = proc.communicate()
  errors = [line for line in log.splitlines() if line.startswith("error: ")]
  if proc.returncode == 2 and errors:
    cli.exit_with_error(f"--moe_args: experiments.balance_moe: {errors[-1][7:]}")
  if proc.returncode:
    raise RuntimeError(f"experiments.balance_moe failed:\n{log}")
  with open(os.path.join(tmp, "moe.json")) as f:
    return json.load(f)


def main(argv):
  del argv
  s = _settings()  # every flag, and the output path, before any work
  moe_args = None
  if _MOE.value:  # checked with balance_moe's own flags: a bad one failed after the rest had run
    from experiments import balance_moe
    moe_args = QUICK_MOE if _QUICK.value and not flags.FLAGS["moe_args"].present else (
        _MOE_ARGS.value)
    if problem := balance_moe.args_error(moe_args, MOE_DEVICES):
      raise app.UsageError(f"--moe_args: {problem}")
  out = outputs.output_file(_OUT, quick=_QUICK.value)
  common.setup_devices()
  machine = common.machine_info()  # at the start: the load before our own work
  # (c) first and alone, so it does not disturb the timings of (a); --quick overlaps it. Its
  # JSON goes to a directory removed at the end (a mkdtemp was left behind by every run).
  with tempfile.TemporaryDirectory(prefix="bench_balance_") as tmp:
    moe_run = start_moe(moe_args, tmp) if moe_args is not None else (None, None)
    try:
      result = _run(s, machine, moe_run)
    finally:
      if moe_run[0] and moe_run[0].poll() is None:  # _run failed before it waited for (c)
        moe_run[0].kill()
        moe_run[0].communicate()
  outputs.write_json(out, result, default=str)
  print(json.dumps(result["summary"]), flush=True)


def _run(s, machine, moe_run) -> dict:
  """(a) to (d), printing their tables; returns the JSON's contents."""
  import numpy as np
  from experiments import balance_traces as bt
  rng = np.random.default_rng(s["seed"])
  t_start = time.perf_counter()
  moe = finish_moe(moe_run) if moe_run[0] and not _QUICK.value else None
  timing = time_planner(s, rng)
  print(f"(a) planner, {s['layers']} layers x {s['experts']} experts, top-{s['top_k']}, "
        f"D={s['devices']}, S={s['slots']}, micro-step {s['plan_seqs']} x {s['seq_len']} tokens")
  for k in ("planner", "planner_warm", "planner_lpt", "planner_from_routes", "eplb"):
    print(f"    {k:<22} median {timing[k]:8.2f} ms   min {timing[k + '_min']:8.2f} ms")
  print(f"    the default (method=\"rounds\") {'meets' if timing['planner'] < 5 else 'misses'} the "
        f"5 ms target ({timing['planner']:.2f} ms median), method=\"lpt\" "
        f"{'meets' if timing['planner_lpt'] < 5 else 'misses'} it ({timing['planner_lpt']:.2f} ms)")

  trace = bt.synthetic_trace(rng, steps=s["steps"], seqs=s["seqs"], seq_len=s["seq_len"],
                             layers=s["layers"], experts=s["experts"], top_k=s["top_k"],
                             skew=s["skew"], cluster=s["cluster"], boost=s["boost"],
                             drift=s["drift"])
  tiny = dict(d_model=64, expert_ff=32, attn_params=64 * 64 * 4, heads_x_dim=64)
  # The rate flags hold in --quick too (its tiny shape ignored them, though it printed them).
  cost = bt.CostModel(seq_len=s["seq_len"], gpu_flops=s["gpu_tflops"] * 1e12,
                      a2a_bytes_per_s=s["a2a_gbps"] * 1e9, xfer_bytes_per_s=s["xfer_gbps"] * 1e9,
                      **(tiny if _QUICK.value else {}))
  imb, sim, sweep = {}, {}, {}
  kw = dict(ema=s["ema"], split_iters=s["split_iters"], seed=s["seed"])
  # foresight_lpt: balance first, plain LPT without home rules; foresight_sticky_lpt: the
  # one-replica-at-a-time placement with the same stickiness as foresight (the old default).
  variants = {"foresight_lpt": {"stickiness": 0.0, "method": "lpt"},
              "foresight_sticky_lpt": {"method": "lpt"}}

  def summarize(res, m, bw=None):
    tokens = m * s["seq_len"]
    c = cost if bw is None else dataclasses.replace(cost, xfer_bytes_per_s=bw * 1e9)
    base = bt.simulate_step(res["none"], tokens, s["devices"], c)
    return {mode: {"mean": float(r["imbalance"].mean()), "max": float(r["imbalance"].max()),
                   "fetches_per_layer_device": float(r["transfers"].mean()),
                   "sim_step_s": bt.simulate_step(r, tokens, s["devices"], c),
                   "sim_speedup": base / bt.simulate_step(r, tokens, s["devices"], c),
                   "sim_speedup_planner_serial": base / bt.simulate_step(
                       r, tokens, s["devices"], c,
                       planner_s=timing["planner"] / 1e3 if mode == "foresight" else 0.0)}
            for mode, r in res.items()}

  print(f"\n(b) imbalance max/mean per (micro-step, layer): mean [max]; {s['steps']} steps x "
        f"{s['seqs']} sequences; foresight stickiness {s['stickiness']}")
  modes = bt.MODES + tuple(variants)
  print(f"    {'seqs/micro':<11}" + "".join(f"{m:>22}" for m in modes))
  for m in s["micro_seqs"]:
    res = bt.evaluate_modes(trace, s["devices"], s["slots"], m, stickiness=s["stickiness"],
                            variants=variants, **kw)
    imb[m] = summarize(res, m)
    print(f"    {m:<11}" + "".join(f"{imb[m][k]['mean']:>14.3f} [{imb[m][k]['max']:5.2f}]"
                                   for k in modes))
    if m == s["sim_micro_seqs"]:
      for bw in s["sweep_xfer_gbps"]:
        sim[bw] = summarize(res, m, bw)
  m = s["sim_micro_seqs"]
  for st in s["sweep_stickiness"]:
    res = bt.evaluate_modes(trace, s["devices"], s["slots"], m, stickiness=st, **kw)
    sweep[st] = {bw: summarize(res, m, bw)["foresight"]
                 for bw in [s["xfer_gbps"]] + s["sweep_xfer_gbps"]}
  sweep[s["stickiness"]] = {bw: (imb[m] if bw == s["xfer_gbps"] else sim[bw])["foresight"]
                            for bw in [s["xfer_gbps"]] + s["sweep_xfer_gbps"]}
  rollout = {}
  if _ROLLOUT.value:  # the same modes on routes our own (tiny, warmed-up) model sampled
    experts, top_k, devices, slots, sft_steps = s["rollout_model"]
    steps, prompts, group = s["rollout_batch"]
    trace_r, seq_len_r = bt.rollout_trace(steps=steps, prompts=prompts, group_size=group,
                                          experts=experts, top_k=top_k, sft_steps=sft_steps,
                                          seed=s["seed"])
    print(f"\n(b) on rollouts of configs/tiny.py's model ({experts} experts, top-{top_k}, "
          f"{sft_steps} warm-up steps): {steps} steps x {prompts * group} sequences of "
          f"{seq_len_r} slots, D={devices}, S={slots}")
    print(f"    {'seqs/micro':<11}" + "".join(f"{m:>22}" for m in modes))
    for mr in s["rollout_micro_seqs"]:
      res = bt.evaluate_modes(trace_r, devices, slots, mr, stickiness=s["stickiness"],
                              variants=variants, **kw)
      rollout[mr] = {k: {"mean": float(r["imbalance"].mean()),
                         "max": float(r["imbalance"].max()),
                         "fetches_per_layer_device": float(r["transfers"].mean())}
                     for k, r in res.items()}
      print(f"    {mr:<11}" + "".join(
          f"{rollout[mr][k]['mean']:>14.3f} [{rollout[mr][k]['max']:5.2f}]" for k in modes))
  if moe_run[0] and moe is None:
    moe = finish_moe(moe_run)
  if moe:
    print(f"\n(c) one MoE layer on {moe['devices']} fake CPU devices, {moe['tokens']} tokens, "
          f"top-{moe['top_k']}, {moe['experts']} experts: capacity static {moe['capacity_static']}"
          f" x {moe['slots_static']} slots, foresight {moe['capacity_foresight']} x "
          f"{moe['slots_foresight']} slots (buffer {moe['buffer_ratio']:.2f}x smaller)")
    for k in ("forward", "train"):
      t = moe[f"{k}_s"]
      print(f"    {k:<8} static {t['static'] * 1e3:8.1f} ms  foresight {t['foresight'] * 1e3:8.1f}"
            f" ms  speedup {moe[k + '_speedup']:.3f}x")

  print(f"\n(d) modelled old-log-prob + update, {s['devices']} GPUs, "
        f"{s['gpu_tflops']:.0f} TFLOP/s, a2a {s['a2a_gbps']:.0f} GB/s: speedup over none "
        "[fetches per layer and device]")
  print(f"    {'seqs/micro':<11}" + "".join(f"{k:>22}" for k in modes) + "   (transfers "
        f"{s['xfer_gbps']:.0f} GB/s)")
  for mi in s["micro_seqs"]:
    print(f"    {mi:<11}" + "".join(
        f"{imb[mi][k]['sim_speedup']:>13.3f}x [{imb[mi][k]['fetches_per_layer_device']:5.2f}]"
        for k in modes))
  print(f"    at {m} seqs/micro, other transfer bandwidths:")
  for bw, row in sim.items():
    print(f"    {bw:>6.0f} GB/s" + "".join(f"{row[k]['sim_speedup']:>13.3f}x        "
                                         for k in modes))
  print(f"    foresight stickiness sweep at {m} seqs/micro: imbalance mean [max], fetches, "
        "speedup per transfer bandwidth")
  for st in sorted(sweep):
    row = sweep[st][s["xfer_gbps"]]
    print(f"    {st:<6} {row['mean']:.3f} [{row['max']:.2f}]  "
          f"{row['fetches_per_layer_device']:5.2f}"
          + "".join(f"  {bw:.0f} GB/s {r['sim_speedup']:.3f}x" for bw, r in sweep[st].items()))
  headline = s["sim_micro_seqs"]
  summary = {
      "planner_ms": round(timing["planner"], 3),
      "planner_ms_warm": round(timing["planner_warm"], 3),
      "planner_ms_lpt": round(timing["planner_lpt"], 3),
      "planner_from_routes_ms": round(timing["planner_from_routes"], 3),
      "eplb_ms": round(timing["eplb"], 3),
      **{f"imbalance_{k}": round(imb[headline][k]["mean"], 4) for k in modes},
      "imbalance_micro_seqs": headline,
      "cpu_moe_speedup": round(moe["train_speedup"], 4) if moe else None,
      "cpu_moe_forward_speedup": round(moe["forward_speedup"], 4) if moe else None,
      "fetches_per_layer_device_foresight": round(
          imb[headline]["foresight"]["fetches_per_layer_device"], 4),
      "fetches_per_layer_device_foresight_sticky_lpt": round(
          imb[headline]["foresight_sticky_lpt"]["fetches_per_layer_device"], 4),
      "sim_speedup": round(imb[headline]["foresight"]["sim_speedup"], 4),
      "sim_speedup_foresight_sticky_lpt": round(
          imb[headline]["foresight_sticky_lpt"]["sim_speedup"], 4),
      "sim_speedup_eplb_step": round(imb[headline]["eplb_step"]["sim_speedup"], 4),
  }
  if rollout:  # at the largest rollout micro-step
    big = max(rollout)
    summary.update({f"rollout_imbalance_{k}": round(rollout[big][k]["mean"], 4) for k in modes},
                   rollout_micro_seqs=big)
  return {"command": outputs.command_line(), "settings": s, "quick": _QUICK.value,
          "timing_ms": timing, "imbalance": imb, "imbalance_rollout": rollout, "moe": moe,
          "simulation_bandwidth": sim, "stickiness_sweep": sweep,
          "cost_model": dataclasses.asdict(cost), "summary": summary,
          "machine": dict(machine, load_avg_at_end=os.getloadavg()),
          "wall_s": time.perf_counter() - t_start}


if __name__ == "__main__":
  cli.run(main)
