"""End-to-end tests of pr2_jax.rl.loop: a tiny run, resume after interruption, metrics keys."""

import dataclasses
import json
import os
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _cli
from _metrics_doc import row_expected_keys
from pr2_jax.config import ModelConfig
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import loop, records
from pr2_jax.rl.char_tokenizer import CharTokenizer
from pr2_jax.rl.config import ExperimentConfig, PR2Config, RLConfig, SetupError, SFTConfig
from pr2_jax.rl.tasks import Arithmetic, Problem
from pr2_jax.train.checkpoint import CheckpointError, Checkpointer, abstract_like
from test_checkpoint import corrupt, flip_bytes

REQUIRED_KEYS = {"step", "phase", "reward_mean", "response_len", "entropy", "k3_kl", "old_k3_kl",
                 "extreme_frac", "ratio_mean", "ratio_var", "clip_frac_low", "clip_frac_high",
                 "grad_norm", "topk_agreement", "zero_dev_ratio", "coverage_gap",
                 "topk_agreement_per_layer", "zero_dev_ratio_per_layer", "coverage_gap_per_layer"}


def _config(num_steps, replay_mode="r3", num_layers=1, **rl):
  # One layer unless a test follows PR2's features across layers: the loop never indexes the
  # layer axis (routes and features pass through whole), and each layer is compiled anew
  # (layers are unrolled): two layers cost this file ~35 % more CPU with a cold compile cache.
  model = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      expert_d_ff=32, num_experts=4, top_k=2, num_layers=num_layers)
  rl = RLConfig(num_steps=num_steps, prompts_per_step=8, group_size=2, off_policy_k=2,
                micro_steps=2, replay_mode=replay_mode, max_new_tokens=6, eval_every=2,
                eval_size=16, **rl)  # = the rollout batch: r3's evaluation reuses its sampler
  return ExperimentConfig(model=model, rl=rl, sft=SFTConfig(num_steps=4, batch_size=8),
                          task="countdown", checkpoint_every=1)


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _token_rewards(self, problems, tokens_BS):
  """A deterministic reward that varies within groups from the first step (the tiny warm-up
  earns the task's reward 0 everywhere, which makes every advantage and gradient 0)."""
  del problems
  return (np.asarray(tokens_BS)[:, self.prompt_slots:] % 3 == 0).mean(1).astype(np.float32)


def _run(workdir, num_steps, mesh, replay_mode="r3", **rl):
  rows = []
  def write(m):
    rows.append(m)
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps(m, sort_keys=True) + "\n")
  os.makedirs(workdir, exist_ok=True)
  return loop.run(_config(num_steps, replay_mode, **rl), mesh, workdir, on_metrics=write), rows


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
  """Stopping after step 2 and rerunning to step 3 ends bit-identical to one run of 3 steps,
  with non-zero updates (so the optimizer state and the params must come back exactly)."""
  monkeypatch.setattr(loop.Engine, "rewards", _token_rewards)
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  full, _ = _run(str(tmp_path / "full"), 3, mesh)
  _run(str(tmp_path / "split"), 2, mesh)
  resumed, rows = _run(str(tmp_path / "split"), 3, mesh)
  assert [r["step"] for r in rows] == [3], "the resumed run must start after the checkpoint"
  leaves = zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(resumed["state"].params))
  for a, b in leaves:
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
  assert strip(_rows(str(tmp_path / "full"))) == strip(_rows(str(tmp_path / "split")))
  rl_rows = [r for r in _rows(str(tmp_path / "full")) if r["phase"] == "rl"]
  assert [r["step"] for r in rl_rows] == [1, 2, 3]
  assert REQUIRED_KEYS <= set(rl_rows[0])
  assert "eval_reward" in rl_rows[1] and "eval_reward" in rl_rows[2]
  assert len(rl_rows[0]["topk_agreement_per_layer"]) == 1  # _config's one layer
  assert len(rl_rows[0]["topk_agreement_per_ministep"]) == 2
  assert all(r["grad_norm"] > 0 and r["loss"] != 0 for r in rl_rows), rl_rows
  with Checkpointer(str(tmp_path / "full" / "checkpoints" / "sft")) as ck:
    params = full["state"].params
    warm, _ = ck.restore(ck.latest_step(), abstract_like(
        params, jax.tree.map(lambda x: x.sharding, params)))
  moved = [not np.array_equal(np.asarray(a), np.asarray(b))
           for a, b in zip(jax.tree.leaves(warm), jax.tree.leaves(params))]
  assert all(moved), "three RL steps with non-zero gradients must move every parameter"


@pytest.mark.slow
def test_routers_only_rl_moves_the_routers_alone_and_resumes(tmp_path, monkeypatch):
  """rl.trainable='routers': two RL steps, the second resumed from the first's checkpoint
  (the optimizer state reads back), move every router and leave every other parameter as the
  warm-up left it, bit for bit."""
  monkeypatch.setattr(loop.Engine, "rewards", _token_rewards)
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  workdir = str(tmp_path / "run")
  _run(workdir, 1, mesh, "pr2", trainable="routers")
  resumed, rows = _run(workdir, 2, mesh, "pr2", trainable="routers")
  assert [r["step"] for r in rows] == [2] and rows[0]["grad_norm"] > 0
  params = resumed["state"].params
  with Checkpointer(os.path.join(workdir, "checkpoints", "sft")) as ck:
    warm, _ = ck.restore(ck.latest_step(), abstract_like(
        params, jax.tree.map(lambda x: x.sharding, params)))
  moved = {jax.tree_util.keystr(path): not np.array_equal(np.asarray(a), np.asarray(b))
           for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(warm),
                                   jax.tree.leaves(params), strict=True)}
  routers = {k for k in moved if k.endswith("['mlp']['gate']")}
  assert len(routers) == 1 and all(moved[k] for k in routers), moved
  assert not any(v for k, v in moved.items() if k not in routers), moved


