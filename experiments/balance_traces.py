"""Routing traces, the three balancing modes and a cost model of one RL step (no flags).

Dimension legend:
  B sequences in a step, T tokens per sequence, L MoE layers, E experts,
  K top-k, D expert-parallel devices, S slots per device, M micro-steps.

A *trace* is a list over RL steps of float [B, L, E] arrays: per sequence,
the (token, k) pairs routed to each expert (padding excluded). Synthetic
traces come from `synthetic_trace`; traces of real rollouts come from
`trace_from_routes` (routes [B, T, L, K] + valid [B, T] per step). Every
function below takes a trace, so both kinds run through the same code.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.balance import (eplb_device_load, eplb_rebalance, fetched_experts, imbalance,
                             loads_from_routes, native_layout, plan_placement, static_device_load)
from pr2_jax.balance.planner import DEFAULT_METHOD

MODES = ("none", "eplb_step", "eplb_ema", "foresight")


def synthetic_routes(rng, base_LE, num_seqs, seq_len, top_k, cluster, boost):
  """int32 [B, T, L, K]: every sequence boosts its own `cluster` experts per layer by
  `boost` (in logits) over the shared popularity `base_LE`; tokens draw K distinct
  experts by Gumbel top-k."""
  num_layers, num_experts = base_LE.shape
  out = np.empty((num_seqs, seq_len, num_layers, top_k), np.int32)
  for b in range(num_seqs):
    logits_LE = base_LE.copy()
    for l in range(num_layers):
      logits_LE[l, rng.choice(num_experts, cluster, replace=False)] += boost
    g_LTE = logits_LE[:, None, :] + rng.gumbel(size=(num_layers, seq_len, num_experts))
    out[b] = np.argpartition(-g_LTE.astype(np.float32), top_k, axis=-1)[..., :top_k].transpose(
        1, 0, 2)
  return out


def routes_to_seq_loads(routes_BTLK, valid_BT, num_experts):
  """float32 [B, L, E] per-sequence loads of one step."""
  fn = jax.vmap(lambda r, v: loads_from_routes(r[None], v[None], num_experts))
  return np.asarray(fn(jnp.asarray(routes_BTLK), jnp.asarray(valid_BT)))


def trace_from_routes(steps, num_experts):
  """A trace from recorded rollouts: `steps` is a list of (routes [B,T,L,K], valid [B,T])."""
  return [routes_to_seq_loads(r, v, num_experts) for r, v in steps]


def rollout_trace(*, steps, prompts, group_size, experts, top_k, sft_steps, seed=0):
  """A trace recorded from our own rollouts: configs/tiny.py's model (with `experts` and
  `top_k`) warmed up for `sft_steps` on countdown, then `steps` rollout batches of
  `prompts` x `group_size` sequences sampled by the RL engine (prompt and response tokens,
  padding excluded). Returns (trace, tokens per sequence)."""
  import importlib.util
  import os

  from pr2_jax.parallel.mesh import make_mesh
  from pr2_jax.rl import data, loop
  from pr2_jax.rl.config import ExperimentConfig
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  c = tiny.get_config()
  c.seed, c.model.num_experts, c.model.top_k, c.sft.num_steps = seed, experts, top_k, sft_steps
  c.rl.prompts_per_step, c.rl.group_size, c.rl.off_policy_k, c.rl.micro_steps = (
      prompts, group_size, 1, 1)
  c.rl.eval_size = 8
  engine = loop.Engine(ExperimentConfig.from_dict(c.to_dict()),
                       make_mesh(1, 1, devices=jax.devices()[:1]))
  params = engine.warmup()
  recorded = []
  for step in range(1, steps + 1):
    rng = np.random.default_rng([seed, loop.RL_STREAM, step])
    problems = [p for p in engine.task.sample(rng, prompts) for _ in range(group_size)]
    tokens, valid = data.encode_prompts(engine.tok, problems, engine.prompt_slots)
    key = jax.random.fold_in(engine.key, step)
    roll = jax.device_get(engine.sample(params, tokens, valid, key))
    recorded.append((np.asarray(roll.routes), np.asarray(roll.valid)))
  return trace_from_routes(recorded, experts), engine.prompt_slots + engine.response_slots


def synthetic_trace(rng, *, steps, seqs, seq_len, layers, experts, top_k, skew, cluster, boost,
                    drift):
  """RL-like trace: stable skewed popularity (logits ~ N(0, skew), drifting by N(0, drift)
  per step), per-sequence clusters, Gumbel top-k routing of every token."""
  base_LE = rng.normal(0.0, skew, (layers, experts)).astype(np.float32)
  trace = []
  for _ in range(steps):
    base_LE = base_LE + rng.normal(0.0, drift, base_LE.shape).astype(np.float32)
    routes = synthetic_routes(rng, base_LE, seqs, seq_len, top_k, cluster, boost)
    trace.append(routes_to_seq_loads(routes, np.ones(routes.shape[:2], bool), experts))
  return trace


@functools.lru_cache(maxsize=None)
def plan_fn(num_devices, slots, stickiness, split_iters, min_gain=None, method=DEFAULT_METHOD):
  """One jitted planner per setting, so repeated evaluations compile once."""
  return jax.jit(lambda loads, prev: plan_placement(
      loads, num_devices, slots, prev, stickiness=stickiness, split_iters=split_iters,
      min_gain=min_gain, method=method))


def layout_error(experts, top_k, devices, slots, flag="") -> str | None:
  """Why `experts` (top-`top_k`) on `devices` with `slots` each cannot be laid out, naming them
  as flags (`--experts`), or as the parts of list flag `flag`; None if they can be
  (`native_layout` refused them after the work before it had run)."""
  prefix, name = (f"--{flag}: ", str) if flag else ("", lambda n: f"--{n}")
  if experts % devices:
    return f"{prefix}{name('experts')}={experts} must be a multiple of {name('devices')}={devices}"
  if slots < experts // devices:
    return (f"{prefix}{name('slots')}={slots} must be at least experts / devices = "
            f"{experts // devices} (each device's native experts)")
  if top_k > experts:
    return f"{prefix}{name('top_k')}={top_k} must be at most {name('experts')}={experts}"
  return None


def evaluate_modes(trace, num_devices, slots, micro_seqs, *, ema=0.5, stickiness=0.25,
                   split_iters=8, min_gain=None, seed=0, variants=None):
  """Device loads of every mode on every micro-step of the trace.

  Each step's sequences are shuffled and cut into micro-steps of `micro_seqs`.
    none:      native layout, no replicas;
    eplb_step: one EPLB plan (global policy) from the step's total loads, fixed over the
               step's micro-steps, even split among replicas (an oracle: it knows the step);
    eplb_ema:  the same from an exponential moving average of past steps' totals
               (first step: native layout);
    foresight: `plan_placement` (default method) per micro-step, chained through `previous`;
    variants: more foresight modes, {name: plan_placement keyword overrides}.
  Returns {mode: {"device_load": [M, L, D], "imbalance": [M, L], "transfers": [M, L, D]}}.
  """
  rng = np.random.default_rng(seed)
  num_layers, num_experts = trace[0].shape[1:]
  num_slots = num_devices * slots
  native = np.broadcast_to(native_layout(num_experts, num_devices, slots),
                           (num_layers, num_devices, slots))
  planners = {"foresight": dict(stickiness=stickiness, split_iters=split_iters,
                                min_gain=min_gain, method=DEFAULT_METHOD)}
  for name, over in (variants or {}).items():
    planners[name] = {**planners["foresight"], **over}
  plan_fns = {name: plan_fn(num_devices, slots, kw["stickiness"], kw["split_iters"],
                            kw["min_gain"], kw["method"]) for name, kw in planners.items()}
  modes = MODES[:-1] + tuple(planners)
  out = {m: {"device_load": [], "imbalance": [], "transfers": []} for m in modes}
  prev_fs, prev_eplb = {m: native for m in planners}, {"eplb_step": native, "eplb_ema": native}
  avg_LE = None
  for seq_loads in trace:
    total_LE = seq_loads.sum(0)
    layouts = {"eplb_step": eplb_rebalance(total_LE, num_slots, 1, 1, num_devices)}
    if avg_LE is not None:
      layouts["eplb_ema"] = eplb_rebalance(avg_LE, num_slots, 1, 1, num_devices)
    avg_LE = total_LE if avg_LE is None else ema * avg_LE + (1 - ema) * total_LE
    step_transfers = {}
    for mode in ("eplb_step", "eplb_ema"):
      if mode in layouts:  # moved once per step, before its first micro-step
        layout = layouts[mode][0].reshape(num_layers, num_devices, slots)
        step_transfers[mode] = fetched_experts(layout, prev_eplb[mode])
        prev_eplb[mode] = layout
    order = rng.permutation(len(seq_loads))
    for first in range(0, len(order) - micro_seqs + 1, micro_seqs):
      micro_LE = seq_loads[order[first:first + micro_seqs]].sum(0)
      loads = {"none": np.asarray(static_device_load(jnp.asarray(micro_LE), num_devices))}
      moved = {"none": np.zeros((num_layers, num_devices), np.int64)}
      for mode in ("eplb_step", "eplb_ema"):
        if mode in layouts:
          phy2log, _, logcnt = layouts[mode]
          loads[mode] = eplb_device_load(micro_LE, phy2log, logcnt, num_devices)
        else:
          loads[mode] = loads["none"]
        moved[mode] = step_transfers.pop(mode, np.zeros((num_layers, num_devices), np.int64))
      for name, fn in plan_fns.items():
        plan = fn(jnp.asarray(micro_LE), jnp.asarray(prev_fs[name]))
        new = np.asarray(plan.slot_expert)
        moved[name] = fetched_experts(new, prev_fs[name])
        prev_fs[name] = new
        loads[name] = np.asarray(plan.device_load)
      for mode in modes:
        out[mode]["device_load"].append(np.asarray(loads[mode], np.float64))
        out[mode]["imbalance"].append(np.asarray(imbalance(jnp.asarray(loads[mode]))))
        out[mode]["transfers"].append(moved[mode])
  return {m: {k: np.stack(v) for k, v in r.items()} for m, r in out.items()}


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Per-GPU rates and the model shape (defaults: Qwen3-30B-A3B on H100-class GPUs)."""
  d_model: int = 2048
  expert_ff: int = 768
  attn_params: int = 2048 * (32 * 128 + 2 * 4 * 128) + 32 * 128 * 2048  # q,k,v,o per layer
  heads_x_dim: int = 32 * 128
  seq_len: int = 2048
  gpu_flops: float = 400e12      # achieved bf16 FLOP/s per GPU (~40 % of H100 dense peak)
  a2a_bytes_per_s: float = 50e9  # per-GPU all-to-all bandwidth (400 Gb/s IB)
  a2a_latency_s: float = 10e-6   # per all-to-all
  xfer_bytes_per_s: float = 50e9  # replica weight / gradient transfer bandwidth
  act_bytes: int = 2             # bf16 activations on the wire
  weight_bytes: int = 2          # bf16 weights fetched into a replica slot
  grad_bytes: int = 4            # fp32 replica gradients sent back to the owner

  @property
  def expert_flops(self):  # per (token, k) assignment, forward
    return 2 * 3 * self.d_model * self.expert_ff

  @property
  def dense_flops(self):  # per token and layer, forward: projections + causal attention
    return 2 * self.attn_params + 2 * self.heads_x_dim * self.seq_len

  @property
  def expert_bytes(self):
    return 3 * self.d_model * self.expert_ff


