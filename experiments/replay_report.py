"""Summaries and report of the routing-replay comparison (`experiments/compare_replay.py`).

Pure functions from metrics.jsonl rows to numbers and Markdown, and the sweep's
choice to reuse, resume or restart a run directory (`plan_run`); no flags, so
tests and notebooks can import them. Its plots: experiments/replay_plots.py.

    from experiments import replay_report
    summary = replay_report.summarise_run(rows, collapse_fraction=0.5)
"""

import math
import os
import sys

# plan_run continues a run differing only here (how long it runs, and the learner's memory).
RESUMABLE = ("rl.num_steps", "checkpoint_every", "rl.logits_chunk")

# Per-step scalars averaged over a run's RL steps (names as in metrics.jsonl).
STEP_MEANS = ("k3_kl", "extreme_frac", "ratio_mean", "ratio_var", "clip_frac_low",
              "clip_frac_high", "topk_agreement", "zero_dev_ratio", "coverage_gap", "entropy",
              "grad_norm", "reward_mean", "response_len", "pred_loss", "pred_topk_acc",
              "bias_logit_ratio", "feature_cache_bytes")
# Per-step vectors averaged over steps: the horizon curve (length κ) and the deviation histogram.
STEP_VECTORS = ("topk_agreement_per_ministep", "zero_dev_ratio_per_ministep", "dev_hist",
                "pred_topk_acc_per_ministep", "k3_kl_per_ministep", "extreme_frac_per_ministep")
# From each `X_per_ministep`: `X_ministep1` (mini-step 1, where π_θ = π_old and the live
# router is the rollout's, up to the engines' numerics) and `X_ministep_ge2` (mean over
# mini-steps 2..κ, after at least one optimizer step since the rollout).
SPLIT = ("zero_dev_ratio", "topk_agreement", "k3_kl", "extreme_frac")
CURVES = ("reward_mean", "k3_kl", "topk_agreement", "zero_dev_ratio_ministep_ge2")
TABLE = (("eval_reward", "final eval reward", "{:.3f}"),
         ("zero_dev_ratio_ministep_ge2", "zero-dev (mini-step ≥ 2)", "{:.4f}"),
         ("zero_dev_ratio_ministep1", "zero-dev (mini-step 1)", "{:.4f}"),
         ("k3_kl_ministep1", "k3 KL (mini-step 1)", "{:.2e}"),
         ("k3_kl", "k3 KL (all)", "{:.2e}"),
         ("extreme_frac_ministep1", "extreme (mini-step 1)", "{:.1e}"),
         ("extreme_frac", "extreme (all)", "{:.1e}"),
         ("clip_frac_low", "clip low", "{:.4f}"),
         ("clip_frac_high", "clip high", "{:.4f}"))
MODE_LABELS = {"none": "vanilla (DAPO, no replay)", "r2": "R2", "r3": "R3", "pr2": "PR2",
               "pr2_r2": "PR2-R2", "gspo": "GSPO (no replay)"}


# -- Run directories (pure: what the sweep does with a run it finds on disk) -----------------------

def _flat(d: dict, prefix: str = "") -> dict:
  """{'rl.num_steps': 100, ...}: nested config dicts as dotted leaves."""
  out = {}
  for key, value in d.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(stored: dict, wanted: dict) -> list[str]:
  """Dotted names of the config fields that differ (or exist in one of the two only)."""
  a, b = _flat(stored), _flat(wanted)
  return sorted(k for k in a.keys() | b.keys() if a.get(k, a) != b.get(k, b))


def plan_run(stored: dict | None, wanted: dict, rows: list[dict],
             stopped: str | None = None) -> tuple[str, str]:
  """What to do with a run directory: ('reuse' | 'resume' | 'restart', why).

  `stored` is its run_config.json (None: none), `rows` its metrics rows, `stopped` the error of
  a run the loop stopped (non-finite updates). 'reuse': the config is `wanted` and the metrics
  reach rl.num_steps (or the run stopped, which it would again). 'resume': the configs differ at
  most in rl.num_steps and checkpoint_every (no result changes), the run has not gone past the
  wanted steps: `loop.run` continues from its newest checkpoint. 'restart' (delete it):
  no config, another field differs (named in `why`), or the step count was lowered below
  where the run already is (no checkpoint there, and its final evaluation would be missing).
  """
  if stored is None:
    return "restart", "no run_config.json"
  had_flat, want_flat = _flat(stored), _flat(wanted)
  changed = [k for k in config_differences(stored, wanted) if k not in RESUMABLE]
  if changed:
    return "restart", "config changed: " + ", ".join(
        f"{k} {had_flat.get(k, '(absent)')!r} -> {want_flat.get(k, '(absent)')!r}"
        for k in changed)
  steps, had = want_flat["rl.num_steps"], had_flat.get("rl.num_steps")
  if not isinstance(had, int):
    return "restart", f"rl.num_steps {had!r} in run_config.json is not a step count"
  last = max((r.get("step", 0) for r in rows if r.get("phase") == "rl"), default=0)
  if had > steps and last >= steps:
    return "restart", f"rl.num_steps lowered from {had} to {steps}, the run is at step {last}"
  if stopped is not None:
    return "reuse", f"stopped at step {last}: {stopped}"
  if had == steps and last == steps:
    return "reuse", "complete"
  return "resume", (f"at step {last} of {steps}" if had == steps else
                    f"rl.num_steps {had} -> {steps}, at step {last}")


