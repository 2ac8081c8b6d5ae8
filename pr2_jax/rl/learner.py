"""The learner ("training engine", float32): old-log-prob pass and off-κ updates.

Dimension legend:
  B sequences in a rollout batch, S slots (prompt + response), T = S - 1
  predicted positions, M micro-steps per mini-batch, b sequences per
  micro-step, L MoE layers, K top-k, E experts, V vocab.

A rollout batch is cut into κ mini-batches (one optimizer step each), each of
M micro-steps of gradient accumulation. `micro_step` is the unit the
load-balancing planner works on: one forward/backward over b sequences with
their replayed routes. Batches are dicts of arrays shaped [M, b, ...]; the
loss denominators are the *mini-batch's*, so M accumulated micro-steps give
exactly the mini-batch gradient.

Replay modes (DESIGN §2): 'none' routes live everywhere; 'r2' replays the
routes the old-log-prob pass recorded; 'r3' replays the rollout's routes.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pr2_jax.models.routing import top_k_experts
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import TOKEN_AXES
from pr2_jax.rl import losses, metrics
from pr2_jax.rl.config import RLConfig
from pr2_jax.train.state import TrainState, replicated


def forward_logprobs(model: MoETransformer, params, seq: dict, routes, temperature: float):
  """Log-probs [b, T] of tokens[:, 1:] under π_θ/temperature, plus the model output."""
  out = model.apply({"params": params}, seq["tokens"], routes=routes, positions=seq["positions"],
                    valid=seq["valid"], return_router_logits=True)
  scale = 1.0 if temperature == 0 else 1.0 / temperature
  logits_BTV = out.logits[:, :-1] * scale
  return losses.token_logprobs(logits_BTV, seq["tokens"][:, 1:]), logits_BTV, out


def old_logprob_pass(model: MoETransformer, config: RLConfig, params, batch: dict):
  """π_old over every micro-batch [N, b, ...]; returns (old_logp [N, b, T], routes used).

  Runs micro-batch by micro-batch with the same forward as the update, so with
  equal routes and dtype π_old and the first mini-step's π_θ agree bitwise.
  """
  def one(_, micro):
    routes = micro["rollout_routes"] if config.replay_mode == "r3" else None
    logp, _, out = forward_logprobs(model, params, micro, routes, config.temperature)
    return None, (logp, out.routes)

  return jax.lax.scan(one, None, batch)[1]


def micro_step(model: MoETransformer, config: RLConfig, params, micro: dict, loss_denom,
               token_denom):
  """Loss and additive statistics of one micro-step (differentiate w.r.t. params)."""
  routes = None if config.replay_mode == "none" else micro["replay_routes"]
  logp_BT, logits_BTV, out = forward_logprobs(model, params, micro, routes, config.temperature)
  mask_BT = micro["response_mask"][:, 1:]
  rollout_BT = micro["rollout_logp"][:, 1:]
  against_BT = rollout_BT if config.ratio_denominator == "rollout" else micro["old_logp"]
  is_weight = None
  if config.tis_cap > 0 and config.ratio_denominator == "old":
    is_weight = (losses.tis_weights(micro["old_logp"], rollout_BT, config.tis_cap)
                 if config.loss == "dapo" else
                 losses.sequence_tis_weights(micro["old_logp"], rollout_BT, mask_BT, config.tis_cap))
  loss, aux = losses.policy_loss(config.loss, logp_BT, against_BT, micro["adv"], mask_BT,
                                 clip_low=config.clip_low, clip_high=config.clip_high,
                                 is_weight=is_weight, denom=loss_denom)
  probs_BTLE = jax.nn.softmax(out.router_logits, axis=-1)
  live_BTLK = top_k_experts(probs_BTLE, micro["rollout_routes"].shape[-1])
  stats = {
      "loss": loss,
      "entropy": jax.lax.stop_gradient(losses.token_entropy(logits_BTV, mask_BT, token_denom)),
      "loss_sums": aux["sums"],
      "mismatch": metrics.mismatch_sums(logp_BT, rollout_BT, mask_BT),
      "routing": metrics.routing_sums(micro["rollout_routes"], live_BTLK, probs_BTLE,
                                      micro["valid"]),
      "dropped": out.dropped.sum(),
  }
  return loss, stats


def minibatch_metrics(stats: dict, grads) -> dict:
  """Means from the micro-steps' summed statistics."""
  return {"loss": stats["loss"], "entropy": stats["entropy"], "dropped": stats["dropped"],
          "grad_norm": optax.global_norm(grads),
          **losses.loss_stats_from_sums(stats["loss_sums"]),
          **{f"mismatch_{k}" if k.startswith("ratio") else k: v
             for k, v in metrics.mismatch_from_sums(stats["mismatch"]).items()},
          **metrics.routing_from_sums(stats["routing"])}


def update_step(model: MoETransformer, config: RLConfig, tx: optax.GradientTransformation,
                state: TrainState, minibatch: dict):
  """One optimizer step from M accumulated micro-steps ([M, b, ...] arrays)."""
  mask_NT = minibatch["response_mask"][..., 1:].reshape(-1, minibatch["response_mask"].shape[-1] - 1)
  loss_denom = losses.loss_denominator(config.loss, mask_NT)
  token_denom = jnp.maximum(mask_NT.sum(), 1.0)
  grad_fn = jax.grad(functools.partial(micro_step, model, config), has_aux=True)

  def accumulate(acc, micro):
    grads, stats = grad_fn(state.params, micro, loss_denom, token_denom)
    return jax.tree.map(jnp.add, acc, (grads, stats)), None

  first = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], minibatch),
                         loss_denom, token_denom)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
  (grads, stats), _ = jax.lax.scan(accumulate, zeros, minibatch)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  return TrainState(state.step + 1, params, opt_state), minibatch_metrics(stats, grads)


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  """[M, b, ...] arrays: the b axis is split over the token shards."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, PartitionSpec(None, TOKEN_AXES, *([None] * (x.ndim - 2)))),
      batch)


def make_learner_fns(model: MoETransformer, config: RLConfig, tx, mesh: Mesh, state_shardings,
                     example_batch: dict) -> tuple[Callable, Callable]:
  """(old_logprob_fn(params, batch), update_fn(state, minibatch)), jitted with shardings."""
  shard = batch_shardings(mesh, example_batch)
  # The old-log-prob pass sees the batch before old_logp/replay_routes exist;
  # its inputs arrive already placed by `batch_shardings`.
  old_fn = jax.jit(functools.partial(old_logprob_pass, model, config))
  update_fn = jax.jit(functools.partial(update_step, model, config, tx),
                      in_shardings=(state_shardings, shard),
                      out_shardings=(state_shardings, replicated(mesh)), donate_argnums=0)
  return old_fn, update_fn
