"""Tests for pr2_jax.rl.start: where the warm-up checkpoint is, and a fresh start then a resume
(the loop's end-to-end resume tests are in tests/test_loop.py)."""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

from pr2_jax.config import ModelConfig
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import balancing, loop, records, start
from pr2_jax.rl.config import ExperimentConfig, RLConfig, SetupError, SFTConfig
from pr2_jax.train.checkpoint import Checkpointer, SetupMismatchError


def _config(**kw):
  model = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      expert_d_ff=32, num_experts=4, top_k=2)
  rl = RLConfig(num_steps=2, prompts_per_step=8, group_size=2, off_policy_k=2, micro_steps=2,
                max_new_tokens=6, eval_every=0, eval_size=16)
  return ExperimentConfig(model=model, rl=rl, sft=SFTConfig(num_steps=4, batch_size=8),
                          task="countdown", **kw)


def test_warmup_dir_is_init_from_or_the_workdirs_unless_none_is_kept():
  sft = os.path.join("/w", "checkpoints", "sft")
  assert start.warmup_dir(_config(), "/w") == sft
  assert start.warmup_dir(_config(init_from="/other/sft"), "/w") == "/other/sft"
  hf = _config(hf_checkpoint="/ckpt")
  assert start.warmup_dir(hf, "/w") == sft  # SFT from the checkpoint's weights: saved
  no_sft = dataclasses.replace(hf, sft=SFTConfig(num_steps=0, batch_size=8))
  assert start.warmup_dir(no_sft, "/w") is None  # RL starts from the checkpoint's own weights
  assert start.warmup_dir(dataclasses.replace(no_sft, init_from="/other/sft"), "/w") == (
      "/other/sft")
  # Without a checkpoint, a warm-up of 0 steps (the random init) is saved all the same.
  assert start.warmup_dir(dataclasses.replace(_config(), sft=no_sft.sft), "/w") == sft


def test_a_fresh_start_saves_step_0_and_a_second_call_resumes_it(tmp_path):
  engine = loop.Engine(_config(), make_mesh(1, 1, devices=jax.devices()[:1]))
  engine.warmup = lambda *args: engine.state.params  # the warm-up's own tests run it
  engine.evaluate = lambda params: 0.25
  rows, messages = [], []
  with Checkpointer(str(tmp_path / "checkpoints" / "rl")) as ck:
    fresh = start.start_or_resume(engine, ck, str(tmp_path), emit=rows.append,
                                  warn=messages.append, info=messages.append)
    ck.wait()
    meta = ck.restore_meta(0)
  assert (fresh.step, fresh.consecutive_skips, fresh.resumed_from,
          fresh.warmup_eval_reward) == (0, 0, None, 0.25)
  assert rows == [{"phase": "sft_eval", "step": 0, "eval_reward": 0.25}]
  assert messages == ["warm-up: 4 supervised steps (the first compiles)"]
  assert (meta["rl_step"], meta["consecutive_skips"], meta["mesh"]) == (0, 0, {"data": 1,
                                                                                "expert": 1})
  assert os.listdir(tmp_path / "checkpoints" / "sft") == ["4"]  # saved at its last step
  rows.clear(), messages.clear()
  with Checkpointer(str(tmp_path / "checkpoints" / "rl")) as ck:
    resumed = start.start_or_resume(engine, ck, str(tmp_path), emit=rows.append,
                                    warn=messages.append, info=messages.append)
  assert (resumed.step, resumed.resumed_from, resumed.warmup_eval_reward) == (0, 0, None)
  assert rows == [] and messages == [f"resuming from the RL checkpoint of step 0 in "
                                     f"{tmp_path / 'checkpoints' / 'rl'}; metrics rows after "
                                     "step 0 are rewritten"]
  # Another run given this one's RL checkpoints as its warm-up: named, not "unreadable".
  other = loop.Engine(_config(init_from=str(tmp_path / "checkpoints" / "rl")), engine.mesh)
  with Checkpointer(str(tmp_path / "other" / "checkpoints" / "rl")) as ck:
    with pytest.raises(SetupError, match=r"init_from='.*/checkpoints/rl' holds RL checkpoints "
                                         r"\(step 0\); init_from takes a warm-up checkpoint"):
      start.start_or_resume(other, ck, str(tmp_path / "other"), emit=print, warn=print,
                            info=print)


