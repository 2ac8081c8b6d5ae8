"""(c) of bench_balance: measured MoE-layer wall time, static dropless vs foresight capacity.

Dimension legend:
  N tokens, K top-k, E experts, D fake CPU devices ('expert' mesh axis), S slots per
  device, C per-(source shard, slot) capacity, d model width, F expert width.

One MoE layer (`moe_experts`, capacity path, all_to_all over 'expert') runs the
same skewed micro-step two ways:
  static:    native layout (S = E/D), capacity = the largest (source shard, expert)
             count, i.e. the smallest dropless buffer for that layout;
  foresight: `plan_placement` with one redundant slot per device and
             `assign_replicas`, capacity = the largest (source shard, slot) count.
Both are dropless, so their outputs agree; the wall-time ratio of forward and of
forward+backward is what a smaller padded buffer buys on this machine (fake CPU
devices share the host's cores, so time tracks total work, not the busiest device).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
from absl import flags

from experiments import cli, common, outputs

# JAX and the model code are imported where used: bench_balance imports this module for
# `define_flags` and `settings_error`, to check its --moe_args before any work.


def _capacity(slot_ids_NK, num_slots, shards):
  """Largest count of one source shard's assignments to one slot."""
  n = slot_ids_NK.shape[0]
  block_NK = np.repeat(np.arange(n) // (n // shards), slot_ids_NK.shape[1]).reshape(n, -1)
  return int(np.bincount((block_NK * num_slots + slot_ids_NK).ravel(),
                         minlength=shards * num_slots).max())


def _time(fns, args, repeats):
  """Median seconds per call of each function, timed round-robin (so load hits all alike)."""
  import jax
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def measure_moe(expert_ids_NK, *, num_experts, d_model, d_ff, repeats, seed=0):
  """Returns a dict of capacities, wall times and speedups (static / foresight)."""
  import jax
  import jax.numpy as jnp

  from pr2_jax import balance
  from pr2_jax.models.experts import ExpertWeights
  from pr2_jax.parallel.expert_parallel import moe_experts
  from pr2_jax.parallel.mesh import make_mesh
  from pr2_jax.parallel.replica_fetch import fetch_slabs
  num_devices = jax.device_count()
  n, k = expert_ids_NK.shape
  per = num_experts // num_devices
  slots = per + 1
  mesh = make_mesh(1, num_devices)
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (n, d_model), jnp.float32)
  gates = jax.nn.softmax(jax.random.normal(keys[1], (n, k)), axis=-1)
  w = ExpertWeights(*(0.1 * jax.random.normal(kk, shape) for kk, shape in zip(
      keys[2:], ((num_experts, d_model, d_ff),) * 2 + ((num_experts, d_ff, d_model),))))
  ids = jnp.asarray(expert_ids_NK, jnp.int32)

  loads = balance.loads_from_routes(ids[None, :, None, :], None, num_experts)
  plan = balance.plan_placement(loads, num_devices, slots)
  slot_ids = balance.assign_replicas(ids, None, plan.layer(0), num_source_shards=num_devices)
  slot_expert = plan.slot_expert.reshape(-1)
  cap_static = _capacity(np.asarray(expert_ids_NK), num_experts, num_devices)
  cap_fs = _capacity(np.asarray(slot_ids), num_devices * slots, num_devices)

  def static(x, w):
    return moe_experts(x, ids, gates, w, mesh=mesh, capacity=cap_static)[0]

  def foresight(x, w):
    return moe_experts(x, ids, gates, w, mesh=mesh, capacity=cap_fs, slot_expert_X=slot_expert,
                       slot_ids_NK=slot_ids)[0]

  def train(fn):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w) ** 2), argnums=(0, 1)))

  y_static, y_fs = jax.jit(static)(x, w), jax.jit(foresight)(x, w)
  max_diff = float(jnp.max(jnp.abs(y_static - y_fs)))
  fwd = _time({"static": jax.jit(static), "foresight": jax.jit(foresight)}, (x, w), repeats)
  bwd = _time({"static": train(static), "foresight": train(foresight)}, (x, w), repeats)
  return {"devices": num_devices, "tokens": n, "top_k": k, "experts": num_experts,
          "fetched_experts": int(fetch_slabs(slot_expert, num_experts, num_devices)),
          "slots_static": per, "slots_foresight": slots,
          "capacity_static": cap_static, "capacity_foresight": cap_fs,
          "buffer_ratio": (per * cap_static) / (slots * cap_fs),
          "forward_s": fwd, "train_s": bwd, "max_abs_diff": max_diff,
          "forward_speedup": fwd["static"] / fwd["foresight"],
          "train_speedup": bwd["static"] / bwd["foresight"]}


