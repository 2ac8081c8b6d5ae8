"""Replica placement one replica at a time, longest processing time first (`method="lpt"`).

Dimension legend:
  E experts, D expert-parallel devices, S slots per device, X = D*S replicas.
  D here is moe_experts' P (the 'expert' axis size), not the models' d_model.

The planner's step 2 has two methods; this module holds the sequential greedy
as `rounds.py` holds the default, so that `planner.py` keeps the steps both
share. `place_lpt` takes the replicas by decreasing n_e / r_e (ties: expert
id), each onto the lightest device with a free slot (exactly S per device)
that holds no replica of that expert yet (if every open device does, the
lightest open one). With stickiness > 0, two rules keep weights in place
(stickiness 0 is plain LPT: no home preference, most moves):
* reservation: each device keeps one slot per native expert (e // (E/D))
  free until that expert's first replica is placed, so heavy replicas of
  other experts cannot crowd a light native out of its own device;
* home rule: a device that already holds the expert (native, or in the
  previous layout) is taken when its load is at most `tol` (stickiness x
  mean device load) above the lightest candidate's: a small loss of balance
  for no weight transfer (one argmin over load - bonus, the bonus being the
  tolerance on home devices).
A device holding the expert is used only when no other device is open, and
one with only reserved slots free only before that.

If the greedy still had to put two replicas of an expert on one device,
`repair_duplicates` (which the planner runs after either method) moves one
of them to a device without it, in a few swap rounds, in exchange for a
replica of about the same load.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pr2_jax.balance.rounds import expand_runs


# pick_device's tiers, best first. Full devices get their own, last tier: the replica count
# (X = D*S) keeps a device open at every pick, and argmin must never reach a full one
# (`d * S + used_D[d]` would write into the next device's slot 0, with no error).
TIER_FREE, TIER_RESERVED, TIER_HOLDS, TIER_HOLDS_RESERVED, TIER_FULL = range(5)


def pick_device(load_D, used_D, steal_D, holds_D, bonus_D, slots: int):
  """The device the next replica goes to: int32 scalar.

  The best non-empty tier of devices, in order:
    TIER_FREE            free slots, does not hold the expert;
    TIER_RESERVED        only reserved slots free (a distinct device beats a reservation);
    TIER_HOLDS           holds the expert, has free slots;
    TIER_HOLDS_RESERVED  holds the expert, only reserved slots free;
    TIER_FULL            no slot left: never picked while another device is open.
  Within it the lightest after the home bonus (home devices win within `tol`), lower id on
  ties.

  Args:
    load_D: float32 [D] device loads so far.
    used_D: int32 [D] slots taken.
    steal_D: bool [D] devices whose free slots are all reserved for unplaced native experts.
    holds_D: bool [D] devices holding the replica's expert already.
    bonus_D: float32 [D] the home rule's tolerance on the expert's home devices, else 0.
    slots: S.
  """
  open_D = used_D < slots
  # Tiers, not additive penalties: a float32 load + 1e30 loses the load, and then the lowest
  # id, not the lightest device, won within a tier.
  tier_D = jnp.where(open_D, jnp.where(holds_D, TIER_HOLDS, TIER_FREE) + steal_D, TIER_FULL)
  return jnp.argmin(jnp.where(tier_D == jnp.min(tier_D), load_D - bonus_D, jnp.inf))


def place_lpt(load_E, count_E, prev_DS, num_devices, slots, tol, reserve):
  """Step 2 of one layer by LPT: each replica, heaviest first, onto `pick_device`'s device.

  Args:
    load_E: float32 [E] (token, k) pairs per expert.
    count_E: int32 [E] replicas per expert (>= 1, sums to D*S).
    prev_DS: int32 [D, S] previous layout (EMPTY = -1 allowed); its devices, with each
      expert's native one, are the expert's homes.
    num_devices, slots: D and S (static).
    tol: the home rule's tolerance in load units (0: no home preference).
    reserve: keep one slot per native expert on its device until its first replica is
      placed (static bool).
  Returns:
    expert_X int32 [X]: replicas by decreasing n_e / r_e (ties: expert id);
    slot_X int32 [X]: global slot d * S + s of each.
  """
  num_experts = load_E.shape[0]
  num_slots = num_devices * slots
  device_D = jnp.arange(num_devices)
  expert_X = expand_runs(count_E, num_slots)
  weight_X = load_E[expert_X] / count_E[expert_X]
  # Stable: one expert's replicas (equal weights, adjacent in expert order) stay
  # adjacent, so "holds this expert" only needs the devices of the current run.
  order_X = jnp.argsort(-weight_X, stable=True)
  expert_X, weight_X = expert_X[order_X], weight_X[order_X]
  per = num_experts // num_devices
  home_XD = ((device_D[None, :] == (expert_X // per)[:, None])
             | jnp.any(prev_DS[None, :, :] == expert_X[:, None, None], axis=-1))
  bonus_XD = jnp.where(home_XD, tol, 0.0)
  same_X = jnp.concatenate([jnp.zeros((1,), bool), expert_X[1:] == expert_X[:-1]])
  # The first replica of each expert owns a reserved slot on its native device
  # until it is placed (there or, if the home rule says so, elsewhere).
  own_XD = ~same_X[:, None] & (device_D[None, :] == (expert_X // per)[:, None])

  def place(i, state):
    load_D, used_D, reserved_D, holds_D, slot_X = state
    holds_D &= same_X[i]
    reserved_D = jnp.maximum(reserved_D - own_XD[i], 0)
    steal_D = used_D + reserved_D >= slots  # only reserved slots free
    d = pick_device(load_D, used_D, steal_D, holds_D, bonus_XD[i], slots)
    on_D = device_D == d
    return (load_D + jnp.where(on_D, weight_X[i], 0.0), used_D + on_D,
            reserved_D - (on_D & steal_D), holds_D | on_D,
            slot_X.at[i].set(d * slots + used_D[d]))

  init = (jnp.zeros((num_devices,), jnp.float32), jnp.zeros((num_devices,), jnp.int32),
          jnp.full((num_devices,), per if reserve else 0, jnp.int32),
          jnp.zeros((num_devices,), bool),
          jnp.zeros((num_slots,), jnp.int32))
  return expert_X, jax.lax.fori_loop(0, num_slots, place, init)[4]


def repair_duplicates(expert_X, slot_X, weight_X, num_devices, slots, num_experts, rounds):
  """Swaps away replicas the greedy had to put beside a twin (its last open slots were
  on a device holding the expert): each round moves one such replica to a device
  without that expert, in exchange for a replica of about the same load whose
  expert the first device lacks. Returns the new slot_X. Stops early once no twin
  is left or no swap helps (usually at once: twins are rare)."""
  def twins_X(slot_X):
    # On the [D, S] layout: S x S compares per device, far cheaper than a [D, E] count.
    layout_DS = jnp.zeros_like(expert_X).at[slot_X].set(expert_X).reshape(num_devices, slots)
    same_DSS = layout_DS[:, :, None] == layout_DS[:, None, :]
    return (jnp.sum(same_DSS, axis=2) > 1).reshape(-1)[slot_X]

  def swap(state):
    i_round, slot_X, dup_X = state
    device_X = slot_X // slots
    holds_DE = jnp.zeros((num_devices, num_experts), jnp.int32).at[device_X, expert_X].add(1)
    i = jnp.argmax(dup_X)
    ok_X = ((holds_DE[device_X, expert_X[i]] == 0)
            & (holds_DE[device_X[i], expert_X] == 0))
    j = jnp.argmin(jnp.where(ok_X, jnp.abs(weight_X - weight_X[i]), jnp.inf))
    slot_X = jnp.where(ok_X[j], slot_X.at[i].set(slot_X[j]).at[j].set(slot_X[i]), slot_X)
    # No partner for the first twin: stop (it would be picked again every round).
    return jnp.where(ok_X[j], i_round + 1, rounds), slot_X, twins_X(slot_X)

  state = (jnp.int32(0), slot_X, twins_X(slot_X))
  return jax.lax.while_loop(lambda st: (st[0] < rounds) & jnp.any(st[2]), swap, state)[1]
