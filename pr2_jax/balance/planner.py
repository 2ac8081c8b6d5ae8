"""Per-micro-step expert placement with routing foresight (ForeMoE-style planner).

Dimension legend:
  L MoE layers, E experts, D expert-parallel devices, S slots per device,
  X = D*S global slots (= replicas), R = X - E redundant replicas.
  D here is moe_experts' P (the 'expert' axis size), not the models' d_model.

Given one micro-step's loads (from its replayed routes) the planner decides,
per layer, which expert every slot holds and what share of the expert's
tokens each replica takes. It is `jax.numpy` with static shapes and a `vmap`
over layers, so it traces into a jitted step and a new plan never
recompiles. Per layer:

1. Replica counts: each of the R redundant slots goes, one at a time, to the
   expert with the largest load per replica n_e / r_e (lowest id on ties),
   capped at D replicas when S <= E (a device gains nothing from two replicas
   of one expert). See `replica_counts`.
2. Placement: replicas by decreasing n_e / r_e (ties: expert id), exactly S
   per device, on devices that hold no replica of the expert yet where
   possible. Two methods, each in its own module (every other step is shared
   and lives here): `method="rounds"` (the default) places them in S rounds of
   D (`rounds.py`), `method="lpt"` one at a time, longest processing time
   first, with reservations for native experts (`lpt.py`). On the bench traces
   rounds balanced better at equal stickiness, ran 2-2.5x faster on CPU and moved
   about as many experts at the 30B shape, up to 1.7x as many where a device
   holds many experts (docs/results/balance.md, "Placement methods").
   With stickiness > 0 a home rule keeps weights in place (stickiness 0: no
   home preference, most moves): a device that already holds the expert
   (native, or in `previous`) is taken when its load is at most `stickiness` x
   (mean device load) above the lightest candidate's. If a device still got
   two replicas of an expert, a few swap rounds move one of them to a device
   without it, in exchange for a replica of about the same load
   (`lpt.repair_duplicates`).
3. Token split: start from 1/r_e per replica (what step 2 balanced), then
   water-filling rounds among each expert's replicas (`split.water_fill`)
   that only ever lower the busiest device.
4. Slots: experts a device held before keep their old slot index, so
   unchanged slots are not rewritten.
5. Hysteresis (optional, `min_gain`): the previous layout, re-split for the
   new loads, is kept (no transfers at all) unless its peak device load is
   above (1 + `min_gain`) x the new plan's; only a layout with every slot
   filled and every expert placed (a plan's) qualifies.
6. Guard: a layer whose plan would make its busiest device busier than the
   static layout's falls back to the native layout; its redundant slots hold
   copies of other devices' experts with a zero share. So the layer's peak
   device load is never above the static layout's peak (up to float32
   rounding: the guard's 1e-6); single devices may well be, that is balancing.

S == E/D (no redundant slots) returns the native layout: without spare slots
the only way to rebalance is to move experts, which this planner does not do.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from pr2_jax.balance.loads import EMPTY, native_layout
from pr2_jax.balance.lpt import place_lpt, repair_duplicates
from pr2_jax.balance.rounds import place_in_rounds, prefix_sum
from pr2_jax.balance.split import water_fill
from pr2_jax.checks import as_array, check_finite, check_ids, check_rank, is_concrete
from pr2_jax.config import check_int

_TINY = float(np.finfo(np.float32).tiny)
# The greedy's float-bit search and the water-filling assume counts; a NaN spreads everywhere.
_LOADS_WHY = "loads are (token, k) counts"
_PROBES_J = np.arange(1, 8, dtype=np.int32)  # replica_counts' search probes, in eighths
_REPAIR_ROUNDS = 4  # duplicate-replica swaps per layer (a forced twin is rare)
METHODS = ("lpt", "rounds")  # step 2: sequential LPT greedy, or S rounds of D
# Step 2's default: see the module docstring (better balance, 2-2.5x faster, about as many
# moves at the 30B shape).
DEFAULT_METHOD = "rounds"


class Plan(flax.struct.PyTreeNode):
  """One micro-step's placement for every MoE layer (a pytree of arrays).

  Global slot x = d * S + s is local slot s of device d: the flattened
  `slot_expert.reshape(L, D * S)[l]` is the `slot_expert_X` of `moe_experts`.
  """
  slot_expert: jax.Array    # int32 [L, D, S] expert held by each slot
  replica_count: jax.Array  # int32 [L, E] slots holding each expert (>= 1, sums to D*S)
  replica_share: jax.Array  # float32 [L, D, S] share of its expert's tokens (sums to 1 per expert)
  slot_load: jax.Array      # float32 [L, D, S] planned (token, k) pairs of each slot
  device_load: jax.Array    # float32 [L, D] planned (token, k) pairs per device

  def layer(self, l) -> "Plan":
    """The plan of one layer (arrays lose their leading L axis)."""
    return jax.tree.map(lambda a: a[l], self)


def replica_counts(load_E: jax.Array, num_slots: int, max_replicas: int) -> jax.Array:
  """int32 [E]: greedy replica counts of one layer (step 1 of the module docstring).

  Needs E <= num_slots <= E * max_replicas (every expert one replica, none more than
  max_replicas): counts then sum to num_slots.

  The greedy's picks are exactly the R = num_slots - E largest quotients
  n_e / j (j = 1 .. max_replicas - 1), taken in expert order among equal
  quotients. Rather than R sequential argmaxes, the R-th largest quotient v
  is found by an 8-way search on the bits of float32 (11 rounds on E-vectors), with
  counts made exactly with the float division the greedy would use.
  Loads must be finite and >= 0 (checked when concrete).
  """
  check_rank("loads", load_E, 1, "[E]: one layer's loads (plan_placement takes [L, E])")
  check_finite("loads", load_E, _LOADS_WHY, low=0)
  load_E = jnp.asarray(load_E).astype(jnp.float32)
  num_experts = load_E.shape[0]
  if not num_experts <= num_slots <= num_experts * max_replicas:
    raise ValueError(f"num_slots={num_slots} must be in [E, E * max_replicas] = [{num_experts}, "
                     f"{num_experts * max_replicas}]: counts could not sum to it")
  redundant = num_slots - num_experts
  cols = min(redundant, max_replicas - 1)
  if cols <= 0:
    return jnp.ones((num_experts,), jnp.int32)

  def count_at_least(bits):
    """#{j in 1..cols : n_e / j >= v} per expert, v = the float32 with these bits."""
    # XLA:CPU flushes subnormals to zero: the least v above 0 is the least normal.
    v = jnp.maximum(jax.lax.bitcast_convert_type(bits, jnp.float32), _TINY)
    guess_E = jnp.clip(jnp.floor(load_E / v), 0, cols).astype(jnp.int32)
    best_E = jnp.zeros_like(guess_E)
    for step in (-1, 0, 1):  # the float guess is within one of the exact count
      c_E = jnp.clip(guess_E + step, 0, cols)
      ok_E = (c_E == 0) | (load_E / jnp.maximum(c_E, 1).astype(jnp.float32) >= v)
      best_E = jnp.maximum(best_E, jnp.where(ok_E, c_E, 0))
    return jnp.where(bits > 0, best_E, cols)

  def search(_, lo_hi):
    # Octasection: 7 probes at once, so 11 dependent rounds instead of 31 (each round
    # is a handful of tiny ops whose launch cost dominates on CPU). No int32 overflow:
    # (hi - lo) // 8 * j + (hi - lo) % 8 * j // 8 == (hi - lo) * j // 8.
    lo, hi = lo_hi
    width = hi - lo
    probe_J = lo + width // 8 * _PROBES_J + width % 8 * _PROBES_J // 8
    enough_J = jnp.sum(jax.vmap(count_at_least)(probe_J), axis=1) >= redundant
    return (jnp.max(jnp.where(enough_J, probe_J, lo)), jnp.min(jnp.where(enough_J, hi, probe_J)))

  top = jax.lax.bitcast_convert_type(jnp.max(load_E), jnp.int32) + 1  # above every quotient
  lo, _ = jax.lax.fori_loop(0, 11, search, (jnp.int32(0), top))  # 8**11 > 2**31
  above_E = count_at_least(lo + 1)         # quotients > v: all taken
  tied_E = count_at_least(lo) - above_E    # quotients == v: lowest experts first
  left = redundant - jnp.sum(above_E)
  take_E = jnp.clip(left - (prefix_sum(tied_E) - tied_E), 0, tied_E)
  return (1 + above_E + take_E).astype(jnp.int32)


