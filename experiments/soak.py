"""Soak test: a long RL run of the tiny config, watching memory, recompilations and metrics.jsonl.

    python -m experiments.soak                    # 300 RL steps, ~1 min on 2 cores (4 at load 7-10)
    python -m experiments.soak --config.rl.replay_mode=pr2 --out=experiments/results/soak_pr2.json
    python -m experiments.soak --quick --out=/tmp/soak.json      # 6 small steps, ~20 s (a test's)

Full-run times as recorded in docs/results/soak.md (58-65 s at load 1.2-1.7 on 2 vCPUs); --quick
timed at load 2.5. --quick without --out writes under the temp directory, not over
experiments/results/soak.json.

Runs warm-up then `--steps` RL steps in-process through `pr2_jax.rl.loop.run`
(the code path of `experiments.main`), and measures after the first
`--warmup_steps` RL steps (which compile everything and include one
evaluation and one checkpoint):
  * peak RSS: the process's peak resident memory at the end of warm-up and at
    the end of the run (`rss_growth_frac` = end / warm-up - 1), plus the
    current RSS per step and its slope, which a leak would drive up;
  * recompilations: XLA backend compiles reported through `jax.monitoring`
    (event /jax/core/compile/backend_compile_duration, with the function
    name) after warm-up; they should be zero;
  * metrics.jsonl: exactly one row per RL step, the required keys in every row,
    evaluation rows where expected, and the number of skipped updates.
Prints a table, writes JSON to `--out`; the last printed line is a JSON object
with `rss_growth_frac`, `recompiles_after_warmup`, `steps` (and a few more).
"""

import json
import math
import os
import resource
import shutil
import tempfile
import threading
import time

import numpy as np
from absl import flags

from experiments import cli, common, outputs

# Flags only when run as a script: tests import check_metrics, and absl refuses a second
# module defining the same flag names (config, steps, out).
if __name__ == "__main__":
  _CONFIG = cli.define_config("configs/tiny.py", "Experiment config file.")
  _STEPS = flags.DEFINE_integer("steps", 300, "RL steps (overrides config.rl.num_steps).")
  _WARMUP = flags.DEFINE_integer("warmup_steps", 25, "RL steps counted as warm-up: compilation, "
                                 "the first evaluation and the first checkpoint happen in them.")
  _WORKDIR = flags.DEFINE_string("workdir", "", "Run directory ('' = a temporary one, deleted "
                                 "after).")
  _OUT = flags.DEFINE_string("out", "experiments/results/soak.json", "JSON output.")
  _QUICK = flags.DEFINE_bool("quick", False, "6 steps of a small batch (3 of warm-up): a smoke "
                             "test of this script, not a soak.")
  cli.at_least(1, "steps", "warmup_steps")

# Every RL row must carry these (eval_reward only on evaluation steps).
REQUIRED_KEYS = ("step", "phase", "loss", "reward_mean", "response_len", "entropy", "k3_kl",
                 "extreme_frac", "ratio_mean", "clip_frac_low", "clip_frac_high", "grad_norm",
                 "topk_agreement", "zero_dev_ratio", "coverage_gap", "skipped_updates",
                 "elapsed_s")
QUICK = {"sft.num_steps": 10, "rl.prompts_per_step": 4, "rl.group_size": 4, "rl.eval_size": 16,
         "rl.eval_every": 3, "checkpoint_every": 3}


def _peak_rss_mb() -> float:
  # The kernel's high-water mark (Linux reports KiB) can lag a fresh sample of the current RSS.
  return max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, _rss_mb())


def _rss_mb() -> float:
  with open("/proc/self/statm") as f:  # pages: size resident shared ...
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class CompileCounter:
  """Counts XLA backend compiles (and which function) through jax.monitoring."""

  def __init__(self):
    import jax
    from jax._src import dispatch
    self.event = dispatch.BACKEND_COMPILE_EVENT
    self.names, self._lock = [], threading.Lock()
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kwargs):
    if event == self.event:
      with self._lock:
        self.names.append(kwargs.get("fun_name", "?"))

  def __len__(self):
    with self._lock:
      return len(self.names)


