"""Benchmark: compile time and tokens/s of the forward and train step, per expert path.

    python -m experiments.bench_model                        # default config below
    python -m experiments.bench_model --impls=capacity,ragged --steps=20
    python -m experiments.bench_model --cpu_devices=8 --mesh_expert=4   # expert parallel

For every `--impls` entry it builds the same model (same seed, same batch),
compiles the jitted forward and the jitted, donated train step with
`jit(...).lower(...).compile()` (timed), then times `--steps` runs of each
after `--warmup` untimed runs. Runs are interleaved round-robin across the
expert paths, so a load change on a shared machine hits every path alike and
the ratios against the baseline ('capacity') stay comparable. Prints a table
and writes JSON (config, machine, per-path results) to `--out`.
No assertions on timings anywhere: the figures describe this machine only.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags, logging

from experiments import cli, common, outputs
from experiments import model_flags as mf
from pr2_jax.config import ModelConfig
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import logical_sharding, make_mesh
from pr2_jax.train.state import create_train_state, make_optimizer
from pr2_jax.train.supervised import make_train_step

# Importing jax does not start a backend: `common.setup_devices()` in main still
# takes effect (the device count is fixed on the first jax operation).

_SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences per step (global).")
_IMPLS = flags.DEFINE_list(
    "impls", ["capacity", "ragged", "dense"],
    "Expert paths to compare; 'capacity:1.25' sets that entry's capacity factor.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Computation dtype.")
_CAPACITY_FACTOR = flags.DEFINE_float(
    "capacity_factor", 0.0, "Capacity path's buffer size / even share; 0 = dropless.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed runs of each function per path.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed runs after compiling.")
_MESH_EXPERT = flags.DEFINE_integer("mesh_expert", 1, "'expert' mesh axis size; data = rest.")
_SEED = flags.DEFINE_integer("seed", 0, "Parameter and token seed.")
_OUT = flags.DEFINE_string("out", "experiments/results/bench_model.json", "JSON result path.")
cli.at_least(1, "seq_len", "batch", "steps", "mesh_expert")
cli.at_least(0, "warmup", "capacity_factor")
cli.non_empty("impls")

BASELINE = "capacity"


def parse_impl(entry: str) -> tuple[str, float]:
  """'capacity:1.25' -> ('capacity', 1.25); a bare name uses --capacity_factor."""
  impl, _, factor = entry.partition(":")
  if factor and impl != "capacity":  # accepted and recorded, though no other path reads it
    raise flags.ValidationError(f"--impls entry {entry!r}: only the capacity path takes a "
                                "capacity factor")
  try:
    return impl, float(factor) if factor else _CAPACITY_FACTOR.value
  except ValueError:
    raise flags.ValidationError(f"--impls entry {entry!r}: capacity factor must be a number"
                                ) from None


def shape_config(**fields) -> ModelConfig:
  """ModelConfig of the model-shape flags and --dtype (and `fields`)."""
  return ModelConfig(
      vocab_size=mf.VOCAB_SIZE.value, num_layers=mf.NUM_LAYERS.value, d_model=mf.D_MODEL.value,
      num_heads=mf.NUM_HEADS.value, num_kv_heads=mf.NUM_KV_HEADS.value,
      head_dim=mf.HEAD_DIM.value, expert_d_ff=mf.EXPERT_D_FF.value,
      num_experts=mf.NUM_EXPERTS.value, top_k=mf.TOP_K.value, dtype=_DTYPE.value, **fields)


def model_config(entry: str) -> ModelConfig:
  impl, capacity_factor = parse_impl(entry)
  try:
    return shape_config(expert_impl=impl, capacity_factor=capacity_factor)
  except ValueError as e:  # a usage error: one line (cli.run), not a traceback
    raise flags.ValidationError(f"--impls entry {entry!r}: {e}") from None


def build_mesh():
  """The (data, expert) mesh over every device; a UsageError naming the flag that does not fit
  (the device count is --cpu_devices', or the backend's)."""
  n, expert = jax.device_count(), _MESH_EXPERT.value
  if n % expert or mf.NUM_EXPERTS.value % expert:
    raise app.UsageError(f"--mesh_expert={expert} must divide the {n} devices and "
                         f"--num_experts={mf.NUM_EXPERTS.value}")
  if _BATCH.value % n:
    raise app.UsageError(f"--batch={_BATCH.value} must be divisible by the {n} devices")
  return make_mesh(n // expert, expert)


def random_batch(vocab_size: int, mesh):
  """Uniform random tokens (routing is near-uniform at init anyway), all positions in the loss."""
  shape = (_BATCH.value, _SEQ_LEN.value)
  tokens = jax.random.randint(jax.random.key(_SEED.value + 1), shape, 0, vocab_size, jnp.int32)
  batch = {"tokens": tokens, "loss_mask": jnp.ones(shape, jnp.float32)}
  return jax.device_put(batch, logical_sharding(mesh, ("batch", "length")))


def timed_compile(jitted, *args):
  """(compiled executable, seconds for lower + compile, XLA flop estimate or None)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - t0
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"])
  except Exception:  # cost analysis is best-effort and backend dependent
    flops = None
  return compiled, seconds, flops