@pytest.mark.slow
def test_pr2_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
  """PR2-R3 resumed after step 2 ends bit-identical to 3 steps straight: params, AdamW state,
  the predictor W_p (trained from mini-step 2, so non-zero) and its optimizer state."""
  monkeypatch.setattr(loop.Engine, "rewards", _token_rewards)
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  full, _ = _run(str(tmp_path / "full"), 3, mesh, "pr2")
  _run(str(tmp_path / "split"), 2, mesh, "pr2")
  resumed, rows = _run(str(tmp_path / "split"), 3, mesh, "pr2")
  assert [r["step"] for r in rows] == [3]
  assert float(jnp.abs(full["state"].predictor).max()) > 0
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]
  assert strip(_rows(str(tmp_path / "full"))) == strip(_rows(str(tmp_path / "split")))
  for row in _rows(str(tmp_path / "full")):  # sft, sft_eval and rl rows: docs/metrics.md's keys
    assert set(row) == row_expected_keys(row, "pr2", "none"), (
        row["phase"], row["step"], set(row) ^ row_expected_keys(row, "pr2", "none"))


def test_rl_step_feeds_the_learner_the_rollouts_group_advantages(monkeypatch):
  """rl_step's wiring against a hand computation: the rollout's rewards become GRPO
  advantages per consecutive group of G, rows reach the update in the split's order, the
  off-policy mini-steps take consecutive chunks, and only mini-steps after the first train
  PR2's predictor; the row's reward_mean and response_len are the rollout's."""
  seen, orders, updates = {}, [], []

  def rewards(self, problems, tokens_BS):
    seen["tokens"], seen["rewards"] = np.asarray(tokens_BS), _token_rewards(self, problems,
                                                                            tokens_BS)
    return seen["rewards"]

  def split(batch, order, **kwargs):
    orders.append(np.asarray(jax.device_get(order)))
    return real_split(batch, order, **kwargs)

  real_split = loop.shuffle.shuffle_into_chunks
  monkeypatch.setattr(loop.Engine, "rewards", rewards)
  monkeypatch.setattr(loop.shuffle, "shuffle_into_chunks", split)
  cfg = _config(1)
  engine = loop.Engine(cfg, make_mesh(2, 2, devices=jax.devices()[:4]))
  real_fns = engine.learner_fns

  def spy(micro):
    old_fn, update_fn = real_fns(micro)
    def update(state, mini, train_predictor, *args):
      updates.append((np.asarray(jax.device_get(mini["adv"])),
                      np.asarray(jax.device_get(mini["tokens"])), bool(train_predictor)))
      return update_fn(state, mini, train_predictor, *args)
    return old_fn, update
  engine.learner_fns = spy
  _, summary = engine.rl_step(engine.state, 1)

  rl, r_PG = cfg.rl, seen["rewards"].reshape(-1, cfg.rl.group_size).astype(np.float64)
  std_PG = r_PG.std(1, keepdims=True)
  adv_B = np.where(std_PG > 0, (r_PG - r_PG.mean(1, keepdims=True)) / (std_PG + 1e-6), 0).ravel()
  assert np.count_nonzero(adv_B) >= rl.batch_size // 2, "the check needs non-trivial advantages"
  (order,) = orders
  assert sorted(order) == list(range(rl.batch_size))
  assert [u[2] for u in updates] == [False, True]
  chunk = rl.batch_size // (rl.off_policy_k * rl.micro_steps)
  for i, (adv_MB, tokens_MBS, _) in enumerate(updates):
    rows = order[i * rl.micro_steps * chunk:(i + 1) * rl.micro_steps * chunk]
    np.testing.assert_allclose(adv_MB.reshape(-1), adv_B[rows], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tokens_MBS.reshape(len(rows), -1), seen["tokens"][rows])
  assert summary["reward_mean"] == pytest.approx(float(seen["rewards"].mean()), rel=1e-6)
  # response_len: the sampled ids after the prompt up to and including EOS (all N without one).
  response_BN = seen["tokens"][:, engine.prompt_slots:]
  stops_BN = response_BN == engine.tok.eos_id
  length_B = np.where(stops_BN.any(1), stops_BN.argmax(1) + 1, response_BN.shape[1])
  assert len(set(length_B.tolist())) > 1, "the check needs responses of different lengths"
  assert summary["response_len"] == pytest.approx(float(length_B.mean()), rel=1e-6)


@pytest.mark.parametrize("mode, replays_old_pass", [("r2", True), ("r3", False)])
def test_the_update_replays_the_old_pass_routes_in_r2_and_the_rollouts_in_r3(monkeypatch, mode,
                                                                             replays_old_pass):
  """rl_step's replay_routes: r2 replays the routes the old-log-prob pass used, r3 the
  rollout's. The old pass is made to report its routes shifted by one expert (e -> e + 1 mod E,
  still k distinct ids), so the two candidates differ at most entries whatever the model routes
  (r3's old pass replays the rollout's: all of them); each mini-step must see its own κ chunk of
  the chosen one."""
  engine = loop.Engine(_config(1, mode), make_mesh(2, 2, devices=jax.devices()[:4]))
  real_fns, seen = engine.learner_fns, {"replay": []}
  num_experts = engine.config.model.num_experts

  def spy(micro):
    old_fn, update_fn = real_fns(micro)
    seen["rollout"] = np.asarray(jax.device_get(micro["rollout_routes"]))

    def old(*args, **kwargs):
      old = old_fn(*args, **kwargs)
      shifted = (old.routes + 1) % num_experts
      seen["old_pass"] = np.asarray(jax.device_get(shifted))
      return old._replace(routes=shifted)

    def update(state, mini, *args):
      seen["replay"].append(np.asarray(jax.device_get(mini["replay_routes"])))
      return update_fn(state, mini, *args)
    return old, update

  engine.learner_fns = spy
  engine.rl_step(engine.state, 1)
  want = seen["old_pass"] if replays_old_pass else seen["rollout"]
  assert np.mean(seen["old_pass"] != seen["rollout"]) > 0.5
  m = engine.config.rl.micro_steps
  assert len(seen["replay"]) == engine.config.rl.off_policy_k
  for i, replay in enumerate(seen["replay"]):
    np.testing.assert_array_equal(replay, want[i * m:(i + 1) * m])


