r"""Entry point: warm-up then RL on a procedural task, resumable from --workdir.

    python -m experiments.main --config=configs/tiny.py --workdir=runs/tiny

Multi-host (run the same command on every process; see docs/scaling.md):

    python -m experiments.main --config=configs/tiny.py --workdir=SHARED_DIR \
        --coordinator_address=HOST0:1234 --num_processes=2 --process_id=RANK
"""

import sys

from absl import flags, logging

from experiments import cli, common, outputs

_CONFIG = cli.define_config(
    "configs/tiny.py", "Experiment config file (configs/*.py); any field can be overridden with "
    "--config.FIELD=VALUE, e.g. --config.rl.num_steps=10 --config.rl.replay_mode=pr2.")
# --help lists only this module's key flags: without this it left out --config, --cpu_devices
# and the multi-host flags (defined in cli and common), which --helpfull alone showed.
flags.adopt_module_key_flags(cli)
flags.adopt_module_key_flags(common)
_WORKDIR = flags.DEFINE_string("workdir", "runs/tiny", "Checkpoints and metrics.jsonl go here; "
                               "rerunning with the same workdir resumes.")
_FRESH = flags.DEFINE_bool("fresh", False, "Allow starting from scratch in a workdir that has RL "
                           "metrics but no RL checkpoint, or only unreadable checkpoints (they "
                           "are deleted); otherwise that is an error.")


def main(argv):
  del argv
  outputs.output_dir("workdir", _WORKDIR.value)  # before JAX starts: a bad path fails at once
  common.setup_devices()
  from pr2_jax.rl import loop, start
  from pr2_jax.rl.config import SetupError
  from pr2_jax.train.checkpoint import CheckpointError, SetupMismatchError

  config, mesh = common.experiment_setup(cli.config_value(_CONFIG))
  for flag in common.ineffective_overrides(sys.argv, config.rl.replay_mode):
    logging.warning("%s has no effect: rl.replay_mode=%r runs no predictor (pr2 and pr2_r2 do)",
                    flag, config.rl.replay_mode)
  for warning in (common.predictor_lr_warning(config), common.predictor_idle_warning(config),
                  common.balance_mode_warning(config)):
    if warning:
      logging.warning(warning)
  writer = common.MetricsWriter(_WORKDIR.value)
  logging.info("mesh %s; workdir %s", dict(mesh.shape), _WORKDIR.value)
  try:
    # Called every step: a Ctrl-C that Python dropped stops the run at the next one.
    summary = loop.run(config, mesh, _WORKDIR.value,
                       on_metrics=cli.raises_signalled(common.log_and_write(writer)),
                       on_progress=cli.raises_signalled(common.progress_logger("rl")),
                       on_warmup_progress=cli.raises_signalled(common.progress_logger("warm-up")),
                       warn=logging.warning, info=logging.info,
                       allow_fresh_start=_FRESH.value)
  except (SetupError, SetupMismatchError, CheckpointError) as e:  # found before any training step
    cli.exit_with_error(str(e))
  except loop.Diverged as e:
    # One line, not a traceback (nothing is broken), and what to do.
    if e.phase == "sft":  # nothing was saved: the same command diverges again
      cli.exit_with_error(f"{e}. Change the warm-up (e.g. a lower --config.sft.learning_rate) "
                          "and rerun", code=1)
    # RL checkpointed its last good state: the same command resumes from it and most likely
    # diverges again, and a changed setup needs its own workdir.
    warmup = start.warmup_dir(config, _WORKDIR.value)
    reuse = f" (--config.init_from={warmup} reuses this run's warm-up)" if warmup else ""
    cli.exit_with_error(f"{e}. Rerunning resumes from there, likely into the same failure: "
                        "change the setup (e.g. a lower --config.rl.learning_rate) and use a new "
                        f"--workdir{reuse}", code=1)
  except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: loop.run has finished any save in flight
    logging.warning("interrupted; %s", start.rerun_plan(config, _WORKDIR.value))
    cli.exit_interrupted(143 if isinstance(e, cli.Terminated) else 130)
  if _FRESH.value and summary["resumed_from"] is not None:
    logging.warning("--fresh had no effect: %s has an RL checkpoint, which was resumed (use "
                    "another --workdir to start over)", _WORKDIR.value)
  common.print_summary(summary, _WORKDIR.value)


if __name__ == "__main__":
  cli.run(main)