def make_forward(model: MoETransformer, mesh, param_shardings):
  """jit(apply) -> (logits, dropped), sharded like the train step's inputs."""
  def forward(params, tokens_BT):
    out = model.apply({"params": params}, tokens_BT)
    return out.logits, out.dropped
  tokens_sharding = logical_sharding(mesh, ("batch", "length"))
  return jax.jit(forward, in_shardings=(param_shardings, tokens_sharding))


class PathBench:
  """One expert path: its compiled forward and train step, params and threaded state."""

  def __init__(self, entry: str, mesh):
    self.impl, self.config = entry, model_config(entry)
    self.config.validate_mesh(mesh.shape["expert"])
    model, tx = MoETransformer(self.config, mesh), make_optimizer(1e-4)
    self.state, shardings = create_train_state(model, tx, jax.random.key(_SEED.value), mesh)
    self.params = jax.tree.map(lambda x: x.copy(), self.state.params)  # the step donates state
    self.batch = random_batch(self.config.vocab_size, mesh)
    self.forward, self.compile_forward_s, self.forward_flops = timed_compile(
        make_forward(model, mesh, shardings.params), self.params, self.batch["tokens"])
    self.train_step, self.compile_train_s, self.train_flops = timed_compile(
        make_train_step(model, tx, mesh, shardings), self.state, self.batch)
    self.forward_times, self.train_times, self.dropped = [], [], 0

  def run_forward(self):
    logits, dropped = self.forward(self.params, self.batch["tokens"])
    self.dropped = dropped
    return logits

  def run_train(self):
    self.state, metrics = self.train_step(self.state, self.batch)
    return self.state, metrics

  def time_round(self, record: bool):
    fwd, train = common.timed_call(self.run_forward), common.timed_call(self.run_train)
    if record:
      self.forward_times.append(fwd)
      self.train_times.append(train)

  def result(self, tokens: int) -> dict:
    fwd_s, train_s = statistics.median(self.forward_times), statistics.median(self.train_times)
    assignments = tokens * self.config.top_k * self.config.num_moe_layers
    return {
        "compile_forward_s": self.compile_forward_s, "compile_train_step_s": self.compile_train_s,
        "forward_s_median": fwd_s, "train_step_s_median": train_s,
        "forward_tokens_per_s": tokens / fwd_s, "train_tokens_per_s": tokens / train_s,
        "forward_s_all": self.forward_times, "train_step_s_all": self.train_times,
        "xla_flops_forward": self.forward_flops, "xla_flops_train_step": self.train_flops,
        "expert_impl": self.config.expert_impl, "capacity_factor": self.config.capacity_factor,
        "dropped_fraction": int(self.dropped.sum()) / assignments,
    }


