"""The learner ("training engine", float32): old-log-prob pass and off-κ updates.

Dimension legend:
  B sequences in a rollout batch, S slots (prompt + response), T = S - 1
  predicted positions, M micro-steps per mini-batch, b sequences per
  micro-step, F cached feature positions per sequence, L MoE layers,
  K top-k, E experts, D d_model, V vocab; N = b*F feature rows, n (b) one token
  shard's share of N (of b).

A rollout batch is cut into κ mini-batches (one optimizer step each), each of
M micro-steps of gradient accumulation. `micro_step` is the unit the
load-balancing planner works on: one forward/backward over b sequences with
their replayed routes. Batches are dicts of arrays shaped [M, b, ...]; the
loss denominators are the *mini-batch's*, so M accumulated micro-steps give
exactly the mini-batch's policy-loss gradient. The Switch aux loss (off by
default) is the micro-steps' mean, as per-micro-batch aux losses usually are:
E·Σ f_e·P_e multiplies two batch means, so it is not additive over micro-steps.

Replay modes (DESIGN §2): 'none' routes live everywhere; 'r2' replays the
routes the old-log-prob pass recorded; 'r3' replays the rollout's routes;
'pr2' replays the rollout's *predicted* routes; 'pr2_r2' predicts in the
old-log-prob pass. PR2's predictor W_p lives outside the policy parameters
with its own optimizer: the policy loss cannot reach it, and its own loss
(on cached features, router logits as data) cannot reach the backbone.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pr2_jax.models.moe import ROUTER_PARAM
from pr2_jax.models.routing import top_k_experts
from pr2_jax.models.transformer import MoETransformer, lm_head_kernel
from pr2_jax.balance.loads import loads_from_routes
from pr2_jax.parallel.mesh import EXPERT, TOKEN_AXES, axis_size, on_token_shards
from pr2_jax.pr2 import predictor as pred
from pr2_jax.rl import advantages, losses, metrics
from pr2_jax.rl.chunked_logprobs import chunked_token_stats
from pr2_jax.rl.balancing import foresight_plan
from pr2_jax.rl.config import PR2Config, RLConfig
from pr2_jax.rl.sampler import temperature_scale
from pr2_jax.train.state import TrainState, keep_only, replicated


# RLConfig.trainable -> the parameter names RL updates (train_only); absent: every parameter.
TRAINED_PARAMS = {"routers": frozenset({ROUTER_PARAM})}


@dataclasses.dataclass(frozen=True)
class Learner:
  """What the jitted learner phases close over (hashable, static)."""
  model: MoETransformer
  rl: RLConfig
  tx: optax.GradientTransformation
  pr2: PR2Config = PR2Config()
  pred_tx: optax.GradientTransformation | None = None

  @property
  def uses_predictor(self) -> bool:
    return self.rl.phases.uses_predictor


def gather_slots(x_bS_: jax.Array, slots_bF: jax.Array) -> jax.Array:
  """x at the given slots along axis 1: [b, S, ...] -> [b, F, ...]."""
  idx = slots_bF.reshape(slots_bF.shape + (1,) * (x_bS_.ndim - 2))
  return jnp.take_along_axis(x_bS_, idx, axis=1)


def micro_layout(lr: Learner, routes_bSLK, valid_bS, step_plan=None):
  """The expert layout of one micro-step (None = static, no replicas).

  eplb_step: the step's plan (computed on the host, passed in as data);
  foresight: planned here, inside the jitted step, from the micro-step's
  replayed routes (a live-routed phase has none to plan from).
  """
  mode = lr.rl.balance_mode
  if mode == "eplb_step":
    return step_plan
  if mode != "foresight" or routes_bSLK is None:
    return None
  cfg = lr.model.config
  devices = axis_size(lr.model.mesh, EXPERT)
  loads_LE = loads_from_routes(routes_bSLK, valid_bS, cfg.num_experts)
  return foresight_plan(loads_LE, devices, cfg.num_experts // devices + lr.rl.redundant_slots,
                        lr.rl.planner_method)


def forward_logprobs(model: MoETransformer, params, seq: dict, routes, temperature: float,
                     predictor=None, features: bool = False, plan=None, capacity=None,
                     logits_chunk: int = 0):
  """Log-probs and entropies [b, T] of tokens[:, 1:] under π_θ/temperature, plus the model
  output.

  The training engine's forward: gates always come from the router's ρ (DESIGN §3). A
  `predictor` (PR2-R2's old pass) only chooses the route R̂, so π_old is exactly what the
  update's forward computes when it replays R̂ at θ = θ_old. `capacity` is the static
  per-slot token capacity (None: the model's capacity_factor). `logits_chunk` > 0 applies the
  LM head that many positions at a time (`chunked_token_stats`); the output then has no logits.
  """
  out = model.apply({"params": params}, seq["tokens"], routes=routes, positions=seq["positions"],
                    valid=seq["valid"], return_router_logits=True,
                    return_router_inputs=features, predictor=predictor, predicted_gates=False,
                    slot_expert=plan, capacity=capacity, logits="none" if logits_chunk else "all")
  scale = temperature_scale(temperature)  # the sampler's µ is tempered by the same rule
  targets_BT = seq["tokens"][:, 1:]
  if logits_chunk:
    logp_BT, ent_BT = chunked_token_stats(
        out.hidden[:, :-1], lm_head_kernel(params, model.config), targets_BT, chunk=logits_chunk,
        scale=scale, dtype=model.config.dtype, mesh=model.mesh)
    return logp_BT, ent_BT, out
  logits_BTV = out.logits[:, :-1] * scale
  return losses.token_logprobs(logits_BTV, targets_BT), losses.token_entropies(logits_BTV), out


class OldPass(NamedTuple):
  """What `old_logprob_pass` gives, per micro-batch [N, ...] unless said."""
  logp: jax.Array  # π_old's log-probs of the sampled tokens [N, b, T]
  routes: jax.Array  # the routes the pass used [N, b, S, L, K]
  feats: tuple | None  # PR2-R2's features (h_old, p_old), else None
  dropped: jax.Array  # (token, k) pairs over `capacity` [N]
  # π_old against µ over the whole batch: the training engine at the rollout's weights, so the
  # pure train–inference mismatch (the update's `k3_kl` adds the policy's movement after
  # mini-step 1). Keys as `mismatch_row(..., "old_")` names them.
  mismatch: dict


def mismatch_row(sums: dict, prefix: str = "") -> dict:
  """`metrics.mismatch_from_sums` under the metrics row's names: k3_kl, extreme_frac,
  mismatch_ratio_mean, mismatch_ratio_var (each after `prefix`)."""
  return {prefix + (f"mismatch_{k}" if k.startswith("ratio") else k): v
          for k, v in metrics.mismatch_from_sums(sums).items()}


def old_logprob_pass(lr: Learner, params, predictor, batch: dict, step_plan=None,
                     capacity=None) -> OldPass:
  """π_old over every micro-batch [N, b, ...], as an `OldPass`.

  `step_plan` is eplb_step's plan; `capacity` is static (`dropped` counts what
  went over it).

  Runs micro-batch by micro-batch with the same forward as the update, so with
  equal routes and dtype π_old and the first mini-step's π_θ agree. In 'pr2_r2'
  the live routes here are the predicted ones and the PR2 features
  (h_old, p_old) are taken here; otherwise `feats` is None.
  """
  pr2_r2 = lr.rl.phases.predicts_at_old_pass

  def one(_, micro):
    routes = micro["rollout_routes"] if lr.rl.phases.old_pass_replays_rollout else None
    logp, _, out = forward_logprobs(lr.model, params, micro, routes, lr.rl.temperature,
                                    predictor if pr2_r2 else None, features=pr2_r2,
                                    plan=micro_layout(lr, routes, micro["valid"], step_plan),
                                    capacity=capacity, logits_chunk=lr.rl.logits_chunk)
    feats = None
    if pr2_r2:
      dtype = jnp.dtype(lr.pr2.feature_dtype)
      feats = (gather_slots(out.router_inputs, micro["feature_slots"]).astype(dtype),
               gather_slots(out.router_logits, micro["feature_slots"]).astype(dtype))
    mismatch = metrics.mismatch_sums(logp, micro["rollout_logp"][:, 1:],
                                     micro["response_mask"][:, 1:])
    return None, (logp, out.routes, feats, out.dropped.sum(), mismatch)

  logp, routes, feats, dropped, sums = jax.lax.scan(one, None, batch)[1]
  return OldPass(logp, routes, feats, dropped,
                 mismatch_row(jax.tree.map(lambda x: jnp.sum(x, 0), sums), "old_"))


def micro_step(lr: Learner, params, predictor, micro: dict, denoms: dict, step_plan=None,
               capacity=None):
  """Policy loss and additive statistics of one micro-step (differentiate w.r.t. params).

  The loss is the policy loss plus `ModelConfig.aux_loss_coef` times this
  micro-step's Switch load-balancing loss over the M micro-steps
  (`denoms["micro"]` = 1/M), so M micro-steps add up to the mini-batch's mean.
  With PR2 on, also the predictor's gradient from this micro-step's features,
  normalised by the mini-batch's feature count so micro-steps add up.
  """
  rl = lr.rl
  aux_coef = lr.model.config.aux_loss_coef
  routes = micro["replay_routes"] if rl.phases.update_replays else None
  logp_BT, ent_BT, out = forward_logprobs(
      lr.model, params, micro, routes, rl.temperature,
      plan=micro_layout(lr, routes, micro["valid"], step_plan), capacity=capacity,
      logits_chunk=rl.logits_chunk)
  mask_BT = micro["response_mask"][:, 1:]
  rollout_BT = micro["rollout_logp"][:, 1:]
  against_BT = rollout_BT if rl.ratio_denominator == "rollout" else micro["old_logp"]
  is_weight = None
  if rl.tis_cap > 0 and rl.ratio_denominator == "old":
    is_weight = (advantages.tis_weights(micro["old_logp"], rollout_BT, rl.tis_cap)
                 if losses.LOSS_LEVELS[rl.loss] == "token" else
                 advantages.sequence_tis_weights(micro["old_logp"], rollout_BT, mask_BT,
                                                 rl.tis_cap))
  loss, aux = losses.policy_loss(rl.loss, logp_BT, against_BT, micro["adv"], mask_BT,
                                 clip_low=rl.clip_low, clip_high=rl.clip_high,
                                 is_weight=is_weight, denom=denoms["loss"])
  aux_share = jax.lax.stop_gradient(out.aux_loss) * denoms["micro"]
  if aux_coef:  # a Python float: at 0 the objective stays exactly the policy loss
    loss = loss + aux_coef * denoms["micro"] * out.aux_loss
  # Over all S slots (mask with micro["valid"], not the [b, T] mask_BT). The live route is the
  # top-k of ρ, as `routing.route` picks it without a bias.
  probs_bSLE = jax.nn.softmax(out.router_logits, axis=-1)
  k = micro["rollout_routes"].shape[-1]
  live_bSLK = on_token_shards(lambda probs_nSLE: top_k_experts(probs_nSLE, k),
                              lr.model.mesh)(probs_bSLE)
  stats = {
      "count": jnp.float32(1.0),
      "loss": loss,
      "entropy": jax.lax.stop_gradient(
          jnp.sum(ent_BT * mask_BT.astype(jnp.float32)) / denoms["tokens"]),
      "loss_sums": aux["sums"],
      "mismatch": metrics.mismatch_sums(logp_BT, rollout_BT, mask_BT),
      # The rollout's route against the live router: the drift replay has to absorb.
      "routing": metrics.routing_sums(micro["rollout_routes"], live_bSLK, probs_bSLE,
                                      micro["valid"]),
      "dropped": out.dropped.sum(),
      "aux_loss": aux_share,
  }
  if rl.phases.update_replays_old_pass:  # replays another route than the rollout's
    stats["routing_replayed"] = metrics.routing_sums(micro["replay_routes"], live_bSLK,
                                                     probs_bSLE, micro["valid"])
  if lr.uses_predictor:
    stats["pred"] = predictor_step(lr, predictor, micro, out.router_logits, denoms["features"])
  return loss, stats


def predictor_step(lr: Learner, predictor, micro: dict, router_logits_bSLE, feature_denom):
  """Gradient and metrics of the predictor loss on this micro-step's cached features."""
  slots_bF = micro["feature_slots"]
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  h_NLD, p_old_NLE = flat(micro["feature_h"]), flat(micro["feature_p"])
  p_cur_NLE = flat(jax.lax.stop_gradient(gather_slots(router_logits_bSLE, slots_bF)))
  weight_N = flat(gather_slots(micro["valid"], slots_bF)).astype(jnp.float32)
  share = jnp.sum(weight_N) / feature_denom  # this micro-step's part of the mini-batch mean

  def objective(w_LDE):
    per_layer = pred.predictor_losses(lr.pr2.loss, w_LDE, h_NLD, p_old_NLE, p_cur_NLE, weight_N)
    return jnp.sum(per_layer) * share, per_layer * share

  grad, per_layer = jax.grad(objective, has_aux=True)(predictor)
  k = micro["rollout_routes"].shape[-1]
  live_NLK, predicted_NLK = on_token_shards(lambda h_nLD, p_old_nLE, p_cur_nLE: (
      top_k_experts(jax.nn.softmax(p_cur_nLE.astype(jnp.float32), axis=-1), k),
      pred.predicted_topk(predictor, h_nLD, p_old_nLE, k)), lr.model.mesh)(h_NLD, p_old_NLE,
                                                                           p_cur_NLE)
  acc_L = pred.topk_overlap(predicted_NLK, live_NLK, weight_N)
  bias_sum, logit_sum = pred.bias_logit_sums(predictor, h_NLD, p_old_NLE, weight_N)
  return {"grad": grad, "loss_per_layer": per_layer, "topk_acc_per_layer": acc_L * share,
          "bias_abs_sum": bias_sum, "logit_abs_sum": logit_sum}


def minibatch_metrics(stats: dict, grads) -> dict:
  """Means from the micro-steps' summed statistics.

  `loss` is the optimised objective (policy loss + aux_loss_coef * aux_loss);
  `aux_loss` is the micro-steps' mean Switch load-balancing loss, reported at
  any coefficient.
  """
  out = {"loss": stats["loss"], "entropy": stats["entropy"], "dropped": stats["dropped"],
         "aux_loss": stats["aux_loss"],
         "grad_norm": optax.tree.norm(grads),
         **losses.loss_stats_from_sums(stats["loss_sums"]),
         **mismatch_row(stats["mismatch"]),
         **metrics.routing_from_sums(stats["routing"])}
  if "routing_replayed" in stats:
    out.update({f"replayed_{k}": v
                for k, v in metrics.routing_from_sums(stats["routing_replayed"]).items()})
  if "pred" in stats:
    p = stats["pred"]
    out.update(pred_loss=jnp.sum(p["loss_per_layer"]), pred_loss_per_layer=p["loss_per_layer"],
               pred_topk_acc=jnp.mean(p["topk_acc_per_layer"]),
               pred_topk_acc_per_layer=p["topk_acc_per_layer"],
               bias_logit_ratio=pred.bias_logit_ratio_from_sums(p["bias_abs_sum"],
                                                                p["logit_abs_sum"]))
  return out


def denominators(rl: RLConfig, minibatch: dict) -> dict:
  """The mini-batch's ([M, b, ...]) normalisers every micro-step shares; `micro` = 1/M."""
  resp = minibatch["response_mask"]
  # XLA gathers this small [M, b, T] mask to flatten it: a collective that depends on no other,
  # hence a program of its own in `make_learner_fns`.
  mask_NT = resp[..., 1:].reshape(-1, resp.shape[-1] - 1)
  denoms = {"loss": losses.loss_denominator(rl.loss, mask_NT),
            "tokens": jnp.maximum(mask_NT.sum(), 1.0),
            "micro": jnp.float32(1.0 / resp.shape[0])}
  if "feature_slots" in minibatch:
    valid = jax.vmap(gather_slots)(minibatch["valid"], minibatch["feature_slots"])
    denoms["features"] = jnp.maximum(jnp.sum(valid), 1.0)
  return denoms


def update_step(lr: Learner, state: TrainState, minibatch: dict, train_predictor=False,
                step_plan=None, capacity=None, denoms=None):
  """One optimizer step from M accumulated micro-steps ([M, b, ...] arrays).

  `train_predictor` (a traced bool) gates PR2's predictor update: it is skipped
  at the first mini-step of each rollout batch, where the router has not moved.
  A non-finite policy loss or gradient, or (with `train_predictor`) predictor loss or
  gradient, skips the whole update (`skipped` = 1).
  `step_plan` is eplb_step's plan (data); `capacity` the static per-slot capacity;
  `denoms` the mini-batch's `denominators` (computed here when None).
  """
  if denoms is None:
    denoms = denominators(lr.rl, minibatch)
  grad_fn = jax.grad(functools.partial(micro_step, lr, step_plan=step_plan, capacity=capacity),
                     has_aux=True)

  def accumulate(acc, micro):
    grads, stats = grad_fn(state.params, state.predictor, micro, denoms)
    return jax.tree.map(jnp.add, acc, (grads, stats)), None

  first = jax.eval_shape(grad_fn, state.params, state.predictor,
                         jax.tree.map(lambda x: x[0], minibatch), denoms)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
  (grads, stats), _ = jax.lax.scan(accumulate, zeros, minibatch)
  updates, opt_state = lr.tx.update(grads, state.opt_state, state.params)
  new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
  # A non-finite loss or gradient skips the whole update: parameters and
  # optimizer state stay exactly as they were (the step counter still moves).
  finite = all_finite(stats["loss"], grads)
  if lr.uses_predictor:
    p = stats["pred"]
    p_updates, p_opt = lr.pred_tx.update(p["grad"], state.pred_opt_state, state.predictor)
    stepped = (optax.apply_updates(state.predictor, p_updates), p_opt)
    keep = (state.predictor, state.pred_opt_state)
    choose = lambda a, b: jnp.where(train_predictor, a, b)
    predictor, pred_opt_state = jax.tree.map(choose, stepped, keep)
    new = new.replace(predictor=predictor, pred_opt_state=pred_opt_state)
    # The predictor's loss and gradient too, where its update would be applied: a NaN W_p
    # would route every later rollout by NaN scores, unchecked under jit.
    pred_finite = all_finite(jnp.sum(p["loss_per_layer"]), p["grad"])
    finite = finite & (pred_finite | ~jnp.asarray(train_predictor, bool))
  new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
  trained = TRAINED_PARAMS.get(lr.rl.trainable)  # grad_norm: of what the optimizer clips
  metrics = minibatch_metrics(stats, grads if trained is None else keep_only(grads, trained))
  metrics["skipped"] = (~finite).astype(jnp.int32)
  return new.replace(step=state.step + 1), metrics


def all_finite(loss: jax.Array, grads) -> jax.Array:
  """bool scalar: the loss and every gradient entry are finite (else `update_step` skips)."""
  return jnp.isfinite(loss) & jnp.all(jnp.array(
      [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))


def batch_shardings(mesh: Mesh, batch: dict) -> dict:
  """[M, b, ...] arrays: the b axis is split over the token shards."""
  return jax.tree.map(
      lambda x: NamedSharding(mesh, PartitionSpec(None, TOKEN_AXES, *([None] * (x.ndim - 2)))),
      batch)


def make_learner_fns(lr: Learner, mesh: Mesh, state_shardings,
                     example_batch: dict) -> tuple[Callable, Callable]:
  """(old_fn(params, predictor, batch, step_plan=None, capacity=None),
  update_fn(state, minibatch, train_predictor, step_plan=None, capacity=None)).

  `capacity` is static (each new value compiles once); `step_plan` (eplb_step's
  `Plan`, replicated) is data, so a new plan never recompiles.
  """
  shard = batch_shardings(mesh, example_batch)
  # The old-log-prob pass sees the batch before old_logp/replay_routes exist;
  # its inputs arrive already placed by `batch_shardings`.
  old_fn = jax.jit(functools.partial(old_logprob_pass, lr), static_argnames=("capacity",))
  rep = replicated(mesh)
  update = jax.jit(functools.partial(update_step, lr), static_argnums=(4,),
                   in_shardings=(state_shardings, shard, rep, rep, rep),
                   out_shardings=(state_shardings, rep), donate_argnums=0)
  # The denominators are a program of their own: their mask gather has no data dependence on
  # the update's first collectives (eplb_step's replica fetch, which XLA hoists out of the
  # micro-step loop), so on CPU a device ran both at once, each holding a thread while it
  # waits for the others (parallel/distributed.py, CPU_THREADS_PER_DEVICE).
  denoms_fn = jax.jit(functools.partial(denominators, lr.rl), in_shardings=(shard,),
                      out_shardings=rep)

  def update_fn(state, minibatch, train_predictor, step_plan=None, capacity=None):
    return update(state, minibatch, train_predictor, step_plan, capacity, denoms_fn(minibatch))

  update_fn.jitted = update  # for cache inspection (tests)
  return old_fn, update_fn
