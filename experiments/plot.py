"""Draws PNG plots of a run's metrics.jsonl (one or more workdirs, overlaid).

    python -m experiments.plot runs/tiny                 # -> runs/tiny/plots/*.png
    python -m experiments.plot runs/r3 runs/none --out=runs/compare

Every WORKDIR must hold a metrics.jsonl with at least one RL row; they are all
read and checked before the output directory is made. A torn last line (a run
killed mid-write) is skipped, as the training loop does. Each run's line is
labelled by the shortest end of its path that no other WORKDIR's path ends with
(`r3/seed0` and `pr2/seed0` for compare_replay's off2/r3/seed0 and off2/pr2/seed0).
"""

import os

from absl import app, flags

from experiments import cli, outputs
from pr2_jax import viz


def read_rows(workdir: str, phases=("sft_eval", "rl")) -> list[dict]:
  """Rows of the given phases ('sft_eval' is the warm-up policy's eval_reward at step 0)."""
  from pr2_jax.rl import records  # the loop's reader: it tolerates a torn last line
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"no metrics.jsonl in {workdir!r} (expected a run's workdir, e.g. runs/tiny)")
  return [r for r in records.read_metrics_rows(path) if r.get("phase") in phases]


def run_labels(workdirs: list[str]) -> list[str]:
  """A distinct label per workdir: the fewest trailing path components that no other workdir's
  path ends with (its whole path if it is the end of another's; a repeated path gets ' (2)').
  Basenames were not enough: compare_replay's off{κ}/{mode}/seed{s} runs share them, and all
  but one of them were dropped from the plots."""
  paths = [tuple(os.path.normpath(w).split(os.sep)) for w in workdirs]
  labels = []
  for i, path in enumerate(paths):
    others = [p for j, p in enumerate(paths) if j != i and p != path]
    n = next((n for n in range(1, len(path) + 1)
              if not any(p[-n:] == path[-n:] for p in others)), len(path))
    label = os.path.join(*path[-n:])
    repeat = paths[:i].count(path)
    labels.append(f"{label} ({repeat + 1})" if repeat else label)
  return labels


def load_runs(workdirs: list[str]) -> dict[str, list[dict]]:
  """{run label (`run_labels`): rows}; a ValueError naming a workdir without RL rows."""
  if not workdirs:
    raise ValueError("no workdir given (expected one or more run directories)")
  runs = {}
  for workdir, label in zip(workdirs, run_labels(workdirs)):
    rows = read_rows(workdir)
    if not any(r.get("phase") == "rl" for r in rows):
      raise ValueError(f"metrics.jsonl in {workdir!r} has no RL rows (phase 'rl'), nothing to "
                       "plot: has the run finished an RL step yet?")
    steps = [r.get("step") for r in rows if r.get("phase") == "rl"]
    back = next((i for i in range(1, len(steps)) if not steps[i - 1] < steps[i]), None)
    if back is not None:  # a resume trims the rows past its checkpoint: never happens alone
      raise ValueError(f"metrics.jsonl in {workdir!r} has RL step {steps[back]} after step "
                       f"{steps[back - 1]}: two runs wrote it at once (or it was edited); "
                       "the curves would zig-zag between them")
    runs[label] = rows
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
  """The command line: argv[1:] are the workdirs (absl has taken the flags out). A bad workdir
  or output directory is one `error:` line, exit code 2, before anything is drawn."""
  workdirs = argv[1:]
  if not workdirs:
    raise app.UsageError("give one or more WORKDIRs (run directories holding metrics.jsonl)")
  for workdir in workdirs:  # else the default --out under it is what the error names
    if os.path.isfile(workdir):
      cli.exit_with_error(f"experiments.plot: {workdir} is a file, not a run's workdir (give "
                          f"the directory holding metrics.jsonl, e.g. "
                          f"{os.path.dirname(workdir) or '.'})")
  # An --out that is a file failed only after every figure was drawn.
  out_dir = outputs.output_dir("out", out_dir or os.path.join(workdirs[0], "plots"))
  try:
    paths = plot(workdirs, out_dir)
  except ValueError as e:
    cli.exit_with_error(f"experiments.plot: {e}")
  for path in paths:
    print(path)


if __name__ == "__main__":
  # Flags only when run as a script: other entry points define --out too, and absl refuses a
  # second definition in a process that imports both (the test suite).
  _OUT = flags.DEFINE_string("out", None, "Output directory (default: the first WORKDIR/plots).")
  cli.run(lambda argv: main(argv, _OUT.value), positional=True)
