"""The plots of the routing-replay comparison (`experiments/compare_replay.py`): three PNGs
beside its report, from the per-κ, per-mode aggregates of `replay_report.aggregate`.

    replay_comparison_curves.png    eval and train reward, k3 KL, zero-dev ratio and top-k
                                    agreement against RL step (seed means)
    replay_comparison_horizon.png   zero-dev ratio, top-k agreement and k3 KL at mini-step 1..κ
    replay_comparison_dev_hist.png  the deviation histogram K − |I_rep ∩ I_cur|

It is its own module because replay_report.py had reached the 400-line limit; like that one it
has no flags, and imports matplotlib only when it draws.

Dimension legend (the lists it plots):
  S RL steps of a run (`curves`: one value per step, None where a step lacks it; eval points at
  `eval_step` only), κ mini-steps per RL step (`*_per_ministep`: mean and std over seeds),
  4 bins of experts changed, 0, 1, 2 and ≥3 (`dev_hist`; with top-k K < 3, the first K + 1).
"""

import os

from experiments.replay_report import MODE_LABELS


def _smooth(ys, window=5):
  out = []
  for i in range(len(ys)):
    part = [y for y in ys[max(0, i - window + 1):i + 1] if y is not None]
    out.append(sum(part) / len(part) if part else None)
  return out


def _save(plt, fig, axes, path: str) -> str:
  """The legend on the first panel, then write the figure to `path` and close it."""
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def write_plots(out_dir: str, results: dict, top_k: int) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  offs = list(results)
  modes = sorted({m for r in results.values() for m in r}, key=list(MODE_LABELS).index)
  color = {m: f"C{i}" for i, m in enumerate(MODE_LABELS)}
  paths = []

  # Reward, k3 KL and agreement against step (seed means; train curves smoothed over 5 steps).
  panels = (("reward", "eval reward (markers) / train reward (line)"), ("k3_kl", "k3 KL"),
            ("zero_dev_ratio_ministep_ge2", "zero-dev ratio, mini-steps ≥ 2"),
            ("topk_agreement", "top-k agreement, all mini-steps"))
  fig, axes = plt.subplots(len(offs), len(panels), figsize=(4.2 * len(panels), 3 * len(offs)),
                           squeeze=False)
  for row, off in enumerate(offs):
    for col, (key, title) in enumerate(panels):
      ax = axes[row][col]
      for mode, agg in results[off].items():
        c = agg["curves"]
        if key == "reward":
          ax.plot(c["step"], _smooth(c["reward_mean"]), color=color[mode], alpha=0.5, lw=1)
          ax.plot(c["eval_step"], c["eval_reward"], "o-", color=color[mode], ms=3,
                  label=MODE_LABELS[mode])
        elif any(v is not None for v in c[key]):
          ax.plot(c["step"], _smooth(c[key]), color=color[mode], label=MODE_LABELS[mode])
      if key == "k3_kl":
        ax.set_yscale("log")
      ax.set_title(f"{off}: {title}", fontsize=9)
      ax.set_xlabel("RL step")
      ax.grid(alpha=0.3)
  paths.append(_save(plt, fig, axes, os.path.join(out_dir, "replay_comparison_curves.png")))

  # The horizon curve: agreement with the live router (and k3) at mini-step i = 1..κ.
  fig, axes = plt.subplots(3, len(offs), figsize=(4.2 * len(offs), 9), squeeze=False)
  for col, off in enumerate(offs):
    for row, (key, title) in enumerate((("zero_dev_ratio_per_ministep", "zero-dev ratio"),
                                        ("topk_agreement_per_ministep", "top-k agreement"),
                                        ("k3_kl_per_ministep", "k3 KL"))):
      ax = axes[row][col]
      for mode, agg in results[off].items():
        f = agg[key]
        if f["mean"]:
          xs = list(range(1, len(f["mean"]) + 1))
          ax.errorbar(xs, f["mean"], yerr=f["std"], color=color[mode], marker="o", ms=3,
                      capsize=2, label=MODE_LABELS[mode])
      ax.set_title(f"{off}: {title} vs mini-step", fontsize=9)
      ax.set_xticks(range(1, int(off[3:]) + 1))
      if key.startswith("k3"):
        ax.set_yscale("log")
      ax.set_xlabel("mini-step i")
      ax.grid(alpha=0.3)
  paths.append(_save(plt, fig, axes, os.path.join(out_dir, "replay_comparison_horizon.png")))

  # Deviation histogram K − |I_rep ∩ I_cur| (shares over all mini-steps; log scale).
  bins = min(top_k, 3) + 1
  fig, axes = plt.subplots(1, len(offs), figsize=(4.2 * len(offs), 3.2), squeeze=False)
  width = 0.8 / max(len(modes), 1)
  for col, off in enumerate(offs):
    ax = axes[0][col]
    for i, mode in enumerate(m for m in modes if m in results[off]):
      hist = results[off][mode]["dev_hist"]["mean"][:bins]
      ax.bar([b + (i - len(modes) / 2 + 0.5) * width for b in range(bins)], hist, width,
             color=color[mode], label=MODE_LABELS[mode])
    ax.set_xticks(range(bins), [str(b) if b < 3 else "≥3" for b in range(bins)])
    ax.set_yscale("log")
    ax.set_xlabel("experts changed (K − overlap)")
    ax.set_title(f"{off}: deviation histogram", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  paths.append(_save(plt, fig, axes, os.path.join(out_dir, "replay_comparison_dev_hist.png")))
  return paths


if __name__ == "__main__":  # run as a command, it would do nothing at all, even for --help
  import sys
  sys.stderr.write("error: experiments.replay_plots is a library module, not a command; it is "
                   "used by python -m experiments.compare_replay\n")
  sys.exit(2)