def define_flags(flag_values=flags.FLAGS):
  """This command's flags, defined in `flag_values` (bench_balance parses its --moe_args with
  them in a FlagValues of its own), with their bounds."""
  fv = flag_values
  flags.DEFINE_integer("experts", 32, "Experts (a multiple of the device count).", flag_values=fv)
  flags.DEFINE_integer("top_k", 4, "Experts per token (fewer than --experts).", flag_values=fv)
  flags.DEFINE_integer("seqs", 2, "Sequences in the micro-step.", flag_values=fv)
  flags.DEFINE_integer("seq_len", 1024, "Tokens per sequence (seqs x seq_len: a multiple of the "
                       "device count).", flag_values=fv)
  flags.DEFINE_integer("cluster", 4, "Experts each sequence prefers (at most --experts).",
                       flag_values=fv)
  flags.DEFINE_float("boost", 2.0, "Logit boost of preferred experts.", flag_values=fv)
  flags.DEFINE_float("skew", 0.5, "Std of the popularity logits.", flag_values=fv)
  flags.DEFINE_integer("d_model", 128, "Model width.", flag_values=fv)
  flags.DEFINE_integer("d_ff", 256, "Expert hidden width.", flag_values=fv)
  flags.DEFINE_integer("repeats", 5, "Timed calls per variant.", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "Seed.", flag_values=fv)
  flags.DEFINE_string("out", "/tmp/balance_moe.json", "JSON output.", flag_values=fv)
  for minimum, names in ((1, ("experts", "top_k", "seqs", "seq_len", "cluster", "d_model",
                              "d_ff", "repeats")), (0, ("boost", "skew"))):
    for name in names:
      flags.register_validator(name, lambda v, m=minimum: v >= m, flag_values=fv,
                               message=f"--{name} must be >= {minimum}")


def settings_error(fv, num_devices: int) -> str | None:
  """What in the parsed flags `fv` cannot run on `num_devices` devices (None: nothing). These
  failed as numpy or layout errors after JAX had started."""
  tokens = fv.seqs * fv.seq_len
  if fv.experts % num_devices:
    return f"--experts={fv.experts} must be a multiple of the {num_devices} devices"
  if fv.top_k >= fv.experts:  # a token draws top_k distinct experts, by Gumbel top-k
    return f"--top_k={fv.top_k} must be below --experts={fv.experts}"
  if fv.cluster > fv.experts:
    return f"--cluster={fv.cluster} must be at most --experts={fv.experts}"
  if tokens % num_devices:
    return (f"--seqs x --seq_len = {fv.seqs} x {fv.seq_len} = {tokens} tokens must split evenly "
            f"over the {num_devices} devices")
  return None


def args_error(args: list[str], num_devices: int) -> str | None:
  """What is wrong with these command-line flags (`--cpu_devices` among them, else
  `num_devices`), parsed with this command's own definitions; None: nothing."""
  values = flags.FlagValues()
  define_flags(values)
  flags.DEFINE_integer("cpu_devices", num_devices, "Fake CPU devices.", flag_values=values)
  try:
    values(["balance_moe", *args])
  except flags.Error as e:
    return str(e)
  return settings_error(values, values.cpu_devices)


def main(argv):
  """`python -m experiments.balance_moe --cpu_devices=8 --out=...` (run by bench_balance)."""
  del argv
  import jax

  from experiments import balance_traces as bt
  f = flags.FLAGS
  out = outputs.output_file(f["out"])
  common.setup_devices()
  if problem := settings_error(f, jax.device_count()):
    cli.exit_with_error(problem)
  rng = np.random.default_rng(f.seed)
  base_LE = rng.normal(0.0, f.skew, (1, f.experts)).astype(np.float32)
  routes = bt.synthetic_routes(rng, base_LE, f.seqs, f.seq_len, f.top_k, f.cluster, f.boost)
  result = measure_moe(routes[:, :, 0, :].reshape(-1, f.top_k), num_experts=f.experts,
                       d_model=f.d_model, d_ff=f.d_ff, repeats=f.repeats, seed=f.seed)
  outputs.write_json(out, result)
  print(f"wrote {out}: {result['devices']} devices, {result['tokens']} tokens, train speedup "
        f"{result['train_speedup']:.3f}x, forward {result['forward_speedup']:.3f}x "
        "(static / foresight capacity)", flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
