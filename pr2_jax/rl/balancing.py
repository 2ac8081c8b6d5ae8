"""Host-side balance planning of one RL step: layouts per mode, capacity buckets, metrics.

Dimension legend:
  M micro-steps, b sequences per micro-step, T slots per sequence, N = b*T
  tokens of a micro-step, L MoE layers, K top-k, E experts, D expert-parallel
  devices, S slots per device, X = D*S global slots, P token shards.

Replayed routes are fixed after rollout (or after the old-log-prob pass for
R2), so before each learner phase the host knows every micro-step's routes
and can:
  * build the step-level EPLB plan of `eplb_step` mode (one per RL step,
    fixed over its micro-steps) from the step's loads, or their EMA;
  * count what every (token shard, slot) buffer will receive under the
    layout each micro-step uses, i.e. the smallest dropless capacity, and
    round its maximum up to a bucket: the phase's static capacity (a new
    bucket compiles the phase once, a repeated bucket never does). Only
    valid tokens count: the experts give padding no buffer place
    (`moe_experts`' valid_N), and the learner's forwards mask with the same
    micro-batch `valid` [b, T] the host counts with;
  * measure what each of the three modes gives on these routes.
The foresight plan is recomputed inside the jitted micro-step by the same
`foresight_plan`, so a plan is data and never part of a jit key.

Bucket rule (`capacity_bucket`): with q buckets per doubling, the buckets in
each (h, 2h], h a power of two, are ceil(h (1 + i/q)) for i = 1..q (q distinct
ones once h >= q; below, every integer), plus 1; a need n >= 1 is rounded up to
the smallest bucket >= n and capped at the dropless bound (tokens per shard).
For q a power of two these are the multiples of max(1, h/q) in (h, 2h]: q = 1
gives powers of two, q = 2 gives 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ... A bucket
is at most ceil((1 + 1/q) n) and never above the power of two >= n.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.balance.dispatch import assign_replicas, slot_counts
from pr2_jax.balance.eplb import eplb_rebalance
from pr2_jax.balance.loads import (fetched_experts, imbalance, loads_from_routes, native_layout,
                                   static_device_load)
from pr2_jax.balance.planner import DEFAULT_METHOD, Plan, plan_placement
from pr2_jax.models.experts import capacity_for
from pr2_jax.parallel.distributed import to_host
from pr2_jax.parallel.mesh import EXPERT, axis_size, num_token_shards
from pr2_jax.parallel.replica_fetch import fetch_slabs
from pr2_jax.rl.config import BALANCE_MODES, ReplayPhases, replay_phases

MODES = BALANCE_MODES  # the modes measured every step: RLConfig.balance_mode's choices


@dataclasses.dataclass(frozen=True)
class BalanceShape:
  """Static sizes of the expert layout (hashable: a jit key of the host analysis)."""
  num_experts: int
  num_devices: int        # D, the 'expert' mesh axis
  slots: int              # S = E/D + redundant slots (used by eplb_step and foresight)
  token_shards: int       # P, source blocks of the capacity buffers
  bytes_per_expert: float = 0.0  # weight bytes one replica fetch moves
  planner_method: str = DEFAULT_METHOD  # foresight placement, RLConfig.planner_method

  def __post_init__(self):
    if self.num_devices < 1 or self.num_experts % self.num_devices:
      raise ValueError(f"BalanceShape.num_devices={self.num_devices} must divide "
                       f"num_experts={self.num_experts}")
    if self.slots * self.num_devices < self.num_experts:
      raise ValueError(f"BalanceShape.slots={self.slots} is too few for {self.num_experts} "
                       f"experts on {self.num_devices} devices")
    if self.token_shards < 1:
      raise ValueError(f"BalanceShape.token_shards={self.token_shards} must be >= 1")


def capacity_bucket(needed: int, per_doubling: int, limit: int) -> int:
  """The static capacity for a need of `needed` assignments per (shard, slot) buffer: the
  smallest bucket >= needed (module docstring's rule, q = per_doubling), capped at `limit`."""
  if per_doubling < 1 or limit < 1:
    raise ValueError(f"per_doubling={per_doubling} and limit={limit} must be >= 1")
  needed, q = max(int(needed), 1), per_doubling
  half = (1 << (needed - 1).bit_length()) // 2  # needed in (half, 2 half]
  if half == 0:
    return 1
  # The first i whose bucket ceil(half (q + i) / q) reaches needed, i.e. half (q + i) / q >
  # needed - 1. Integer maths: rounding up to multiples of half // (2q) instead gave q = 3,
  # needed 31 a bucket of 35, past the doubling's end (32).
  i = q * (needed - 1 - half) // half + 1
  return min(-(-(half * (q + i)) // q), limit)


def foresight_plan(loads_LE: jax.Array, num_devices: int, slots: int,
                   method: str = DEFAULT_METHOD) -> Plan:
  """The per-micro-step plan; one function for the jitted step and the host, so they agree
  (both must pass the same `method`, RLConfig.planner_method)."""
  return plan_placement(loads_LE, num_devices, slots, method=method)


def plan_from_eplb(phy2log_LX, logcnt_LE, loads_LE, num_devices: int, slots: int) -> Plan:
  """EPLB's output as a `Plan`: GPU u holds physical experts [u*S, (u+1)*S), tokens split
  evenly over an expert's replicas (EPLB's own assumption)."""
  phy2log_LX, logcnt_LE = np.asarray(phy2log_LX), np.asarray(logcnt_LE)
  num_layers = phy2log_LX.shape[0]
  if phy2log_LX.shape[1] != num_devices * slots:
    raise ValueError(f"phy2log has {phy2log_LX.shape[1]} physical experts, the layout "
                     f"{num_devices} x {slots} slots")
  slot_LDS = phy2log_LX.reshape(num_layers, num_devices, slots).astype(np.int32)
  count_LDS = np.take_along_axis(logcnt_LE, phy2log_LX, -1).reshape(slot_LDS.shape)
  share_LDS = (1.0 / count_LDS).astype(np.float32)
  load_LDS = np.take_along_axis(np.asarray(loads_LE, np.float32), phy2log_LX,
                                -1).reshape(slot_LDS.shape) * share_LDS
  # numpy leaves: the same value on every process, placed by the jitted step's shardings.
  return Plan(slot_expert=slot_LDS, replica_count=logcnt_LE.astype(np.int32),
              replica_share=share_LDS, slot_load=load_LDS.astype(np.float32),
              device_load=load_LDS.sum(-1).astype(np.float32))


class StepState(NamedTuple):
  """Host state carried across RL steps; saved in the checkpoint's metadata (`to_json`), so a
  resumed run continues the EMA and the churn count as if never interrupted."""
  ema_LE: np.ndarray | None = None       # EMA of step loads (eplb_step)
  layout_LDS: np.ndarray | None = None   # the last layout the update phase used (churn)

  def to_json(self) -> dict:
    """Plain lists (float64 round-trips exactly through JSON's repr)."""
    return {k: None if v is None else np.asarray(v).tolist() for k, v in self._asdict().items()}

  @classmethod
  def from_json(cls, saved: dict | None) -> "StepState":
    """The state `to_json` wrote; None or {} (a checkpoint from before this field) = fresh."""
    saved = saved or {}
    def as_array(k, dtype):
      return None if saved.get(k) is None else np.asarray(saved[k], dtype)
    return cls(ema_LE=as_array("ema_LE", np.float64), layout_LDS=as_array("layout_LDS", np.int32))


@functools.partial(jax.jit, static_argnames=("num_experts",))
def _step_loads(routes_MbTLK, valid_MbT, *, num_experts):
  m, b, t = valid_MbT.shape
  return loads_from_routes(routes_MbTLK.reshape((m * b, t) + routes_MbTLK.shape[3:]),
                           valid_MbT.reshape(m * b, t), num_experts)


def step_plan(shape: BalanceShape, rollout_routes, valid, ema: float, state: StepState):
  """(EPLB Plan, new state, ms): one plan for the whole step from the EMA of step loads.

  The EMA includes this step (weight 1 - ema), so ema = 0 plans from exactly
  this step's loads, which the host knows after rollout.
  """
  total_LE = to_host(_step_loads(rollout_routes, valid, num_experts=shape.num_experts)).astype(
      np.float64)
  avg_LE = total_LE if state.ema_LE is None else ema * state.ema_LE + (1 - ema) * total_LE
  t0 = time.perf_counter()
  # Global policy (1 group, 1 node): our D devices form one expert-parallel group.
  phy2log, _, logcnt = eplb_rebalance(avg_LE, shape.num_devices * shape.slots, 1, 1,
                                      shape.num_devices)
  ms = (time.perf_counter() - t0) * 1e3
  plan = plan_from_eplb(phy2log, logcnt, avg_LE, shape.num_devices, shape.slots)
  return plan, state._replace(ema_LE=avg_LE), ms


def layout_kind(balance_mode: str, replayed: bool) -> str:
  """Which layout a phase runs: 'step' (EPLB), 'foresight' (needs replayed routes) or 'native'."""
  if balance_mode == "eplb_step":
    return "step"
  return "foresight" if balance_mode == "foresight" and replayed else "native"


@functools.partial(jax.jit, static_argnames=("shape", "plan"))
def _foresight_plans(routes_MbTLK, valid_MbT, *, shape, plan=True):
  """Per micro-step loads and foresight plans; plan=False gives native plans instead."""
  loads_MLE = jax.vmap(lambda r, v: loads_from_routes(r, v, shape.num_experts))(
      routes_MbTLK, valid_MbT)
  slots = shape.slots if plan else shape.num_experts // shape.num_devices  # = E/D: native
  return loads_MLE, jax.vmap(lambda l: foresight_plan(l, shape.num_devices, slots,
                                                      shape.planner_method))(loads_MLE)


def _max_counts(ids_NLK, valid_N, plan, shape):
  """int32 [L]: the largest (shard, slot) buffer need per layer; plan None = native layout.
  Valid tokens only: `moe_experts` gives padding (the same valid_N) no buffer place."""
  def layer(ids_NK, plan_l):
    if plan_l is None:
      return jnp.max(slot_counts(ids_NK, shape.num_experts, shape.token_shards, valid_N))
    slot_ids_NK = assign_replicas(ids_NK, valid_N, plan_l, shape.token_shards)
    return jnp.max(slot_counts(slot_ids_NK, shape.num_devices * shape.slots, shape.token_shards,
                               valid_N))
  return jax.vmap(layer, in_axes=(1, 0))(ids_NLK, plan)


@functools.partial(jax.jit, static_argnames=("shape", "kind"))
def _analyse(routes_MbTLK, valid_MbT, loads_MLE, plans, step: Plan, *, shape, kind):
  """Per micro-step: buffer needs (layout `kind` and native) and device loads of every mode."""
  m, b, t, num_layers, k = routes_MbTLK.shape
  ids_MNLK = routes_MbTLK.reshape(m, b * t, num_layers, k)
  valid_MN = valid_MbT.reshape(m, b * t)
  static_ML = jax.lax.map(lambda a: _max_counts(a[0], a[1], None, shape), (ids_MNLK, valid_MN))
  if kind == "foresight":
    need_ML = jax.lax.map(lambda a: _max_counts(a[0], a[1], a[2], shape),
                          (ids_MNLK, valid_MN, plans))
  elif kind == "step":  # one plan for every micro-step
    need_ML = jax.lax.map(lambda a: _max_counts(a[0], a[1], step, shape), (ids_MNLK, valid_MN))
  else:
    need_ML = static_ML
  count_LE = jnp.maximum(step.replica_count, 1).astype(jnp.float32)
  eplb_MLD = jax.vmap(lambda l_LE: jnp.sum(
      jnp.take_along_axis(l_LE / count_LE, step.slot_expert.reshape(num_layers, -1), -1)
      .reshape(step.slot_expert.shape), -1))(loads_MLE)
  loads = {"none": jax.vmap(lambda l: static_device_load(l, shape.num_devices))(loads_MLE),
           "eplb_step": eplb_MLD, "foresight": plans.device_load}
  return need_ML.max(-1), static_ML.max(-1), {mode: imbalance(v) for mode, v in loads.items()}


class PhasePlan(NamedTuple):
  needed: int            # planned max per-(shard, slot) count over the phase's micro-steps
  needed_static: int     # the same for the native layout (what dropless static needs)
  capacity: int | None   # the static capacity to run with (None: the model's own)
  imbalance_ML: dict     # mode -> float [M, L] max/mean device load
  layouts_MLDS: np.ndarray  # the layout every micro-step uses (for churn)
  planner_ms: float      # host foresight planner wall time per micro-step (compile excluded)


_COMPILED: set = set()  # (shape, routes shape) keys seen: time the planner, not its compile


def plan_phase(shape: BalanceShape, routes, valid, step: Plan, kind: str, bucket: bool,
               per_doubling: int, limit: int) -> PhasePlan:
  """Plans one learner phase on the host from the routes its micro-steps will see.

  Args:
    routes: int [M, b, T, L, K] the phase's routes (replayed, or a forecast).
    valid: bool [M, b, T], the very mask the phase's forwards pass as `valid` (the
      micro-batches' "valid"): only its True tokens are counted, and a token the device
      counts but this mask does not could be dropped under the bucket.
    step: this step's EPLB plan (also the eplb_step counterfactual).
    kind: `layout_kind` of the phase.
    bucket: round the need up to a capacity bucket (else capacity None).
    per_doubling, limit: `capacity_bucket`'s arguments.
  """
  # On one device every plan puts the whole load there (foresight's imbalance is 1 whatever it
  # plans), so unless the phase runs the plan, skip the planner: its trace and compile cost
  # seconds in every single-device run.
  plan = kind == "foresight" or shape.num_devices > 1
  key = (shape, tuple(routes.shape), plan)
  if key not in _COMPILED:  # time the planner, not its compilation
    jax.block_until_ready(_foresight_plans(routes, valid, shape=shape, plan=plan))
    _COMPILED.add(key)
  t0 = time.perf_counter()
  loads_MLE, plans = jax.block_until_ready(
      _foresight_plans(routes, valid, shape=shape, plan=plan))
  ms = (time.perf_counter() - t0) * 1e3 / routes.shape[0]
  need_M, static_M, imb = to_host(
      _analyse(routes, valid, loads_MLE, plans, step, shape=shape, kind=kind))
  needed = int(np.max(need_M))
  m, num_layers = routes.shape[0], routes.shape[3]
  if kind == "foresight":
    layouts = to_host(plans.slot_expert)
  else:
    one = (np.asarray(step.slot_expert) if kind == "step" else
           np.broadcast_to(native_layout(shape.num_experts, shape.num_devices,
                                         shape.num_experts // shape.num_devices),
                           (num_layers, shape.num_devices, shape.num_experts // shape.num_devices)))
    layouts = np.broadcast_to(one, (m,) + one.shape)
  return PhasePlan(needed=needed, needed_static=int(np.max(static_M)),
                   capacity=capacity_bucket(needed, per_doubling, limit) if bucket else None,
                   imbalance_ML={k: np.asarray(v) for k, v in imb.items()},
                   layouts_MLDS=layouts, planner_ms=ms)


def churn(layouts_MLDS: np.ndarray, previous_LDS: np.ndarray | None, bytes_per_expert: float):
  """(slots changed, bytes moved) per micro-step, each micro-step against the one before it
  (the first against `previous_LDS`, the last layout of the previous step; None = itself).

  A slot is changed when it holds another expert; bytes count only experts its
  device did not hold anywhere before (a move within a device needs no transfer).
  A `previous_LDS` of another shape (a run resumed on another expert mesh) has no
  slot-to-slot comparison: the first micro-step's churn is NaN (unknown), not 0.
  """
  layouts = np.asarray(layouts_MLDS)
  other_mesh = previous_LDS is not None and np.shape(previous_LDS) != layouts.shape[1:]
  prev = layouts[:1] if previous_LDS is None or other_mesh else np.asarray(previous_LDS)[None]
  before = np.concatenate([prev, layouts[:-1]], axis=0)
  changed_M = np.sum(layouts != before, axis=(1, 2, 3)).astype(np.float64)
  bytes_M = fetched_experts(layouts, before).sum(axis=(1, 2)) * float(bytes_per_expert)
  if other_mesh:
    changed_M[0] = bytes_M[0] = np.nan
  return changed_M, bytes_M


@dataclasses.dataclass(frozen=True)
class StepBalancer:
  """Plans and reports balancing around one RL step's learner phases (built by `create`).

  Phases and their routes: the old-log-prob pass replays the rollout's routes
  in r3/pr2 and routes live otherwise; the update replays `replay_routes`
  unless replay_mode is none. A live phase's capacity can only be forecast
  from the rollout's routes (capacity_mode 'forecast'; drops are reported),
  else it keeps the model's.
  """
  shape: BalanceShape
  balance_mode: str        # none | eplb_step | foresight
  replay_mode: str
  capacity_mode: str       # RLConfig.effective_capacity_mode: model | bucket | forecast
  capacity_buckets: int    # buckets per doubling
  eplb_ema: float
  tokens_per_shard: int    # the dropless bound of a micro-step's (shard, slot) buffer
  model_capacity: tuple    # ModelConfig's capacity on the (native, D*S-slot) layouts; 0 = no
                           # capacity path (dense/ragged experts are dropless)

  @classmethod
  def create(cls, rl, model_cfg, mesh, seq_len: int) -> "StepBalancer":
    devices, shards = axis_size(mesh, EXPERT), num_token_shards(mesh)
    e = model_cfg.num_experts
    # One expert's weights: SwiGLU's three [D, F] matrices (gate, up, down), stored float32
    # whatever the compute dtype (MoEBlock's params).
    expert_bytes = 3.0 * model_cfg.d_model * model_cfg.expert_d_ff * jnp.dtype(
        jnp.float32).itemsize
    shape = BalanceShape(e, devices, e // devices + rl.redundant_slots, shards,
                         bytes_per_expert=expert_bytes, planner_method=rl.planner_method)
    tokens = rl.micro_batch_size * seq_len // shards
    model_capacity = (0, 0)
    if model_cfg.expert_impl == "capacity":
      model_capacity = tuple(capacity_for(tokens, model_cfg.top_k, x, model_cfg.capacity_factor)
                             for x in (e, devices * shape.slots))
    return cls(shape, rl.balance_mode, rl.replay_mode, rl.effective_capacity_mode,
               rl.capacity_buckets, rl.eplb_ema, tokens, model_capacity)

  @property
  def phases(self) -> ReplayPhases:
    """What the learner's phases replay (the jitted step asks the same `replay_phases`)."""
    return replay_phases(self.replay_mode)

  def _phase(self, routes, valid, step: Plan, replayed: bool) -> PhasePlan:
    kind = layout_kind(self.balance_mode, replayed)
    bucket = self.model_capacity[0] > 0 and (
        self.capacity_mode == "forecast" or (self.capacity_mode == "bucket" and replayed))
    return plan_phase(self.shape, routes, valid, step, kind, bucket, self.capacity_buckets,
                      self.tokens_per_shard)

  def plan_old_pass(self, micro: dict, state: StepState):
    """(step plan, old-pass PhasePlan, new state, EPLB ms) before the old-log-prob pass."""
    step, state, eplb_ms = step_plan(self.shape, micro["rollout_routes"], micro["valid"],
                                     self.eplb_ema, state)
    old = self._phase(micro["rollout_routes"], micro["valid"], step,
                      self.phases.old_pass_replays_rollout)
    return step, old, state, eplb_ms

  def plan_update(self, micro: dict, step: Plan, old: PhasePlan) -> PhasePlan:
    replayed = self.phases.update_replays
    same = (micro["replay_routes"] is micro["rollout_routes"]
            and replayed == self.phases.old_pass_replays_rollout)
    return old if same else self._phase(micro["replay_routes"], micro["valid"], step, replayed)

  def step_plan_arg(self, step: Plan):
    """What the jitted phases take: the plan only in eplb_step mode."""
    return step if self.balance_mode == "eplb_step" else None

  def used_capacity(self, phase: PhasePlan, replayed: bool) -> int:
    """The capacity a phase ran with (its bucket, or the model's; 0 = no capacity path)."""
    if phase.capacity is not None:
      return phase.capacity
    return self.model_capacity[layout_kind(self.balance_mode, replayed) != "native"]

  def summary(self, old: PhasePlan, update: PhasePlan, eplb_ms: float, old_dropped: float,
              state: StepState):
    """(metrics dict for metrics.jsonl, new state) of the step; see the README's table."""
    out = {}
    for mode in MODES:
      imb = update.imbalance_ML[mode]
      out[f"imbalance_{mode}_mean"] = float(imb.mean())
      out[f"imbalance_{mode}_max"] = float(imb.max())
    used = {"eplb_step": "eplb_step", "none": "none"}.get(
        self.balance_mode, "foresight" if self.phases.update_replays else "none")
    out["imbalance_used_mean"] = out[f"imbalance_{used}_mean"]
    out["imbalance_used_max"] = out[f"imbalance_{used}_max"]
    changed_M, bytes_M = churn(update.layouts_MLDS, state.layout_LDS, self.shape.bytes_per_expert)
    m = update.layouts_MLDS.shape[0]
    # Expert-weight slabs each device's fetch receives per layer and micro-step, as a fraction
    # of all E (1 = gathering every expert; parallel.replica_fetch). A native layout fetches none.
    fetched = 0.0
    if layout_kind(self.balance_mode, self.phases.update_replays) != "native":
      layouts_MLX = update.layouts_MLDS.reshape(update.layouts_MLDS.shape[:2] + (-1,))
      slabs_ML = fetch_slabs(jnp.asarray(layouts_MLX), self.shape.num_experts,
                             self.shape.num_devices)
      fetched = float(np.mean(np.asarray(slabs_ML))) / self.shape.num_experts
    out.update(
        capacity_needed=update.needed, capacity_needed_static=update.needed_static,
        capacity_used=self.used_capacity(update, self.phases.update_replays),
        old_capacity_needed=old.needed,
        old_capacity_used=self.used_capacity(old, self.phases.old_pass_replays_rollout),
        old_dropped=float(old_dropped), slots_changed=float(changed_M.mean()),
        bytes_moved=float(bytes_M.mean()), fetched_experts=fetched)
    if self.balance_mode != "none":  # wall times: kept out of the deterministic default rows
      out["planner_ms"] = (update.planner_ms if self.balance_mode == "foresight"
                           else eplb_ms / m)
    return out, state._replace(layout_LDS=np.asarray(update.layouts_MLDS[-1]))
