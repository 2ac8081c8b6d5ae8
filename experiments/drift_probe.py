"""Is router drift predictable across rollout batches? An oracle probe behind the PR2 comparison.

    python -m experiments.drift_probe --init_from=runs/compare_replay/warmup/checkpoints/sft
    python -m experiments.drift_probe --off=8 --learning_rate=2e-3 --steps=30 --out=/tmp/drift.json

PR2 predicts the router of mini-step j+1 (after j updates) with a linear map
of the router input, `TopK(p + h W_p)`, fitted on earlier rollout batches. This
runs plain R3 RL and, around every optimizer step, records the live router
logits p and inputs h on a fixed probe set (task prompts with their
solutions). For batch t it then predicts the router after j updates from the
batch start, using only batch t-1, and scores the prediction's zero-deviation
ratio (same top-k set) against the router that really came:

  stale           p_t,0                      (what R3 replays)
  prev_drift      p_t,0 + (p_t-1,j − p_t-1,0)  (batch t-1's drift of the same token, per token)
  momentum        p_t,0 + j·(p_t-1,κ − p_t-1,κ-1)  (the last update's drift, per token)
  linear_fit      p_t,0 + h_t,0 W, W = lstsq(h_t-1,0, p_t-1,j − p_t-1,0)  (the best linear
                                              W_p for batch t-1: PR2's hypothesis class)
  router_weights  p_t,0 + h_t,0 (W_r,t-1,j − W_r,t-1,0)  (the router weights' own drift)

PR2 itself routes every mini-step of a batch by one forecast, so the probe also scores
PR2's exact hypothesis class at mini-steps 1..κ, against stale there:

  one_map         p_t,0 + h_t,0 W, W = lstsq(h_t-1,0, mean over j = 1..κ-1 of p_t-1,j − p_t-1,0)
                                              (one map per batch, fitted on the drifts PR2's
                                              predictor learns from: after 1..κ-1 updates)

It also reports the share of the logit drift due to the router weights
(|h ΔW_r| / |Δp|; the rest comes from the hidden states changing) and the
cosine between consecutive batches' drifts. Used by docs/results/replay_comparison.md.
It wraps the engine's update function to see the parameters between
mini-steps (a private hook: a diagnostic, not an API).
"""

import json
import time

import numpy as np
from absl import flags, logging

from experiments import cli, common, outputs

# Flags only when run as a script: tests import the scoring functions below, and absl refuses
# a second module defining the same flag names (config, steps, out).
if __name__ == "__main__":
  _CONFIG = cli.define_config("configs/tiny.py", "Base experiment config.")
  _INIT = flags.DEFINE_string("init_from", "", "Warm-up checkpoint dir (empty: train the "
                              "warm-up here).")
  _OFF = flags.DEFINE_integer("off", 4, "κ: mini-batches per rollout batch (>= 2: mini-steps "
                              "2..κ are scored).")
  _LR = flags.DEFINE_float("learning_rate", 2e-3, "RL learning rate.")
  _STEPS = flags.DEFINE_integer("steps", 30, "RL steps (rollout batches; >= 2: each is predicted "
                                "from the one before).")
  _PROBE = flags.DEFINE_integer("probe_size", 128, "Probe sequences.")
  # κ = 1 printed empty rows, 1 step all-zero rows and a NaN cosine, read as results.
  cli.at_least(2, "off", "steps")
  cli.at_least(1, "probe_size")
  _OUT = flags.DEFINE_string("out", "", "Optional JSON output.")

PREDICTORS = ("stale", "prev_drift", "momentum", "linear_fit", "router_weights")


def zero_dev(pred_BSLE, truth_BSLE, mask_BS, top_k: int) -> float:
  """Share of valid (token, layer) pairs whose predicted top-k set is the true one."""
  top = lambda x: np.sort(np.argsort(-x, -1)[..., :top_k], -1)
  return float((top(pred_BSLE) == top(truth_BSLE)).all(-1)[mask_BS].mean())


def fit_drift(h_BSLD, delta_BSLE, mask_BS):
  """[L, D, E]: per-layer least squares h W = Δp over the valid probe tokens."""
  return np.stack([np.linalg.lstsq(h_BSLD[..., l, :][mask_BS], delta_BSLE[..., l, :][mask_BS],
                                   rcond=None)[0] for l in range(h_BSLD.shape[-2])])


def _lin(h_BSLD, w_LDE):
  return np.einsum("bsld,lde->bsle", h_BSLD, w_LDE)


def _ratio(num: float, den: float) -> float | None:
  """num / den; None for 0 / 0 (a router that did not move has no drift direction or share:
  NaN printed 'nan' and wrote non-standard JSON)."""
  return float(num / den) if den > 0 else None