@pytest.mark.parametrize("mode", ["pr2", "pr2_r2"])
def test_pr2_modes_predict_in_their_own_pass_and_the_update_replays_it(monkeypatch, mode):
  """DESIGN §2's table for the two PR2 modes through rl_step: pr2 routes the rollout by the
  predictor and caches its features there, pr2_r2 rolls out live and predicts in the old pass;
  the update replays the predicting pass's routes and fits on its features. The old pass runs
  once, on the step's starting parameters, before the κ updates (DAPO's ratio against µ never
  reads π_old, so only this says it is θ_old's). Its routes are shifted by one expert, as in
  the r2/r3 test above, so that the two candidate routes differ. The row's feature_cache_bytes
  counts both cached features."""
  # Two layers: the cached features have a layer axis, and a layer mixed up between the
  # predicting pass and the update would show.
  engine = loop.Engine(_config(1, mode, num_layers=2), make_mesh(2, 2, devices=jax.devices()[:4]))
  real_fns, real_sample, calls = engine.learner_fns, engine.sample, []
  start_params = engine.state.params
  num_experts = engine.config.model.num_experts

  def sample(*args, predictor, feature_slots_BF, **kwargs):
    calls.append(("rollout", predictor is not None, feature_slots_BF is not None))
    return real_sample(*args, predictor=predictor, feature_slots_BF=feature_slots_BF, **kwargs)

  def spy(micro):
    old_fn, update_fn = real_fns(micro)
    rollout = jax.device_get((micro["rollout_routes"], micro.get("feature_h")))

    def old(params, *args, **kwargs):
      calls.append(("old", params is start_params))
      old = old_fn(params, *args, **kwargs)
      old = old._replace(routes=(old.routes + 1) % num_experts)
      seen.update(rollout=rollout, old=jax.device_get((old.routes, old.feats)))
      return old

    def update(state, mini, *args):
      calls.append(("update",))
      seen["update"].append(jax.device_get((mini["replay_routes"], mini["feature_h"])))
      return update_fn(state, mini, *args)
    return old, update

  seen = {"update": []}
  engine.sample, engine.learner_fns = sample, spy
  _, summary = engine.rl_step(engine.state, 1)
  k, m = engine.config.rl.off_policy_k, engine.config.rl.micro_steps
  # The cache of both features: B 16 rows x F 8 slots x L 2 layers x (h: D 32 + p_old: E 4)
  # bfloat16 values of 2 bytes, wherever they were recorded.
  assert summary["feature_cache_bytes"] == 16 * 8 * 2 * (32 + 4) * 2
  at_rollout = mode == "pr2"
  assert calls == [("rollout", at_rollout, at_rollout), ("old", True)] + [("update",)] * k
  (rollout_routes, rollout_h), (old_routes, old_feats) = seen["rollout"], seen["old"]
  assert (rollout_h is not None) == at_rollout and (old_feats is None) == at_rollout
  want_routes = rollout_routes if at_rollout else old_routes
  want_h = rollout_h if at_rollout else old_feats[0]
  assert np.mean(old_routes != rollout_routes) > 0.5
  for i, (routes, h) in enumerate(seen["update"]):
    np.testing.assert_array_equal(routes, want_routes[i * m:(i + 1) * m])
    np.testing.assert_array_equal(h, want_h[i * m:(i + 1) * m])


def test_a_missing_init_from_is_an_error_not_a_fresh_warm_up(tmp_path):
  typo = tmp_path / "typo_dir"
  cfg = dataclasses.replace(_config(1), init_from=str(typo))
  with pytest.raises(ValueError, match=f"init_from='{typo}' holds no checkpoint"):
    loop.run(cfg, make_mesh(1, 1, devices=jax.devices()[:1]), str(tmp_path / "work"))
  assert not typo.exists() and not (tmp_path / "work" / "checkpoints" / "sft").exists()
  assert not os.listdir(tmp_path / "work" / "checkpoints" / "rl")  # no RL step either


@pytest.mark.parametrize("where", ["workdir", "init_from"])
def test_a_path_orbax_cannot_use_is_refused_before_any_work(tmp_path, where):
  """Orbax globs the step directory's path, so '[lr=1e-3]' in it wrote checkpoints it could not
  read back (an Orbax warning at each save, exit 0; the rerun found nothing usable)."""
  bad = str(tmp_path / "exp[lr=1e-3]")
  cfg = dataclasses.replace(_config(1), init_from=bad if where == "init_from" else None)
  workdir = bad if where == "workdir" else str(tmp_path / "work")
  with pytest.raises(SetupError, match=re.escape(f"{where}: checkpoint directory {bad!r} "
                                                 "contains '[]': Orbax reads")):
    loop.run(cfg, make_mesh(1, 1, devices=jax.devices()[:1]), workdir)
  assert os.listdir(tmp_path) == []  # nothing created


def test_evaluation_at_the_rollout_temperature_reuses_the_sampler():
  """Same sampling settings: one jitted sampler (an eval batch of the rollout's shape then
  compiles nothing new); another eval temperature gets its own."""
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  cfg = _config(1)
  same = loop.Engine(cfg, mesh)
  assert same.eval_sample is same.sample
  greedy = loop.Engine(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl,
                                                                       eval_temperature=0.0)), mesh)
  assert greedy.eval_sample is not greedy.sample


def test_bad_setups_fail_before_compiling(tmp_path):
  mesh = make_mesh(1, 8)
  with pytest.raises(ValueError, match="micro-batch size 4 .* 8 token shards"):
    loop.Engine(_config(1), mesh)
  cfg = _config(1)
  small_vocab = ExperimentConfig(model=cfg.model.replace(vocab_size=16), rl=cfg.rl, sft=cfg.sft,
                                 task="countdown")
  with pytest.raises(ValueError, match="vocab_size=16 is below the tokenizer's 24"):
    loop.Engine(small_vocab, make_mesh(1, 1, devices=jax.devices()[:1]))
  short = ExperimentConfig(model=cfg.model, rl=RLConfig(max_new_tokens=3, prompts_per_step=4,
                                                        group_size=2, eval_size=8),
                           sft=cfg.sft, task="countdown")
  with pytest.raises(ValueError, match="max_new_tokens=3 cannot hold"):
    loop.Engine(short, make_mesh(1, 1, devices=jax.devices()[:1]))


