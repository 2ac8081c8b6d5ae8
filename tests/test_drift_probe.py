"""experiments/drift_probe.py: a smoke run at a minuscule size (numbers in range, JSON shape),
its scoring on synthetic router snapshots whose drift is exactly linear, and a missing or empty
--init_from refused before anything is created."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.drift_probe import (PREDICTORS, check_init_from, restore_params, result_row,
                                     score_batches, zero_dev)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_drift_probe_writes_scores(tmp_path):
  """Also: the JSON goes into a directory it makes (its parent was never created), and the log
  shows the warm-up's and the RL steps' progress (minutes passed without a line)."""
  out = tmp_path / "new" / "d.json"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.drift_probe", "--off=2", "--steps=3", "--probe_size=16",
       "--config.sft.num_steps=5", "--config.model.num_layers=1", f"--out={out}"],
      capture_output=True, text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"),
      cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warm-up step 5/5" in proc.stderr and "rl step 4/4" in proc.stderr, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["command"].startswith("python -m experiments.drift_probe --off=2")
  assert result["mini_steps"] == [2]
  for name, scores in result["zero_dev_by_ministep"].items():
    assert len(scores) == 1 and 0.0 <= scores[0] <= 1.0, name
  assert result["router_weight_share_of_drift"] > 0
  assert result["one_map_mini_steps"] == [1, 2]
  assert result["one_map_by_ministep"]["stale"][0] == 1.0


def test_zero_dev_compares_top_k_sets_on_valid_tokens():
  # [B=1, S=2, L=1, E=3]: token 0's top-2 is {0, 1} in both (order differs); token 1's is
  # {2, 1} predicted against {2, 0} true.
  pred = np.array([[[[3.0, 2.0, 1.0]], [[1.0, 2.0, 3.0]]]])
  truth = np.array([[[[2.0, 3.0, 0.0]], [[3.0, 1.0, 4.0]]]])
  assert zero_dev(pred, truth, np.array([[True, True]]), top_k=2) == 0.5
  assert zero_dev(pred, truth, np.array([[True, False]]), top_k=2) == 1.0
  assert zero_dev(pred, truth, np.array([[False, True]]), top_k=2) == 0.0


def _same_set_share(pred, truth, mask, k):
  """Oracle of zero_dev: python sets per valid (token, layer)."""
  hits = [set(np.argsort(-pred[b, s, l])[:k]) == set(np.argsort(-truth[b, s, l])[:k])
          for b, s in zip(*np.nonzero(mask)) for l in range(pred.shape[2])]
  return sum(hits) / len(hits)


def _linear_drift_batches(rng, *, same_h, batches=3, kappa=3, b=2, s=6, layers=2, d=3, e=5):
  """Router logits p = h W_r with W_r moving by the same Δ at every update, h fixed within a
  batch (new per batch unless `same_h`); invalid tokens get noise logits, which must be ignored."""
  mask = np.ones((b, s), bool)
  mask[0, -2:] = mask[1, -1] = False
  w0, step = rng.normal(size=(layers, d, e)), rng.normal(size=(layers, d, e))
  h_shared = rng.normal(size=(b, s, layers, d))
  out = []
  for t in range(batches):
    h = h_shared if same_h else rng.normal(size=(b, s, layers, d))
    snaps = []
    for j in range(kappa + 1):
      w = w0 + (t * kappa + j) * step
      p = np.einsum("bsld,lde->bsle", h, w)
      p[~mask] = 10 * rng.normal(size=p[~mask].shape)
      snaps.append((p, h, w))
    out.append(snaps)
  return out, mask


def test_score_batches_exact_on_linear_drift_with_new_hidden_states():
  batches, mask = _linear_drift_batches(np.random.default_rng(0), same_h=False)
  got = score_batches(batches, mask, top_k=2)
  assert set(got["zero_dev"]) == set(PREDICTORS)
  # Truth at mini-step j+1 of batch t is p_t,0 + h_t,0 · jΔ: the least-squares map fitted on
  # batch t-1 recovers jΔ exactly, and so does batch t-1's router-weight drift.
  assert got["zero_dev"]["linear_fit"].tolist() == [1.0, 1.0]
  assert got["zero_dev"]["router_weights"].tolist() == [1.0, 1.0]
  # Per-token drifts of batch t-1 belong to other hidden states: wrong somewhere.
  assert got["zero_dev"]["prev_drift"].max() < 1.0
  # Stale: the mean over batches 1, 2 of the share of unchanged top-2 sets.
  for j in (1, 2):
    want = np.mean([_same_set_share(batches[t][0][0], batches[t][j][0], mask, 2)
                    for t in (1, 2)])
    assert got["zero_dev"]["stale"][j - 1] == pytest.approx(want, abs=1e-12)
  assert got["zero_dev"]["stale"].max() < 1.0
  # All drift comes from the router weights (h is fixed within a batch).
  assert got["router_share"] == pytest.approx(1.0, abs=1e-12)
  # One map for the whole batch: fitted on batch t-1's drifts after 1 and 2 updates, it is
  # their mean, 1.5Δ, used at mini-steps 1, 2, 3 (drifts 0, Δ, 2Δ): no drift equals it, but
  # the drift is small beside the logits, so top-2 sets mostly agree (0.97, 1, 1) and any map
  # near 1.5Δ scores alike here: test_one_map_is_fitted_on_the_mean_drift_... tells them apart.
  for j in range(3):
    one = np.mean([_same_set_share(batches[t][0][0] + np.einsum(
        "bsld,lde->bsle", batches[t][0][1], 1.5 * (batches[t][1][2] - batches[t][0][2])),
        batches[t][j][0], mask, 2) for t in (1, 2)])
    stale = np.mean([_same_set_share(batches[t][0][0], batches[t][j][0], mask, 2)
                     for t in (1, 2)])
    assert got["one_map"]["one_map"][j] == pytest.approx(one, abs=1e-12)
    assert got["one_map"]["stale"][j] == pytest.approx(stale, abs=1e-12)
  assert got["one_map"]["stale"][0] == 1.0 and got["one_map"]["one_map"][0] < 1.0
  cos = []
  for t in (1, 2):
    a, c = ((batches[u][3][0] - batches[u][0][0])[mask].ravel() for u in (t - 1, t))
    cos.append(a @ c / np.linalg.norm(a) / np.linalg.norm(c))
  assert got["cosine"] == pytest.approx(np.mean(cos), abs=1e-12)


def test_a_router_that_did_not_move_has_no_cosine_or_share():
  """No update (every reward 0): 0 / 0 was NaN, printed 'nan' and written as non-standard
  JSON. A batch without drift now counts in neither mean, and none at all gives None."""
  batches, mask = _linear_drift_batches(np.random.default_rng(0), same_h=True)
  still = [[batch[0]] * len(batch) for batch in batches]
  got = score_batches(still, mask, top_k=2)
  assert got["cosine"] is None and got["router_share"] is None
  assert got["zero_dev"]["stale"].tolist() == [1.0, 1.0]  # nothing moved: stale is exact
  # Batch 0 still, the others drifting: the share is theirs alone (1: h fixed in a batch).
  got = score_batches([still[0]] + batches[1:], mask, top_k=2)
  assert got["router_share"] == pytest.approx(1.0, abs=1e-12)


def test_score_batches_same_hidden_states_every_drift_predictor_is_exact():
  batches, mask = _linear_drift_batches(np.random.default_rng(1), same_h=True)
  got = score_batches(batches, mask, top_k=2)
  for name in ("prev_drift", "momentum", "linear_fit", "router_weights"):
    assert got["zero_dev"][name].tolist() == [1.0, 1.0], name
  assert got["zero_dev"]["stale"].max() < 1.0
  assert got["cosine"] == pytest.approx(1.0, abs=1e-12)  # the same drift every batch


def test_init_from_without_a_checkpoint_is_refused(tmp_path):
  nope = tmp_path / "nope"
  with pytest.raises(ValueError, match=f"init_from='{nope}' holds no checkpoint"):
    check_init_from(str(nope))
  assert not nope.exists()
  empty = tmp_path / "empty"  # e.g. a warm-up killed before its first step finished
  (empty / "tmp_step").mkdir(parents=True)
  with pytest.raises(ValueError, match=f"init_from='{empty}' holds no checkpoint"):
    check_init_from(str(empty))
  (empty / "40").mkdir()
  check_init_from(str(empty))
  check_init_from("")  # no --init_from: the probe trains its own warm-up


def test_command_line_refuses_a_missing_init_from_before_creating_it(tmp_path):
  nope = tmp_path / "nope"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.drift_probe", f"--init_from={nope}", "--steps=2"],
      capture_output=True, text=True, timeout=120, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert proc.stderr.startswith(f"error: init_from='{nope}' holds no checkpoint")
  assert not nope.exists()


def test_restore_params_reads_the_newest_step_and_refuses_none(tmp_path):
  import jax
  from pr2_jax.train.checkpoint import Checkpointer
  params = {"gate": np.arange(6, dtype=np.float32).reshape(2, 3)}
  abstract = {"gate": jax.ShapeDtypeStruct((2, 3), np.float32)}
  identity = {"model": {"num_experts": 3}}
  with Checkpointer(str(tmp_path / "sft"), max_to_keep=2) as ckpt:
    ckpt.save(5, {"gate": params["gate"] - 1}, identity)
    ckpt.save(10, params, identity)
    ckpt.wait()
    got = restore_params(ckpt, abstract, identity)
  np.testing.assert_array_equal(np.asarray(got["gate"]), params["gate"])

  class NothingFinished:  # what restore_newest_good returns for a directory without steps
    directory = str(tmp_path / "empty")

    def restore_newest_good(self, abstract_state, expect_meta):
      return None, None, None, []
  with pytest.raises(ValueError, match=f"init_from='{tmp_path / 'empty'}': no checkpoint step "
                     "restored"):
    restore_params(NothingFinished(), abstract, identity)


@pytest.mark.parametrize("flag, want", [
    # 1 step scored nothing (all-zero rows and a NaN cosine), κ = 1 printed empty rows.
    ("--steps=1", "error: flag --steps=1: --steps must be >= 2"),
    ("--off=1", "error: flag --off=1: --off must be >= 2"),
    ("--out=FILE/d.json", "/a_file is a file")])
def test_bad_flag_is_one_error_line_before_any_work(tmp_path, flag, want):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.drift_probe", flag.replace("FILE", str(a_file))],
      capture_output=True, text=True, timeout=120, cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and proc.stdout == "", proc.stderr[-2000:]
  (line,) = proc.stderr.splitlines()
  assert line.startswith("error: ") and want in line, line
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def _changing_drift_batches(rng, *, h_drift=0.0, batches=3, b=2, s=6, layers=2, d=3, e=5):
  """κ = 3 updates per batch that grow (1, 2, 3 times batch t's own random step Δ_t), so no
  predictor is exact and each one's formula shows: batch t-1's drift is not batch t's, the last
  update is not the first. h moves by `h_drift` x noise per update. Returns the snapshots, the
  mask and the generating (h [T, κ+1, ...], w [T, κ+1, ...], Δ [T, ...])."""
  mask = np.ones((b, s), bool)
  mask[0, -2:] = mask[1, -1] = False
  growth = np.array([0, 1, 3, 6])  # cumulative: after j updates, w = w_t,0 + growth[j] Δ_t
  w, h, steps, out = rng.normal(size=(layers, d, e)), [], [], []
  for _ in range(batches):
    step, h0 = rng.normal(size=(layers, d, e)), rng.normal(size=(b, s, layers, d))
    hs = [h0 + h_drift * j * rng.normal(size=h0.shape) for j in range(4)]
    ws = [w + g * step for g in growth]
    snaps = []
    for hj, wj in zip(hs, ws):
      p = np.einsum("bsld,lde->bsle", hj, wj)
      p[~mask] = 10 * rng.normal(size=p[~mask].shape)  # padding: must be ignored
      snaps.append((p, hj, wj))
    out.append(snaps)
    h.append(hs)
    steps.append(step)
    w = ws[-1]
  return out, mask, (h, steps, growth)


def test_score_batches_each_predictor_uses_the_previous_batch_as_documented():
  """Oracles from the generating weights, not from the snapshots. With h fixed in a batch the
  truth after j updates is p_t,0 + h_t (g_j Δ_t); from batch t-1 the predictors are
    prev_drift      p_t,0 + h_t-1 (g_j Δ_t-1)    (batch t-1's per-token drift)
    momentum        p_t,0 + j · h_t-1 (3 Δ_t-1)  (its last update's drift, per token)
    linear_fit      p_t,0 + h_t (g_j Δ_t-1)      (lstsq recovers g_j Δ_t-1 exactly)
    router_weights  p_t,0 + h_t (g_j Δ_t-1),
  each scored by its same-set share over valid tokens. A predictor reading batch t itself (the
  future) would score 1.0 here, one using the first update for momentum another share."""
  batches, mask, (h, steps, g) = _changing_drift_batches(np.random.default_rng(2))
  got = score_batches(batches, mask, top_k=2)["zero_dev"]
  lin = lambda x, w: np.einsum("bsld,lde->bsle", x, w)
  for j in (1, 2):
    want = {name: [] for name in PREDICTORS}
    for t in (1, 2):
      p0, truth = lin(h[t][0], batches[t][0][2]), batches[t][j][0]
      preds = {"stale": p0, "prev_drift": p0 + lin(h[t - 1][0], g[j] * steps[t - 1]),
               "momentum": p0 + j * lin(h[t - 1][0], 3 * steps[t - 1]),
               "linear_fit": p0 + lin(h[t][0], g[j] * steps[t - 1]),
               "router_weights": p0 + lin(h[t][0], g[j] * steps[t - 1])}
      for name, pred in preds.items():
        want[name].append(_same_set_share(pred, truth, mask, 2))
    for name in PREDICTORS:
      assert got[name][j - 1] == pytest.approx(np.mean(want[name]), abs=1e-12), (name, j)
  assert max(got[name].max() for name in PREDICTORS) < 1.0


def test_router_share_is_per_batch_from_the_batch_start_hidden_states():
  """With h moving within a batch, the share |h_t,0 (W_t,κ − W_t,0)| / |p_t,κ − p_t,0| differs
  per batch: the result is its mean over every batch (the first too), from valid tokens."""
  batches, mask, (h, steps, g) = _changing_drift_batches(np.random.default_rng(3), h_drift=0.3)
  lin = lambda x, w: np.einsum("bsld,lde->bsle", x, w)
  shares = []
  for t in range(3):
    w0 = batches[t][0][2]
    router = lin(h[t][0], g[3] * steps[t])[mask]
    total = (lin(h[t][3], w0 + g[3] * steps[t]) - lin(h[t][0], w0))[mask]
    shares.append(np.linalg.norm(router) / np.linalg.norm(total))
  assert np.ptp(shares) > 0.01  # the batches' shares differ
  got = score_batches(batches, mask, top_k=2)["router_share"]
  assert got == pytest.approx(np.mean(shares), rel=1e-12)


def test_one_map_is_fitted_on_the_mean_drift_after_1_to_kappa_minus_1_updates():
  """PR2's one forecast per batch: W fitted on the mean of batch t-1's drifts after 1..κ-1
  updates. κ = 3, one layer, h = 1, top-1 of 2 experts: batch 0 drifts expert 1 up by 1, 3
  (then 6) for both valid tokens, so W = +2 on expert 1 (the last drift alone, 3, or the mean
  up to κ, 10/3, route otherwise; a padding token drifting 100 must not count). Batch 1's
  tokens a, b start at [2.5, 0], [1.5, 0]: the forecast [2.5, 2], [1.5, 2] picks experts 0, 1
  against truths (0, 0), (0, 1), (1, 1) at mini-steps 1, 2, 3: shares 0.5, 1, 0.5. Stale picks
  0, 0: 1, 0.5, 0. On the last drift the forecast picks 1, 1: 0, 0.5, 1."""
  def batch(a_js, b_js, c_js):
    p = np.array([[[a], [b], [c]] for a, b, c in zip(a_js, b_js, c_js)], float)[:, None]
    return [(p_j, np.ones((1, 3, 1, 1)), np.zeros((1, 1, 2))) for p_j in p]
  drift = [[0, 0], [0, 1], [0, 3], [0, 6]]
  first = batch(drift, drift, [[0, 0], [0, 100], [0, 100], [0, 100]])
  second = batch([[2.5, 0], [2.5, 0], [0, 5], [0, 5]], [[1.5, 0], [1.5, 2], [0, 5], [0, 5]],
                 [[0, 0]] * 4)
  mask = np.array([[True, True, False]])
  got = score_batches([first, second], mask, top_k=1)
  assert got["one_map"]["one_map"].tolist() == [0.5, 1.0, 0.5]
  assert got["one_map"]["stale"].tolist() == [1.0, 0.5, 0.0]
  assert got["zero_dev"]["stale"].tolist() == [0.5, 0.0]


def test_result_row_names_each_score_by_its_own_key():
  """The JSON's keys hold their own scores (the share and the cosine are both in [0, 1]-ish, so
  only the slow end-to-end test reached this and could not tell them apart)."""
  scored = {"zero_dev": {"stale": np.array([0.123456, 0.5])},
            "one_map": {"one_map": np.array([1.0, 0.87654, 0.5])},
            "router_share": 0.9, "cosine": 0.25}
  assert result_row(scored, 3, 1e-3, 7) == {
      "off": 3, "learning_rate": 1e-3, "steps": 7,
      "zero_dev_by_ministep": {"stale": [0.1235, 0.5]}, "mini_steps": [2, 3],
      "one_map_by_ministep": {"one_map": [1.0, 0.8765, 0.5]}, "one_map_mini_steps": [1, 2, 3],
      "router_weight_share_of_drift": 0.9, "consecutive_drift_cosine": 0.25}