def _mean(values) -> float | None:
  defined = [v for v in values if v is not None]
  return float(np.mean(defined)) if defined else None


def score_batches(batches, mask_BS, top_k: int) -> dict:
  """Scores of every predictor (module docstring) from recorded router snapshots.

  `batches[t]` holds the κ+1 snapshots (logits p [B,S,L,E], inputs h [B,S,L,D], router
  weights W_r [L,D,E]) of rollout batch t, before each mini-step's update and after the
  last. Returns {"zero_dev": {name: [κ-1] mean over batches 1.. at mini-steps 2..κ},
  "one_map": {"one_map", "stale": [κ] the same at mini-steps 1..κ}, "cosine": mean cosine
  of consecutive batches' drifts, "router_share": mean over batches of |h ΔW_r| / |Δp|};
  the last two are means over the batches whose logits moved, None if none did.
  """
  kappa = len(batches[0]) - 1
  scores = {name: np.zeros(kappa - 1) for name in PREDICTORS}
  one_map = np.zeros(kappa)
  cosines, router_share = [], []
  for t in range(1, len(batches)):
    prev, cur = batches[t - 1], batches[t]
    p0, h0 = cur[0][0], cur[0][1]
    drifts_prev = []  # batch t-1's drift after j = 1..κ-1 updates
    for j in range(1, kappa):
      truth = cur[j][0]
      delta_prev = prev[j][0] - prev[0][0]
      drifts_prev.append(delta_prev)
      preds = {"stale": p0, "prev_drift": p0 + delta_prev,
               "momentum": p0 + j * (prev[kappa][0] - prev[kappa - 1][0]),
               "linear_fit": p0 + _lin(h0, fit_drift(prev[0][1], delta_prev, mask_BS)),
               "router_weights": p0 + _lin(h0, prev[j][2] - prev[0][2])}
      for name, pred in preds.items():
        scores[name][j - 1] += zero_dev(pred, truth, mask_BS, top_k) / (len(batches) - 1)
    # Least squares on the mean drift = on the drifts stacked (the same h for every j).
    one = p0 + _lin(h0, fit_drift(prev[0][1], np.mean(drifts_prev, axis=0), mask_BS))
    for j in range(kappa):
      one_map[j] += zero_dev(one, cur[j][0], mask_BS, top_k) / (len(batches) - 1)
    a = (prev[kappa][0] - prev[0][0])[mask_BS].ravel()
    b = (cur[kappa][0] - cur[0][0])[mask_BS].ravel()
    cosines.append(_ratio(a @ b, np.linalg.norm(a) * np.linalg.norm(b)))
  for batch in batches:
    total = (batch[kappa][0] - batch[0][0])[mask_BS]
    router = _lin(batch[0][1], batch[kappa][2] - batch[0][2])[mask_BS]
    router_share.append(_ratio(np.linalg.norm(router), np.linalg.norm(total)))
  # Stale at mini-step 1 is the router itself (truth p_t,0 = p0).
  stale = np.concatenate([[1.0], scores["stale"]])
  return {"zero_dev": scores, "one_map": {"one_map": one_map, "stale": stale},
          "cosine": _mean(cosines), "router_share": _mean(router_share)}


def check_init_from(init_from: str) -> None:
  """A ValueError unless `init_from` is empty or holds a checkpoint step. Called before anything
  is made: a Checkpointer would create the (mistyped) directory, and the restore find nothing."""
  from pr2_jax.rl import records
  if init_from and not records.holds_checkpoint(init_from):
    # The wording of experiments.main (pr2_jax.rl.loop.run), for the same mistake.
    raise ValueError(f"init_from={init_from!r} holds no checkpoint (expected a warm-up "
                     "checkpoint dir such as WORKDIR/checkpoints/sft of an earlier run)")


def restore_params(checkpointer, params_abstract, identity: dict, warn=print):
  """The newest readable warm-up params of `checkpointer`; a ValueError naming its directory when
  none restores (its steps unreadable, or none finished), instead of params=None downstream."""
  _, params, _, problems = checkpointer.restore_newest_good(params_abstract, identity)
  for problem in problems:
    warn(problem)
  if params is None:
    raise ValueError(f"init_from={checkpointer.directory!r}: no checkpoint step restored (expected "
                     "a finished warm-up checkpoint such as WORKDIR/checkpoints/sft)")
  return params


def result_row(scored: dict, kappa: int, learning_rate: float, steps: int) -> dict:
  """The JSON result (without the command) from `score_batches`' scores, rounded to 4 places."""
  rounded = lambda scores: {n: v.round(4).tolist() for n, v in scores.items()}  # noqa: E731
  return {"off": kappa, "learning_rate": learning_rate, "steps": steps,
          "zero_dev_by_ministep": rounded(scored["zero_dev"]),
          "mini_steps": list(range(2, kappa + 1)),
          "one_map_by_ministep": rounded(scored["one_map"]),
          "one_map_mini_steps": list(range(1, kappa + 1)),
          "router_weight_share_of_drift": scored["router_share"],
          "consecutive_drift_cosine": scored["cosine"]}