def _pr2_engine(feature_rule, feature_tokens):
  cfg = dataclasses.replace(_config(1, "pr2"), pr2=PR2Config(feature_rule=feature_rule,
                                                             feature_tokens=feature_tokens))
  return loop.Engine(cfg, make_mesh(1, 1, devices=jax.devices()[:1]))


def test_response_feature_slots_are_the_first_response_slots_of_every_row():
  """feature_rule='response': every row caches slots P, P+1, ..., P+F-1, whatever the rng; more
  features than the N response slots would cache (and weight) slots twice: refused."""
  engine = _pr2_engine("response", 5)
  p, n = engine.prompt_slots, engine.response_slots
  assert (p, n) == (11, 6)  # countdown's prompt layout
  for seed in (0, 1):
    slots_BF = engine.feature_slots(np.random.default_rng(seed), 5)
    assert slots_BF.dtype == np.int32
    np.testing.assert_array_equal(slots_BF, np.broadcast_to(np.arange(11, 16), (5, 5)))
  np.testing.assert_array_equal(_pr2_engine("response", 6).feature_slots(None, 1),
                                [np.arange(11, 17)])


def test_too_many_feature_tokens_fail_before_the_state_is_built(monkeypatch):
  """'response' draws from the N = 6 response slots alone, 'random' from all P + N = 11 + 6:
  one more is refused, naming only the slots the rule counts, before the state init (it ran
  after it, and after a whole checkpoint read with hf_checkpoint)."""
  def no_init(*args):
    raise AssertionError("the state init ran before the check")

  monkeypatch.setattr(loop.programs.Programs, "init_state", no_init)
  with pytest.raises(SetupError, match=r"^PR2Config.feature_tokens=7 exceeds the 6 slots "
                                       r"feature_rule='response' draws from "
                                       r"\(max_new_tokens 6\)$"):
    _pr2_engine("response", 7)
  with pytest.raises(SetupError, match=r"^PR2Config.feature_tokens=18 exceeds the 17 slots "
                                       r"feature_rule='random' draws from \(prompt 11 \+ "
                                       r"max_new_tokens 6\)$"):
    _pr2_engine("random", 18)


def test_random_feature_slots_are_distinct_sorted_and_uniform():
  """feature_rule='random': each row is F distinct slots of [0, P + N), sorted, drawn from the
  rng alone (same seed, same slots; another seed, others); over many rows every slot is picked
  with frequency F / S, rows differ from each other."""
  engine = _pr2_engine("random", 5)
  s, f, rows = engine.prompt_slots + engine.response_slots, 5, 4000
  slots_BF = engine.feature_slots(np.random.default_rng(0), rows)
  assert slots_BF.shape == (rows, f) and slots_BF.dtype == np.int32
  assert np.all(np.diff(slots_BF, axis=1) > 0)  # sorted and distinct
  assert slots_BF.min() >= 0 and slots_BF.max() < s
  np.testing.assert_array_equal(engine.feature_slots(np.random.default_rng(0), rows), slots_BF)
  assert not np.array_equal(engine.feature_slots(np.random.default_rng(1), rows), slots_BF)
  assert len({tuple(r) for r in slots_BF[:50]}) > 45  # C(17, 5) = 6188 subsets: rare repeats
  freq_S = np.bincount(slots_BF.ravel(), minlength=s) / rows
  # Binomial(4000, 5/17) per slot: std 0.0072, so 0.04 is > 5 sigma.
  np.testing.assert_allclose(freq_S, np.full(s, f / s), atol=0.04)


@pytest.mark.slow
def test_non_finite_updates_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
  """NaN advantages make every update non-finite: skipped, counted, then a clear stop. (NaN
  rewards are rejected earlier, by grpo_advantages: here the blow-up is downstream of them.)"""
  monkeypatch.setattr(loop.advantages, "grpo_advantages",
                      lambda rewards, group_size: jnp.full(rewards.shape, jnp.nan, jnp.float32))
  cfg = _config(5)
  cfg = ExperimentConfig(model=cfg.model, rl=RLConfig(**{**cfg.rl.__dict__,
                                                         "max_consecutive_skips": 3}),
                         sft=cfg.sft, task="countdown", checkpoint_every=0)
  rows, warnings = [], []
  # The resume test's mesh (and test_balancing's): its compiled programs come from the shared
  # compilation cache; a 1-device mesh compiled all of them again (60 s cold).
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  with pytest.raises(FloatingPointError, match="4 consecutive updates had a non-finite loss"):
    loop.run(cfg, mesh, str(tmp_path), on_metrics=rows.append, warn=warnings.append)
  rl_rows = [r for r in rows if r["phase"] == "rl"]
  assert [r["skipped_updates"] for r in rl_rows] == [2, 2]
  assert warnings == ["RL step 1: 2 of 2 updates skipped (non-finite loss or gradient), 2 in a "
                      "row; the run stops at RLConfig.max_consecutive_skips=3"]
  with Checkpointer(str(tmp_path / "checkpoints" / "rl")) as ck:
    assert ck.latest_step() == 2
  # The count survives a resume: 1 step (2 skips), then resumed, the run stops at step 2 too.
  resumed = str(tmp_path / "resumed")
  loop.run(dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, num_steps=1)), mesh, resumed)
  with pytest.raises(FloatingPointError, match="4 consecutive updates had a non-finite loss.*"
                                               "stopped at RL step 2 "):
    loop.run(cfg, mesh, resumed)


def test_skip_run_counts_runs_inside_a_step_and_across_steps():
  """Finding: only a step's trailing skips were counted, so [skip, skip, skip, ok] was 0 in a
  row, and [ok, skip] then [skip, ok] 0 as well."""
  s, o = True, False
  assert loop.skip_run([s, s, s, o], 0) == (3, 0)
  assert loop.skip_run([o, s], 0) == (1, 1)
  assert loop.skip_run([s, o], 1) == (2, 0)  # the previous step's trailing skip joins
  assert loop.skip_run([o, o], 2) == (0, 0)  # no skip of its own: nothing new to count
  assert loop.skip_run([s, s], 2) == (4, 4)
  assert loop.skip_run([s, o, s, s, o, s], 0) == (2, 1)


