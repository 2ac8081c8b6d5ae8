"""The MoE feed-forward block: float32 router, record/replay, slot-based experts.

Dimension legend:
  B batch, T length, N = B*T tokens, n one token shard's N, D d_model, E experts,
  K top-k, F expert hidden width, X global expert slots.

Parameter names mirror Hugging Face Qwen3-MoE (`gate` is the router), with
expert weights stacked on a leading 'expert' axis that the mesh shards.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pr2_jax.balance.dispatch import assign_replicas
from pr2_jax.balance.planner import Plan
from pr2_jax.checks import check_shape
from pr2_jax.config import ModelConfig
from pr2_jax.models import experts as ex
from pr2_jax.models import routing
from pr2_jax.models.layers import INIT
from pr2_jax.parallel.expert_parallel import moe_experts
from pr2_jax.parallel.mesh import constrain, on_token_shards, partitioned
from pr2_jax.pr2.predictor import predictor_bias

# Each MoE layer's router W_r [D, E], under Hugging Face's name (mlp.gate.weight).
ROUTER_PARAM = "gate"


class MoEAux(NamedTuple):
  routes_BTK: jax.Array   # int32, the experts actually used
  logits_BTE: jax.Array   # float32 router logits
  dropped: jax.Array      # int32, (token, k) pairs over capacity
  aux_loss: jax.Array     # float32 Switch load-balancing loss


@dataclasses.dataclass(frozen=True)
class _ShardRouting:
  """`routing.route` on one token shard's rows. Compared by value, so an eager MoEBlock call
  reuses the program that `on_token_shards` compiled for the same settings and shapes."""
  top_k: int
  norm_topk_prob: bool
  predicted_gates: bool

  def __call__(self, logits_nE, routes_nK, bias_nE):
    # MoETransformer checked the whole routes array eagerly (validate_routes): no host sync here.
    return routing.route(logits_nE, self.top_k, self.norm_topk_prob, routes_nK, bias_nE,
                         self.predicted_gates, check_values=False)


class MoEBlock(nn.Module):
  config: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x_BTD, routes_BTK=None, slot_expert_X=None, capacity=None, predictor_DE=None,
               predicted_gates=True, valid_BT=None):
    """Returns (y_BTD in the compute dtype, MoEAux). `slot_expert_X` is a slot map [X] (each
    expert's first slot takes its tokens) or one layer of a `pr2_jax.balance.Plan` (tokens
    split among replicas by the plan's shares); the other arguments are
    `MoETransformer.__call__`'s for one layer (routes_BTK, predictor_DE: its slices). Padding
    (valid_BT False) takes no expert capacity and gets a zero expert output."""
    cfg = self.config
    b, t, d = x_BTD.shape
    e, f = cfg.num_experts, cfg.expert_d_ff
    # Static: a reshape below would fail obscurely, or a [1, ...] predictor broadcast silently.
    if routes_BTK is not None:
      check_shape("routes_BTK", routes_BTK, (b, t, cfg.top_k), "[B, T, K]")
    if predictor_DE is not None:
      check_shape("predictor_DE", predictor_DE, (d, e), "[D, E]")
    w_router_DE = self.param(ROUTER_PARAM, partitioned(INIT, ("embed", "experts_logits")), (d, e),
                          jnp.float32)
    weights = ex.ExpertWeights(
        self.param("gate_proj", partitioned(INIT, ("expert", "embed", "mlp")), (e, d, f),
                   jnp.float32),
        self.param("up_proj", partitioned(INIT, ("expert", "embed", "mlp")), (e, d, f),
                   jnp.float32),
        self.param("down_proj", partitioned(INIT, ("expert", "mlp", "embed")), (e, f, d),
                   jnp.float32))
    x_ND = constrain(x_BTD.reshape(b * t, d), self.mesh, ("batch", "embed"))
    logits_NE = routing.router_logits(x_ND, w_router_DE)
    routes_NK = None if routes_BTK is None else routes_BTK.reshape(b * t, cfg.top_k)
    bias_NE = None if predictor_DE is None else predictor_bias(x_ND, predictor_DE)
    # Per token shard: see on_token_shards (top-k).
    r = on_token_shards(_ShardRouting(cfg.top_k, cfg.norm_topk_prob, predicted_gates),
                        self.mesh)(logits_NE, routes_NK, bias_NE)
    slot_ids_NK = None
    valid_N = None if valid_BT is None else valid_BT.reshape(b * t).astype(bool)
    if isinstance(slot_expert_X, Plan):  # one layer's plan: the planned replica split
      plan = slot_expert_X
      slot_expert_X = plan.slot_expert.reshape(-1)
      # Per token shard, like the routing: a shard's replica split depends on its own rows only,
      # and over split rows XLA partitions the global sort by all-gathering every shard's ids.
      # The plan goes in whole as an argument: closed over, an eager call compiled anew.
      slot_ids_NK = on_token_shards(assign_replicas, self.mesh, num_whole=1)(
          r.expert_ids, valid_N, plan)
    y_ND, dropped = moe_experts(
        x_ND, r.expert_ids, r.gates, weights, impl=cfg.expert_impl, mesh=self.mesh,
        capacity_factor=cfg.capacity_factor, capacity=capacity, slot_expert_X=slot_expert_X,
        slot_ids_NK=slot_ids_NK, dtype=jnp.dtype(cfg.dtype), valid_N=valid_N)
    aux = MoEAux(r.expert_ids.reshape(b, t, cfg.top_k), logits_NE.reshape(b, t, e), dropped,
                 routing.switch_aux_loss(r.probs, r.expert_ids, valid_N))
    return y_ND.reshape(b, t, d).astype(cfg.dtype), aux
