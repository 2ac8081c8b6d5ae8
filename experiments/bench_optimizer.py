"""Benchmark: the clipped AdamW update, our global-norm clip against optax's.

    python -m experiments.bench_optimizer            # bench_peer's model (13.9 M params), ~20 s
    python -m experiments.bench_optimizer --quick    # test-sized, a few seconds

Both sides are `make_optimizer`'s chain, global-norm clip 1.0 then AdamW, on the parameter
tree of `MoETransformer` at the model-shape flags (bench_peer's default config, all of it on
one device): "optax" clips with `optax.clip_by_global_norm` (a select between g and g / |g|),
"ours" with `train.state.clip_by_global_norm` (g * min(1, 1 / |g|)). Each update is jitted with
donated parameters and state; the two are called alternately (the order flips every round)
on the same random gradients (global norm well above 1: the clip is active, as it is in
bench_peer's train step). Reported per side: XLA's bytes accessed of the compiled update
(deterministic: what the change is about), median and min time after warm-up, and the largest
difference between the two sides' parameters after the first step (an ulp: the clips agree to
the last bit or so) and at the end (the same gradients every step repeat the same last-bit
rounding, so it grows by up to an ulp a step).
Prints a table; the last line is one JSON object (also written to --out).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import flags

from experiments import cli, common, outputs
from experiments import model_flags  # defines the model-shape flags read below

_QUICK = flags.DEFINE_bool("quick", False, "Test-sized model and few rounds.")
_ROUNDS = flags.DEFINE_integer("rounds", 40, "Timed rounds (each times both sides once).")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed rounds first.")
_LR = flags.DEFINE_float("lr", 1e-4, "AdamW learning rate.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_optimizer.json", "JSON result path.")
cli.at_least(1, "rounds")
cli.at_least(0, "warmup")

QUICK = dict(d_model=64, num_layers=2, num_experts=8, expert_d_ff=64, head_dim=16,
             vocab_size=256, rounds=4, warmup=1)


def model_size() -> dict:
  """The model-shape flags' values (--quick: its small sizes where a flag was not given)."""
  size = {n: flags.FLAGS[n].value for n in model_flags.NAMES}
  if _QUICK.value:
    size.update({n: v for n, v in QUICK.items() if n in size and not flags.FLAGS[n].present})
  return size


def param_shapes(size: dict):
  """ShapeDtypeStructs of the model's parameters at `size` (model_size)."""
  import jax
  from flax import linen as nn
  from pr2_jax.config import ModelConfig
  from pr2_jax.models.transformer import MoETransformer
  model = MoETransformer(ModelConfig(**size))
  tokens = jax.ShapeDtypeStruct((1, 1), "int32")
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"])


def compiled_update(tx, shapes):
  """(jitted donated update, its bytes accessed): params, opt_state, grads -> params, opt_state."""
  import jax
  import optax

  def update(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  fn = jax.jit(update, donate_argnums=(0, 1))
  cost = fn.lower(shapes, jax.eval_shape(tx.init, shapes), shapes).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return fn, float(cost["bytes accessed"])


def max_diff(a, b) -> float:
  import jax
  return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(abs(x - y).max()), a, b)))


def run(size: dict, rounds: int, warmup: int, lr: float) -> dict:
  import jax
  import numpy as np
  import optax
  from pr2_jax.train.state import make_optimizer
  shapes = param_shapes(size)
  # both AdamW without weight decay (make_optimizer's default; optax.adamw's is 1e-4)
  sides = {"optax": optax.chain(optax.clip_by_global_norm(1.0),
                                optax.adamw(lr, weight_decay=0.0)),
           "ours": make_optimizer(lr, grad_clip=1.0)}
  rng = np.random.default_rng(0)
  draw = lambda s: jax.numpy.asarray(rng.normal(size=s.shape).astype(s.dtype))
  params, grads = jax.tree.map(draw, shapes), jax.tree.map(draw, shapes)
  state, fns, bytes_accessed, times = {}, {}, {}, {k: [] for k in sides}
  for name, tx in sides.items():
    fns[name], bytes_accessed[name] = compiled_update(tx, shapes)
    own = jax.tree.map(jax.numpy.copy, params)  # each side donates its own copy
    state[name] = (own, tx.init(own))
  for r in range(warmup + rounds):
    for name in (sides if r % 2 else reversed(list(sides))):
      t0 = time.perf_counter()
      state[name] = fns[name](*state[name], grads)
      jax.block_until_ready(state[name])
      if r >= warmup:
        times[name].append(time.perf_counter() - t0)
    if r == 0:
      first_diff = max_diff(state["optax"][0], state["ours"][0])
  return {"param_count": int(sum(x.size for x in jax.tree.leaves(shapes))), "model": size,
          "bytes_accessed": bytes_accessed, "bytes_ratio": bytes_accessed["ours"]
          / bytes_accessed["optax"], "median_ms": {k: 1e3 * statistics.median(v)
                                                  for k, v in times.items()},
          "min_ms": {k: 1e3 * min(v) for k, v in times.items()},
          "time_ratio": statistics.median(times["ours"]) / statistics.median(times["optax"]),
          "first_step_max_param_diff": first_diff, "steps": warmup + rounds,
          "max_param_diff": max_diff(state["optax"][0], state["ours"][0]),
          "grad_global_norm": float(optax.tree.norm(grads))}


def format_table(r: dict) -> str:
  rows = ["| | optax clip + AdamW | ours | ours / optax |", "|---|---|---|---|",
          f"| bytes accessed, MB | {r['bytes_accessed']['optax'] / 1e6:.1f} | "
          f"{r['bytes_accessed']['ours'] / 1e6:.1f} | {r['bytes_ratio']:.2f} |",
          f"| median ms | {r['median_ms']['optax']:.2f} | {r['median_ms']['ours']:.2f} | "
          f"{r['time_ratio']:.2f} |",
          f"| min ms | {r['min_ms']['optax']:.2f} | {r['min_ms']['ours']:.2f} | |",
          f"| params, max abs diff after 1 / {r['steps']} steps | "
          f"{r['first_step_max_param_diff']:.1e} / {r['max_param_diff']:.1e} | | |"]
  return "\n".join(rows)


def main(argv):
  del argv
  out = outputs.output_file(_OUT, quick=_QUICK.value)  # a bad path fails now, not after the run
  size = model_size()
  with model_flags.bad_sizes_exit(QUICK if _QUICK.value else None):  # before any compile
    from pr2_jax.config import ModelConfig
    ModelConfig(**size)
  rounds, warmup = _ROUNDS.value, _WARMUP.value
  if _QUICK.value:
    rounds = rounds if flags.FLAGS["rounds"].present else QUICK["rounds"]
    warmup = warmup if flags.FLAGS["warmup"].present else QUICK["warmup"]
  common.setup_devices()
  machine = common.machine_info()
  result = run(size, rounds, warmup, _LR.value)
  result.update(machine=machine, command=outputs.command_line())
  print(format_table(result), flush=True)
  outputs.write_json(out, result, sort_keys=True)
  print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "model")},
                   sort_keys=True), flush=True)


if __name__ == "__main__":
  cli.run(main)