def _scripted_skips(monkeypatch, patterns):
  """RL steps whose updates skip as `patterns[step - 1]` says (True = skipped), with no
  warm-up, evaluation or learner compiled: only the loop's bookkeeping runs."""
  monkeypatch.setattr(loop.Engine, "warmup", lambda self, *a: self.state.params)
  monkeypatch.setattr(loop.Engine, "evaluate", lambda self, params: 0.0)

  def rl_step(self, state, step):
    flags = list(patterns[step - 1])
    return state, {"skipped_flags": flags, "skipped_updates": sum(flags)}

  monkeypatch.setattr(loop.Engine, "rl_step", rl_step)


def _skip_config(num_steps, off_policy_k):
  cfg = _config(num_steps)
  return dataclasses.replace(cfg, rl=dataclasses.replace(
      cfg.rl, off_policy_k=off_policy_k, micro_steps=1, max_consecutive_skips=3))


def test_three_skips_in_a_row_inside_one_step_stop_the_run(tmp_path, monkeypatch):
  s, o = True, False
  _scripted_skips(monkeypatch, [[s, s, s, o], [o, o, o, o]])
  warnings = []
  with pytest.raises(loop.Diverged, match=r"^3 consecutive updates had a non-finite loss .*"
                                          r"stopped at RL step 1 "):
    loop.run(_skip_config(2, 4), make_mesh(1, 1, devices=jax.devices()[:1]), str(tmp_path),
             warn=warnings.append)
  assert warnings == []
  with Checkpointer(str(tmp_path / "checkpoints" / "rl")) as ck:
    assert ck.latest_step() == 1 and ck.restore_meta(1)["consecutive_skips"] == 0


def test_skips_in_a_row_across_a_step_boundary_count_together(tmp_path, monkeypatch):
  s, o = True, False
  _scripted_skips(monkeypatch, [[o, s], [s, o], [o, s], [s, s], [o, o]])
  warnings = []
  with pytest.raises(loop.Diverged, match=r"^3 consecutive updates .* stopped at RL step 4 "):
    loop.run(_skip_config(5, 2), make_mesh(1, 1, devices=jax.devices()[:1]), str(tmp_path),
             warn=warnings.append)
  tail = ("(non-finite loss or gradient), {} in a row; the run stops at "
          "RLConfig.max_consecutive_skips=3")
  assert warnings == [f"RL step 1: 1 of 2 updates skipped {tail.format(1)}",
                      f"RL step 2: 1 of 2 updates skipped {tail.format(2)}",
                      f"RL step 3: 1 of 2 updates skipped {tail.format(1)}"]
  with Checkpointer(str(tmp_path / "checkpoints" / "rl")) as ck:
    assert ck.restore_meta(4)["consecutive_skips"] == 3


def test_a_diverged_warm_up_stops_before_rl_and_saves_nothing(tmp_path):
  """A NaN warm-up loss is an error at its next report (it used to carry on, and RL then
  skipped every update and ended with reward 0 and exit 0); nothing of it is checkpointed."""
  cfg = _config(2)
  cfg = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, learning_rate=1e30))
  rows, messages = [], []
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  with pytest.raises(loop.Diverged, match=r"^the warm-up diverged: supervised loss nan at step 4 "
                     r"\(SFTConfig.learning_rate=1e\+30\); none of it was checkpointed$") as e:
    loop.run(cfg, mesh, str(tmp_path), on_metrics=rows.append, info=messages.append)
  assert e.value.phase == "sft" and isinstance(e.value, FloatingPointError)
  assert rows == [] and messages == ["warm-up: 4 supervised steps (the first compiles)"]
  assert os.listdir(tmp_path / "checkpoints" / "sft") == []


def test_an_eval_size_beyond_the_task_is_a_setup_error_naming_it():
  """A one-digit arithmetic task has 21 distinct problems: eval_size=16 fits, 32 does not (a
  bare ValueError from the task, raised after compiling, named no config field)."""
  cfg = dataclasses.replace(_config(1), task="arithmetic", task_kwargs={"num_digits": 1})
  cfg = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, eval_size=32))
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  with pytest.raises(SetupError, match=r"^RLConfig.eval_size=32 is too large: arithmetic: found "
                                       r"only 21 distinct eval problems, asked for 32"):
    loop.Engine(cfg, mesh)


def test_a_workdir_in_use_is_refused_before_anything_is_built(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "Engine", lambda *a: pytest.fail("built an engine"))
  with records.workdir_lock(str(tmp_path)), pytest.raises(SetupError, match="in use by another"):
    loop.run(_config(1), make_mesh(1, 1, devices=jax.devices()[:1]), str(tmp_path))


def test_refuses_fresh_start_over_existing_rl_metrics(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"phase": "rl", "step": 3}) + "\n")
  mesh = make_mesh(1, 1, devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="holds RL metrics from an earlier run but no RL checkpoint"):
    loop.run(_config(1), mesh, str(tmp_path))


def test_resume_with_another_setup_is_refused_naming_the_fields(tmp_path):
  """Only how long a run goes and how it is evaluated may change on resume: another learning
  rate or seed would mix two setups in one metrics file (it used to resume silently)."""
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  _run(str(tmp_path), 1, mesh)
  cfg = _config(2)
  changed = dataclasses.replace(cfg, seed=7, rl=dataclasses.replace(cfg.rl, learning_rate=0.5))
  with pytest.raises(ValueError, match=r"another setup than this run: rl\.learning_rate: "
                                       r"checkpoint 0\.0001, this run 0\.5; "
                                       r"seed: checkpoint 0, this run 7"):
    loop.run(changed, mesh, str(tmp_path))
  more = dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, eval_every=0, num_steps=2))
  messages = []
  out = loop.run(more, mesh, str(tmp_path), info=messages.append)
  assert out["resumed_from"] == 1 and out["final"]["step"] == 2
  assert messages == [f"resuming from the RL checkpoint of step 1 in "
                      f"{tmp_path / 'checkpoints' / 'rl'}; metrics rows after step 1 are rewritten",
                      "RL: steps 2..2 (the first compiles)"]
  assert records.run_identity(more) == records.run_identity(cfg)  # the fields a resume may change


