"""Shell helpers shared by entry points: devices, mesh, configs, metrics file, progress and
summary (command-line plumbing and exits: `experiments.cli`)."""

import json
import logging as py_logging
import math
import os
import platform
import re
import subprocess
import sys
import time

from absl import flags, logging

from experiments import allocator, cli, outputs

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "If > 0, run on this many fake CPU devices (tries expert parallelism "
    "without accelerators). Must be set before JAX starts.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: host:port of process 0 (jax.distributed). Empty with "
    "--num_processes<=1 = single process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's rank (-1 = auto).")
_AUTO_DETECT = flags.DEFINE_bool(
    "distributed_auto", False, "Multi-host: let JAX detect the cluster (TPU pods, SLURM, Open "
    "MPI) instead of --coordinator_address, --num_processes and --process_id.")


class _QuietLibraries:
  """Drops INFO chatter of Orbax and JAX internals from the absl log (warnings still pass)."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("orbax", "jax/_src", "xla_bridge"))
    return record.levelno >= py_logging.WARNING or not noisy  # not absl's WARNING (-1)


# DistributedConfig's fields and the flags that set them: its errors name the field.
_DISTRIBUTED_FLAGS = {"coordinator_address": "coordinator_address",
                      "num_processes": "num_processes", "process_id": "process_id",
                      "auto_detect": "distributed_auto"}


def as_flag_names(message: str) -> str:
  """A DistributedConfig error as the command line says it: `auto_detect` is
  `--distributed_auto` (a user told to set auto_detect found no such flag)."""
  fields = "|".join(_DISTRIBUTED_FLAGS)
  return re.sub(rf"(?<![\w-])({fields})\b", lambda m: f"--{_DISTRIBUTED_FLAGS[m[1]]}", message)


def setup_devices():
  """Fake CPU devices and the distributed runtime; call before any other JAX work."""
  py_logging.getLogger("absl").addFilter(_QuietLibraries())
  # JAX logs through its own loggers, which a filter on "absl" never sees: on the handler, it
  # also drops JAX's start-up INFO ("Unable to initialize backend 'tpu': ... libtpu.so"), which
  # read as an error at the top of every CPU run.
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  from pr2_jax.parallel import distributed
  if _CPU_DEVICES.value > 0:
    distributed.use_cpu_devices(_CPU_DEVICES.value)
  try:
    cfg = distributed.DistributedConfig(_COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value, _AUTO_DETECT.value)
    distributed.initialize(cfg)
  except ValueError as e:
    raise flags.ValidationError(as_flag_names(str(e))) from None
  if not distributed.is_main_process():
    logging.set_verbosity(logging.WARNING)  # one log: process 0's
  if cfg.enabled:
    logging.info("process %d of %d: %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())


# What a benchmark's numbers depend on: the code, not the docs or earlier results.
CODE_PATHS = ("pr2_jax", "experiments", "configs", "setup.py", "constraints.txt",
              ":(exclude)experiments/results")


def source_revision(path: str | None = None) -> dict:
  """The git commit a benchmark ran from, and the code files (CODE_PATHS, new ones included)
  that differed from it, so numbers in the docs name the code they measured; {} outside a git
  checkout or without git."""
  path = path or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args) -> str:
    return subprocess.run(("git", "-C", path) + args, capture_output=True, text=True, check=True,
                          timeout=10).stdout
  try:
    changed = sorted(line[3:] for line in git("status", "--porcelain", "--", *CODE_PATHS)
                     .splitlines())
    return {"git_commit": git("rev-parse", "HEAD").strip(), "git_dirty": bool(changed),
            "git_changed": changed}
  except (OSError, subprocess.SubprocessError):
    return {}


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def timed_call(fn) -> float:
  """Seconds `fn()` takes until its result is ready (JAX dispatches asynchronously)."""
  import jax
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def machine_info(**extra) -> dict:
  """What a benchmark JSON records of where and from what it ran: CPU, cores, load, versions,
  JAX devices, git commit, time (UTC); `extra` adds or overrides fields."""
  import flax
  import jax
  import jaxlib
  import optax
  info = {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
          "cpus_usable": len(os.sched_getaffinity(0)), "load_avg_1m_at_start": os.getloadavg()[0],
          "platform": platform.platform(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          **allocator.describe(os.environ), "transparent_hugepage": allocator.thp_mode(),
          **source_revision()}
  info.update(extra)
  return info


def devices_dividing(cores: int, *sizes: int) -> int:
  """The most devices, at most one per core, that split every size evenly."""
  return max(d for d in range(1, cores + 1) if all(n % d == 0 for n in sizes))


def auto_axis(size: int, num_devices: int, other: int = 1) -> int:
  """A mesh axis size as configs and flags give it: 0 = automatic, the devices the other axis
  (of size `other`) leaves. So a config's `mesh_data=0` is the rest after `mesh_expert`, and
  bench_peer's `--mesh_expert=0` (its data axis is always the rest) is every device. A
  config's `mesh_expert` has no automatic value: `build_mesh` refuses 0."""
  return int(size) or num_devices // other


