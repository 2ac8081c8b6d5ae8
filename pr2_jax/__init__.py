"""pr2_jax: RL on Mixture-of-Experts language models with Predictive Routing Replay.

    import pr2_jax as p2
    model = p2.MoETransformer(p2.ModelConfig())
    out = model.apply({"params": params}, tokens)          # out.logits, out.routes
    out = model.apply({"params": params}, tokens, routes=out.routes)   # replay
"""

from pr2_jax.balance import (Plan, assign_replicas, eplb_device_load, eplb_rebalance, imbalance,
                             loads_from_routes, native_layout, plan_placement, plan_stats,
                             replica_counts, slot_counts, static_device_load)
from pr2_jax.config import ModelConfig
from pr2_jax.hf import HFTokenizer, load_hf_checkpoint, save_hf_checkpoint
from pr2_jax.hf.config_map import read_hf_config
from pr2_jax.models.experts import ExpertWeights
from pr2_jax.models.routing import (LIVE, Routing, expert_load, gates_at, replay_gates, route,
                                    router_logits, switch_aux_loss, top_k_experts, validate_routes)
from pr2_jax.models.transformer import (KVCache, ModelOutput, MoETransformer, init_cache,
                                        lm_head_kernel, validate_tokens)
from pr2_jax.parallel.expert_parallel import moe_experts
from pr2_jax.parallel.distributed import (DistributedConfig, gather_rows, local_rows, to_global,
                                          to_host, use_cpu_devices)
from pr2_jax.parallel.mesh import LOGICAL_RULES, make_mesh
from pr2_jax.parallel.replica_fetch import fetch_slabs
from pr2_jax.parallel.shuffle import shuffle_into_chunks
from pr2_jax.pr2.predictor import (bias_logit_ratio, bias_logit_sums, init_predictor,
                                   predicted_topk, predictor_bias, predictor_loss,
                                   predictor_losses, topk_overlap)
from pr2_jax.rl.advantages import grpo_advantages, sequence_tis_weights, tis_weights
from pr2_jax.rl.chunked_logprobs import chunked_token_stats
from pr2_jax.rl.config import ExperimentConfig, PR2Config, RLConfig, SFTConfig
from pr2_jax.rl.losses import (dapo_loss, gspo_loss, loss_denominator, loss_stats_from_sums,
                               policy_loss, token_entropies, token_entropy, token_logprobs)
from pr2_jax.rl.metrics import (mismatch_from_sums, mismatch_metrics, mismatch_sums,
                                routing_from_sums, routing_metrics, routing_sums)
from pr2_jax.rl.sampler import Rollout, SamplerConfig, generate, validate_generate_inputs
from pr2_jax.train.state import state_memory

__version__ = "0.1.0"