def test_a_fresh_start_over_rl_metrics_is_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"phase": "rl", "step": 3}\n')
  engine = loop.Engine(_config(), make_mesh(1, 1, devices=jax.devices()[:1]))
  with Checkpointer(str(tmp_path / "checkpoints" / "rl")) as ck:
    with pytest.raises(SetupError, match=f"^{tmp_path} holds RL metrics from an earlier run but "
                                         "no RL checkpoint to resume"):
      start.start_or_resume(engine, ck, str(tmp_path), emit=print, warn=print, info=print)


def test_a_resume_never_reads_init_from_and_the_rerun_plan_says_what_happens(tmp_path):
  """A run warmed up from another's checkpoint (init_from) resumes after that directory is
  gone: a resume never reads it (it was checked first and refused the resume). The rerun plan
  an interrupted run prints follows what the workdir holds at each stage."""
  shared, work = tmp_path / "shared_sft", str(tmp_path / "work")
  cfg = _config(init_from=str(shared))
  assert start.rerun_plan(cfg, work) == ("no RL checkpoint yet; rerunning the same command "
                                         f"starts the warm-up again ({work})")
  engine = loop.Engine(cfg, make_mesh(1, 1, devices=jax.devices()[:1]))
  engine.evaluate = lambda params: 0.5
  with Checkpointer(str(shared)) as ck:  # another run's warm-up: the model must match
    ck.save(4, engine.state.params, {"model": records.run_identity(cfg)["model"]})
  assert start.rerun_plan(cfg, work) == ("no RL checkpoint yet; rerunning the same command "
                                         f"restores the warm-up from {shared} and starts RL")
  with Checkpointer(start.rl_checkpoint_dir(work)) as ck:
    assert start.start_or_resume(engine, ck, work, emit=print, warn=print,
                                 info=print).resumed_from is None
  shutil.rmtree(shared)
  assert start.rerun_plan(cfg, work) == ("rerun the same command to resume from the newest "
                                         f"checkpoint in {work}")
  with Checkpointer(start.rl_checkpoint_dir(work)) as ck:
    assert start.start_or_resume(engine, ck, work, emit=print, warn=print,
                                 info=print).resumed_from == 0
  no_warmup = dataclasses.replace(_config(hf_checkpoint="/ckpt"),
                                  sft=SFTConfig(num_steps=0, batch_size=8))
  assert start.rerun_plan(no_warmup, str(tmp_path / "hf")) == (
      "no RL checkpoint yet; rerunning the same command starts RL from /ckpt again")


