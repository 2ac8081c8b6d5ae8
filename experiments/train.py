"""Entry point: parse flags, build configs, call the library.

    python -m experiments.train --config=configs/tiny.py --workdir=/tmp/pr2_tiny
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import common

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/pr2_jax/tiny", "Where metrics.jsonl is written.")


def main(argv):
  del argv
  common.setup_devices()
  from pr2_jax.train import supervised  # after device setup: jax must not have started

  cfg = _CONFIG.value
  mesh = common.build_mesh(cfg)
  model_config = common.model_config(cfg)
  train_config = supervised.SupervisedConfig(**cfg.supervised)
  writer = common.MetricsWriter(_WORKDIR.value)
  logging.info("mesh %s, model %s", dict(mesh.shape), model_config)

  def log(step, m):
    writer.write(m)
    logging.info("step %4d  loss %.4f  acc %.3f  grad_norm %.3f  dropped %d  (%.1fs)",
                 step, m["loss"], m["accuracy"], m["grad_norm"], m["dropped"], m["elapsed_s"])

  _, history = supervised.train(model_config, train_config, mesh, on_metrics=log)
  first, last = history[0]["loss"], history[-1]["loss"]
  logging.info("loss %.4f -> %.4f over %d steps; metrics in %s/metrics.jsonl",
               first, last, train_config.num_steps, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