# -- Summaries (pure: rows of metrics.jsonl in, numbers out) ---------------------------------------

def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def _mean(values):
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


def summarise_run(rows: list[dict], collapse_fraction: float, error: str | None = None) -> dict:
  """One run's numbers from its metrics rows: final eval, step means, horizon curve, collapse."""
  warm = next((r["eval_reward"] for r in rows if r.get("phase") == "sft_eval"), None)
  rl = [r for r in rows if r.get("phase") == "rl"]
  evals = [(r["step"], r["eval_reward"]) for r in rl if "eval_reward" in r]
  out = {"warmup_eval_reward": warm, "eval_reward": evals[-1][1] if evals else None,
         "steps": len(rl), "skipped_updates": sum(r.get("skipped_updates", 0) for r in rl)}
  for key in STEP_MEANS:
    out[key] = _mean([r[key] for r in rl if key in r])
  for key in STEP_VECTORS:
    vecs = [r[key] for r in rl if key in r]
    out[key] = [sum(v) / len(vecs) for v in zip(*vecs)] if vecs else None
  for key in SPLIT:
    vec = out.get(f"{key}_per_ministep")  # every step has κ entries: the step mean splits exactly
    out[f"{key}_ministep1"] = vec[0] if vec else None
    out[f"{key}_ministep_ge2"] = _mean(vec[1:]) if vec and len(vec) > 1 else None
  non_finite = any(not _finite(r.get("loss", 0.0)) for r in rl) or out["skipped_updates"] > 0
  low = (out["eval_reward"] is None or warm is None or
         out["eval_reward"] < collapse_fraction * warm)
  out["collapsed"] = bool(error or non_finite or low)
  out["error"] = error
  out["curves"] = {"step": [r["step"] for r in rl],
                   "eval_step": [s for s, _ in evals], "eval_reward": [v for _, v in evals],
                   **{k: [(_mean(r.get("zero_dev_ratio_per_ministep", [])[1:])
                           if k == "zero_dev_ratio_ministep_ge2" else r.get(k)) for r in rl]
                      for k in CURVES}}
  return out


def _std(xs):
  if len(xs) < 2:
    return 0.0
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))  # sample std over seeds


def aggregate(runs: dict) -> dict:
  """{seed: summarise_run(...)} -> fields {mean, std, per_seed}, vectors and mean curves."""
  seeds = sorted(runs)
  first = runs[seeds[0]]
  out = {"seeds": seeds, "collapsed_runs": sum(runs[s]["collapsed"] for s in seeds),
         "errors": {str(s): runs[s]["error"] for s in seeds if runs[s]["error"]}}
  for key, value in first.items():
    if key in ("curves", "collapsed", "error"):
      continue
    vals = [runs[s][key] for s in seeds]
    if isinstance(value, list):
      ok = [v for v in vals if v is not None]
      out[key] = {"mean": [sum(c) / len(ok) for c in zip(*ok)] if ok else None,
                  "std": [_std(list(c)) for c in zip(*ok)] if ok else None, "per_seed": vals}
    elif value is None or isinstance(value, (int, float)):
      ok = [v for v in vals if _finite(v)]
      out[key] = {"mean": sum(ok) / len(ok) if ok else None, "std": _std(ok) if ok else None,
                  "per_seed": [v if _finite(v) else None for v in vals]}
  curves = [runs[s]["curves"] for s in seeds]
  steps, eval_steps = (sorted({x for cv in curves for x in cv[axis]})
                       for axis in ("step", "eval_step"))
  out["curves"] = {"step": steps, "eval_step": eval_steps,
                   **{k: _mean_curve(curves, "step", k, steps) for k in CURVES},
                   "eval_reward": _mean_curve(curves, "eval_step", "eval_reward", eval_steps)}
  return out


