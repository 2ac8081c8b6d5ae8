"""Draws PNG plots of a run's metrics.jsonl (one or more workdirs, overlaid).

    python -m experiments.plot runs/tiny                 # -> runs/tiny/plots/*.png
    python -m experiments.plot runs/r3 runs/none --out runs/compare
"""

import json
import os
import sys

from pr2_jax import viz


def read_rows(workdir: str, phases=("sft_eval", "rl")) -> list[dict]:
  """Rows of the given phases ('sft_eval' is the warm-up policy's eval_reward at step 0)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise SystemExit(f"no metrics.jsonl in {workdir!r}")
  with open(path) as f:
    return [r for r in map(json.loads, filter(str.strip, f)) if r.get("phase") in phases]


def figures(runs: dict[str, list[dict]]) -> list[tuple]:
  """(name, matplotlib Figure) of every panel of `viz.PANELS`, then the horizon curve."""
  return ([(name, viz.metric_panel(runs, keys)) for name, keys in viz.PANELS]
          + [("horizon", viz.horizon_curve(runs))])


def plot(workdirs: list[str], out_dir: str) -> list[str]:
  """One PNG per panel of `viz.PANELS` plus the horizon curve; returns the written paths."""
  import matplotlib.pyplot as plt
  os.makedirs(out_dir, exist_ok=True)
  runs = {os.path.basename(os.path.normpath(w)): read_rows(w) for w in workdirs}
  written = []
  for name, fig in figures(runs):
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
  return written


def main(argv):
  args = argv[1:]
  out = None
  if "--out" in args:
    i = args.index("--out")
    out, args = args[i + 1], args[:i] + args[i + 2:]
  if not args:
    raise SystemExit(__doc__)
  for path in plot(args, out or os.path.join(args[0], "plots")):
    print(path)


if __name__ == "__main__":
  main(sys.argv)