def _write_rows(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _read_rows(path):
  return [(r["phase"], r["step"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_resume_restores_the_skip_count_and_balancer_and_drops_only_later_rl_rows(tmp_path):
  """What a resume takes from the checkpoint besides the state: the skip count (the next skips
  add to it), the balancer's EMA and layout (else a resumed run plans its first step from one
  step's loads, unlike the uninterrupted run), and the rows it rewrites: RL rows after the
  checkpoint's step, not that step's nor the warm-up's. Step 2 of a 2-step run: "already
  complete" (at == num_steps, not only beyond it)."""
  engine = loop.Engine(_config(), make_mesh(1, 1, devices=jax.devices()[:1]))
  saved = balancing.StepState(ema_LE=np.array([[0.25, 1.5, 3.0, 0.125]]),
                              layout_LDS=np.array([[[0, 1], [2, 3]]], np.int32))
  engine.balance_state = saved
  rl_dir = start.rl_checkpoint_dir(str(tmp_path))
  with Checkpointer(rl_dir) as ck:
    start.save_rl_checkpoint(ck, engine, 2, engine.state, 2)
    ck.wait()
  _write_rows(tmp_path / "metrics.jsonl", [
      {"phase": "sft", "step": 4}, {"phase": "sft_eval", "step": 0}, {"phase": "rl", "step": 1},
      {"phase": "rl", "step": 2}, {"phase": "rl", "step": 3}])
  engine.balance_state = balancing.StepState()  # what a new process starts with
  messages = []
  with Checkpointer(rl_dir) as ck:
    resumed = start.start_or_resume(engine, ck, str(tmp_path), emit=print, warn=messages.append,
                                    info=messages.append)
  assert (resumed.step, resumed.consecutive_skips, resumed.resumed_from) == (2, 2, 2)
  assert messages == [f"resuming from the RL checkpoint of step 2 in {rl_dir} (already complete)"]
  np.testing.assert_array_equal(engine.balance_state.ema_LE, saved.ema_LE)
  np.testing.assert_array_equal(engine.balance_state.layout_LDS, saved.layout_LDS)
  assert _read_rows(tmp_path / "metrics.jsonl") == [("sft", 4), ("sft_eval", 0), ("rl", 1),
                                                    ("rl", 2)]


def test_an_allowed_fresh_start_keeps_a_restored_warm_ups_rows_and_checks_its_setup(tmp_path):
  """A fresh start allowed over an earlier run's rows (its RL checkpoints gone) restores the
  warm-up and drops the RL rows and the old `sft_eval` row (the caller appends the new one: two
  step-0 evaluations otherwise), keeping the warm-up's `sft` rows. The warm-up checkpoint records
  the warm-up's whole setup: another SFT learning rate is refused, not silently reused."""
  work = str(tmp_path)
  engine = loop.Engine(_config(), make_mesh(1, 1, devices=jax.devices()[:1]))
  engine.warmup = lambda *args: engine.state.params
  engine.evaluate = lambda params: 0.25
  with Checkpointer(start.rl_checkpoint_dir(work)) as ck:
    start.start_or_resume(engine, ck, work, emit=print, warn=print, info=print)
  shutil.rmtree(start.rl_checkpoint_dir(work))
  _write_rows(tmp_path / "metrics.jsonl", [
      {"phase": "sft", "step": 2}, {"phase": "sft", "step": 4}, {"phase": "sft_eval", "step": 0},
      {"phase": "rl", "step": 1}])
  rows, messages = [], []
  with Checkpointer(start.rl_checkpoint_dir(work)) as ck:
    fresh = start.start_or_resume(engine, ck, work, emit=rows.append, warn=messages.append,
                                  info=messages.append, allow_fresh_start=True)
  assert fresh.resumed_from is None and messages == []  # restored: no "warm-up:" message
  assert rows == [{"phase": "sft_eval", "step": 0, "eval_reward": 0.25}]
  assert _read_rows(tmp_path / "metrics.jsonl") == [("sft", 2), ("sft", 4)]
  shutil.rmtree(start.rl_checkpoint_dir(work))
  cfg = _config()
  other = loop.Engine(dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft,
                                                                       learning_rate=0.5)),
                      engine.mesh)
  with Checkpointer(start.rl_checkpoint_dir(work)) as ck:
    with pytest.raises(SetupMismatchError, match=r"checkpoint step 4 in .*/checkpoints/sft was "
                                                 r"written with another setup than this run: "
                                                 r"sft\.learning_rate: checkpoint "):
      start.start_or_resume(other, ck, work, emit=print, warn=print, info=print)


def test_a_fresh_start_evaluates_and_saves_the_warmed_up_params_not_the_init(tmp_path):
  """The warm-up's params (here the init + 1) are what the `sft_eval` row measures, what RL
  starts from and what both checkpoints hold: a resume of step 0, and a fresh start after the
  RL checkpoints are gone (the warm-up restored), continue from them, not from the init."""
  work, rl_dir = str(tmp_path), start.rl_checkpoint_dir(str(tmp_path))
  engine = loop.Engine(_config(), make_mesh(1, 1, devices=jax.devices()[:1]))
  warm = jax.device_get(jax.tree.map(lambda x: x + 1.0, engine.state.params))
  engine.warmup = lambda *args: jax.tree.map(jax.numpy.asarray, warm)
  evaluated = []
  engine.evaluate = lambda params: evaluated.append(jax.device_get(params)) or 0.5
  starts = []
  for _ in range(2):  # fresh, then a resume of step 0
    with Checkpointer(rl_dir) as ck:
      starts.append(start.start_or_resume(engine, ck, work, emit=print, warn=print, info=print))
      ck.wait()
  assert [s.resumed_from for s in starts] == [None, 0]
  shutil.rmtree(rl_dir)
  engine.warmup = None  # restored from the warm-up checkpoint, not run again
  with Checkpointer(rl_dir) as ck:
    starts.append(start.start_or_resume(engine, ck, work, emit=print, warn=print, info=print))
  assert starts[-1].resumed_from is None and len(evaluated) == 2
  for params in evaluated + [s.state.params for s in starts]:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6),
                 params, warm)
