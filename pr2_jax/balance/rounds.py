"""Replica placement in S rounds of D (the planner's default `method="rounds"`, step 2).

Dimension legend:
  E experts, D expert-parallel devices, S slots per device, X = D*S replicas,
  Y = the D*S slots of a [D, S] layout in slot order (d * S + s), R = the D
  replicas of one round (not planner.py's redundant replicas), H = 3 home
  devices per replica, P = D + 1 device rows (row D = "no such device"),
  Q = a round's left-over replicas in weight order, N = any length (helpers).
  D here is moe_experts' P (the 'expert' axis size), not the models' d_model.

The LPT placement (`lpt.place_lpt`) places the X replicas one at a time: X
dependent steps, each a handful of tiny XLA ops, so loop overhead dominates
on CPU. Here the replicas, heaviest first, are cut into S rounds of D; in
each round the round's heaviest replica goes to the lightest device, the
next to the next lightest, and so on: one ranking of D loads per round
instead of D dependent argmins, and exactly S replicas per device by
construction. Rankings are pairwise comparison counts (no sort, no loop).

One refinement keeps a device from holding two replicas of one expert:
an expert's replicas are adjacent in the order (equal weights, stable sort),
so with at most D replicas per expert only the expert that opens a round can
already sit on a device, placed in the previous round. Devices holding it
sort after all others in that round, so its replicas go to devices without
it and the holders take the round's lightest replicas. (With more than D
replicas per expert, S > E, twins cannot be avoided and are allowed.)

With stickiness > 0 (`prev_DS` and `tol` given) the home rule keeps weights
in place: before the matching, each replica claims a device that already
holds its expert (native, or in the previous layout) if that device is at
most `tol` heavier than the round's lightest; a device claimed twice takes
the heavier replica and the loser tries its next home. The unclaimed
replicas and devices are then matched as above. There are no reservations
(LPT's other rule): each device takes one replica per round anyway. On the
bench traces this balanced better than sticky LPT and moved about as many
experts at the 30B shape, up to 1.7x as many where a device holds many
experts (docs/results/balance.md). A claim can rarely leave a twin for a
later replica of the round; the planner's repair step (`lpt.repair_duplicates`) swaps
it away.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_CLAIM_PASSES = 2  # home claims per round (a loser tries its next home)


def _rank(key_N, tier_N=None):
  """int32 [N]: position of each entry in a stable ascending sort by (tier_N, key_N, index).
  Pairwise counts: N <= a few hundred here, and on XLA:CPU this one fusion is several
  times faster than a sort."""
  index_N = jnp.arange(key_N.shape[0])
  before_NN = (key_N[None, :] < key_N[:, None]) | (
      (key_N[None, :] == key_N[:, None]) & (index_N[None, :] < index_N[:, None]))
  if tier_N is not None:
    before_NN = jnp.where(tier_N[None, :] == tier_N[:, None], before_NN,
                          tier_N[None, :] < tier_N[:, None])
  return jnp.sum(before_NN, axis=1).astype(jnp.int32)


def prefix_sum(count_N):
  """int32 [N]: inclusive prefix sums of small non-negative int counts (total < 2**24).

  One [N] x [N, N] triangular matmul: on XLA:CPU `jnp.cumsum` lowers to chains of
  reduce-windows, several small kernels where this is one (exact in float32 below 2**24;
  HIGHEST so that GPUs and TPUs do not round the products either).
  """
  n = count_N.shape[-1]
  upper_NN = jnp.triu(jnp.ones((n, n), jnp.float32))
  sums_N = jnp.matmul(count_N.astype(jnp.float32), upper_NN, precision=jax.lax.Precision.HIGHEST)
  return jnp.round(sums_N).astype(jnp.int32)


def expand_runs(count_N, total: int):
  """int32 [total]: n repeated count_N[n] times (counts >= 1 summing to `total`), as
  `jnp.repeat` with traced counts: mark where each run starts (distinct, as counts >= 1),
  then a prefix sum of the marks numbers the runs."""
  start_N = prefix_sum(count_N) - count_N
  return prefix_sum(jnp.zeros((total,), jnp.int32).at[start_N[1:]].add(1))


def _inverse(rank_N):
  """int32 [N]: the entry at each position (the permutation rank_N inverted)."""
  n = rank_N.shape[0]
  return jnp.zeros((n,), jnp.int32).at[rank_N].set(jnp.arange(n, dtype=jnp.int32))


def _homes(expert_X, prev_DS, num_devices, num_experts):
  """int32 [X, 3]: devices holding each replica's expert already: its native device, then the
  lowest and highest other device holding it in prev_DS (D where there is none). Enough for
  the usual one or two copies; the home rule ignores further ones."""
  num_slots = prev_DS.size
  native_E = jnp.arange(num_experts, dtype=jnp.int32) // (num_experts // num_devices)
  expert_Y = prev_DS.reshape(-1)
  device_Y = jnp.arange(num_slots, dtype=jnp.int32) // prev_DS.shape[1]
  other_Y = (expert_Y >= 0) & (device_Y != native_E[jnp.maximum(expert_Y, 0)])
  target_Y = jnp.where(other_Y, expert_Y, num_experts)
  low_E = jnp.full((num_experts,), num_devices, jnp.int32).at[target_Y].min(device_Y, mode="drop")
  high_E = jnp.full((num_experts,), -1, jnp.int32).at[target_Y].max(device_Y, mode="drop")
  high_E = jnp.where((high_E < 0) | (high_E == low_E), num_devices, high_E)
  return jnp.stack([native_E, low_E, high_E], axis=1)[expert_X]


def _sticky_round(load_D, expert_R, home_RH, held_DS, tol):
  """int32 [D]: the replica (index into the round) each device takes, with the home rule.

  A replica claims its lightest home device that does not hold its expert yet,
  if that device is at most `tol` heavier than the lightest device; a device
  claimed several times takes the heaviest claimant, and the losers claim
  their next home. The other replicas, still heaviest first, go to the
  unclaimed devices, lightest first; devices holding the first of them's
  expert rank last (no twin for it, as in the plain rounds).
  """
  n = load_D.shape[0]
  index_N = jnp.arange(n, dtype=jnp.int32)
  home_RH = jnp.minimum(home_RH, n)  # n = no such home
  load_P = jnp.concatenate([load_D, jnp.full((1,), jnp.inf, load_D.dtype)])
  held_PS = jnp.concatenate([held_DS, jnp.full((1, held_DS.shape[1]), -1, held_DS.dtype)])
  home_load_RH = load_P[home_RH]
  ok_RH = ((home_RH < n) & (home_load_RH <= jnp.min(load_D) + tol)
           & ~jnp.any(held_PS[home_RH] == expert_R[:, None, None], axis=-1))
  taken_P = jnp.zeros((n + 1,), bool)
  won_R = jnp.zeros((n,), bool)
  winner_P = jnp.full((n + 1,), n, jnp.int32)
  for _ in range(_CLAIM_PASSES):  # a replica that lost a device claims its next home
    open_RH = ok_RH & ~taken_P[home_RH] & ~won_R[:, None]
    pick_R = jnp.argmin(jnp.where(open_RH, home_load_RH, jnp.inf), axis=1)
    claim_R = jnp.where(jnp.any(open_RH, axis=1),
                        jnp.take_along_axis(home_RH, pick_R[:, None], axis=1)[:, 0], n)
    first_P = jnp.full((n + 1,), n, jnp.int32).at[claim_R].min(index_N)  # heaviest claimant
    new_P = (first_P < n) & ~taken_P
    new_P = new_P.at[n].set(False)
    winner_P = jnp.where(new_P, first_P, winner_P)
    won_R = won_R | (winner_P[claim_R] == index_N)
    taken_P |= new_P
  taken_D, winner_D = taken_P[:n], winner_P[:n]
  # Everyone else in weight order: q-th left-over replica -> q-th free device.
  rest_q = prefix_sum(~won_R) - 1
  rest_at_Q = jnp.zeros((n,), jnp.int32).at[jnp.where(won_R, n, rest_q)].set(index_N, mode="drop")
  avoid_D = jnp.any(held_DS == expert_R[rest_at_Q[0]], axis=1) & ~taken_D
  tier_D = jnp.where(taken_D, 2, jnp.where(avoid_D, 1, 0))
  position_D = _rank(load_D, tier_N=tier_D)
  return jnp.where(taken_D, winner_D, rest_at_Q[jnp.minimum(position_D, n - 1)])


def place_in_rounds(load_E, count_E, num_devices: int, slots: int, prev_DS=None, tol=None):
  """Step 2 of one layer by rounds; returns (expert_X, slot_X) in placement order.

  Args:
    load_E: float32 [E] (token, k) pairs per expert.
    count_E: int32 [E] replicas per expert (>= 1, sums to D*S).
    prev_DS, tol: with both given, the home rule (`_sticky_round`): a replica
      stays on a device holding its expert (native, or in prev_DS) when that
      is at most tol heavier than the round's lightest device.
  Returns:
    expert_X int32 [X]: replicas by decreasing n_e / r_e (ties: expert id);
    slot_X int32 [X]: global slot d * S + s of each (round s -> local slot s).
  """
  num_slots = num_devices * slots
  # Replicas by decreasing n_e / r_e, ties by expert id (a stable sort of the replicas in
  # expert order, as in LPT): rank the E experts, then repeat each r_e times, which keeps
  # one expert's replicas adjacent (see the module docstring) and ranks E, not X, entries.
  weight_E = load_E / count_E
  by_weight_E = _inverse(_rank(-weight_E))
  expert_X = by_weight_E[expand_runs(count_E[by_weight_E], num_slots)]
  expert_SD = expert_X.reshape(slots, num_devices)
  weight_SD = weight_E[expert_X].reshape(slots, num_devices)
  sticky = prev_DS is not None and tol is not None
  home_SDH = (_homes(expert_SD.reshape(-1), prev_DS, num_devices, load_E.shape[0]).reshape(
      slots, num_devices, -1) if sticky else jnp.zeros((slots, 0), jnp.int32))

  def one_round(carry, round_s):
    load_D, last_D, held_DS = carry  # device loads; each device's last expert; experts so far
    s, expert_D, weight_D, home_DH = round_s
    if sticky:
      take_D = _sticky_round(load_D, expert_D, home_DH, held_DS, tol)
      held_DS = held_DS.at[:, s].set(expert_D[take_D])
    else:
      # Device d takes the round's replica take_D[d]: lightest device, heaviest replica;
      # devices holding the round's first expert rank last (no twins).
      take_D = _rank(load_D, tier_N=(last_D == expert_D[0]).astype(jnp.int32))
      last_D = expert_D[take_D]
    return (load_D + weight_D[take_D], last_D, held_DS), _inverse(take_D) * slots + s

  # A scan, not S unrolled rounds: the compile stays that of one round (the sticky round is
  # large), and each round depends on the last anyway.
  init = (jnp.zeros((num_devices,), jnp.float32), jnp.full((num_devices,), -1, jnp.int32),
          jnp.full((num_devices, slots), -1, jnp.int32))
  _, slot_SD = jax.lax.scan(one_round, init, (jnp.arange(slots, dtype=jnp.int32), expert_SD,
                                              weight_SD, home_SDH))
  return expert_X, slot_SD.reshape(-1)
