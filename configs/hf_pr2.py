r"""PR2 (predictive routing replay, PR2-R3) RL from a local Hugging Face Qwen3-MoE checkpoint.

    python -m experiments.make_tiny_hf --out=/tmp/tiny_qwen3_moe     # a runnable stand-in
    python -m experiments.main --config=configs/hf_pr2.py --workdir=runs/hf_pr2 \
        --config.hf_checkpoint=/tmp/tiny_qwen3_moe
    # a real checkpoint, experts split 16 ways (80 GB devices: docs/real_checkpoint.md):
    python -m experiments.main --config=configs/hf_pr2.py --workdir=runs/qwen3_pr2 \
        --config.hf_checkpoint=/data/Qwen3-30B-A3B-Base --config.mesh_expert=16 \
        --config.model.dtype=bfloat16 --config.model.expert_impl=ragged

The architecture, the tokenizer and the initial weights come from the
checkpoint directory; the `model` section below only holds our run-time
knobs (an architecture field added here must equal config.json's, else the
run stops with the conflicting fields named). RL starts from the
checkpoint's weights: no SFT warm-up unless `sft.num_steps > 0`.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.hf_checkpoint = ""        # REQUIRED: local dir with config.json, *.safetensors, tokenizer.json
  c.seed = 0                  # data and sampling seed (the weights are the checkpoint's)
  c.mesh_data = 0             # 'data' axis size; 0 = all devices not used by the expert axis
  c.mesh_expert = 1           # 'expert' axis size (expert parallelism); divides num_experts
  c.checkpoint_every = 10     # RL steps between checkpoints (0 = only at the end)
  c.init_from = ""            # warm-up checkpoint dir to start from ('' = WORKDIR/checkpoints/sft,
                              # written only when sft.num_steps > 0: else the checkpoint's weights)
  c.task = "countdown"        # pr2_jax.rl.tasks registry: arithmetic | countdown
  # Options of `task`; these are countdown's. Another task takes its own (an unknown key stops
  # the run, naming the task's options): --config.task=arithmetic --config.task_kwargs={} (its
  # defaults) or --config.task_kwargs="{'num_digits': 1}" (replaces the whole dict).
  c.task_kwargs = ml_collections.ConfigDict({"num_numbers": 3, "max_number": 9})

  m = c.model = ml_collections.ConfigDict()  # run-time knobs only (architecture: config.json)
  m.dtype = "float32"         # training-engine compute dtype; bfloat16 at real scale
  m.expert_impl = "capacity"  # capacity | ragged (GPU/TPU) | grouped | dense; 'capacity' runs
                              # all_to_all only when capacity_factor > 0, dropless runs grouped
  m.capacity_factor = 0.0     # 0 = dropless; e.g. 1.25 drops beyond 1.25x an even share
  m.aux_loss_coef = 0.0       # Switch load-balancing loss weight (off for RL)
  m.fsdp = False              # True: split weights' d_model dim over the 'data' axis too
  m.attention_blocks = 4      # causal query blocks (>= 64 queries each) without a KV cache; 1 = off

  s = c.sft = ml_collections.ConfigDict()
  s.num_steps = 0             # 0 = RL from the checkpoint's weights; > 0 = SFT on solutions first
  s.batch_size = 64           # sequences per warm-up step (only with num_steps > 0)
  s.learning_rate = 1e-3      # peak AdamW learning rate of the warm-up
  s.warmup_steps = 10         # linear warmup of the warm-up's learning rate

  r = c.rl = ml_collections.ConfigDict()
  r.num_steps = 20            # RL steps (rollout batches)
  r.prompts_per_step = 16     # prompts per rollout batch
  r.group_size = 8            # samples per prompt (GRPO group)
  r.off_policy_k = 2          # κ: mini-batches (optimizer steps) per rollout batch
  r.micro_steps = 2           # M: gradient-accumulation micro-steps per mini-batch
  r.replay_mode = "pr2"       # PR2-R3: rollout routes by the predicted q̂, training replays them
  r.loss = "dapo"             # dapo (token ratio) | gspo (sequence ratio)
  # None = the loss's own (DESIGN §3): dapo 0.2 / 0.28 against µ, gspo 3e-4 / 4e-4 against π_old
  r.clip_low = placeholder(float)   # ε_low
  r.clip_high = placeholder(float)  # ε_high
  r.ratio_denominator = placeholder(str)  # π_θ/µ (rollout) or π_θ/π_old (old)
  r.tis_cap = 0.0             # truncated IS cap with ratio_denominator='old' (0 = off)
  r.learning_rate = 1e-5      # AdamW learning rate (a pretrained policy: small steps)
  r.weight_decay = 0.0        # AdamW weight decay
  r.grad_clip = 1.0           # global-norm clip
  r.trainable = "all"         # all | routers (only each MoE layer's W_r; the rest frozen)
  r.temperature = 1.0         # sampling temperature
  r.top_p = 1.0               # nucleus mass
  r.max_new_tokens = 6        # response budget in tokens incl. EOS (countdown answers <= 5 chars)
  r.rollout_dtype = "bfloat16"  # inference-engine dtype (the train/inference mismatch)
  r.eval_every = 10           # RL steps between held-out evaluations
  r.eval_size = 128           # held-out problems per evaluation
  r.eval_temperature = 1.0    # evaluation sampling temperature (0 = greedy)
  r.max_consecutive_skips = 10  # non-finite updates in a row before the run stops (checkpointed)
  r.balance_mode = "none"     # none: static layout | eplb_step: one EPLB plan per RL step |
                              # foresight: per-micro-step replica plan (both need mesh_expert > 1)
  r.redundant_slots = 1       # extra expert slots per device for eplb_step/foresight replicas
  r.planner_method = "rounds"  # foresight placement: rounds (S rounds of D, fast) |
                               # lpt (one replica at a time)
  r.eplb_ema = 0.0            # eplb_step: weight of past steps' loads in its EMA (0 = this step's)
  r.capacity_mode = "auto"    # auto | model | bucket | forecast: the learner's per-slot capacity
  r.capacity_buckets = 2      # capacity buckets per doubling (1 = powers of two)
  r.logits_chunk = 0          # >0: learner log-probs over chunks of this many positions (memory)

  p = c.pr2 = ml_collections.ConfigDict()  # predictor W_p [L, D, E]; L, D, E from config.json
  p.loss = "post"             # predictor objective: post | delta | l2
  p.lr_mult = 100.0           # α: predictor lr = α × rl.learning_rate (α·η = 1e-3 suits Adam)
  p.adam_eps = 1e-3           # predictor's Adam ε: smaller gradients (rounding noise of an
                              # undrifted router) take proportionally smaller steps
  p.feature_tokens = 8        # cached (h_old, p_old) positions per sequence
  p.feature_rule = "random"   # random slots | response: the first response slots
  p.feature_dtype = "bfloat16"  # feature cache dtype
  p.predicted_gates = True    # rollout gates from the predicted distribution (paper's choice)
  return c