def test_an_interrupt_keeps_the_checkpoint_being_written(tmp_path, monkeypatch):
  """Ctrl-C right after a save: run() waits for the background commit before unwinding (an
  interpreter exiting mid-commit left only a tmp directory, and the run restarted)."""
  real_step = loop.Engine.rl_step

  def interrupted(self, state, step):
    if step == 3:
      raise KeyboardInterrupt
    return real_step(self, state, step)

  monkeypatch.setattr(loop.Engine, "rl_step", interrupted)
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  with pytest.raises(KeyboardInterrupt):
    _run(str(tmp_path), 5, mesh)
  rl_dir = tmp_path / "checkpoints" / "rl"
  assert sorted(os.listdir(rl_dir)) == ["1", "2"], "no tmp directory: the save of step 2 finished"
  monkeypatch.setattr(loop.Engine, "rl_step", real_step)
  out, rows = _run(str(tmp_path), 3, mesh)
  assert out["resumed_from"] == 2 and [r["step"] for r in rows] == [3]


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(tmp_path):
  """The resumed run recomputes step 2 and saves it again (it crashed at that save)."""
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  _run(str(tmp_path), 2, mesh)
  corrupt(str(tmp_path / "checkpoints" / "rl" / "2"))
  warnings, rows = [], []
  out = loop.run(_config(3), mesh, str(tmp_path), warn=warnings.append, on_metrics=rows.append)
  assert out["resumed_from"] == 1 and out["final"]["step"] == 3
  assert "checkpoint step 2" in warnings[0] and "unreadable" in warnings[0]
  assert warnings[1].startswith("deleted the unreadable step(s) [2]")
  assert [r["step"] for r in _rows(str(tmp_path)) if r["phase"] == "rl"] == [1]  # 2 rewritten
  assert [r["step"] for r in rows if r["phase"] == "rl"] == [2, 3]
  assert sorted(os.listdir(tmp_path / "checkpoints" / "rl")) == ["2", "3"]


def _flip_all(directory):
  for step in os.listdir(directory):
    flip_bytes(os.path.join(directory, step))


def test_unreadable_checkpoints_are_an_error_unless_a_fresh_start_is_allowed(tmp_path):
  """Every RL checkpoint unreadable: an error that says what to do (it was a raw ValueError, and
  allow_fresh_start / --fresh did not get past it). Allowed, the run deletes them and starts
  over from the warm-up checkpoint, or warms up again if that is unreadable too: either way
  its RL rows are the first run's."""
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  _, first = _run(str(tmp_path), 1, mesh)
  rl_dir, sft_dir = tmp_path / "checkpoints" / "rl", tmp_path / "checkpoints" / "sft"
  strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows
                        if r["phase"] == "rl"]
  for unreadable in (rl_dir, sft_dir):
    _flip_all(rl_dir)
    if unreadable == sft_dir:
      _flip_all(sft_dir)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint: checkpoint step 1 in "
                       rf"{re.escape(str(rl_dir))} is unreadable .*; checkpoint step 0 .*; rerun "
                       r"with --fresh \(allow_fresh_start=True\) to delete the unreadable "
                       "checkpoints and start over, or use another workdir$"):
      loop.run(_config(1), mesh, str(tmp_path))
    warnings, messages, rows = [], [], []
    out = loop.run(_config(1), mesh, str(tmp_path), warn=warnings.append, info=messages.append,
                   on_metrics=rows.append, allow_fresh_start=True)
    assert out["resumed_from"] is None and strip(rows) == strip(first)
    assert f"deleted the unreadable step(s) [1, 0] in {rl_dir}: no step restores" in warnings[2]
    warmed_up = any(m.startswith("warm-up:") for m in messages)
    assert warmed_up == (unreadable == sft_dir), messages
  # Another run's warm-up (init_from) unreadable: named, and never deleted, even when allowed.
  _flip_all(sft_dir)
  named = re.escape(str(sft_dir))
  with pytest.raises(CheckpointError, match=rf"checkpoint step 4 in {named} is unreadable .*; "
                                            rf"init_from='{named}' is unusable$"):
    loop.run(dataclasses.replace(_config(1), init_from=str(sft_dir)), mesh,
             str(tmp_path / "other"), allow_fresh_start=True)
  assert os.listdir(sft_dir) == ["4"]


def test_cli_reports_unreadable_checkpoints_in_one_line(tmp_path):
  """experiments.main caught only setup errors: a workdir whose checkpoints were all unreadable
  ended in a traceback. Now: one `error:` line that says what to do, exit code 2."""
  rl_dir = tmp_path / "checkpoints" / "rl"
  with Checkpointer(str(rl_dir)) as ck:
    ck.save(1, {"x": jnp.arange(4.0)}, {})
    ck.wait()
  damaged = flip_bytes(str(rl_dir / "1"))
  line = _cli.one_error_line(_cli.run("experiments.main", "--config=configs/tiny.py",
                                      f"--workdir={tmp_path}"))
  assert line.startswith(f"error: no usable checkpoint: checkpoint step 1 in {rl_dir} is "
                         f"unreadable (CheckpointError: {damaged} changed since it was "), line
  assert line.endswith("; rerun with --fresh (allow_fresh_start=True) to delete the unreadable "
                       "checkpoints and start over, or use another workdir"), line


def test_progress_rate_leaves_the_first_step_out(tmp_path):
  calls, warm = [], []
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  config = dataclasses.replace(_config(3), sft=SFTConfig(num_steps=75, batch_size=8))
  loop.run(config, mesh, str(tmp_path), on_progress=lambda *a: calls.append(a),
           on_warmup_progress=lambda *a: warm.append(a))
  assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)]
  assert calls[0][2] is None and all(c[2] > 0 for c in calls[1:])
  # The warm-up reports with its metrics rows, every 25 steps; the first includes compiling.
  assert [c[:2] for c in warm] == [(25, 75), (50, 75), (75, 75)]
  assert warm[0][2] is None and all(c[2] > 0 for c in warm[1:])