def _mean_curve(curves: list[dict], axis: str, key: str, xs: list) -> list:
  """The mean over seeds of `key` at each x of `axis`, over the seeds that reached it: a seed
  the non-finite guard stopped early leaves the mean after its last step (zipping the seeds
  cut every curve to the shortest, under the first seed's longer x-axis)."""
  at = {x: [] for x in xs}
  for cv in curves:
    for x, v in zip(cv[axis], cv[key]):
      at[x].append(v)
  return [_mean(at[x]) for x in xs]


# -- Report ----------------------------------------------------------------------------------------

def _fmt(field: dict | None, pattern: str) -> str:
  if not field or field.get("mean") is None:
    return "–"
  mean, std = field["mean"], field["std"] or 0.0
  if len([v for v in field.get("per_seed", []) if v is not None]) < 2:
    return pattern.format(mean)  # one seed: "± 0.000" would claim a spread of none
  return f"{pattern.format(mean)} ± {pattern.format(std)}"


def _diff_verdict(a: dict, b: dict, higher_is: str) -> str:
  """'a − b = d (±2·se)': above/below/within noise by a 2-standard-error rule over seeds."""
  if a["mean"] is None or b["mean"] is None:
    return "n/a"
  d = a["mean"] - b["mean"]
  n_a = len([v for v in a["per_seed"] if v is not None])
  n_b = len([v for v in b["per_seed"] if v is not None])
  if min(n_a, n_b) < 2:
    return f"{d:+.3g} (one seed: no noise estimate)"
  se = math.sqrt((a["std"] or 0) ** 2 / n_a + (b["std"] or 0) ** 2 / n_b)
  if abs(d) <= 2 * se:
    word = "within noise"
  else:
    word = higher_is if d > 0 else ("lower" if higher_is == "higher" else "higher")
  return f"{d:+.3g} (2·se {2 * se:.2g}): {word}"


def expectation_checks(results: dict) -> list[str]:
  """The paper's expectations, checked per κ from the numbers (no judgement by hand)."""
  lines = []
  for off, modes in results.items():
    zd = lambda m: modes[m]["zero_dev_ratio_ministep_ge2"]
    if "pr2" in modes:
      for other in ("r3", "none"):
        if other in modes:
          lines.append(f"- {off}: zero-dev (mini-step ≥ 2) PR2 − {MODE_LABELS[other]}: "
                       f"{_diff_verdict(zd('pr2'), zd(other), 'higher')} "
                       f"(expected: higher)")
    if "none" in modes:
      for m in ("r3", "pr2"):
        if m in modes:
          for key, where in (("k3_kl_ministep1", "mini-step 1"), ("k3_kl", "all mini-steps")):
            lines.append(f"- {off}: k3 KL ({where}) {MODE_LABELS[m]} − vanilla: "
                         f"{_diff_verdict(modes[m][key], modes['none'][key], 'higher')} "
                         "(expected: lower)")
    if "pr2" in modes and "r3" in modes:
      verdict = _diff_verdict(modes["pr2"]["eval_reward"], modes["r3"]["eval_reward"], "higher")
      lines.append(f"- {off}: final eval reward PR2 − R3: {verdict}")
  return lines


def _setting_lines(cfg) -> list[str]:
  from pr2_jax.rl.config import RLConfig
  m, p, s = cfg.model, cfg.pr2, cfg.sft
  rl = RLConfig.from_dict(cfg.rl.to_dict())  # the clip range as run (None = the loss's own)
  return [
      f"- task `{cfg.task}` {cfg.task_kwargs.to_dict()}; model: {m.num_layers} MoE layers, d_model "
      f"{m.d_model}, {m.num_experts} experts top-{m.top_k}, rollout dtype {rl.rollout_dtype}",
      f"- warm-up: {s.num_steps} supervised steps (batch {s.batch_size}, lr {s.learning_rate}), "
      f"trained once and shared by every run",
      f"- RL: {rl.num_steps} steps of {rl.prompts_per_step} prompts × {rl.group_size} samples, "
      f"off-κ mini-batches of {rl.micro_steps} micro-steps, AdamW lr {rl.learning_rate}, DAPO "
      f"clip {rl.clip_low}/{rl.clip_high} (GSPO: 3e-4/4e-4 against π_old), eval every "
      f"{rl.eval_every} steps on {rl.eval_size} held-out problems at temperature "
      f"{rl.eval_temperature}" + ("" if rl.trainable == "all" else
                                  f"; RL trains only the {rl.trainable} (`rl.trainable`), the "
                                  "other parameters stay as the warm-up left them"),
      f"- PR2: loss `{p.loss}`, α = {p.lr_mult} (predictor lr α·η = "
      f"{p.lr_mult * rl.learning_rate:g}), {p.feature_tokens} cached positions per sequence "
      f"({p.feature_rule}), predicted gates at rollout: {p.predicted_gates}",
  ]


