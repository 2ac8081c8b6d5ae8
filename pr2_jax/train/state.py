"""Train state created sharded: eval_shape -> shardings -> jit(init).

The state never exists whole on one device: its shardings come from the
parameters' logical axis names (`LOGICAL_RULES`, or `FSDP_PARAM_RULES` under
`ModelConfig.fsdp`) and `jax.jit(init, out_shardings=...)` materialises every
array directly in place.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pr2_jax.config import ModelConfig, check_real
from pr2_jax.parallel.mesh import (DATA, EXPERT, check_mesh, make_mesh, num_token_shards,
                                   tree_shardings)
from pr2_jax.pr2.predictor import init_predictor

# PR2's W_p [L, D, E]: its D is a parameter's d_model, so model.fsdp splits it too.
PREDICTOR_AXES = ("layers", "embed", "experts_logits")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  predictor: Any = None       # PR2 W_p [L, D, E]: its own optimizer, outside the policy params
  pred_opt_state: Any = None


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """`optax.clip_by_global_norm` as one scalar multiply: g * min(1, max_norm / |g|).

  The same updates (to an ulp: optax divides by the norm, then multiplies by `max_norm`;
  below `max_norm` both return g untouched) and the same empty state, so checkpoints
  restore either way. Why not optax's: its `select(|g| < max_norm, g, g / |g| * max_norm)`
  makes XLA:CPU write the divided gradient out (a divide is too dear to recompute in
  each consumer) and AdamW's moment passes read both copies; a multiply by a scalar
  fuses into them. `python -m experiments.bench_optimizer`: 27 % fewer bytes accessed by
  the clipped AdamW update. (optax keeps its select for gradients through the update itself,
  which nothing here takes.)
  """
  check_real("clip_by_global_norm", "max_norm", max_norm, 0, inclusive=False)

  def update(updates, state, params=None):
    del params
    scale = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
    return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(learning_rate: float, *, warmup_steps: int = 0, total_steps: int = 0,
                   weight_decay: float = 0.0, grad_clip: float = 1.0, b2: float = 0.999,
                   eps: float = 1e-8):
  """AdamW with global-norm clipping. With total_steps > 0 the learning rate warms up linearly
  from 0 over `warmup_steps` and then decays (cosine) to 10% at `total_steps`; with
  warmup_steps = 0 the first update is at the full rate. With total_steps = 0 it is constant
  and `warmup_steps` is unused."""
  if total_steps > 0 and warmup_steps == 0:  # optax's warm-up would spend update 1 at rate 0
    lr = optax.cosine_decay_schedule(learning_rate, total_steps, alpha=0.1)
  elif total_steps > 0:
    lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                            max(total_steps, warmup_steps + 1), learning_rate * 0.1)
  else:
    lr = learning_rate
  return optax.chain(clip_by_global_norm(grad_clip),
                     optax.adamw(lr, b2=b2, eps=eps, weight_decay=weight_decay))


def _named(path, names: frozenset[str]) -> bool:
  return any(getattr(k, "key", None) in names for k in path)


def keep_only(tree, names: frozenset[str]):
  """`tree` with zeros at every leaf whose path has no key in `names`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _named(path, names) else jnp.zeros_like(x), tree)


def train_only(tx: optax.GradientTransformation,
               names: frozenset[str]) -> optax.GradientTransformation:
  """`tx` on the parameters whose path has a key in `names` (e.g. every MoE layer's router,
  "gate"); the others get zero updates. The gradients are masked before `tx`, so its
  clipping sees only the trained ones and those step as under `tx` alone, and the updates
  after it, so weight decay leaves the frozen ones alone too. The optimizer state is `tx`'s
  whole (frozen moments stay 0): its shardings and checkpoints are those of every run.
  `init` raises ValueError when no parameter is named (a misspelt name): the run would
  train nothing."""
  def init(params):
    if not any(_named(path, names) for path, _ in jax.tree_util.tree_leaves_with_path(params)):
      raise ValueError(f"train_only: no parameter path has a key in {sorted(names)}, so "
                       "nothing would train")
    return tx.init(params)

  def update(updates, state, params=None):
    updates, state = tx.update(keep_only(updates, names), state, params)
    return keep_only(updates, names), state

  return optax.GradientTransformation(init, update)


