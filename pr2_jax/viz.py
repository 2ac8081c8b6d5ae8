"""Plots for notebooks and scripts (matplotlib; imported lazily so the library doesn't need a display).

Functions take plain data (metric rows, arrays) and return matplotlib figures;
saving and showing is the caller's business.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

PANELS = (
    ("reward", ("reward_mean", "eval_reward")),
    ("mismatch", ("k3_kl", "extreme_frac")),
    ("ratio", ("ratio_mean", "ratio_var", "clip_frac_low", "clip_frac_high")),
    ("routing", ("topk_agreement", "zero_dev_ratio", "coverage_gap")),
    ("optimisation", ("grad_norm", "entropy", "response_len")),
)


def _plt():
  import matplotlib
  if matplotlib.get_backend().lower() not in ("agg",) and not _interactive():
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _interactive() -> bool:
  try:
    from IPython import get_ipython
    return get_ipython() is not None
  except ImportError:
    return False


def metric_panel(runs: Mapping[str, Sequence[dict]], keys: Sequence[str], title: str = ""):
  """One subplot per metric key, one line per run; rows are metrics.jsonl 'rl' rows."""
  plt = _plt()
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
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def horizon_curve(runs: Mapping[str, Sequence[dict]], key: str = "zero_dev_ratio_per_ministep"):
  """Mean over steps of a per-mini-step metric against the mini-step index (1..κ)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  for run, rows in runs.items():
    curves = [r[key] for r in rows if isinstance(r.get(key), list)]
    if curves:
      mean = np.mean(np.asarray(curves, float), axis=0)
      ax.plot(np.arange(1, len(mean) + 1), mean, marker="o", label=run)
  ax.set_xlabel("mini-step within the rollout batch")
  ax.set_ylabel(key.replace("_per_ministep", ""))
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
