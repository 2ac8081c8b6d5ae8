"""pr2_jax: RL on Mixture-of-Experts language models with Predictive Routing Replay.

    import pr2_jax as p2
    model = p2.MoETransformer(p2.ModelConfig())
"""

from pr2_jax.config import ModelConfig
from pr2_jax.models.experts import ExpertWeights
from pr2_jax.models.routing import (LIVE, Routing, expert_load, gates_at, replay_gates, route,
                                    router_logits, switch_aux_loss, top_k_experts, validate_routes)
from pr2_jax.models.transformer import ModelOutput, MoETransformer
from pr2_jax.parallel.expert_parallel import moe_experts
from pr2_jax.parallel.mesh import LOGICAL_RULES, make_mesh

__version__ = "0.1.0"
