"""Draws PNG plots of a run's metrics.jsonl (one or more workdirs, overlaid).

    python -m experiments.plot runs/tiny                 # -> runs/tiny/plots/*.png
    python -m experiments.plot runs/r3 runs/none --out=runs/compare

Every WORKDIR must hold a metrics.jsonl with at least one RL row; they are all
read and checked before the output directory is made. A torn last line (a run
killed mid-write) is skipped, as the training loop does.
"""

import os

from absl import app, flags

from pr2_jax import viz


def read_rows(workdir: str, phases=("sft_eval", "rl")) -> list[dict]:
  """Rows of the given phases ('sft_eval' is the warm-up policy's eval_reward at step 0)."""
  from pr2_jax.rl import records  # the loop's reader: it tolerates a torn last line
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"no metrics.jsonl in {workdir!r} (expected a run's workdir, e.g. runs/tiny)")
  return [r for r in records.read_metrics_rows(path) if r.get("phase") in phases]


def load_runs(workdirs: list[str]) -> dict[str, list[dict]]:
  """{run name (the workdir's basename): rows}; a ValueError naming a workdir without RL rows."""
  if not workdirs:
    raise ValueError("no workdir given (expected one or more run directories)")
  runs = {}
  for workdir in workdirs:
    rows = read_rows(workdir)
    if not any(r.get("phase") == "rl" for r in rows):
      raise ValueError(f"metrics.jsonl in {workdir!r} has no RL rows (phase 'rl'), nothing to "
                       "plot: has the run finished an RL step yet?")
    runs[os.path.basename(os.path.normpath(workdir))] = rows
  return runs


def figures(runs: dict[str, list[dict]]) -> list[tuple]:
  """(name, matplotlib Figure) of every panel of `viz.PANELS`, then the horizon curve."""
  return ([(name, viz.metric_panel(runs, keys)) for name, keys in viz.PANELS]
          + [("horizon", viz.horizon_curve(runs))])


def plot(workdirs: list[str], out_dir: str) -> list[str]:
  """One PNG per panel of `viz.PANELS` plus the horizon curve; returns the written paths."""
  import matplotlib.pyplot as plt
  runs = load_runs(workdirs)  # before makedirs: bad input must not leave a directory behind
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, fig in figures(runs):
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written


def main(argv, out_dir: str | None = None):
  """The command line: argv[1:] are the workdirs (absl has taken the flags out)."""
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give one or more WORKDIRs (run directories holding metrics.jsonl)")
  try:
    paths = plot(workdirs, out_dir or os.path.join(workdirs[0], "plots"))
  except ValueError as e:
    raise SystemExit(f"experiments.plot: {e}") from None
  for path in paths:
    print(path)


if __name__ == "__main__":
  # Flags only when run as a script: other entry points define --out too, and absl refuses a
  # second definition in a process that imports both (the test suite).
  _OUT = flags.DEFINE_string("out", None, "Output directory (default: the first WORKDIR/plots).")
  from experiments import common
  common.run(lambda argv: main(argv, _OUT.value))