def build_mesh(cfg):
  """The ('data', 'expert') mesh of a run's ConfigDict over every device (`auto_axis`: a
  `mesh_data` of 0 takes the devices `mesh_expert` leaves)."""
  import jax
  from pr2_jax.parallel.mesh import make_mesh
  n = jax.device_count()
  expert = int(cfg.mesh_expert)
  if expert < 1 or n % expert:
    raise flags.ValidationError(f"--config.mesh_expert={expert} must divide the {n} devices")
  return make_mesh(auto_axis(cfg.mesh_data, n, expert), expert)


def experiment_setup(cfg):
  """(ExperimentConfig, mesh) of an RL run's ConfigDict, the model checked against the mesh; a
  bad value is one error line (`cli.bad_config_exits`), before any compile."""
  from pr2_jax.rl.config import ExperimentConfig
  with cli.bad_config_exits():
    config = ExperimentConfig.from_dict(cfg.to_dict())
    mesh = build_mesh(cfg)
    config.model.validate_mesh(mesh.shape["expert"], mesh.shape["data"])
  return config, mesh


class MetricsWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str):
    # A file, a path under a file or an unwritable place is one error line, not a traceback;
    # so is a path Orbax cannot checkpoint under, before the directory is made.
    from pr2_jax.train.checkpoint import check_directory  # imports JAX: after setup_devices
    try:
      check_directory(workdir)
    except ValueError as e:
      cli.exit_with_error(f"--workdir: {e}")
    try:
      os.makedirs(outputs.output_dir("workdir", workdir), exist_ok=True)
    except OSError as e:  # what the check cannot foresee (root in /proc, a full disk)
      cli.exit_with_error(f"--workdir={workdir} cannot be created: {e}")
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, metrics: dict):
    from pr2_jax.parallel.distributed import is_main_process
    if not is_main_process():  # every process computes the metrics; one writes them
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(metrics, sort_keys=True) + "\n")


_SHOWN = ("loss", "reward_mean", "eval_reward", "k3_kl", "topk_agreement", "grad_norm", "accuracy")


def log_and_write(writer: MetricsWriter):
  """Metrics callback: one JSON line per call, a short log line for humans."""
  def callback(m: dict):
    writer.write(m)
    shown = "  ".join(f"{k} {m[k]:.4g}" for k in _SHOWN if isinstance(m.get(k), float))
    logging.info("[%s %d] %s", m.get("phase"), m.get("step", 0), shown)
  return callback


def ineffective_overrides(argv: list[str], replay_mode: str) -> list[str]:
  """`--config.pr2.*` flags given for a run whose replay mode has no predictor: they would
  change nothing, which a user who typed them should hear."""
  from pr2_jax.rl.config import replay_phases
  if replay_phases(replay_mode).uses_predictor:
    return []
  return [a for a in argv[1:] if a.startswith("--config.pr2.")]


