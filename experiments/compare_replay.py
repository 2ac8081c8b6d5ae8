"""Routing-replay comparison (issue 5): none / r2 / r3 / pr2 / GSPO at off-κ over seeds.

    python -m experiments.compare_replay                 # the full sweep -> docs/results/
    python -m experiments.compare_replay --quick         # smoke run (minutes) -> WORKDIR/results
    python -m experiments.compare_replay --offs=4 --modes=r3,pr2 --seeds=0,1 --rl_steps=40

One warm-up (supervised, `configs/tiny.py`'s `sft`) is trained once into
WORKDIR/warmup; every (κ, mode, seed) run then starts from that checkpoint
(`init_from`) and runs in this process through `pr2_jax.rl.loop.run`, writing
its own WORKDIR/off{κ}/{mode}/seed{s}/metrics.jsonl. A run whose metrics are
complete and whose config is unchanged is reused; an interrupted run, or one
whose config differs only in rl.num_steps (raised), is resumed from its newest
checkpoint (`replay_report.plan_run`); a run whose config differs in another
field (or started from another warm-up) is deleted and rerun, with the field
logged. The shared warm-up is reused while its checkpoint records this sweep's
warm-up settings. Compiled functions are shared between runs through JAX's
persistent compilation cache (WORKDIR/jax_cache): runs differing only in seed
compile nothing.

Modes: `none`, `r2`, `r3`, `pr2`, `pr2_r2` are DAPO with that replay mode;
`gspo` is GSPO without replay (sequence ratio against π_old, clip 3e-4/4e-4,
DESIGN §3).

Outputs in --out_dir: replay_comparison.json (keyed off{κ} -> mode -> fields
named as in metrics.jsonl), replay_comparison.md (command, setting, tables,
automatic checks against the paper's expectations) and replay_comparison_*.png.
Text between `<!-- BEGIN analysis -->` and `<!-- END analysis -->` in an
existing report is kept when the report is regenerated (the hand-written
reading of the numbers).
"""

import contextlib
import json
import math
import os
import shutil
import time

from absl import flags, logging

from experiments import cli, common, outputs, replay_plots, replay_report

_CONFIG = cli.define_config("configs/tiny.py", "Base experiment config; the flags below "
                               "override parts of it.")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke run: 2 κ, R3 and PR2, 2 seeds, a few steps, "
                           "a short warm-up. Flags given explicitly still win.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "RL seeds (prompts, sampling, eval set).")
_OFFS = flags.DEFINE_list("offs", ["2", "4", "8"], "κ values: mini-batches per rollout batch.")
_MODES = flags.DEFINE_list("modes", ["none", "r2", "r3", "pr2", "gspo"],
                           "none | r2 | r3 | pr2 | pr2_r2 (DAPO + replay) | gspo (GSPO, no "
                           "replay).")
_RL_STEPS = flags.DEFINE_integer("rl_steps", 100, "RL steps per run.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 20, "RL steps between held-out evaluations.")
_EVAL_SIZE = flags.DEFINE_integer("eval_size", 256, "Held-out problems per evaluation.")
_LR = flags.DEFINE_float("learning_rate", 2e-3, "RL AdamW learning rate (tiny.py: 1e-3; higher "
                         "here so the router drifts within a rollout batch).")
_EXPERTS = flags.DEFINE_integer("num_experts", 8, "Routed experts per layer.")
_TOP_K = flags.DEFINE_integer("top_k", 2, "Experts per token.")
_ALPHA = flags.DEFINE_float("pr2_lr_mult", 0.3, "PR2 predictor learning-rate multiplier α.")
_SFT_STEPS = flags.DEFINE_integer("sft_steps", None, "Warm-up steps (default: the config's).")
_COLLAPSE = flags.DEFINE_float("collapse_fraction", 0.5, "A run collapsed if its final eval reward "
                               "is below this fraction of its warm-up eval reward (or it hit a "
                               "non-finite loss/gradient).")
# eval_every=0 evaluated nothing during RL, and a run never evaluated counted as collapsed.
cli.at_least(1, "rl_steps", "eval_size", "num_experts", "top_k", "eval_every")
cli.at_least(0, "sft_steps", "collapse_fraction")
# Empty lists trained the warm-up, then crashed drawing the plots; a non-integer seed or κ
# failed as int() after the flags were parsed, an unknown mode only after JAX started.
cli.non_empty("seeds", "offs", "modes")
cli.distinct("seeds", "offs", "modes")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/results", "Where the JSON, report and PNGs go "
                               "(--quick default: WORKDIR/results).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare_replay", "Run directories, the shared "
                               "warm-up and the compilation cache (--quick default: "
                               "runs/compare_replay_quick).")
