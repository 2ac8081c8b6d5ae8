"""The device mesh and the one table that maps logical axis names to it.

Parameters and activations are annotated with logical names ('batch',
'expert', 'embed', ...); `LOGICAL_RULES` says which mesh axis each name is
sharded over. Tokens are sharded over both mesh axes (data parallel everywhere
outside the experts); expert weights over 'expert'. The shard_maps (routing,
the expert path, the shuffle, the learner's per-shard work) and the batch checks
name the same split as `TOKEN_AXES` and `EXPERT`: a new layout changes those
constants with the table's 'batch' and 'expert' rows.
With `ModelConfig.fsdp`, parameters (only) follow `FSDP_PARAM_RULES`, which
also split their 'embed' dimension over 'data'; XLA then gathers each weight
where it is used and sums its gradient back into the split layout.
"""

from __future__ import annotations

import functools
import inspect
from typing import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA, EXPERT = "data", "expert"
TOKEN_AXES = (DATA, EXPERT)  # mesh axes a token (batch) dimension is split over

LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", TOKEN_AXES),
    ("expert", EXPERT),
    ("length", None),
    ("embed", None),
    ("vocab", None),
    ("heads", None),
    ("kv_heads", None),
    ("head_dim", None),
    ("mlp", None),
    ("layers", None),
    ("experts_logits", None),  # router output columns: replicated, tokens are sharded
)

# Tried first for parameters under ModelConfig.fsdp; a rule whose mesh axis a
# parameter already uses is skipped (flax), so expert weights get ('expert', 'data').
FSDP_PARAM_RULES = (("embed", DATA),) + LOGICAL_RULES