def test_rewards_score_a_sampled_pad_or_bos_as_malformed():
  """decode skips PAD and BOS, so a response '4 PAD 6 EOS' scored as '46' (full reward for a
  malformed answer) and the learner was pushed towards sampling PAD inside answers. Such ids
  now make the answer malformed, like an id beyond the tokenizer's vocabulary; the padding
  after EOS is never read."""
  tok, task = CharTokenizer(), Arithmetic()
  problem = Problem("40+6=", "46", "46", (40, "+", 6, 46), "arithmetic")
  engine = SimpleNamespace(tok=tok, task=task, prompt_slots=1)
  enc = lambda text: tok.encode(text, bos=False)
  four, six, pad, bos, eos = *enc("4"), *enc("6"), tok.pad_id, tok.bos_id, tok.eos_id
  rows = [[four, six, eos, pad, pad], [four, pad, six, eos, pad], [bos, four, six, eos, pad],
          [four, six, pad, pad, pad], [four, tok.vocab_size + 3, six, eos, pad]]
  tokens_BS = np.array([[bos] + row for row in rows])  # one prompt slot, never scored
  got = loop.Engine.rewards(engine, [problem] * len(rows), tokens_BS)
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0, 0.0, 0.0])


class _Stop(Exception):
  """Ends rl_step at the mini-batch split: what is checked is drawn by then."""


def _draws_of_step_one(monkeypatch, mode):
  """(problems scored, mini-batch split order) of RL step 1 in `mode`, stopped at the split
  (no learner compiled)."""
  seen = {}

  def rewards(self, problems, tokens_BS):
    seen["problems"] = list(problems)
    return _token_rewards(self, problems, tokens_BS)

  def split(batch, order, **kwargs):
    seen["order"] = np.asarray(jax.device_get(order))
    raise _Stop

  monkeypatch.setattr(loop.Engine, "rewards", rewards)
  monkeypatch.setattr(loop.shuffle, "shuffle_into_chunks", split)
  engine = loop.Engine(_config(1, mode), make_mesh(2, 2, devices=jax.devices()[:4]))
  with pytest.raises(_Stop):
    engine.rl_step(engine.state, 1)
  return engine, seen["problems"], seen["order"]


def test_a_steps_problems_come_in_groups_and_pr2_draws_r3s_problems_and_split(monkeypatch):
  """GRPO's advantages normalise over consecutive groups of G rows, so each prompt must fill G
  consecutive rows: the step's P problems come from rng([seed, RL_STREAM, step]) and the split
  order is that rng's next draw, a permutation of B. PR2 draws its feature slots from their own
  stream, so with W_p = 0 it scores R3's problems and splits them exactly as R3 does (sharing
  the RL rng shifted PR2's split; a group-major list interleaved the prompts)."""
  engine, problems, order = _draws_of_step_one(monkeypatch, "r3")
  rl = engine.config.rl
  rng = np.random.default_rng([engine.config.seed, loop.RL_STREAM, 1])
  drawn = engine.task.sample(rng, rl.prompts_per_step)
  assert problems == [p for p in drawn for _ in range(rl.group_size)]
  assert len({p.prompt for p in drawn}) > 1, "the check needs different prompts"
  np.testing.assert_array_equal(order, rng.permutation(rl.batch_size))
  assert not np.array_equal(order, np.arange(rl.batch_size))
  _, pr2_problems, pr2_order = _draws_of_step_one(monkeypatch, "pr2")
  assert pr2_problems == problems
  np.testing.assert_array_equal(pr2_order, order)


def test_evaluate_is_the_mean_reward_of_the_eval_set(monkeypatch):
  """evaluate() scores the eval problems (all of them, in order) and returns the mean of their
  rewards, not of another per-row number score() returns (the response lengths)."""
  seen = {}

  def rewards(self, problems, tokens_BS):
    seen["problems"], seen["rewards"] = list(problems), _token_rewards(self, problems, tokens_BS)
    return seen["rewards"]

  monkeypatch.setattr(loop.Engine, "rewards", rewards)
  engine = loop.Engine(_config(1), make_mesh(2, 2, devices=jax.devices()[:4]))
  got = engine.evaluate(engine.state.params)
  assert seen["problems"] == list(engine.eval_problems)
  assert len(set(seen["rewards"].tolist())) > 1, "the check needs rewards that differ"
  assert got == pytest.approx(float(np.mean(seen["rewards"])), rel=1e-6)


def test_summarise_averages_the_mini_steps_and_counts_their_skips():
  """The step's row from κ = 3 mini-steps' metrics, by hand: every metric is the mean over the
  mini-steps (per layer for per-layer arrays), the mismatch and routing metrics are also listed
  per mini-step in order, `skipped_updates` counts the skipped ones (2 here, not 1), and
  reward_mean / response_len average the rollout's rows."""
  def mini(k3, extreme, agree, per_layer, loss, skipped):
    return {"k3_kl": np.float32(k3), "extreme_frac": np.float32(extreme),
            "topk_agreement": np.float32(agree), "loss": np.float32(loss),
            "topk_agreement_per_layer": np.asarray(per_layer, np.float32),
            "skipped": np.bool_(skipped)}

  per_mini = [mini(0.25, 0.5, 1.0, [1.0, 0.5], 2.0, True),
              mini(0.5, 0.0, 0.5, [0.5, 0.5], 4.0, False),
              mini(0.75, 0.25, 0.75, [0.0, 0.5], 6.0, True)]
  row = loop.Engine._summarise(per_mini, np.array([0.0, 1.0, 1.0, 0.0], np.float32),
                               np.array([3.0, 5.0, 6.0, 2.0], np.float32))
  assert row.pop("skipped_flags") == [True, False, True]
  want = {"k3_kl": 0.5, "extreme_frac": 0.25, "topk_agreement": 0.75, "loss": 4.0,
          "topk_agreement_per_layer": [0.5, 0.5], "skipped_updates": 2,
          "k3_kl_per_ministep": [0.25, 0.5, 0.75], "extreme_frac_per_ministep": [0.5, 0.0, 0.25],
          "topk_agreement_per_ministep": [1.0, 0.5, 0.75], "reward_mean": 0.5,
          "response_len": 4.0}
  assert set(row) == set(want)
  for key, value in want.items():
    np.testing.assert_allclose(row[key], value, rtol=1e-6, err_msg=key)


