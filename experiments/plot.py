"""Draws PNG plots of a run's metrics.jsonl (one or more workdirs, overlaid).

    python -m experiments.plot runs/tiny                 # -> runs/tiny/plots/*.png
    python -m experiments.plot runs/r3 runs/none --out runs/compare
"""

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (
    ("reward", ("reward_mean", "eval_reward")),
    ("mismatch", ("k3_kl", "extreme_frac")),
    ("ratio", ("ratio_mean", "ratio_var", "clip_frac_low", "clip_frac_high")),
    ("routing", ("topk_agreement", "zero_dev_ratio", "coverage_gap")),
    ("optimisation", ("grad_norm", "entropy", "response_len")),
)


def read_rows(workdir: str, phase: str = "rl") -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise SystemExit(f"no metrics.jsonl in {workdir!r}")
  with open(path) as f:
    return [r for r in map(json.loads, filter(str.strip, f)) if r.get("phase") == phase]


def plot(workdirs: list[str], out_dir: str) -> list[str]:
  """One PNG per panel; every workdir is a line per metric. Returns the written paths."""
  os.makedirs(out_dir, exist_ok=True)
  runs = {os.path.basename(os.path.normpath(w)): read_rows(w) for w in workdirs}
  written = []
  for name, keys in PANELS:
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
      for run, rows in runs.items():
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
          ax.plot(*zip(*pts), marker="." if key == "eval_reward" else None, label=run)
      ax.set_title(key)
      ax.set_xlabel("RL step")
      ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
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
