"""Expert parallelism: the three expert paths under `jax.shard_map` over 'expert'.

Dimension legend:
  N tokens (global), n tokens on one shard, g tokens gathered over 'expert' (the
  expert group's n * P), D d_model, K top-k, E experts, P 'expert' axis size,
  S slots per shard, X = P*S global slots, C capacity.

Tokens are split over ('data', 'expert'); expert weights over 'expert'.
  * capacity: each shard packs its tokens into a [P, S, C, D] buffer, one
    dense `all_to_all` sends slot s's rows to the shard holding it, experts
    run as one einsum, a second `all_to_all` brings results home.
    A dropless capacity (the whole shard) runs the grouped path instead: the
    same sums without a buffer of every slot over every token (S/K times the
    expert work, and an `all_to_all` S times the size of the all-gather).
  * dense / ragged / grouped: tokens are all-gathered over 'expert', each shard runs its
    own slots (every slot on every token; `lax.ragged_dot`; blocked matmuls), and
    `psum_scatter` returns every token's sum to its shard. Dropless, and they run on
    every backend: `ragged_all_to_all`, which would send a token only to its experts'
    shards, is unimplemented on XLA:CPU. `impl` picks the path; nothing switches by backend.
Slots: with `slot_expert=None` shard p's slots are its own E/P experts and no
weight moves. With a `slot_expert [X]` map, each shard receives the slot weights
it does not own from their owners inside the step (`replica_fetch`: one
all_to_all of only those, or an all_gather when the plan exceeds its bound);
autodiff sends replica gradients back into the owner's weights.
Padding: with `valid_N`, a padding token's assignments get the slot id X, "no slot",
which every path skips: no buffer place, no work, y = 0, not counted as dropped.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from pr2_jax.checks import check_bound, check_ids, check_int_dtype, is_concrete
from pr2_jax.config import EXPERT_IMPLS
from pr2_jax.models import experts as ex
from pr2_jax.models.grouped import fast_capacity, grouped_experts
from pr2_jax.parallel import replica_fetch
from pr2_jax.parallel.mesh import EXPERT, TOKEN_AXES, axis_size, num_token_shards


def gather_assignments(x_nD, slot_ids_nK, gates_nK, num_slots: int):
  """All-gather a shard's tokens, slot ids and gates over 'expert' in as few collectives as
  the dtypes allow: the ids (exact as float32 up to 2^24, the "no slot" id num_slots
  included) and the gates ride along as float32 columns, of the tokens when those are
  float32 (one all-gather), else beside them (two: bf16 tokens, the rollout's default);
  with num_slots >= 2^24 the three are gathered apart. Each collective is a rendezvous of
  the devices, three per MoE layer and decode step before: on 2 CPU devices the waiting
  was ~10 % of a decode. Inside `shard_map`; returns the gathered
  (x [g, D], slot_ids [g, K], gates [g, K])."""
  gather = functools.partial(jax.lax.all_gather, axis_name=EXPERT, tiled=True)
  if num_slots >= 2 ** 24:  # ids would not be exact as float32
    return gather(x_nD), gather(slot_ids_nK), gather(gates_nK)
  d, k = x_nD.shape[1], slot_ids_nK.shape[1]
  extra_nK2 = jnp.concatenate([gates_nK.astype(jnp.float32), slot_ids_nK.astype(jnp.float32)], 1)
  if x_nD.dtype == jnp.float32:
    all_gD = gather(jnp.concatenate([x_nD, extra_nK2], axis=1))
    x_gD, extra_gK2 = all_gD[:, :d], all_gD[:, d:]
  else:
    x_gD, extra_gK2 = gather(x_nD), gather(extra_nK2)
  return (x_gD, extra_gK2[:, k:].astype(slot_ids_nK.dtype),
          extra_gK2[:, :k].astype(gates_nK.dtype))


def _shard_body(x_nD, slot_ids_nK, gates_nK, valid_n, weights, slot_expert_X, *, impl,
                num_shards, slots_per_shard, capacity, dtype, distributed):
  P_, S = num_shards, slots_per_shard
  p = jax.lax.axis_index(EXPERT) if distributed and P_ > 1 else 0
  # Padding goes to slot X, no slot: outside every shard's [p*S, (p+1)*S), so each path
  # below gives it no place and no work (capacity_positions, grouped_positions and the
  # grouped one-einsum branch keep only ids in range; ragged_dot sorts it past its groups;
  # dense_experts' one-hot is all zeros).
  if valid_n is not None:
    slot_ids_nK = jnp.where(valid_n[:, None], slot_ids_nK, P_ * S)
  if slot_expert_X is not None:
    if distributed and P_ > 1:
      weights = replica_fetch.slot_weights(weights, slot_expert_X, P_, S)
    else:
      weights = weights.take(slot_expert_X)
  weights = weights.astype(dtype)
  x_nD = x_nD.astype(dtype)
  if impl == "capacity" and capacity >= x_nD.shape[0]:
    # Dropless: filling the [P, S, n, D] buffer computes every slot over every token
    # (S/K times the work). The grouped path computes the same sums over only the
    # routed tokens: on two expert shards the peer benchmark's train step went
    # 2.19 -> 0.49 s and its decode 2.03 -> 0.63 s.
    impl = "grouped"
  if impl == "capacity":
    index_nK, keep_nK = ex.capacity_positions(slot_ids_nK, P_ * S, capacity)
    buf_PSCD = ex.dispatch(x_nD, index_nK, P_ * S * capacity).reshape(P_, S, capacity, -1)
    if distributed and P_ > 1:
      buf_PSCD = jax.lax.all_to_all(buf_PSCD, EXPERT, 0, 0, tiled=True)
    y_PSCD = ex.swiglu(buf_PSCD, weights)
    if distributed and P_ > 1:
      y_PSCD = jax.lax.all_to_all(y_PSCD, EXPERT, 0, 0, tiled=True)
    y_nD = ex.combine(y_PSCD.reshape(P_ * S * capacity, -1), index_nK, keep_nK, gates_nK)
    dropped = jnp.sum(~keep_nK & (slot_ids_nK < P_ * S)).astype(jnp.int32)  # real ones only
    if distributed:
      dropped = jax.lax.psum(dropped, TOKEN_AXES)
  else:
    x_gD, slot_ids_gK, gates_gK = x_nD, slot_ids_nK, gates_nK  # g = n on one expert shard
    if distributed and P_ > 1:
      x_gD, slot_ids_gK, gates_gK = gather_assignments(x_nD, slot_ids_nK, gates_nK, P_ * S)
    # The grouped path's one-einsum capacity: an even share of the global slots (the
    # all-gathered assignments mostly belong to other shards' slots).
    grouped = functools.partial(grouped_experts,
                                capacity=fast_capacity(x_gD.shape[0], slot_ids_gK.shape[1], P_ * S))
    fn = {"dense": ex.dense_experts, "ragged": ex.ragged_experts, "grouped": grouped}[impl]
    y_gD = fn(x_gD, slot_ids_gK, gates_gK, weights, slot_offset=p * S)
    y_nD = y_gD
    if distributed and P_ > 1:
      y_nD = jax.lax.psum_scatter(y_gD, EXPERT, scatter_dimension=0, tiled=True)
    # No psum of this constant: a collective that moves nothing still holds a thread of each
    # device on CPU (parallel/distributed.py, CPU_THREADS_PER_DEVICE).
    dropped = jnp.zeros((), jnp.int32)
  return y_nD, dropped


def _check_shapes(x_ND, expert_ids_NK, gates_NK, slot_ids_NK, slot_expert_X, valid_N, weights,
                  impl):
  """Static checks (they hold under jit): a bad shape would be broadcast or cut silently."""
  if impl not in EXPERT_IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {EXPERT_IMPLS}")
  if x_ND.ndim != 2 or expert_ids_NK.ndim != 2:
    raise ValueError(f"x must be [N, D] and expert_ids [N, K]; got shapes {x_ND.shape} and "
                     f"{expert_ids_NK.shape}")
  if expert_ids_NK.shape[0] != x_ND.shape[0]:
    raise ValueError(f"expert_ids has {expert_ids_NK.shape[0]} tokens but x has {x_ND.shape[0]}; "
                     "expected one row of ids per token")
  check_int_dtype("expert_ids", expert_ids_NK, "an integer dtype")
  for name, a in (("gates", gates_NK), ("slot_ids", slot_ids_NK)):
    if a is not None and tuple(a.shape) != tuple(expert_ids_NK.shape):
      raise ValueError(f"{name} has shape {a.shape}, expected expert_ids' {expert_ids_NK.shape} "
                       "[N, K]")
  if slot_expert_X is not None and not hasattr(slot_expert_X, "ndim"):  # a Plan, a list
    raise ValueError(f"slot_expert_X must be an int array [X] (one layer's map, e.g. "
                     f"plan.slot_expert[l].reshape(-1)), got a {type(slot_expert_X).__name__}")
  if slot_expert_X is not None and slot_expert_X.ndim != 1:
    raise ValueError(f"slot_expert_X must be one layer's map [X], got shape {slot_expert_X.shape}")
  if valid_N is not None and (tuple(jnp.shape(valid_N)) != (x_ND.shape[0],)
                              or jnp.result_type(valid_N) != jnp.bool_):
    # An int mask would not say which is padding as clearly, and [B, T] would not broadcast.
    raise ValueError(f"valid_N has shape {tuple(jnp.shape(valid_N))} and dtype "
                     f"{jnp.result_type(valid_N)}; expected bool [N] = ({x_ND.shape[0]},)")
  if x_ND.shape[1] != weights.gate_SDF.shape[1]:
    raise ValueError(f"x has d_model {x_ND.shape[1]}, the expert weights "
                     f"{weights.gate_SDF.shape[1]}")


def _check_values(expert_ids_NK, slot_expert_X, slot_ids_NK, num_experts):
  """Host checks of whatever is concrete (a jitted caller's tracers are left alone)."""
  check_ids(expert_ids_NK, "expert_ids_NK", 0, num_experts, "num_experts")
  if slot_expert_X is not None:
    ex.validate_slot_expert(slot_expert_X, num_experts)
  if slot_ids_NK is None or not is_concrete(slot_ids_NK):
    return
  num_slots = num_experts if slot_expert_X is None else slot_expert_X.shape[0]
  check_ids(slot_ids_NK, "slot_ids_NK", 0, num_slots, "number of slots")
  if is_concrete(expert_ids_NK) and (slot_expert_X is None or is_concrete(slot_expert_X)):
    # A slot holding another expert would run that expert's weights.
    held_NK = np.asarray(slot_ids_NK)
    if slot_expert_X is not None:
      held_NK = np.asarray(slot_expert_X)[held_NK]
    wrong = np.argwhere(held_NK != np.asarray(expert_ids_NK))
    if wrong.size:
      t, k = (int(i) for i in wrong[0])
      raise ValueError(f"slot_ids_NK[{t}, {k}] = {int(np.asarray(slot_ids_NK)[t, k])} holds "
                       f"expert {int(held_NK[t, k])}, but expert_ids_NK[{t}, {k}] = "
                       f"{int(np.asarray(expert_ids_NK)[t, k])}")


def moe_experts(x_ND: jax.Array, expert_ids_NK: jax.Array, gates_NK: jax.Array,
                weights: ex.ExpertWeights, *, impl: str = "capacity", mesh: Mesh | None = None,
                capacity_factor: float = 0.0, capacity: int | None = None,
                slot_expert_X: jax.Array | None = None, slot_ids_NK: jax.Array | None = None,
                dtype=jnp.float32, valid_N: jax.Array | None = None):
  """Runs the routed experts; returns (y float32 [N, D], dropped int32 scalar).

  Args:
    x_ND: token activations, sharded over ('data', 'expert') when `mesh` is set.
    expert_ids_NK, gates_NK: the routing (experts used and their gates).
    weights: per-expert weights [E, ...], sharded over 'expert'.
    impl: 'capacity' | 'ragged' | 'grouped' | 'dense'.
    capacity_factor: capacity per slot relative to an even share, a finite number >= 0
      (as ModelConfig's); 0 = dropless.
    capacity: explicit static int capacity (overrides capacity_factor), e.g. a
      foresight bucket chosen on the host from the planned loads.
    slot_expert_X: int32 [P*S] slot -> expert map; None = identity, S = E/P. Each
      shard receives only the slot weights it does not own (`fetch_slabs` says how many).
    slot_ids_NK: the slot of each assignment (a planner's replica choice);
      default: the first slot holding the expert.
    dtype: computation dtype of the experts.
    valid_N: bool [N], False on padding: its assignments go to no slot on every path (no
      buffer place, no expert work, y = 0) and are not counted in `dropped`, which counts
      only real assignments over capacity. None: every token is real.
  Raises ValueError on bad shapes, a negative or non-finite capacity_factor, and on ids or
  slot maps outside their range when they are concrete (not traced).
  """
  num_experts = weights.gate_SDF.shape[0]
  # capacity_for reads a negative factor as dropless, and NaN or inf fail obscurely in its ceil
  check_bound("capacity_factor", capacity_factor, 0.0, np.finfo(np.float64).max,
              "a finite number >= 0 (0 = dropless)")
  _check_shapes(x_ND, expert_ids_NK, gates_NK, slot_ids_NK, slot_expert_X, valid_N, weights,
                impl)
  n_shards, P_ = num_token_shards(mesh), axis_size(mesh, EXPERT)
  if x_ND.shape[0] % n_shards:
    mesh_shape = dict(mesh.shape) if mesh is not None else {}
    raise ValueError(f"{x_ND.shape[0]} tokens cannot be split over {n_shards} token shards "
                     f"(mesh {mesh_shape}); make the batch divisible")
  if num_experts % P_:
    raise ValueError(f"num_experts={num_experts} must be divisible by the 'expert' axis size {P_}")
  if slot_expert_X is not None and slot_expert_X.shape[0] % P_:
    raise ValueError(f"slot_expert has {slot_expert_X.shape[0]} slots, not a multiple of "
                     f"the 'expert' axis size {P_}")
  _check_values(expert_ids_NK, slot_expert_X, slot_ids_NK, num_experts)
  if slot_expert_X is None:
    S = num_experts // P_
    slot_ids_NK = expert_ids_NK if slot_ids_NK is None else slot_ids_NK
  else:
    S = slot_expert_X.shape[0] // P_
    if slot_ids_NK is None:
      slot_ids_NK = ex.expert_to_slot(expert_ids_NK, slot_expert_X, num_experts)
  n_local = x_ND.shape[0] // n_shards
  if capacity is None:
    capacity = ex.capacity_for(n_local, expert_ids_NK.shape[1], P_ * S, capacity_factor)
  # Static, it sizes the buffers: 2.5 was cut to 2 silently, a traced value failed obscurely.
  if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
    raise ValueError(f"capacity={capacity!r} must be >= 1, a static int")
  static = dict(impl=impl, num_shards=P_, slots_per_shard=S, capacity=int(capacity),
                dtype=jnp.dtype(dtype))
  if mesh is None:
    return _shard_body(x_ND, slot_ids_NK, gates_NK, valid_N, weights, slot_expert_X,
                       distributed=False, **static)
  return _sharded(x_ND, slot_ids_NK, gates_NK, valid_N, weights, slot_expert_X, mesh=mesh,
                  **static)


# Jitted at module level for eager callers: outside jit, shard_map runs its body op by op and
# compiled every op again on each call (48 of the 104 XLA compilations, ~2.5 of the ~5 s of an
# eager model.apply on a 2x4 mesh). A jit traces once per shapes and static arguments; under an
# outer jit it is inlined (the same program, bit-identical outputs and gradients).
@functools.partial(jax.jit, static_argnames=("mesh", "impl", "num_shards", "slots_per_shard",
                                             "capacity", "dtype"))
def _sharded(x_ND, slot_ids_NK, gates_NK, valid_N, weights, slot_expert_X, *, mesh, **static):
  body = functools.partial(_shard_body, distributed=True, **static)
  tok, w_spec = P(TOKEN_AXES, None), P(EXPERT, None, None)
  in_specs = (tok, tok, tok, None if valid_N is None else P(TOKEN_AXES),
              ex.ExpertWeights(w_spec, w_spec, w_spec), None if slot_expert_X is None else P())
  fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(tok, P()))
  return fn(x_ND, slot_ids_NK, gates_NK, valid_N, weights, slot_expert_X)
