"""Plots for notebooks and scripts (matplotlib, imported lazily: the library needs no display).

Functions take plain data (metric rows, arrays) and return matplotlib figures;
saving and showing is the caller's business.

Dimension legend: E experts, D devices (expert shards; not d_model), S slots per device.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from pr2_jax.balance import imbalance

PANELS = (
    ("reward", ("reward_mean", "eval_reward")),
    ("mismatch", ("k3_kl", "extreme_frac", "old_k3_kl")),
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
  # The legend goes on the first subplot with lines: a run may lack a panel's first metric.
  drawn = [ax for ax in axes[0] if ax.get_lines()]
  if drawn:
    drawn[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig


def horizon_curve(runs: Mapping[str, Sequence[dict]], key: str = "zero_dev_ratio_per_ministep"):
  """Mean over steps of a per-mini-step metric against the mini-step index (1..κ)."""
  plt = _plt()
  fig, ax = plt.subplots(figsize=(4.5, 3.2))
  kappa = 0
  for run, rows in runs.items():
    curves = [r[key] for r in rows if isinstance(r.get(key), list)]
    if curves:
      mean = np.mean(np.asarray(curves, float), axis=0)
      ax.plot(np.arange(1, len(mean) + 1), mean, marker="o", label=run)
      kappa = max(kappa, len(mean))
  ax.set_xticks(np.arange(1, kappa + 1))  # mini-steps are whole numbers (matplotlib drew 1.2)
  ax.set_title("horizon: mean over RL steps")
  ax.set_xlabel("mini-step within the rollout batch")
  ax.set_ylabel(key.replace("_per_ministep", ""))
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def plan_figure(loads_E, slot_expert_DS, slot_load_DS, title: str = ""):
  """Experts on devices before (native layout, no replicas) and after a plan, as stacked bars.

  `loads_E` are one layer's (token, k) counts; `slot_expert_DS`/`slot_load_DS`
  one layer of a `pr2_jax.balance.Plan`. Titles carry the imbalance max/mean.
  """
  loads_E = np.asarray(loads_E, float)
  expert_DS, slot_DS = np.asarray(slot_expert_DS), np.asarray(slot_load_DS, float)
  # Else numpy's reshape error, or bars drawn from misaligned rows.
  if loads_E.ndim != 1 or expert_DS.ndim != 2 or slot_DS.shape != expert_DS.shape:
    raise ValueError(f"plan_figure takes loads_E [E] and slot_expert_DS, slot_load_DS [D, S] of "
                     f"one shape; got {loads_E.shape}, {expert_DS.shape}, {slot_DS.shape}")
  d, e = expert_DS.shape[0], loads_E.shape[0]
  if e % d:
    raise ValueError(f"plan_figure: {e} experts do not split evenly over {d} devices (the "
                     "static layout gives each device E/D experts)")
  per = e // d
  plt = _plt()
  native_DS = np.arange(e).reshape(d, per)
  colors = plt.get_cmap("tab20")(np.arange(e) % 20)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
  for ax, (name, ids_DS, load_DS) in zip(axes, (
      ("static (no replicas)", native_DS, loads_E[native_DS]),
      ("planned (replicas + split)", expert_DS, slot_DS))):
    bottom = np.zeros(d)
    for s in range(ids_DS.shape[1]):
      ids = ids_DS[:, s]
      ax.bar(np.arange(d), load_DS[:, s], bottom=bottom, color=colors[np.maximum(ids, 0)],
             edgecolor="white")
      for dev in range(d):
        if load_DS[dev, s] > 0.04 * loads_E.sum() / d:
          ax.text(dev, bottom[dev] + load_DS[dev, s] / 2, str(ids[dev]), ha="center",
                  va="center", fontsize=7)
      bottom += load_DS[:, s]
    ax.axhline(loads_E.sum() / d, color="k", ls="--", lw=0.8)
    ax.set_title(f"{name}: imbalance {float(imbalance(bottom)):.2f}")
    ax.set_xticks(np.arange(d))  # one tick per device, not matplotlib's -0.5, 0.5, ...
    ax.set_xlabel("device")
  axes[0].set_ylabel("(token, k) pairs; labels = expert ids")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return fig
