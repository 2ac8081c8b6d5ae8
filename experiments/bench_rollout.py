"""Benchmark: rollout decode tokens/s of the jitted KV-cache sampler.

    python -m experiments.bench_rollout                       # batch 64, prompt 16, 64 new tokens
    python -m experiments.bench_rollout --batch=128 --new_tokens=128 --dtypes=bfloat16

Each dtype builds the same model and prompts, compiles `generate` once
(timed), then times `--repeats` full generations (prefill + decode loop, all
inside one jit) and reports generated tokens/s (batch x new tokens / time).
Dtypes are timed round-robin so load on a shared machine hits them alike.
Prints a table and writes JSON to `--out`. No timing assertions anywhere.
"""

import functools
import json
import statistics
import time

import jax
from absl import flags

from experiments import cli, common, outputs
from pr2_jax.config import DTYPES, ModelConfig

_BATCH = flags.DEFINE_integer("batch", 64, "Sequences decoded together.")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "Prompt tokens (no padding).")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per sequence (no early EOS).")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Inference-engine dtypes.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed generations per dtype.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_rollout.json", "JSON output.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Residual width (tiny config by default).")
_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Routed experts.")
_LAYERS = flags.DEFINE_integer("num_layers", 2, "Decoder layers.")
cli.at_least(1, "batch", "prompt_len", "new_tokens", "repeats", "num_layers")
# 4 heads of d_model / 4, an even head_dim for rotary embeddings: 4 and 12 failed naming
# head_dim, which is no flag here.
flags.register_validator("d_model", lambda v: v >= 8 and v % 8 == 0,
                         message="--d_model must be a positive multiple of 8 (4 heads of "
                                 "d_model / 4 dimensions, an even number for RoPE)")
cli.at_least(2, "num_experts")  # top-2 routing
cli.non_empty("dtypes")
flags.register_validator("dtypes", lambda v: set(v) <= set(DTYPES),
                         message=f"--dtypes: each must be one of {', '.join(DTYPES)}")
cli.distinct("dtypes")  # each would compile again


def main(argv):
  del argv
  out = outputs.output_file(_OUT)  # a bad path fails now, not after the run
  with cli.bad_config_exits():  # before any compile
    cfg = ModelConfig(vocab_size=256, d_model=_D_MODEL.value, num_layers=_LAYERS.value,
                      num_heads=4, num_kv_heads=2, head_dim=_D_MODEL.value // 4,
                      expert_d_ff=_D_MODEL.value, num_experts=_EXPERTS.value, top_k=2)
  common.setup_devices()
  machine = common.machine_info()  # at the start: the load before our own work
  import flax.linen as nn
  import numpy as np
  from pr2_jax.models.transformer import MoETransformer
  from pr2_jax.rl.sampler import SamplerConfig, generate

  b, p, n = _BATCH.value, _PROMPT.value, _NEW.value
  prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (b, p)).astype(np.int32)
  valid = np.ones((b, p), bool)
  params = nn.unbox(MoETransformer(cfg).init(jax.random.key(0), prompts[:1])["params"])
  sampling = SamplerConfig(max_new_tokens=n, eos_id=-1)  # no EOS: every row decodes n tokens
  fns, compile_s = {}, {}
  for dtype in _DTYPES.value:
    fn = jax.jit(functools.partial(generate, MoETransformer(cfg.replace(dtype=dtype)),
                                   config=sampling))
    t0 = time.perf_counter()
    fns[dtype] = fn.lower(params, prompts, valid, jax.random.key(0)).compile()
    compile_s[dtype] = time.perf_counter() - t0
    print(f"compiled {dtype} in {compile_s[dtype]:.1f}s", flush=True)
  times = {d: [] for d in fns}
  for r in range(_REPEATS.value + 1):
    for dtype, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, prompts, valid, jax.random.key(r)))
      if r:  # the first round warms caches
        times[dtype].append(time.perf_counter() - t0)
  rows = {d: {"compile_s": compile_s[d], "median_s": statistics.median(t),
              "decode_tokens_per_s": b * n / statistics.median(t)} for d, t in times.items()}
  print(f"\nrollout decode: batch {b}, prompt {p}, new tokens {n}, model {cfg.d_model}d "
        f"x {cfg.num_layers} layers, {cfg.num_experts} experts top-{cfg.top_k}")
  print(f"{'dtype':<10} {'compile s':>10} {'gen s':>8} {'tokens/s':>10}")
  for d, row in rows.items():
    print(f"{d:<10} {row['compile_s']:>10.1f} {row['median_s']:>8.3f} "
          f"{row['decode_tokens_per_s']:>10.0f}")
  result = {"config": {"batch": b, "prompt_len": p, "new_tokens": n, "model": cfg.__dict__},
            "machine": machine,
            "results": rows}
  outputs.write_json(out, result, default=str)
  print(json.dumps({d: round(r["decode_tokens_per_s"]) for d, r in rows.items()}))


if __name__ == "__main__":
  cli.run(main)