_CACHE = flags.DEFINE_bool("compile_cache", True, "Share compiled functions between runs through "
                           "JAX's persistent compilation cache in WORKDIR/jax_cache.")


def _known_modes(modes) -> bool:
  from pr2_jax.rl.config import REPLAY_MODES
  return all(mode in REPLAY_MODES + ("gspo",) for mode in modes)


cli.numbers_at_least(int, 0, "seeds")
cli.numbers_at_least(int, 1, "offs")
flags.register_validator("modes", _known_modes, message="--modes must each be one of none, r2, "
                         "r3, pr2, pr2_r2, gspo")

_QUICK_DEFAULTS = {"seeds": ["0", "1"], "offs": ["2", "4"], "modes": ["r3", "pr2"],
                   "rl_steps": 6, "eval_every": 3, "eval_size": 64, "sft_steps": 40,
                   "workdir": "runs/compare_replay_quick"}

CHECKPOINT_EVERY = 20  # RL steps between a run's checkpoints

# ----------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------

def _value(flag, name):
  """A flag's value, or the --quick default when --quick is on and the flag was not given."""
  if _QUICK.value and not flags.FLAGS[name].present and name in _QUICK_DEFAULTS:
    return _QUICK_DEFAULTS[name]
  return flag.value


def base_config():
  """The shared setting: the config file plus this script's overrides (a ConfigDict)."""
  cfg = cli.config_value(_CONFIG).copy_and_resolve_references()
  cfg.model.num_experts = _EXPERTS.value
  cfg.model.top_k = _TOP_K.value
  cfg.rl.learning_rate = _LR.value
  cfg.rl.num_steps = _value(_RL_STEPS, "rl_steps")
  cfg.rl.eval_every = _value(_EVAL_EVERY, "eval_every")
  cfg.rl.eval_size = _value(_EVAL_SIZE, "eval_size")
  cfg.pr2.lr_mult = _ALPHA.value
  sft_steps = _value(_SFT_STEPS, "sft_steps")
  if sft_steps is not None:
    cfg.sft.num_steps = sft_steps
  # An interrupted run resumes from its newest checkpoint (loop.run also saves step 0 and the
  # last step); the cadence changes no result, so replay_report.plan_run ignores it.
  cfg.checkpoint_every = CHECKPOINT_EVERY
  return cfg


def run_config(base, mode: str, off: int, seed: int, init_from: str):
  cfg = base.copy_and_resolve_references()
  cfg.seed = seed
  cfg.init_from = init_from
  cfg.rl.off_policy_k = off
  if mode == "gspo":
    # DESIGN §3's GSPO baseline: sequence ratio against π_old with its tiny clip range.
    cfg.rl.update(replay_mode="none", loss="gspo", clip_low=3e-4, clip_high=4e-4,
                  ratio_denominator="old")
  else:
    cfg.rl.replay_mode = mode
  return cfg


# ----------------------------------------------------------------------------
# Sweep
# ----------------------------------------------------------------------------

def _json_safe(x):
  """NaN/inf -> None, so the JSON is standard."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_json_safe(v) for v in x]
  return x


def _seconds(directory: str, seconds: float | None = None) -> float:
  """Reads (or, given `seconds`, records) the compute time of a run in its directory."""
  path = os.path.join(directory, "timing.json")
  if seconds is not None:
    outputs.write_json(path, {"seconds": seconds})
  elif os.path.exists(path):
    with open(path) as f:
      seconds = json.load(f)["seconds"]
  return seconds or 0.0


@contextlib.contextmanager
def timed(directory: str):
  """Adds the time spent in the block to the compute time recorded in `directory`, however the
  block ends: an interrupted run's time counts (it was lost), and its resume adds its own."""
  t0, before = time.perf_counter(), _seconds(directory)
  try:
    yield
  finally:
    _seconds(directory, before + time.perf_counter() - t0)


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _checkpoint_meta(directory: str) -> dict:
  """The JSON metadata of the newest checkpoint in `directory` (a warm-up's: its settings)."""
  from pr2_jax.train.checkpoint import Checkpointer
  with Checkpointer(directory, max_to_keep=1) as checkpointer:
    return checkpointer.restore_meta(checkpointer.latest_step())