def check_metrics(path: str, steps: int, eval_every: int) -> dict:
  """One row per RL step, required keys everywhere, eval rows where the loop evaluates."""
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  rl = [r for r in rows if r.get("phase") == "rl"]
  problems = []
  if [r["step"] for r in rl] != list(range(1, steps + 1)):
    problems.append(f"RL steps {[r['step'] for r in rl][:10]}... are not 1..{steps} once each")
  for r in rl:
    missing = [k for k in REQUIRED_KEYS if k not in r]
    if missing:
      problems.append(f"step {r['step']} lacks {missing}")
    want_eval = bool(eval_every) and (r["step"] % eval_every == 0 or r["step"] == steps)
    if want_eval != ("eval_reward" in r):
      problems.append(f"step {r['step']}: eval_reward {'missing' if want_eval else 'unexpected'}")
    bad = [k for k, v in r.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
      problems.append(f"step {r['step']}: non-finite {bad}")
  return {"rows": len(rows), "rl_rows": len(rl), "ok": not problems, "problems": problems[:20],
          "skipped_updates": sum(int(r.get("skipped_updates", 0)) for r in rl)}


def main(argv):
  del argv
  out = outputs.output_file(_OUT, quick=_QUICK.value)  # a bad path fails now, not after the run
  workdir = _WORKDIR.value and outputs.output_dir("workdir", _WORKDIR.value)
  if workdir and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
    raise flags.ValidationError(f"--workdir={workdir} already holds a run; use a fresh one")
  steps, warmup = _STEPS.value, _WARMUP.value
  if _QUICK.value:  # its sizes, where a flag was not given explicitly
    steps = steps if flags.FLAGS["steps"].present else 6
    warmup = warmup if flags.FLAGS["warmup_steps"].present else 3
  if not 0 < warmup < steps:
    raise flags.ValidationError(f"--warmup_steps={warmup} must be in (0, --steps={steps})")
  cfg = cli.config_value(_CONFIG)
  if _QUICK.value:
    cfg.update_from_flattened_dict(QUICK)
  cfg.rl.num_steps = steps
  common.setup_devices()
  import jax
  from pr2_jax.rl import loop
  from pr2_jax.rl.config import SetupError

  config, mesh = common.experiment_setup(cfg)  # as experiments.main: before any compile
  machine = common.machine_info()  # before the run: its start time and the load without us
  workdir = workdir or tempfile.mkdtemp(prefix="soak_")

  compiles = CompileCounter()
  writer = common.MetricsWriter(workdir)
  per_step, marks = [], {}
  t_start = time.perf_counter()

  def on_metrics(m):
    writer.write(m)
    if m.get("phase") != "rl":
      return
    per_step.append({"step": m["step"], "rss_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb(),
                     "compiles": len(compiles), "t": time.perf_counter() - t_start})
    if m["step"] == warmup:
      marks["warmup"] = per_step[-1]

  try:
    summary = loop.run(config, mesh, workdir, on_metrics=on_metrics,
                       on_progress=common.progress_logger("rl"), warn=print)
  except SetupError as e:  # found before any training step (e.g. a bad init_from)
    cli.exit_with_error(str(e))
  jax.block_until_ready(summary["state"])
  end = {"rss_mb": _rss_mb(), "peak_rss_mb": _peak_rss_mb(), "compiles": len(compiles),
         "t": time.perf_counter() - t_start}
  metrics = check_metrics(os.path.join(workdir, "metrics.jsonl"), steps, config.rl.eval_every)
  if not _WORKDIR.value:
    shutil.rmtree(workdir, ignore_errors=True)

  w = marks["warmup"]
  late = [s for s in per_step if s["step"] > warmup]
  slope = float(np.polyfit([s["step"] for s in late], [s["rss_mb"] for s in late], 1)[0]) \
      if len(late) > 1 else 0.0
  first_compile = w["compiles"]
  result = {
      "steps": steps, "warmup_steps": warmup, "quick": _QUICK.value,
      "rss_growth_frac": end["peak_rss_mb"] / w["peak_rss_mb"] - 1,
      "rss_current_growth_frac": end["rss_mb"] / w["rss_mb"] - 1,
      "rss_slope_mb_per_step": slope,
      "peak_rss_mb_after_warmup": w["peak_rss_mb"], "peak_rss_mb_end": end["peak_rss_mb"],
      "rss_mb_after_warmup": w["rss_mb"], "rss_mb_end": end["rss_mb"],
      "compiles_in_warmup": first_compile,
      "recompiles_after_warmup": end["compiles"] - first_compile,
      "recompiled_functions": compiles.names[first_compile:],
      "metrics_ok": metrics["ok"], "metrics": metrics,
      "skipped_updates": metrics["skipped_updates"],
      "seconds_per_step_after_warmup": (end["t"] - w["t"]) / (steps - warmup),
      "total_s": end["t"],
      "final_eval_reward": summary["final"].get("eval_reward"),
      "config": cfg.to_dict(),
      "machine": machine,
      "per_step": per_step,
  }
  _print_table(result)
  outputs.write_json(out, result, default=str)
  keys = ("rss_growth_frac", "recompiles_after_warmup", "steps", "metrics_ok", "skipped_updates",
          "rss_current_growth_frac", "seconds_per_step_after_warmup")
  print(json.dumps({k: result[k] for k in keys}), flush=True)


def _print_table(r: dict):
  per_step = r["per_step"]
  shown = sorted({r["warmup_steps"], *[per_step[int(i)]["step"] for i in
                                      np.linspace(0, len(per_step) - 1, 7)]}) if per_step else []
  by_step = {s["step"]: s for s in per_step}
  print(f"\nsoak: {r['steps']} RL steps ({r['warmup_steps']} of warm-up), "
        f"{r['seconds_per_step_after_warmup']:.2f} s/step after warm-up")
  print(f"{'step':>6} {'rss MB':>8} {'peak MB':>8} {'compiles':>9} {'time s':>8}")
  for step in shown:
    s = by_step[step]
    print(f"{step:>6} {s['rss_mb']:>8.1f} {s['peak_rss_mb']:>8.1f} {s['compiles']:>9} "
          f"{s['t']:>8.1f}")
  print(f"peak RSS growth after warm-up {100 * r['rss_growth_frac']:+.2f}% (target < 10%), current "
        f"RSS {100 * r['rss_current_growth_frac']:+.2f}%, "
        f"slope {r['rss_slope_mb_per_step']:+.4f} MB/step")
  print(f"recompilations after warm-up: {r['recompiles_after_warmup']} (target 0) "
        f"{r['recompiled_functions'][:10]}")
  print(f"metrics.jsonl: {r['metrics']['rl_rows']} RL rows, ok={r['metrics_ok']} "
        f"{r['metrics']['problems'][:3]}; skipped updates {r['skipped_updates']}")


if __name__ == "__main__":
  cli.run(main)
