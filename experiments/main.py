"""Entry point: warm-up then RL on a procedural task, resumable from --workdir.

    python -m experiments.main --config=configs/tiny.py --workdir=runs/tiny

Multi-host (run the same command on every process; see docs/scaling.md):

    python -m experiments.main --config=configs/tiny.py --workdir=SHARED_DIR \
        --coordinator_address=HOST0:1234 --num_processes=2 --process_id=RANK
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints and metrics.jsonl go here; "
                               "rerunning with the same workdir resumes.")
_FRESH = flags.DEFINE_bool("fresh", False, "Allow starting from scratch in a workdir that has RL "
                           "metrics but no usable checkpoint (otherwise that is an error).")


def main(argv):
  del argv
  common.setup_devices()
  from pr2_jax.rl import loop
  from pr2_jax.rl.config import ExperimentConfig

  cfg = _CONFIG.value
  config = ExperimentConfig.from_dict(cfg.to_dict())
  mesh = common.build_mesh(cfg)
  config.model.validate_mesh(mesh.shape["expert"], mesh.shape["data"])
  writer = common.MetricsWriter(_WORKDIR.value)
  logging.info("mesh %s; workdir %s", dict(mesh.shape), _WORKDIR.value)
  summary = loop.run(config, mesh, _WORKDIR.value, on_metrics=common.log_and_write(writer),
                     on_progress=common.progress, warn=logging.warning,
                     allow_fresh_start=_FRESH.value)
  common.print_summary(summary, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
