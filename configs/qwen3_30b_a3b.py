r"""Qwen3-30B-A3B at real scale: 30.5B parameters, 3.3B active per token (a model config).

    python -m experiments.memory_plan --config=configs/qwen3_30b_a3b.py --cpu_devices=64 \
        --mesh_expert=8,16,32,64

The model fields equal `pr2_jax.hf.config_from_hf` of the released
config.json (tests/test_qwen3_30b_config.py checks it), so the weights of a
local checkpoint, `p2.load_hf_checkpoint(path, mesh=mesh)`, fit this model
(docs/checkpoints.md). It has no RL sections: RL on this model starts from its
checkpoint, with configs/hf_pr2.py (architecture and weights from the directory):

    python -m experiments.main --config=configs/hf_pr2.py --workdir=runs/q30b \
        --config.hf_checkpoint=/data/Qwen3-30B-A3B-Base --config.mesh_expert=16 \
        --config.model.dtype=bfloat16 --config.model.expert_impl=ragged
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mesh_data = 0      # 'data' axis size; 0 = all devices not used by the expert axis
  c.mesh_expert = 8    # 'expert' axis size; divides num_experts (16 experts per device at 8)

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 151936        # Qwen3 tokenizer ids (about 151.7k used), padded for the LM head
  m.num_layers = 48            # decoder layers, all MoE
  m.d_model = 2048             # residual width (HF hidden_size)
  m.num_heads = 32             # query heads
  m.num_kv_heads = 4           # key/value heads (GQA ratio 8)
  m.head_dim = 128             # per-head width (set explicitly: 32 * 128 != 2048)
  m.expert_d_ff = 768          # SwiGLU expert hidden width (HF moe_intermediate_size)
  m.num_experts = 128          # routed experts per layer
  m.top_k = 8                  # experts per token
  m.norm_topk_prob = True      # renormalise the top-8 gates to sum to 1
  m.rope_theta = 1_000_000.0   # rotary base
  m.rms_norm_eps = 1e-6        # RMSNorm epsilon
  m.tie_embeddings = False     # separate LM head
  m.dtype = "bfloat16"         # computation dtype; params and router stay float32
  m.dense_layers = ()          # no dense-MLP layers (HF mlp_only_layers = [], sparse step 1)
  m.dense_d_ff = 0             # unused without dense layers (HF intermediate_size 6144)
  m.expert_impl = "ragged"     # dropless grouped experts (ragged_dot on GPU/TPU)
  m.capacity_factor = 0.0      # 0 = dropless; only read by expert_impl='capacity'
  m.aux_loss_coef = 0.0        # Switch load-balancing loss weight (off for RL)
  m.fsdp = False               # True: weights and AdamW moments also split over 'data'
                               # (memory_plan)
  m.attention_blocks = 4       # causal query blocks (>= 64 queries each) without a KV cache;
                               # 1 = off
  return c
