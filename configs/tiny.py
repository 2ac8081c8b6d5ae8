"""The default experiment: a tiny Qwen3-MoE-style model on 2 CPU cores.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/pr2_tiny
    python -m experiments.train --config=configs/tiny.py --config.supervised.num_steps=50
    # expert parallelism on 8 fake CPU devices:
    python -m experiments.train --config=configs/tiny.py --cpu_devices=8 --config.mesh_expert=4
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mesh_data = 0      # 'data' axis size; 0 = all devices not used by the expert axis
  c.mesh_expert = 1    # 'expert' axis size (expert parallelism); divides num_experts

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 32           # task tokens (14 used) rounded up
  m.num_layers = 2            # decoder layers, all MoE
  m.d_model = 64              # residual width
  m.num_heads = 4             # query heads
  m.num_kv_heads = 2          # key/value heads (GQA ratio 2)
  m.head_dim = 16             # per-head width
  m.expert_d_ff = 64          # SwiGLU expert hidden width
  m.num_experts = 8           # routed experts per layer
  m.top_k = 2                 # experts per token
  m.norm_topk_prob = True     # renormalise top-k gates (Qwen3-30B-A3B does)
  m.rope_theta = 10000.0      # rotary base
  m.rms_norm_eps = 1e-6       # RMSNorm epsilon
  m.tie_embeddings = False    # separate LM head
  m.dtype = "float32"         # computation dtype: float32 | bfloat16
  m.dense_layers = ()         # layer ids with a dense MLP instead of MoE
  m.dense_d_ff = 0            # dense MLP width (only with dense_layers)
  m.expert_impl = "capacity"  # capacity | ragged | dense
  m.capacity_factor = 0.0     # 0 = dropless; e.g. 1.25 drops beyond 1.25x an even share
  m.aux_loss_coef = 0.0       # Switch load-balancing loss weight (off)

  s = c.supervised = ml_collections.ConfigDict()
  s.batch_size = 32           # sequences per step
  s.num_digits = 8            # reverse-copy length (sequence = 2n + 3 tokens)
  s.num_steps = 300           # optimizer steps
  s.learning_rate = 3e-3      # peak AdamW learning rate
  s.warmup_steps = 20         # linear warmup
  s.weight_decay = 0.0        # AdamW weight decay
  s.grad_clip = 1.0           # global-norm clip
  s.seed = 0                  # init + data seed
  s.log_every = 25            # steps between log lines / metrics.jsonl rows
  return c
