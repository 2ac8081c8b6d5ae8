"""Targeted replica-weight fetch: each expert shard receives only the slot weights it lacks.

Dimension legend:
  E experts, P 'expert' axis size, L = E/P experts each shard owns, S slots per
  shard, X = P*S global slots, B slabs one owner may send one shard (static),
  D d_model, F expert hidden width.

With a planner's `slot_expert [X]` map, shard p's slot s holds expert
e = slot_expert[p*S + s], whose weights live on its owner e // L. Gathering
every owner's experts (`all_gather`) moves all E experts' weights into every
shard on every call, whatever the plan changed. Here every owner sends every
shard only the experts that shard's slots hold and it does not own: one
`all_to_all` of [P, B] slabs per weight. Autodiff transposes it into the
reverse `all_to_all`, and the replicas' gradients are added into the owner's
weights.

B must be static. A plan that keeps each shard's own experts at home and
fills only its S - L redundant slots with copies needs B = S - L; the
planner sometimes moves a shard's own expert away and that shard then takes
more from one owner. So B = S - L and 2(S - L) are both compiled (where they
move less than the all_gather), and `lax.switch` on the replicated map picks
the smallest that fits, else the all_gather: every shard takes the same
branch, and a plan never gives a wrong answer, only a slower call.
`fetch_slabs` tells on the host what a map costs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pr2_jax.checks import check_ids
from pr2_jax.models import experts as ex
from pr2_jax.parallel.mesh import EXPERT


def fetch_bounds(num_experts: int, num_shards: int, slots_per_shard: int) -> tuple[int, ...]:
  """The per-(owner, shard) bounds B compiled, smallest first: S - L (a shard's redundant
  slots, at least 1) and twice that, each only if its all_to_all (P*B slabs a shard) moves
  less than gathering all E experts. On synthetic Qwen3-30B-shaped traces every planner
  layout fitted the larger one (docs/results/balance.md)."""
  base = max(1, slots_per_shard - num_experts // num_shards)
  return tuple(b for b in (base, 2 * base) if num_shards * b < num_experts)


def fetch_plan(slot_expert_X: jax.Array, num_experts: int, num_shards: int):
  """Who sends what, from the replicated slot map (pure, the same on every shard).

  Returns (remote_PS: slot p,s holds an expert shard p does not own;
  rank_PS: its place among the slots p needs from that owner; local_PS: the
  expert's index on its owner, e % L; need_PQ: slabs owner q must send shard p).
  """
  slots = slot_expert_X.shape[0] // num_shards
  per_owner = num_experts // num_shards
  expert_PS = slot_expert_X.reshape(num_shards, slots)
  owner_PS = expert_PS // per_owner
  remote_PS = owner_PS != jnp.arange(num_shards)[:, None]
  from_PSQ = (remote_PS[:, :, None]
              & (owner_PS[:, :, None] == jnp.arange(num_shards))).astype(jnp.int32)
  rank_PS = jnp.sum((jnp.cumsum(from_PSQ, axis=1) - 1) * from_PSQ, axis=2)
  return remote_PS, rank_PS, expert_PS % per_owner, jnp.sum(from_PSQ, axis=1)


def _branch(need_PQ: jax.Array, bounds: tuple[int, ...]) -> jax.Array:
  """Index of the smallest bound that holds every pair's need; len(bounds) = all_gather."""
  need = jnp.max(need_PQ)
  return sum((need > b).astype(jnp.int32) for b in bounds) if bounds else jnp.int32(0)


def fetch_slabs(slot_expert_X: jax.Array, num_experts: int, num_shards: int) -> jax.Array:
  """Slabs per weight one shard receives for the map [X] (or [..., X], e.g. a plan's
  layers flattened: `plan.slot_expert.reshape(L, -1)`, not its [L, D, S]): P*B for the
  targeted all_to_all with the smallest fitting bound B, E for the all_gather fallback, 0 on
  one shard (no collective). Every slot holds an expert id in [0, E), as in a map the model
  runs (no EMPTY = -1): a concrete map with any other id raises ValueError (its owner would be
  a shard that does not exist, and the count silently wrong)."""
  if num_shards < 1 or num_experts % num_shards or slot_expert_X.shape[-1] % num_shards:
    raise ValueError(f"fetch_slabs: num_shards={num_shards} must divide num_experts={num_experts} "
                     f"and the map's {slot_expert_X.shape[-1]} slots")
  if slot_expert_X.shape[-1] < num_experts:  # e.g. a plan's [L, D, S]: S read as X, counts wrong
    raise ValueError(f"fetch_slabs: the map's last axis has {slot_expert_X.shape[-1]} slots, fewer "
                     f"than num_experts={num_experts}: pass [..., X] (a plan's slot_expert "
                     "reshaped to [L, D*S])")
  check_ids(slot_expert_X, "slot_expert_X", 0, num_experts, "num_experts")
  if num_shards == 1:
    return jnp.zeros(slot_expert_X.shape[:-1], jnp.int32)
  bounds = fetch_bounds(num_experts, num_shards, slot_expert_X.shape[-1] // num_shards)
  sizes = jnp.array([num_shards * b for b in bounds] + [num_experts], jnp.int32)
  flat = slot_expert_X.reshape(-1, slot_expert_X.shape[-1])
  branch = jax.vmap(lambda m: _branch(fetch_plan(m, num_experts, num_shards)[3], bounds))(flat)
  return sizes[branch].reshape(slot_expert_X.shape[:-1])


def _targeted(weights: ex.ExpertWeights, plan, slot_expert_X, num_experts, num_shards, bound):
  """Inside shard_map over 'expert': this shard's [S, ...] slot weights via one all_to_all;
  `plan` is `fetch_plan` of the map."""
  p = jax.lax.axis_index(EXPERT)
  remote_PS, rank_PS, local_PS, _ = plan
  owner_PS = slot_expert_X.reshape(remote_PS.shape) // (num_experts // num_shards)
  # As the owner: row r, place b holds the expert shard r needs from me at its rank b (my
  # expert 0 pads the places nobody needs).
  shard_PS = jnp.broadcast_to(jnp.arange(num_shards)[:, None], remote_PS.shape)
  send_PB = jnp.zeros((num_shards, bound), jnp.int32).at[
      jnp.where(remote_PS & (owner_PS == p), shard_PS, num_shards), rank_PS].set(
          local_PS, mode="drop")
  # As the receiver: my slots index [my own L experts ; the P*B received slabs].
  index_S = jnp.where(remote_PS[p], num_experts // num_shards + owner_PS[p] * bound + rank_PS[p],
                      local_PS[p])

  def one(own_L):  # [L, ...] -> [S, ...], for each of the three weights
    recv_PB = jax.lax.all_to_all(own_L[send_PB], EXPERT, 0, 0, tiled=True)
    return jnp.concatenate([own_L, recv_PB.reshape((-1,) + own_L.shape[1:])])[index_S]

  return ex.ExpertWeights(*(one(w) for w in weights))


def slot_weights(weights: ex.ExpertWeights, slot_expert_X: jax.Array, num_shards: int,
                 slots_per_shard: int) -> ex.ExpertWeights:
  """Inside shard_map over 'expert' (P > 1): this shard's slot weights [S, ...] from the
  owners' [L, ...]: the targeted all_to_all with the smallest bound the map fits, else the
  all_gather (`lax.switch` on the replicated map: every shard takes the same branch)."""
  num_experts = weights.gate_SDF.shape[0] * num_shards
  bounds = fetch_bounds(num_experts, num_shards, slots_per_shard)
  p = jax.lax.axis_index(EXPERT)
  my_experts_S = jax.lax.dynamic_slice_in_dim(slot_expert_X, p * slots_per_shard, slots_per_shard)

  def gather_all(w):
    return ex.ExpertWeights(*(jax.lax.all_gather(a, EXPERT, tiled=True) for a in w)).take(
        my_experts_S)

  if not bounds:
    return gather_all(weights)
  plan = fetch_plan(slot_expert_X, num_experts, num_shards)
  targeted = [functools.partial(_targeted, plan=plan, slot_expert_X=slot_expert_X,
                                num_experts=num_experts, num_shards=num_shards, bound=b)
              for b in bounds]
  return jax.lax.switch(_branch(plan[3], bounds), targeted + [gather_all], weights)