def _keep_old_slots(new_DS, prev_DS):
  """int [D, S] permutation p with new_DS[d, p[d, s]] == prev_DS[d, s] where possible."""
  num_devices, slots = new_DS.shape
  perm_DS = jnp.full((num_devices, slots), -1, jnp.int32)
  taken_DS = jnp.zeros((num_devices, slots), bool)
  for s in range(slots):  # S is small and static: an unrolled one-to-one matching
    match_DS = (new_DS == prev_DS[:, s:s + 1]) & ~taken_DS & (prev_DS[:, s:s + 1] != EMPTY)
    has_D = jnp.any(match_DS, axis=1)
    j_D = jnp.argmax(match_DS, axis=1).astype(jnp.int32)
    perm_DS = perm_DS.at[:, s].set(jnp.where(has_D, j_D, -1))
    taken_DS |= (jnp.arange(slots)[None, :] == j_D[:, None]) & has_D[:, None]
  # The q-th unmatched slot takes the q-th untaken new entry.
  free_DS = perm_DS < 0
  free_rank_DS = jnp.cumsum(free_DS, axis=1) - 1
  untaken_rank_DS = jnp.where(taken_DS, -1, jnp.cumsum(~taken_DS, axis=1) - 1)
  pick_DS = jnp.argmax(free_rank_DS[:, :, None] == untaken_rank_DS[:, None, :], axis=2)
  return jnp.where(free_DS, pick_DS.astype(jnp.int32), perm_DS)