def _read_rows(path: str) -> list[dict]:
  from pr2_jax.rl import records  # drops a torn last line (killed mid-write)
  return records.read_metrics_rows(path)


class Progress:
  """Sweep-level progress: RL steps run over those this sweep still has to run (a reused run's
  are skipped, a resumed run's earlier ones too), ETA from the measured rate."""

  def __init__(self, total_steps: int, log=logging.info):
    self.total, self.done, self.t0, self.log = total_steps, 0, time.perf_counter(), log

  def callback(self, label: str):
    first = [True]

    def on_progress(step, total, _seconds_per_step):
      if first[0]:  # the first step this call runs: a resumed run ran the ones before earlier
        first[0] = False
        self.skip(step - 1)
      self.done += 1
      if step % 10 == 0 or step == total:
        rate = (time.perf_counter() - self.t0) / max(self.done, 1)
        eta = rate * (self.total - self.done)
        self.log("[%s] step %d/%d | sweep %d/%d steps, ETA %dm%02ds", label, step, total,
                 self.done, self.total, eta // 60, eta % 60)
    return on_progress

  def skip(self, steps: int):
    self.total -= steps


def main(argv):
  del argv
  # Paths before any work: a bad --out_dir failed after the whole sweep, a --workdir that is a
  # file at the first run directory.
  workdir = outputs.output_dir("workdir", _value(_WORKDIR, "workdir"))
  out_dir = _OUT_DIR.value
  if _QUICK.value and not flags.FLAGS["out_dir"].present:
    out_dir = os.path.join(workdir, "results")
  outputs.output_dir("out_dir", out_dir)
  common.setup_devices()
  import jax
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from pr2_jax.rl import loop, programs, records
  from pr2_jax.rl.config import ExperimentConfig

  seeds = [int(s) for s in _value(_SEEDS, "seeds")]  # validated as integers when parsed
  offs = [int(k) for k in _value(_OFFS, "offs")]
  modes = list(_value(_MODES, "modes"))
  base = base_config()
  grid = [(off, mode, seed) for off in offs for mode in modes for seed in seeds]
  with cli.bad_config_exits():  # every run's settings, before any work
    for off, mode, seed in grid:
      ExperimentConfig.from_dict(run_config(base, mode, off, seed, "").to_dict())
    mesh = common.build_mesh(base)
    ExperimentConfig.from_dict(base.to_dict()).model.validate_mesh(mesh.shape["expert"],
                                                                   mesh.shape["data"])
  t_start = time.perf_counter()
  run_seconds = {}  # compute time per run (recorded in its directory, so reused runs keep theirs)

  # One warm-up for every run: a 1-step RL run that leaves WORKDIR/warmup/checkpoints/sft,
  # unless --config.init_from names one. An existing warm-up checkpoint is reused if it records
  # this sweep's warm-up settings (records.warmup_identity), else trained again. The 1-step run's
  # RL checkpoint is never resumed: it records this sweep's RL flags, which the warm-up ignores.
  init_from = base.init_from
  if not init_from:
    warm_dir = os.path.join(workdir, "warmup")
    init_from = os.path.join(warm_dir, "checkpoints", "sft")
    warm_cfg = run_config(base, "r3", offs[0], int(base.seed), "")
    warm_cfg.rl.num_steps, warm_cfg.rl.eval_every = 1, 0
    warm_config = ExperimentConfig.from_dict(warm_cfg.to_dict())
    if records.holds_checkpoint(init_from):
      changed = replay_report.config_differences(_checkpoint_meta(init_from),
                                                 records.warmup_identity(warm_config))
      if changed:
        logging.warning("the warm-up in %s was trained with other settings (%s): training it "
                        "again", warm_dir, ", ".join(changed))
        shutil.rmtree(warm_dir)
    fresh = not records.holds_checkpoint(init_from)
    t0 = time.perf_counter()
    if fresh:
      logging.info("warm-up into %s", warm_dir)
      loop.run(warm_config, mesh, warm_dir,
               on_metrics=common.log_and_write(common.MetricsWriter(warm_dir)),
               warn=logging.warning, allow_fresh_start=True)
    else:
      logging.info("warm-up checkpoint %s found, reused", init_from)
    run_seconds["warmup"] = _seconds(warm_dir, (time.perf_counter() - t0) if fresh else None)
  init_from = os.path.abspath(init_from)
  # Recorded in every run's config: a run on another warm-up is restarted, not reused.
  warmup_settings = _checkpoint_meta(init_from)
  progress = Progress(len(grid) * base.rl.num_steps)
  per_run, reused = {}, 0
  for i, (off, mode, seed) in enumerate(grid, 1):
    label = f"off{off} {mode} seed{seed} ({i}/{len(grid)})"
    cfg = run_config(base, mode, off, seed, init_from)
    run_dir = os.path.join(workdir, f"off{off}", mode, f"seed{seed}")
    wanted = {**json.loads(json.dumps(cfg.to_dict())), "warmup": warmup_settings}
    cfg_path = os.path.join(run_dir, "run_config.json")
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    stopped_path = os.path.join(run_dir, "stopped.json")
    error = (_read_json(stopped_path) or {}).get("error")
    action, why = replay_report.plan_run(_read_json(cfg_path), wanted, _read_rows(metrics_path),
                                         error)
    key = f"off{off}/{mode}/seed{seed}"
    if action == "reuse":
      run_seconds[key] = _seconds(run_dir)
      reused += 1
      progress.skip(cfg.rl.num_steps)
      logging.info("[%s] %s in %s, reused", label, why, run_dir)
    else:
      error = None  # a stale stopped.json goes with a restarted run; a resumed run had none
      if action == "restart" and os.path.exists(run_dir):
        logging.warning("[%s] deleting %s and starting over (%s)", label, run_dir, why)
        shutil.rmtree(run_dir)
      elif action == "resume":
        logging.info("[%s] resuming %s (%s)", label, run_dir, why)
      outputs.write_json(cfg_path, wanted, sort_keys=True)
      writer = common.MetricsWriter(run_dir)
      with timed(run_dir):
        try:
          # allow_fresh_start: a run dir of ours with RL rows but no readable checkpoint restarts.
          loop.run(ExperimentConfig.from_dict(cfg.to_dict()), mesh, run_dir,
                   on_metrics=writer.write, on_progress=progress.callback(label),
                   warn=logging.warning, allow_fresh_start=True)
        except FloatingPointError as e:  # the non-finite stop: a collapsed run, not a crash
          error = str(e)
          logging.warning("[%s] stopped: %s", label, e)
          # A rerun reuses it: resuming would go past the stop.
          outputs.write_json(stopped_path, {"error": error})
      run_seconds[key] = _seconds(run_dir)
    rows = _read_rows(metrics_path)  # the whole run's rows, those before a resume too
    if i < len(grid) and grid[i][:2] != (off, mode):
      # The next runs' programs differ (seeds share this run's): drop this run's executables.
      programs.clear()
      jax.clear_caches()
    per_run.setdefault(f"off{off}", {}).setdefault(mode, {})[seed] = replay_report.summarise_run(
        rows, _COLLAPSE.value, error)

  results = {off: {mode: replay_report.aggregate(runs) for mode, runs in modes_.items()}
             for off, modes_ in per_run.items()}
  wall = time.perf_counter() - t_start
  meta = {"command": outputs.command_line(),
          "wall_minutes": wall / 60, "sweep_minutes": sum(run_seconds.values()) / 60,
          "runs": len(grid), "reused_runs": reused, "seeds": seeds,
          "devices": f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
                     f"{os.cpu_count()} cores",
          "collapse_fraction": _COLLAPSE.value, "run_seconds": run_seconds,
          "setting": json.loads(json.dumps(base.to_dict()))}
  outputs.write_json(os.path.join(out_dir, "replay_comparison.json"),
                    _json_safe({**results, "meta": meta}))
  plots = replay_plots.write_plots(out_dir, results, base.model.top_k)
  replay_report.write_markdown(os.path.join(out_dir, "replay_comparison.md"), results, meta, plots,
                              base)
  logging.info("wrote %s (%.1f min)", out_dir, wall / 60)
  print(os.path.join(out_dir, "replay_comparison.md"), flush=True)


if __name__ == "__main__":
  cli.run(main)