def add_ratios(results: dict) -> str:
  """Adds each path's tokens/s ratio against the baseline (capacity, else the first path)."""
  base = BASELINE if BASELINE in results else next(iter(results))
  for r in results.values():
    r["forward_vs_baseline"] = r["forward_tokens_per_s"] / results[base]["forward_tokens_per_s"]
    r["train_vs_baseline"] = r["train_tokens_per_s"] / results[base]["train_tokens_per_s"]
  return base


def format_table(results: dict, base: str) -> str:
  head = (f"| impl | compile fwd (s) | compile train (s) | fwd tok/s | train tok/s "
          f"| fwd vs {base} | train vs {base} | dropped |")
  rows = [head, "|" + "---|" * 8]
  for impl, r in results.items():
    rows.append(f"| {impl} | {r['compile_forward_s']:.1f} | {r['compile_train_step_s']:.1f} "
                f"| {r['forward_tokens_per_s']:,.0f} | {r['train_tokens_per_s']:,.0f} "
                f"| {r['forward_vs_baseline']:.2f}x | {r['train_vs_baseline']:.2f}x "
                f"| {100 * r['dropped_fraction']:.1f}% |")
  return "\n".join(rows)


def run_config(mesh) -> dict:
  cfg = dataclasses.asdict(model_config(_IMPLS.value[0]))
  del cfg["expert_impl"], cfg["capacity_factor"]  # per path: see results
  return {"model": cfg, "batch": _BATCH.value, "seq_len": _SEQ_LEN.value,
          "tokens_per_step": _BATCH.value * _SEQ_LEN.value, "steps": _STEPS.value,
          "warmup": _WARMUP.value, "impls": list(_IMPLS.value), "mesh": dict(mesh.shape),
          "optimizer": "AdamW lr 1e-4, clip 1.0", "seed": _SEED.value}


def bench_paths(mesh) -> dict:
  """Compiles every path, then times them round-robin; returns {impl: result}."""
  benches = []
  for impl in _IMPLS.value:
    logging.info("[%s] building state and compiling forward + train step ...", impl)
    b = PathBench(impl, mesh)
    logging.info("[%s] compiled: forward %.1fs, train step %.1fs", impl, b.compile_forward_s,
                 b.compile_train_s)
    benches.append(b)
  rounds = _WARMUP.value + _STEPS.value
  for i in range(rounds):
    for b in benches:
      b.time_round(record=i >= _WARMUP.value)
    logging.info("round %d/%d (%s)", i + 1, rounds, "timed" if i >= _WARMUP.value else "warmup")
  tokens = _BATCH.value * _SEQ_LEN.value
  return {b.impl: b.result(tokens) for b in benches}


def flag_values() -> dict:
  """This benchmark's flags (and --cpu_devices) as given, for the record."""
  fl = flags.FLAGS.get_flags_for_module(sys.modules[__name__])
  fl += flags.FLAGS.get_flags_for_module(mf)
  fl += flags.FLAGS.get_flags_for_module(common)
  return {f.name: f.value for f in fl}


def main(argv):
  del argv
  out = outputs.output_file(_OUT)  # a bad path fails now, not after the compiles
  if len(set(_IMPLS.value)) != len(_IMPLS.value):
    raise app.UsageError(f"--impls={','.join(_IMPLS.value)} repeats an entry")
  with cli.bad_config_exits():  # the shape flags first: not blamed on an --impls entry
    shape_config()
  for entry in _IMPLS.value:
    model_config(entry)  # bad names or sizes fail here, before any compile
  common.setup_devices()
  mesh = build_mesh()
  machine, config = common.machine_info(mesh=dict(mesh.shape)), run_config(mesh)
  logging.info("machine %s\nconfig %s", machine, config)
  results = bench_paths(mesh)
  base = add_ratios(results)
  print(format_table(results, base), flush=True)
  outputs.write_json(out, {"command": outputs.command_line(), "flags": flag_values(),
                          "config": config, "machine": machine,
                          "baseline": base, "results": results,
                          "load_avg_1m_at_end": os.getloadavg()[0],
                          "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                    indent=2, sort_keys=True)  # the recorded results' format
  logging.info("wrote %s", out)


if __name__ == "__main__":
  cli.run(main)