def write_markdown(path: str, results: dict, meta: dict, plots: list[str], base) -> None:
  keep = ""
  if os.path.exists(path):
    with open(path) as f:
      old = f.read()
    begin, end = old.find("<!-- BEGIN analysis -->"), old.find("<!-- END analysis -->")
    if 0 <= begin < end:
      keep = old[begin:end + len("<!-- END analysis -->")]
  lines = ["# Routing replay comparison: vanilla, R2, R3, PR2, GSPO at off-κ", "",
           "```", meta["command"], "```", "",
           f"Sweep time {meta['sweep_minutes']:.1f} min on {meta['devices']}: the shared warm-up "
           f"and {meta['runs']} runs, each timed when it ran ({meta['reused_runs']} "
           f"{'was' if meta['reused_runs'] == 1 else 'were'} reused "
           f"from an earlier invocation; this one took {meta['wall_minutes']:.1f} min).", "",
           "## Setting", "", *_setting_lines(base), "",
           ("Numbers are mean ± sample std over seeds "
            f"{', '.join(map(str, meta['seeds']))}." if len(meta["seeds"]) > 1 else
            f"Numbers are one seed's ({meta['seeds'][0]}): no spread is estimated.") +
           " Per-step metrics (k3 KL, extreme fraction, "
           "clip fractions, zero-deviation ratio) are averaged over all RL steps of a run; "
           "\"zero-dev (mini-step ≥ 2)\" averages the zero-deviation ratio of mini-steps 2..κ, "
           "where the live training router has taken at least one optimizer step since the "
           "rollout. "
           "Routing metrics compare the route recorded at rollout (PR2: the predicted route) with "
           "the live training router's top-k at every mini-step, over all valid tokens and layers; "
           "for R2 that is the rollout route, not the old-log-prob route R2 replays (its metrics "
           "file also has that one's, as `replayed_*`).", "",
           f"**Collapse**: a run counts as collapsed if its final eval reward is below "
           f"{meta['collapse_fraction']:.0%} of its own warm-up eval reward (same eval set and "
           "sampling key), if any update had a non-finite loss or gradient, or if it stopped with "
           "an error.", ""]
  for off, modes in results.items():
    lines += [f"## {off}", "", "| mode | " + " | ".join(t for _, t, _ in TABLE) + " | collapsed |",
              "|---" * (len(TABLE) + 2) + "|"]
    for mode, agg in modes.items():
      cells = [_fmt(agg.get(k), pat) for k, _, pat in TABLE]
      lines.append(f"| {MODE_LABELS.get(mode, mode)} | " + " | ".join(cells) +
                   f" | {agg['collapsed_runs']}/{len(agg['seeds'])} |")
    if "pr2" in modes:
      p = modes["pr2"]
      lines += ["", f"PR2 predictor: pred_loss {_fmt(p['pred_loss'], '{:.2e}')}, "
                f"pred_topk_acc {_fmt(p['pred_topk_acc'], '{:.4f}')}, bias_logit_ratio "
                f"{_fmt(p['bias_logit_ratio'], '{:.3f}')}, feature cache "
                f"{(p['feature_cache_bytes']['mean'] or 0) / 1024:.0f} KiB per step."]
    lines.append("")
  lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  lines += ["", "## Automatic checks against the paper's expectations", "",
            "Differences of means over seeds; \"within noise\" when |difference| ≤ 2 standard "
            "errors.", "", *expectation_checks(results), "",
            "## What the numbers show", ""]
  lines.append(keep or "<!-- BEGIN analysis -->\n(not written yet)\n<!-- END analysis -->")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
  """`python -m experiments.replay_report`: no command of its own. With a help flag it says so
  and names the one that writes the report; with other arguments, one `error:` line, exit 2."""
  if any(arg not in ("-h", "--help", "--helpshort", "--helpfull") for arg in argv[1:]):
    print(f"error: experiments.replay_report is a library module and takes no arguments (got "
          f"{' '.join(argv[1:])}); the report is written by python -m experiments.compare_replay",
          file=sys.stderr)
    return 2
  print(__doc__.strip() + "\n\nA library module, not a command: the report, JSON and plots are "
        "written by\n\n    python -m experiments.compare_replay    (options: --help)\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