def main(argv):
  del argv
  try:
    check_init_from(_INIT.value)
  except ValueError as e:
    cli.exit_with_error(str(e))
  out_path = outputs.output_file(_OUT) if _OUT.value else None  # before the minutes of work
  common.setup_devices()
  import dataclasses

  import jax

  from pr2_jax.rl import data, loop
  from pr2_jax.rl.config import ExperimentConfig
  from pr2_jax.train.checkpoint import Checkpointer, abstract_like

  cfg = cli.config_value(_CONFIG)
  cfg.rl.update(replay_mode="r3", off_policy_k=_OFF.value, learning_rate=_LR.value)
  with cli.bad_config_exits():
    config = ExperimentConfig.from_dict(cfg.to_dict())
  engine = loop.Engine(config, common.build_mesh(cfg))
  if _INIT.value:
    identity = json.loads(json.dumps({"model": dataclasses.asdict(config.model)}))
    with Checkpointer(_INIT.value, max_to_keep=1) as checkpointer:
      params = restore_params(checkpointer, abstract_like(engine.state.params,
                                                          engine.shardings.params), identity,
                              logging.warning)
  else:
    logging.info("warm-up: %d supervised steps (the first compiles)", config.sft.num_steps)
    params = engine.warmup(on_progress=common.progress_logger("warm-up"))
  state = engine.state.replace(params=params)

  probe = data.sft_batch(engine.tok, engine.task.sample(np.random.default_rng(123), _PROBE.value),
                         engine.prompt_slots, engine.response_slots)
  forward = jax.jit(lambda p: engine.model.apply(
      {"params": p}, probe["tokens"], positions=probe["positions"], valid=probe["valid"],
      return_router_logits=True, return_router_inputs=True))
  mask_BS = np.asarray(probe["valid"], bool)
  layers = config.model.num_layers

  def snapshot(p):
    out = forward(p)
    w_LDE = np.stack([np.asarray(p[f"layers_{l}"]["mlp"]["gate"]) for l in range(layers)])
    return np.asarray(out.router_logits), np.asarray(out.router_inputs), w_LDE

  # Step 1 runs before the recording starts (not scored); progress counts it all the same.
  total, progress, t_first = _STEPS.value + 1, common.progress_logger("rl"), None
  state, _ = engine.rl_step(state, 1)
  progress(1, total, None)  # includes compiling
  snaps = []
  learner_fns = engine.learner_fns

  def recording_fns(micro):  # this engine's update also snapshots the router before it runs
    old_fn, update_fn = learner_fns(micro)

    def recording_update(st, *args):
      snaps.append(snapshot(st.params))  # the router before this mini-step's update
      return update_fn(st, *args)
    return old_fn, recording_update

  engine.learner_fns = recording_fns
  batches = []  # per rollout batch: κ+1 snapshots (θ_t,0 .. θ_t,κ)
  for step in range(2, _STEPS.value + 2):
    snaps.clear()
    state, _ = engine.rl_step(state, step)
    batches.append(snaps + [snapshot(state.params)])
    now = time.perf_counter()
    progress(step, total, None if t_first is None else (now - t_first) / (step - 2))
    t_first = t_first or now

  kappa = _OFF.value
  scored = score_batches(batches, mask_BS, config.model.top_k)
  result = result_row(scored, kappa, _LR.value, _STEPS.value)
  print(f"zero-dev ratio vs the real router at mini-steps {result['mini_steps']}:")
  for name, s in result["zero_dev_by_ministep"].items():
    print(f"  {name:15s} " + " ".join(f"{v:.4f}" for v in s))
  print(f"one forecast for the whole batch (PR2's class) at mini-steps 1..{kappa}, and its mean:")
  for name, s in scored["one_map"].items():
    print(f"  {name:15s} " + " ".join(f"{v:.4f}" for v in s) + f"  | {s.mean():.4f}")
  fmt = lambda v: "undefined (the router logits did not move)" if v is None else f"{v:.3f}"
  print(f"router-weight share of the logit drift {fmt(result['router_weight_share_of_drift'])}; "
        f"cosine of consecutive batches' drifts {fmt(result['consecutive_drift_cosine'])}")
  if out_path:  # allow_nan=False: a NaN is a bug here, not a value to write
    outputs.write_json(out_path, {"command": outputs.command_line(), **result}, allow_nan=False)


if __name__ == "__main__":
  cli.run(main)