def make_mesh(data: int, expert: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'expert') mesh of Auto axes; data*expert must equal the device count."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = []
  for name, size in ((DATA, data), (EXPERT, expert)):
    # numpy ints (a size computed from array shapes) are ints; bools and floats are not.
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
      raise ValueError(f"mesh axis '{name}' size must be a positive int, got {size!r}")
    sizes.append(int(size))
  data, expert = sizes
  if data * expert != len(devices):
    raise ValueError(f"mesh data={data} x expert={expert} = {data * expert} devices, "
                     f"but {len(devices)} are available")
  return jax.make_mesh((data, expert), (DATA, EXPERT), axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def check_mesh(mesh: Mesh | None) -> None:
  """Raises ValueError unless `mesh` is None (one device) or a mesh like `make_mesh`'s: axes
  ('data', 'expert'), both Auto. Another mesh failed deep inside JAX (a bare KeyError: 'expert';
  jax.make_mesh's default Explicit axes in with_sharding_constraint)."""
  if mesh is None:
    return
  if not isinstance(mesh, Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh (pr2_jax.parallel.mesh.make_mesh(data, "
                     f"expert)) or None, got {type(mesh).__name__}")
  types = tuple(getattr(t, "name", str(t)) for t in mesh.axis_types)
  if tuple(mesh.axis_names) != (DATA, EXPERT) or any(t != AxisType.Auto for t in mesh.axis_types):
    raise ValueError(f"the model needs a ('data', 'expert') mesh of Auto axes "
                     f"(pr2_jax.parallel.mesh.make_mesh(data, expert)), got axes "
                     f"{tuple(mesh.axis_names)} of types {types}")


def axis_size(mesh: Mesh | None, name: str) -> int:
  """Size of mesh axis `name`; 1 without a mesh (one device)."""
  return 1 if mesh is None else mesh.shape[name]


def num_token_shards(mesh: Mesh | None) -> int:
  """How many pieces a batch is split into: the product of the `TOKEN_AXES` sizes."""
  return int(np.prod([axis_size(mesh, a) for a in TOKEN_AXES]))


def check_batch_split(batch: int, mesh: Mesh | None) -> None:
  """Static: `batch` rows split evenly over the mesh's token shards ('data' x 'expert')."""
  shards = num_token_shards(mesh)
  if batch % shards:
    raise ValueError(f"batch size {batch} must be divisible by the {shards} token shards of the "
                     f"mesh {dict(mesh.shape)} (the batch is split over data x expert)")


def on_token_shards(fn, mesh: Mesh | None, num_whole: int = 0):
  """`fn` run on each token shard: every argument and output is split on its first dimension
  over 'data' x 'expert' (the batch's split); None arguments pass through. Only for functions
  whose rows on one shard depend on that shard's rows alone (row-wise ones, or ones defined
  per token shard like `assign_replicas`). The last `num_whole` arguments (pytrees) reach every
  shard whole, unsplit; anything else `fn` needs is closed over.

  Why: XLA's SPMD partitioner has no rule for `lax.top_k` on a split batch. Under plain jit it
  all-gathers the operand, and every device top-k's the global batch: at Qwen3-30B's router
  (128 experts) a [global tokens, 128] float32 gather per layer. Raises ValueError when an
  argument's rows do not split evenly over the token shards.

  Eager calls (no traced argument) run jitted. Pass a module-level function or one that
  compares by value (a frozen dataclass with `__call__`, as MoEBlock's routing) and calls with
  the same shapes reuse one program; a function made per call (a lambda, a closure) compiles
  once per call. So pass arrays that change between calls (a balance plan) as whole arguments,
  not in a closure."""
  if mesh is None or num_token_shards(mesh) == 1:
    return fn

  def on_shards(*args):
    for a in args[:len(args) - num_whole]:
      if a is not None:
        check_batch_split(a.shape[0], mesh)
    if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
      # Under a trace the caller's program is compiled whole: the same ops as ever, and no jit
      # cache entry pinning a closure over this trace's tracers.
      return _shard_rows(fn, mesh, num_whole, *args)
    if not _reusable(fn):  # made per call: a program of its own, not kept
      return jax.jit(functools.partial(_shard_rows, fn, mesh, num_whole))(*args)
    return _shard_rows_jit(fn, mesh, num_whole, *args)
  return on_shards


def _reusable(fn) -> bool:
  """Whether `fn` is the same key on every call: compared by value, or a module-level function
  (one defined in a function body is a new object per call, and a cache entry would pin it)."""
  if type(fn).__eq__ is not object.__eq__:
    return True
  return inspect.isfunction(fn) and "<" not in fn.__qualname__  # not '<locals>', '<lambda>'


def _shard_rows(fn, mesh: Mesh, num_whole: int, *args):
  rows = PartitionSpec(TOKEN_AXES)
  split = len(args) - num_whole
  specs = tuple(None if a is None else rows for a in args[:split]) + (PartitionSpec(),) * num_whole
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=rows)(*args)


# Outside jit, shard_map runs `fn` op by op and compiled every op again on each call (28 XLA
# compilations per MoE layer's routing, ~1 s, on a 2x4 mesh). A jit traces once per shapes and
# static `fn`, which jax compares by equality: a value-compared `fn` hits its cache.
_shard_rows_jit = jax.jit(_shard_rows, static_argnums=(0, 1, 2))


def logical_spec(axes: Sequence[str | None]) -> PartitionSpec:
  """The PartitionSpec `LOGICAL_RULES` give an array with these logical axis names."""
  return nn.logical_to_mesh_axes(tuple(axes), LOGICAL_RULES)


def logical_sharding(mesh: Mesh, axes: Sequence[str | None]) -> NamedSharding:
  return NamedSharding(mesh, logical_spec(axes))


def constrain(x: jax.Array, mesh: Mesh | None, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op without a mesh."""
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_sharding(mesh, axes))


def tree_shardings(mesh: Mesh, boxed_tree, fsdp: bool = False):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (or plain) abstract leaves;
  `fsdp` (parameter trees only) uses `FSDP_PARAM_RULES`."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, FSDP_PARAM_RULES if fsdp else LOGICAL_RULES)


def partitioned(init_fn, axes: Sequence[str | None]):
  """Wraps a Flax initializer so the parameter carries logical axis names."""
  return nn.with_logical_partitioning(init_fn, tuple(axes))
