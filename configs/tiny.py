r"""The default experiment: warm up a tiny Qwen3-MoE-style model on countdown
(reach a target from a few numbers), then RL it with DAPO and rollout routing replay (R3).

    python -m experiments.main --config=configs/tiny.py --workdir=runs/tiny
    python -m experiments.main --config=configs/tiny.py --workdir=runs/none \
        --config.rl.replay_mode=none
    # expert parallelism on 8 fake CPU devices:
    python -m experiments.main --config=configs/tiny.py --workdir=runs/ep --cpu_devices=8 \
        --config.mesh_expert=4
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0                  # init, data and sampling seed
  c.mesh_data = 0             # 'data' axis size; 0 = all devices not used by the expert axis
  c.mesh_expert = 1           # 'expert' axis size (expert parallelism); divides num_experts
  c.checkpoint_every = 25     # RL steps between checkpoints (0 = only at the end)
  c.init_from = ""            # warm-up checkpoint dir to start from ('' = WORKDIR/checkpoints/sft)
  c.task = "countdown"        # pr2_jax.rl.tasks registry: arithmetic | countdown
  # Options of `task`; these are countdown's. Another task takes its own (an unknown key stops
  # the run, naming the task's options): --config.task=arithmetic --config.task_kwargs={} (its
  # defaults) or --config.task_kwargs="{'num_digits': 1}" (replaces the whole dict).
  c.task_kwargs = ml_collections.ConfigDict({"num_numbers": 3, "max_number": 9})

  m = c.model = ml_collections.ConfigDict()
  m.vocab_size = 32           # character tokenizer (24 ids) rounded up
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
  m.dtype = "float32"         # training-engine compute dtype (rollout: rl.rollout_dtype)
  m.dense_layers = ()         # layer ids with a dense MLP instead of MoE
  m.dense_d_ff = 0            # dense MLP width (only with dense_layers)
  m.expert_impl = "capacity"  # capacity | ragged | grouped | dense
  m.capacity_factor = 0.0     # 0 = dropless; e.g. 1.25 drops beyond 1.25x an even share
  m.aux_loss_coef = 0.0       # Switch load-balancing loss weight (off)
  m.fsdp = False              # True: split weights' d_model dim over the 'data' axis too
  m.attention_blocks = 4      # causal query blocks (>= 64 queries each) without a KV cache; 1 = off

  s = c.sft = ml_collections.ConfigDict()
  s.num_steps = 100           # warm-up steps on task solutions (partial competence)
  s.batch_size = 64           # sequences per warm-up step
  s.learning_rate = 1e-2      # peak AdamW learning rate
  s.warmup_steps = 10         # linear warmup

  r = c.rl = ml_collections.ConfigDict()
  r.num_steps = 200           # RL steps (rollout batches)
  r.prompts_per_step = 32     # prompts per rollout batch
  r.group_size = 8            # samples per prompt (GRPO group)
  r.off_policy_k = 2          # κ: mini-batches (optimizer steps) per rollout batch
  r.micro_steps = 2           # M: gradient-accumulation micro-steps per mini-batch
  r.replay_mode = "r3"        # none | r2 | r3 | pr2 (PR2-R3) | pr2_r2 (PR2-R2)
  r.loss = "dapo"             # dapo | gspo
  # None = the loss's own (DESIGN §3): dapo 0.2 / 0.28 against µ, gspo 3e-4 / 4e-4 against π_old
  r.clip_low = placeholder(float)   # ε_low
  r.clip_high = placeholder(float)  # ε_high
  r.ratio_denominator = placeholder(str)  # π_θ/µ (rollout) or π_θ/π_old (old)
  r.tis_cap = 0.0             # truncated IS cap with ratio_denominator='old' (0 = off)
  r.learning_rate = 1e-3      # AdamW learning rate
  r.weight_decay = 0.0        # AdamW weight decay
  r.grad_clip = 1.0           # global-norm clip
  r.trainable = "all"         # all | routers (only each MoE layer's W_r; the rest frozen)
  r.temperature = 1.0         # sampling temperature
  r.top_p = 1.0               # nucleus mass
  r.max_new_tokens = 6        # response budget incl. EOS (expressions <= 5 chars)
  r.rollout_dtype = "bfloat16"  # inference-engine dtype (the train/inference mismatch)
  r.eval_every = 25           # RL steps between held-out evaluations
  r.eval_size = 256           # held-out problems per evaluation
  r.eval_temperature = 1.0    # evaluation sampling temperature (0 = greedy): the policy's
                              # expected reward
  r.max_consecutive_skips = 10  # non-finite updates in a row before the run stops
                                # (state checkpointed)
  r.balance_mode = "none"     # none: static layout | eplb_step: one EPLB plan per RL step |
                              # foresight: per-micro-step replica plan (both need mesh_expert > 1)
  r.redundant_slots = 1       # extra expert slots per device for eplb_step/foresight replicas
  r.planner_method = "rounds"  # foresight placement: rounds (S rounds of D, fast) |
                               # lpt (one replica at a time)
  r.eplb_ema = 0.0            # eplb_step: weight of past steps' loads in its EMA (0 = this step's)
  r.capacity_mode = "auto"    # auto | model | bucket | forecast: the learner's per-slot capacity
  r.capacity_buckets = 2      # capacity buckets per doubling (1 = powers of two)
  r.logits_chunk = 0          # >0: learner log-probs over chunks of this many positions (memory)

  p = c.pr2 = ml_collections.ConfigDict()  # used when rl.replay_mode is pr2 | pr2_r2
  p.loss = "post"             # predictor objective: post | delta | l2
  p.lr_mult = 1.0             # α: predictor lr = α × rl.learning_rate (α·η ≈ 1e-3 suits
                              # Adam here; the paper's α ~ 1e2-1e4 goes with its much smaller η)
  p.adam_eps = 1e-3           # predictor's Adam ε: smaller gradients (rounding noise of an
                              # undrifted router) take proportionally smaller steps
  p.feature_tokens = 8        # cached (h_old, p_old) positions per sequence
  p.feature_rule = "random"   # random slots | response: the first response slots
  p.feature_dtype = "bfloat16"  # feature cache dtype
  p.predicted_gates = True    # rollout gates from the predicted distribution (paper's choice)
  return c
