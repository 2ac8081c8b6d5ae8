"""Supervised next-token training: one jitted, sharded, donated step.

Dimension legend: B batch, T sequence length, t = T - 1 predicted positions, V vocab.

`make_train_step` builds the step once per (model, optimizer, mesh); the
loop in `train` is a thin host shell that feeds procedurally generated
batches and hands metrics to a callback (logging and files belong to the
caller in `experiments/`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from pr2_jax.config import ModelConfig, check_int, check_real
from pr2_jax.data import synthetic
from pr2_jax.parallel.mesh import logical_sharding, num_token_shards
from pr2_jax.models.layers import first_argmax
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.train.state import TrainState, create_train_state, make_optimizer, replicated


@dataclasses.dataclass(frozen=True)
class SupervisedConfig:
  batch_size: int = 32        # sequences per step (global, split over data x expert)
  num_digits: int = 8         # reverse-copy task length; sequence length is 2n + 3
  num_steps: int = 300        # optimizer steps
  learning_rate: float = 3e-3 # peak AdamW learning rate
  warmup_steps: int = 20      # linear warmup steps
  weight_decay: float = 0.0   # AdamW decoupled weight decay
  grad_clip: float = 1.0      # global-norm gradient clipping
  seed: int = 0               # parameter init and data seed
  log_every: int = 25         # steps between metric callbacks

  def __post_init__(self):
    for name in ("batch_size", "num_digits", "num_steps", "log_every"):
      check_int("SupervisedConfig", name, getattr(self, name))
    for name in ("warmup_steps", "seed"):
      check_int("SupervisedConfig", name, getattr(self, name), minimum=0)
    # NaN passes every `<=` test: a NaN learning rate trained on NaN silently.
    for name in ("learning_rate", "grad_clip"):
      check_real("SupervisedConfig", name, getattr(self, name), 0, inclusive=False)
    check_real("SupervisedConfig", "weight_decay", self.weight_decay, 0)

  def validate_mesh(self, mesh: Mesh | None) -> None:
    shards = num_token_shards(mesh)
    if self.batch_size % shards:
      raise ValueError(f"SupervisedConfig.batch_size={self.batch_size} must be divisible by the "
                       f"{shards} token shards (mesh data x expert)")


def next_token_loss(logits_BTV: jax.Array, tokens_BT: jax.Array, mask_BT: jax.Array):
  """(loss, accuracy): the masked token-mean cross-entropy of predicting tokens[:, 1:] from
  logits[:, :-1], and the fraction of those masked targets the argmax gets right."""
  logits_BtV = logits_BTV[:, :-1]
  targets_Bt, mask_Bt = tokens_BT[:, 1:], mask_BT[:, 1:].astype(jnp.float32)
  nll_Bt = optax.softmax_cross_entropy_with_integer_labels(logits_BtV, targets_Bt)
  denom = jnp.maximum(mask_Bt.sum(), 1.0)
  accuracy = jnp.sum((first_argmax(logits_BtV) == targets_Bt) * mask_Bt) / denom
  return jnp.sum(nll_Bt * mask_Bt) / denom, accuracy


def make_train_step(model: MoETransformer, tx: optax.GradientTransformation, mesh: Mesh,
                    state_shardings, batch_keys=("tokens", "loss_mask")) -> Callable:
  """jit(step) with explicit shardings; the input state is donated.

  A batch holds `tokens` and `loss_mask` [B, T] and optionally `positions`
  and `valid` (left-padded prompts); `batch_keys` names the keys it has.
  """
  aux_coef = model.config.aux_loss_coef

  def step(state: TrainState, batch):
    def loss_fn(params):
      out = model.apply({"params": params}, batch["tokens"], positions=batch.get("positions"),
                        valid=batch.get("valid"))
      nll, acc = next_token_loss(out.logits, batch["tokens"], batch["loss_mask"])
      return nll + aux_coef * out.aux_loss, (nll, acc, out)

    grads, (nll, acc, out) = jax.grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": nll, "accuracy": acc, "grad_norm": optax.tree.norm(grads),
               "aux_loss": out.aux_loss, "dropped": out.dropped.sum()}
    return TrainState(state.step + 1, params, opt_state), metrics

  batch_sharding = {k: logical_sharding(mesh, ("batch", "length")) for k in batch_keys}
  return jax.jit(step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)


def train(model_config: ModelConfig, config: SupervisedConfig, mesh: Mesh,
          on_metrics: Callable[[int, dict], None] | None = None):
  """Trains on the reverse-copy task; returns (state, list of metric dicts)."""
  config.validate_mesh(mesh)
  if model_config.vocab_size < synthetic.MIN_VOCAB:
    raise ValueError(f"ModelConfig.vocab_size={model_config.vocab_size} is below the task's "
                     f"{synthetic.MIN_VOCAB} tokens")
  model = MoETransformer(model_config, mesh)
  tx = make_optimizer(config.learning_rate, warmup_steps=config.warmup_steps,
                      total_steps=config.num_steps, weight_decay=config.weight_decay,
                      grad_clip=config.grad_clip)
  state, shardings = create_train_state(model, tx, jax.random.key(config.seed), mesh)
  train_step = make_train_step(model, tx, mesh, shardings)
  batch_sharding = logical_sharding(mesh, ("batch", "length"))
  rng = np.random.default_rng(config.seed)
  history, t0 = [], time.perf_counter()
  for step in range(1, config.num_steps + 1):
    batch = synthetic.reverse_copy_batch(rng, config.batch_size, config.num_digits)
    state, metrics = train_step(state, jax.device_put(batch, batch_sharding))
    if step % config.log_every == 0 or step in (1, config.num_steps):
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      metrics.update(step=step, elapsed_s=time.perf_counter() - t0)
      history.append(metrics)
      if on_metrics is not None:
        on_metrics(step, metrics)
  return state, history