def predictor_lr_warning(config) -> str | None:
  """A warning when PR2's predictor learns at a rate Adam takes in large steps: the paper's
  α = 1e3 is for its η ~ 1e-6; at α·η = 1 the bias swamped the router."""
  lr = config.pr2.lr_mult * config.rl.learning_rate
  if not config.rl.phases.uses_predictor or lr <= 1e-2:
    return None
  return (f"PR2's predictor learning rate pr2.lr_mult * rl.learning_rate = {lr:g} is large for "
          "Adam (~1e-3 suits, as configs/tiny.py); watch bias_logit_ratio in the metrics")


def predictor_idle_warning(config) -> str | None:
  """PR2's predictor trains from the second mini-step of a rollout batch on (DESIGN §2; at the
  first the policy has not moved, so there is no drift to fit); with one mini-step W_p stays
  zero and the run routes and replays exactly as R3 (pr2) or R2 (pr2_r2)."""
  rl = config.rl
  if not rl.phases.uses_predictor or rl.off_policy_k > 1:
    return None
  same = "r3" if rl.replay_mode == "pr2" else "r2"
  return (f"rl.replay_mode={rl.replay_mode!r} with rl.off_policy_k=1 never trains the predictor "
          f"(it learns from the second mini-step on): W_p stays zero and the run is {same.upper()} "
          f"with extra work; use off_policy_k >= 2 (or replay_mode={same!r})")


def balance_mode_warning(config) -> str | None:
  """foresight plans from replayed routes; with replay_mode 'none' every learner phase routes
  live, so its plans are never used (the imbalance_* metrics are logged in every mode)."""
  rl = config.rl
  if rl.balance_mode != "foresight" or rl.phases.update_replays:
    return None
  return ("rl.balance_mode='foresight' places nothing with rl.replay_mode='none' (live routing "
          "leaves no routes to plan from): the static layout is used; imbalance_foresight_* "
          "still reports what it would give")


def progress_logger(phase: str, every_s: float = 10.0, clock=time.monotonic):
  """An `on_progress(step, total, seconds_per_step)` callback for loop.run: '{phase} step i/n,
  s/step, ETA' in the log, at most every `every_s` seconds (always at the first and last)."""
  last_logged = [-math.inf]

  def log(step: int, total: int, seconds_per_step: float | None):
    now = clock()
    if seconds_per_step is None:  # the first report after a start or resume: mostly compiling
      logging.info("%s step %d/%d  (includes compiling; ETA from the next report)", phase, step,
                   total)
    elif step == total or now - last_logged[0] >= every_s:
      eta = (total - step) * seconds_per_step
      logging.info("%s step %d/%d  %.2fs/step  ETA %dm%02ds", phase, step, total,
                   seconds_per_step, eta // 60, eta % 60)
    else:
      return
    last_logged[0] = now
  return log


def print_summary(summary: dict, workdir: str):
  from pr2_jax.parallel.distributed import is_main_process
  if not is_main_process():
    return
  from pr2_jax.rl.records import read_metrics_rows
  final = summary["final"]
  warm = summary["warmup_eval_reward"]
  lines = ["", "== summary =="]
  if warm is None or not final:  # resumed: what came before the resume is in metrics.jsonl
    rows = read_metrics_rows(os.path.join(workdir, "metrics.jsonl"))
    # A resumed run's summary left out the reward before RL, the number to compare with.
    warm = next((r["eval_reward"] for r in rows if r.get("phase") == "sft_eval"), warm)
  if not final:  # resumed a finished run: nothing ran, report its last row
    final = next((r for r in reversed(rows) if r.get("phase") == "rl"), {})
    lines.append(f"already complete at RL step {summary.get('resumed_from')}: nothing to run "
                 "(raise --config.rl.num_steps to continue, or use another --workdir)")
  if warm is not None:
    lines.append(f"eval reward before RL:     {warm:.3f}")  # after the warm-up, or the checkpoint's
  if "eval_reward" in final:
    lines.append(f"eval reward after RL:      {final['eval_reward']:.3f}")
  lines.append(f"train reward (last step):  {final.get('reward_mean', float('nan')):.3f}")
  lines.append(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}  plots: "
               f"{sys.executable} -m experiments.plot {workdir}")
  print("\n".join(lines), flush=True)


cli.at_least(0, "cpu_devices", "num_processes")
cli.at_least(-1, "process_id")