def _fallback_layout(num_experts, num_devices, slots):
  """Native layout; spare slot j of device d copies native expert j // (D-1) of device
  d + 1 + j % (D-1) (mod D): distinct experts on every device while that is possible."""
  per = num_experts // num_devices
  layout = native_layout(num_experts, num_devices, slots)
  others = max(num_devices - 1, 1)
  for j in range(slots - per):
    device = (np.arange(num_devices) + 1 + j % others) % num_devices
    layout[:, per + j] = device * per + (j // others) % per
  return layout


def _resplit(load_E, layout_DS, split_iters):
  """float32 [D, S] slot loads of a fixed layout: 1/r_e each, then water-filling."""
  num_devices, slots = layout_DS.shape
  expert_X = jnp.maximum(layout_DS.reshape(-1), 0)  # replica x sits in global slot x
  count_E = jnp.bincount(expert_X, length=load_E.shape[0])
  n_X = load_E[expert_X]
  x_X = water_fill(n_X, expert_X, jnp.arange(expert_X.shape[0]),
                   n_X / jnp.maximum(count_E[expert_X], 1), num_devices, slots, split_iters)
  return x_X.reshape(num_devices, slots)


def _plan_layer(load_E, prev_DS, *, num_devices, slots, stickiness, split_iters, min_gain,
                method):
  num_experts = load_E.shape[0]
  per = num_experts // num_devices
  num_slots = num_devices * slots
  max_replicas = num_devices if slots <= num_experts else num_slots
  count_E = replica_counts(load_E, num_slots, max_replicas)
  tol = stickiness * jnp.sum(load_E) / num_devices
  if method == "rounds":
    expert_X, slot_X = place_in_rounds(load_E, count_E, num_devices, slots,
                                       prev_DS if stickiness > 0 else None, tol)
  else:
    expert_X, slot_X = place_lpt(load_E, count_E, prev_DS, num_devices, slots, tol,
                                 reserve=stickiness > 0)
  n_X = load_E[expert_X]
  if max_replicas > 1:
    slot_X = repair_duplicates(expert_X, slot_X, n_X / count_E[expert_X], num_devices, slots,
                               num_experts, _REPAIR_ROUNDS)
  x_X = water_fill(n_X, expert_X, slot_X, n_X / count_E[expert_X], num_devices, slots,
                   split_iters)
  new_DS = jnp.zeros((num_slots,), jnp.int32).at[slot_X].set(expert_X).reshape(num_devices, slots)
  load_DS = jnp.zeros((num_slots,), jnp.float32).at[slot_X].set(x_X).reshape(num_devices, slots)
  perm_DS = _keep_old_slots(new_DS, prev_DS)
  slot_DS = jnp.take_along_axis(new_DS, perm_DS, axis=1)
  load_DS = jnp.take_along_axis(load_DS, perm_DS, axis=1)
  peak = lambda l_DS: jnp.max(jnp.sum(l_DS, axis=1))  # noqa: E731

  if min_gain is not None:
    # Step 5: keep the previous layout (re-split: no transfers) unless its peak is above
    # (1 + min_gain) x the new one's; needs every expert placed there.
    prev_ok = jnp.all(prev_DS >= 0) & jnp.all(
        jnp.bincount(jnp.maximum(prev_DS.reshape(-1), 0), length=num_experts) > 0)
    prev_load_DS = _resplit(load_E, prev_DS, split_iters)
    keep = prev_ok & (peak(prev_load_DS) <= peak(load_DS) * (1 + min_gain))
    slot_DS = jnp.where(keep, prev_DS, slot_DS)
    load_DS = jnp.where(keep, prev_load_DS, load_DS)

  # Step 6: the peak never above the static layout's. The 1e-6 (~8 float32 ulps) absorbs
  # rounding: the plan's device loads sum split shares in another order than the static
  # sums, so a plan exactly as good (e.g. the native layout re-planned) can read a few ulps
  # higher and would fall back for nothing.
  worse = peak(load_DS) > jnp.max(jnp.sum(load_E.reshape(num_devices, per), axis=1)) * (1 + 1e-6)
  native_DS = jnp.broadcast_to(jnp.arange(slots) < per, (num_devices, slots)).astype(jnp.float32)
  slot_DS = jnp.where(worse, jnp.asarray(_fallback_layout(num_experts, num_devices, slots)),
                      slot_DS)
  count_E = jnp.bincount(slot_DS.reshape(-1), length=num_experts).astype(jnp.int32)
  n_DS = load_E[slot_DS]
  load_DS = jnp.where(worse, native_DS * n_DS, load_DS)
  # Share of an expert with no tokens: even over its replicas (native only in the fallback).
  share_DS = jnp.where(n_DS > 0, load_DS / jnp.where(n_DS > 0, n_DS, 1.0),
                       jnp.where(worse, native_DS, 1.0 / count_E[slot_DS]))
  return Plan(slot_expert=slot_DS, replica_count=count_E, replica_share=share_DS,
              slot_load=load_DS, device_load=jnp.sum(load_DS, axis=1))


@functools.partial(jax.jit, static_argnames=("num_devices", "slots", "stickiness", "split_iters",
                                             "min_gain", "method"))
def _plan(loads_LE, previous_LDS, *, num_devices, slots, stickiness, split_iters, min_gain,
          method):
  fn = functools.partial(_plan_layer, num_devices=num_devices, slots=slots, stickiness=stickiness,
                         split_iters=split_iters, min_gain=min_gain, method=method)
  return jax.vmap(fn)(loads_LE, previous_LDS)


def _native_plan(loads_LE, num_devices):
  num_layers, num_experts = loads_LE.shape
  layout = native_layout(num_experts, num_devices, num_experts // num_devices)
  slot_LDS = jnp.broadcast_to(jnp.asarray(layout), (num_layers,) + layout.shape)
  load_LDS = loads_LE.reshape(slot_LDS.shape)
  return Plan(slot_expert=slot_LDS, replica_count=jnp.ones((num_layers, num_experts), jnp.int32),
              replica_share=jnp.ones(slot_LDS.shape, jnp.float32), slot_load=load_LDS,
              device_load=jnp.sum(load_LDS, axis=-1))


def plan_placement(loads_LE, num_devices: int, slots_per_device: int, previous=None, *,
                   stickiness: float = 0.25, split_iters: int = 8,
                   min_gain: float | None = None, method: str = DEFAULT_METHOD) -> Plan:
  """Replicates and places experts for one micro-step (see the module docstring).

  Args:
    loads_LE: float or int [L, E] (token, k) pairs per expert, padding excluded, finite and
      >= 0 (checked when concrete; under jit a NaN, inf or negative load counts as 0, so
      the plan stays valid: every expert keeps a replica).
    num_devices, slots_per_device: D, the expert-parallel axis size (E % D == 0), and
      S >= E/D (E/D native experts + S - E/D redundant slots); positive ints.
    previous: the previous `Plan` or its int [L, D, S] `slot_expert` (EMPTY = -1 allowed);
      devices holding an expert there are its home, kept experts keep their slot. None: native.
    stickiness: the home rule's tolerance as a fraction of the mean device load; 0 = no home
      preference (and for lpt no reservations): most transfers, and on heavy skew worse
      balance (heavy replicas stack; docs/results/balance.md, "Heavy skew"); larger = fewer.
    split_iters: water-filling rounds of the token split (0 = proportional); more get
      closer to a layout's best split, at a cost in planner time.
    min_gain: None = off; else keep the previous layout unless its peak device load,
      re-split for these loads, is above (1 + min_gain) x the new plan's (step 5): with 0.2
      experts move only for a peak more than 1 - 1/1.2 = 17 % lower. Only a previous layout
      with every slot filled (a `Plan`'s) can be kept: with None (native) or EMPTY slots the
      new plan is always taken.
    method: step 2's placement: "rounds" (default; S rounds of D with the home rule,
      `rounds.py`) or "lpt" (one replica at a time, with reservations; 2-2.5x slower
      on CPU). On the bench traces rounds balanced better than LPT at equal stickiness and
      moved about as many experts at the 30B shape, up to 1.7x as many where a device holds
      many experts (docs/results/balance.md).
  Returns:
    A `Plan`. Jit-compatible; D, S, stickiness, split_iters, min_gain and method are static
    (a new value compiles anew) and shapes depend only on (L, E, D, S), so new loads never
    recompile.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is not one of {METHODS}")
  loads_LE = as_array(loads_LE)  # not jnp.asarray: strings must reach check_finite's message
  if loads_LE.ndim != 2:
    raise ValueError(f"loads must be [layers, experts], got shape {loads_LE.shape}")
  check_finite("loads", loads_LE, _LOADS_WHY, low=0)
  num_layers, num_experts = loads_LE.shape
  for name, value in (("num_devices", num_devices), ("slots_per_device", slots_per_device)):
    check_int("plan_placement", name, value)  # a float 3.0 failed deep in numpy
  check_int("plan_placement", "split_iters", split_iters, minimum=0)  # 2.5 became 2 silently
  if num_experts == 0:
    raise ValueError(f"loads has shape {loads_LE.shape}: no experts to place")
  if num_experts % num_devices:
    raise ValueError(f"num_devices={num_devices} must be >= 1 and divide num_experts={num_experts}")
  if slots_per_device * num_devices < num_experts:
    raise ValueError(f"slots_per_device={slots_per_device} is too few: {num_devices} devices "
                     f"need at least {num_experts // num_devices} slots each for {num_experts} "
                     "experts")
  if not stickiness >= 0 or (min_gain is not None and not min_gain >= 0):
    raise ValueError(f"stickiness={stickiness} and min_gain={min_gain} must be >= 0 (not NaN)")
  shape = (num_layers, num_devices, slots_per_device)
  if previous is not None:
    previous = jnp.asarray(getattr(previous, "slot_expert", previous))
    if previous.shape != shape:
      raise ValueError(f"previous layout has shape {previous.shape}, expected {shape} (L, D, S)")
    check_ids(previous, "previous", EMPTY, num_experts, "num_experts")
  loads_LE = loads_LE.astype(jnp.float32)
  if not is_concrete(loads_LE):  # a NaN load gave an expert 0 replicas, its tokens another's slot
    loads_LE = jnp.where(jnp.isfinite(loads_LE) & (loads_LE >= 0), loads_LE, 0.0)
  if slots_per_device == num_experts // num_devices:
    return _native_plan(loads_LE, num_devices)
  if previous is None:
    previous = np.broadcast_to(native_layout(num_experts, num_devices, slots_per_device), shape)
  return _plan(loads_LE, jnp.asarray(previous, jnp.int32), num_devices=num_devices,
               slots=slots_per_device, stickiness=float(stickiness), split_iters=int(split_iters),
               min_gain=None if min_gain is None else float(min_gain), method=method)