def simulate_step(result, micro_tokens, num_devices, cost: CostModel, planner_s=0.0):
  """Modelled seconds of the old-log-prob pass + the update for one mode's micro-steps.

  Per micro-step and layer: dense compute of micro_tokens / D tokens, expert compute and
  all-to-all set by the busiest device (loads from `result`), x1 forward (old-log-prob)
  plus x3 forward+backward (update). Replica weights for micro-step i are fetched while
  micro-step i-1 computes and gradients return while i+1 computes; only the part of a
  transfer longer than the compute it hides behind costs time. `planner_s` per
  micro-step is added serially (0: plans made ahead, e.g. during the previous phase).
  """
  load_MLD = result["device_load"]
  peak_ML = np.maximum(load_MLD.max(-1), load_MLD.mean(-1))
  dense = micro_tokens / num_devices * cost.dense_flops / cost.gpu_flops
  expert_ML = peak_ML * cost.expert_flops / cost.gpu_flops
  a2a_ML = 2 * (peak_ML * cost.d_model * cost.act_bytes / cost.a2a_bytes_per_s
                + cost.a2a_latency_s)
  fwd_M = np.sum(dense + expert_ML + a2a_ML, axis=1)
  fetched_M = result["transfers"].sum(1).max(-1)  # the device fetching most, all layers
  fetch_M = fetched_M * cost.expert_bytes * cost.weight_bytes / cost.xfer_bytes_per_s
  grads_M = fetched_M * cost.expert_bytes * cost.grad_bytes / cost.xfer_bytes_per_s
  total = 0.0
  for passes, with_grads in ((1, False), (3, True)):  # old-log-prob pass, then the update
    compute_M = passes * fwd_M + planner_s
    side_M = fetch_M[1:].tolist() + [0.0]  # the next micro-step's weights
    if with_grads:
      side_M = [s + g for s, g in zip(side_M, [0.0] + grads_M[:-1].tolist())]
    total += fetch_M[0] + float(np.sum(np.maximum(compute_M, side_M)))
    if with_grads:
      total += grads_M[-1] * 1.0
  return total


if __name__ == "__main__":  # run as a command, it did nothing at all, even for --help
  import sys
  sys.stderr.write("error: experiments.balance_traces is a library module, not a command; it is "
                   "used by python -m experiments.bench_balance (and experiments.balance_moe)\n")
  sys.exit(2)
