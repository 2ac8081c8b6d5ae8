"""The model-shape flags (d_model .. vocab_size) shared by the benchmarks (bench_model, bench_peer,
bench_optimizer), and how their errors name a size.

absl allows one module per process to define a flag, and tests import
bench_model while bench_peer runs in a subprocess: both read these.
Defaults: the benchmarks' shared config (a Qwen3-MoE shape scaled to a 2-core CPU).
"""

import contextlib

from absl import flags

from experiments import cli

D_MODEL = flags.DEFINE_integer("d_model", 256, "Residual width.")
NUM_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder layers (all MoE).")
NUM_EXPERTS = flags.DEFINE_integer("num_experts", 16, "Routed experts per layer.")
TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
EXPERT_D_FF = flags.DEFINE_integer("expert_d_ff", 256, "SwiGLU expert hidden width.")
NUM_HEADS = flags.DEFINE_integer("num_heads", 4, "Query heads.")
NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads.")
HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Per-head width.")
VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 1024, "Vocabulary size.")
NAMES = ("d_model", "num_layers", "num_experts", "top_k", "expert_d_ff", "num_heads",
         "num_kv_heads", "head_dim", "vocab_size")
cli.at_least(1, *NAMES)


def given(name: str, value, quick: dict | None = None) -> str:
  """How an error names a size: `--name=value` as the user gave it, else where the value came
  from (`quick`, a --quick run's sizes, or the default): blaming `--num_experts=8` misleads a
  user who never typed it."""
  if flags.FLAGS[name].present:
    return f"--{name}={value}"
  return f"{name} {value} ({'--quick' if quick and name in quick else 'default'})"


@contextlib.contextmanager
def bad_sizes_exit(quick: dict | None = None):
  """`cli.bad_config_exits` for a ModelConfig built from these flags: a size it refuses is
  one error line, before any work, which also lists the sizes --quick chose (`quick`) that the
  user did not type (`top_k=9 must be <= num_experts=8` names a value they may not know of)."""
  chosen = [f"{n}={v}" for n, v in (quick or {}).items()
            if n in NAMES and not flags.FLAGS[n].present]
  try:
    yield
  except ValueError as e:
    note = f" (--quick's sizes: {', '.join(chosen)})" if chosen else ""
    cli.exit_with_error(f"bad config: {e}{note}")