def init_tokens(mesh: Mesh | None) -> jax.Array:
  """The smallest token batch the mesh can split (init only needs shapes)."""
  return jnp.zeros((num_token_shards(mesh), 1), jnp.int32)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh):
  tokens = init_tokens(mesh)

  def init(rng):
    params = model.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return init


def state_shardings(model: nn.Module, mesh: Mesh, boxed_state):
  """Shardings of a boxed abstract state (or parameter tree) of `model` on `mesh`. Raises
  ValueError if the model was built on another mesh: its shard_maps would split the work one
  way and the state another, resharding at every call, unlike what validate_mesh approved."""
  check_mesh(mesh)
  own = getattr(model, "mesh", None)
  if own is not None and own != mesh:
    raise ValueError(f"the model was built on the mesh {dict(own.shape)}, the state is asked "
                     f"for on {dict(mesh.shape)} (or on other devices): use one mesh for both")
  model.config.validate_mesh(mesh.shape[EXPERT], mesh.shape[DATA])
  return tree_shardings(mesh, boxed_state, fsdp=model.config.fsdp)


def state_initializer(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                      rng: jax.Array):
  """(init, state_shardings): `init(key)` is a jitted init whose arrays are born in their
  shardings. Keep it to initialise again from another key without tracing again; `rng` only
  gives the key's type."""
  init = _init_fn(model, tx, mesh)
  shardings = state_shardings(model, mesh, jax.eval_shape(init, rng))
  return jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings), shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       mesh: Mesh):
  """Returns (state, state_shardings) with every array born in its sharding."""
  init, shardings = state_initializer(model, tx, mesh, rng)
  return init(rng), shardings


def predictor_initializer(config: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh):
  """(init, (w_sharding, opt_shardings)) for PR2's W_p = 0 and its optimizer state.

  Replicated by default; under `config.fsdp` W_p and its
  moments are split over 'data' on D like every other parameter (for the 30B config
  that is 50 MB of W_p and 100 MB of moments per device otherwise). `init()` is jitted
  and its arrays are born in those shardings. Raises ValueError if `mesh` cannot hold
  the model (`ModelConfig.validate_mesh`).
  """
  config.validate_mesh(mesh.shape[EXPERT], mesh.shape[DATA])

  def init():
    w = nn.LogicallyPartitioned(
        init_predictor(config.num_moe_layers, config.d_model, config.num_experts), PREDICTOR_AXES)
    return w, tx.init(w)

  shardings = tree_shardings(mesh, jax.eval_shape(init), fsdp=config.fsdp)
  return jax.jit(lambda: nn.unbox(init()), out_shardings=shardings), shardings


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) under `shardings`."""
  def one(x, sharding):
    return int(np.prod(sharding.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(one, abstract_tree, shardings)))


def state_memory(model: nn.Module, tx: optax.GradientTransformation,
                 mesh: Mesh | None = None) -> dict:
  """Per-device bytes of the train state on `mesh` (None: the model's mesh, one device if it
  has none), from shapes alone (nothing is allocated).

  Gradients are laid out like the parameters, so they cost `params` again
  during the update; activations are not counted (they depend on the batch).
  """
  if mesh is None:
    mesh = getattr(model, "mesh", None) or make_mesh(1, 1, jax.devices()[:1])
  boxed = jax.eval_shape(_init_fn(model, tx, mesh), jax.random.key(0))
  shardings = state_shardings(model, mesh, boxed)
  state = nn.unbox(boxed)
  params = bytes_per_device(state.params, shardings.params)
  opt = bytes_per_device(state.opt_state, shardings.opt_state)
  total_params = sum(x.size for x in jax.tree.leaves(state.params))
  return {"param_count": total_params, "params": params, "opt_state": opt, "grads": params,
          "total": 2 * params + opt}


def replicated(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of `mesh` (scalars, metrics)."""
  return NamedSharding(mesh, PartitionSpec())
