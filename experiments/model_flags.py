"""The model-shape flags (d_model .. vocab_size) shared by the benchmarks (bench_model, bench_peer).

absl allows one module per process to define a flag, and tests import
bench_model while bench_peer runs in a subprocess: both read these.
Defaults: the benchmarks' shared config (a Qwen3-MoE shape scaled to a 2-core CPU).
"""

from absl import flags

from experiments import common

D_MODEL = flags.DEFINE_integer("d_model", 256, "Residual width.")
NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder layers (all MoE).")
NUM_EXPERTS = flags.DEFINE_integer("num_experts", 16, "Routed experts per layer.")
TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
EXPERT_D_FF = flags.DEFINE_integer("expert_d_ff", 256, "SwiGLU expert hidden width.")
NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads.")
NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads.")
HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Per-head width.")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
common.at_least(1, "d_model", "num_layers", "num_experts", "top_k", "expert_d_ff", "num_heads",
                "num_kv_heads", "head_dim", "vocab_size")