def _scripted_clock(monkeypatch):
  """loop's clock, advanced only by the scripted RL steps."""
  clock = {"now": 0.0}
  monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
  return clock


def test_eval_checkpoint_and_progress_cadence_include_the_last_step(tmp_path, monkeypatch):
  """5 RL steps with eval_every = checkpoint_every = 2: evaluated and checkpointed at steps
  2, 4 and the last, 5 (not only at multiples); the progress rate leaves the first step out
  and divides by the steps since it (10 s a step here, so exactly 10), elapsed_s counts from
  the start."""
  _scripted_skips(monkeypatch, [[False, False]] * 5)
  clock = _scripted_clock(monkeypatch)
  scripted_step = loop.Engine.rl_step

  def rl_step(self, state, step):
    clock["now"] += 10.0
    return scripted_step(self, state, step)

  monkeypatch.setattr(loop.Engine, "rl_step", rl_step)
  evaluated, saved, rows, calls = [], [], [], []
  monkeypatch.setattr(loop.Engine, "evaluate", lambda self, params: evaluated.append(
      clock["now"] / 10) or 0.5)
  monkeypatch.setattr(loop.start, "save_rl_checkpoint",
                      lambda ckpt, engine, step, state, consecutive: saved.append(step))
  cfg = _skip_config(5, 2)
  cfg = dataclasses.replace(cfg, checkpoint_every=2,
                            rl=dataclasses.replace(cfg.rl, eval_every=2))
  loop.run(cfg, make_mesh(1, 1, devices=jax.devices()[:1]), str(tmp_path),
           on_metrics=rows.append, on_progress=lambda *a: calls.append(a))
  rl_rows = [r for r in rows if r["phase"] == "rl"]
  assert [r["step"] for r in rl_rows] == [1, 2, 3, 4, 5]
  # Step 0: the warm-up's evaluation and the RL checkpoint start() writes before step 1.
  assert evaluated == [0, 2, 4, 5] and saved == [0, 2, 4, 5]
  assert [r["step"] for r in rl_rows if "eval_reward" in r] == [2, 4, 5]
  assert [r["elapsed_s"] for r in rl_rows] == [10.0, 20.0, 30.0, 40.0, 50.0]
  assert calls == [(1, 5, None), (2, 5, 10.0), (3, 5, 10.0), (4, 5, 10.0), (5, 5, 10.0)]


def test_warm_up_reports_every_25_steps_and_the_last_with_the_rate_after_the_first(monkeypatch):
  """Engine.warmup on a scripted step (2 s each, loss = the step): a row and a progress call at
  steps 25, 50 and the last, 60; the rate is None at the first report (compiling) and then the
  seconds per step since it: (100 - 50) / 25 and (120 - 100) / 10, exactly 2."""
  clock = _scripted_clock(monkeypatch)
  monkeypatch.setattr(loop, "to_global", lambda batch, sharding: batch)

  def step_fn(state, batch):
    clock["now"] += 2.0
    return SimpleNamespace(params=state.params + 1), {"loss": np.float32(state.params + 1)}

  task = loop.make_task("countdown")
  prompt_slots, response_slots = loop.data.layout(task, 6)
  sft = SFTConfig(num_steps=60, batch_size=8)
  # The scripted state's params count the steps: init gives 0, each step adds 1.
  programs = SimpleNamespace(warmup=lambda key, cfg: (lambda key: SimpleNamespace(params=0), None,
                                                      step_fn))
  engine = SimpleNamespace(config=SimpleNamespace(hf_checkpoint="", sft=sft, seed=0), key=None,
                           task=task, tok=CharTokenizer(), prompt_slots=prompt_slots,
                           response_slots=response_slots, seq_sharding=None, programs=programs)
  rows, calls = [], []
  params = loop.Engine.warmup(engine, on_metrics=rows.append,
                              on_progress=lambda *a: calls.append(a))
  assert params == 60
  assert rows == [{"phase": "sft", "step": s, "loss": float(s)} for s in (25, 50, 60)]
  assert calls == [(25, 60, None), (50, 60, 2.0), (60, 60, 2.0)]


def test_rewards_read_the_first_id_beyond_the_vocabulary_and_a_pad_that_stops_as_such():
  """The boundary ids of Engine.rewards: id vocab_size (the first the tokenizer lacks) makes the
  answer malformed like any larger one (it crashed decode when only ids above it were caught);
  and with a tokenizer whose PAD is also its stop id (a Hugging Face pad = EOS), that id still
  ends the response: '4 6 PAD=EOS' is the answer '46' (masking it as a non-text id made every
  well-formed answer malformed)."""
  task, problem = Arithmetic(), Problem("40+6=", "46", "46", (40, "+", 6, 46), "arithmetic")
  tok = CharTokenizer()
  four, six = tok.encode("4")[0], tok.encode("6")[0]
  engine = SimpleNamespace(tok=tok, task=task, prompt_slots=1)
  rows = [[four, six, tok.eos_id, tok.pad_id], [four, tok.vocab_size, six, tok.eos_id],
          [four, six, tok.vocab_size, tok.eos_id]]
  tokens_BS = np.array([[tok.bos_id] + row for row in rows])
  got = loop.Engine.rewards(engine, [problem] * len(rows), tokens_BS)
  np.testing.assert_array_equal(got, [1.0, 0.0, 0.0])
  pad_stops = CharTokenizer()
  pad_stops.pad_id = pad_stops.eos_id
  engine = SimpleNamespace(tok=pad_stops, task=task, prompt_slots=1)
  tokens_BS = np.array([[tok.bos_id, four, six, tok.eos_id, tok.eos_id]])
  np.testing.assert_array_equal(loop.Engine.rewards(engine, [problem], tokens_BS), [1.0])
