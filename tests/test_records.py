"""The workdir's metrics rows and the identities checkpoints record."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from pr2_jax.config import ModelConfig
from pr2_jax.rl import records
from pr2_jax.rl.config import ExperimentConfig, RLConfig, SetupError, SFTConfig
from pr2_jax.train.checkpoint import Checkpointer, SetupMismatchError


def _config(**rl) -> ExperimentConfig:
  model = ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, num_experts=4, top_k=2, expert_d_ff=32, dense_d_ff=32)
  return ExperimentConfig(model=model, rl=RLConfig(prompts_per_step=4, group_size=2, **rl),
                          sft=SFTConfig(num_steps=3, batch_size=8))


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_torn_last_metrics_line_is_dropped(tmp_path):
  """A kill mid-write leaves half a JSON line: resume drops it; a torn middle line is an error."""
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"phase": "rl", "step": 1}\n{"phase": "rl", "st')
  assert records.read_metrics_rows(str(path)) == [{"phase": "rl", "step": 1}]
  path.write_text('{"phase": "rl", "st\n{"phase": "rl", "step": 1}\n')
  # A SetupError: the entry points print it as one error line (it was a traceback).
  with pytest.raises(SetupError, match=rf"{path} line 1 is not a JSON row \(.*\); repair or "):
    records.read_metrics_rows(str(path))
  assert records.read_metrics_rows(str(tmp_path / "missing.jsonl")) == []


def test_truncate_keeps_other_phases_and_earlier_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [{"phase": "sft", "step": 25}, {"phase": "sft_eval", "step": 0},
          {"phase": "rl", "step": 1}, {"phase": "rl", "step": 2}, {"phase": "rl", "step": 3}]
  _write(path, rows)
  records.truncate_metrics(str(path), 1)
  assert records.read_metrics_rows(str(path)) == rows[:3]
  assert records.has_rl_rows(str(path))
  records.truncate_metrics(str(path), -1, phases=("rl", "sft_eval"))
  assert records.read_metrics_rows(str(path)) == rows[:1]
  assert not records.has_rl_rows(str(path))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no tmp file left


def test_resumable_fields_leave_the_identity_and_the_rest_enter_it():
  base = _config()
  longer = _config(num_steps=base.rl.num_steps + 5, eval_every=7, eval_size=3, logits_chunk=64)
  assert records.run_identity(longer) == records.run_identity(base)
  assert records.run_identity(_config(learning_rate=0.5))["rl"]["learning_rate"] == 0.5
  assert records.run_identity(_config(learning_rate=0.5)) != records.run_identity(base)
  other_seed = dataclasses.replace(base, seed=3)
  assert records.run_identity(other_seed)["seed"] == 3
  # The warm-up identity ignores RL settings but not the warm-up's own.
  assert records.warmup_identity(_config(learning_rate=0.5)) == records.warmup_identity(base)
  longer_sft = dataclasses.replace(base, sft=SFTConfig(num_steps=4, batch_size=8))
  assert records.warmup_identity(longer_sft) != records.warmup_identity(base)
  assert sorted(records.warmup_identity(base)) == ["hf_checkpoint", "model", "seed", "sft", "task",
                                                   "task_kwargs"]
  # A warm-up from a checkpoint's weights is not one from random weights of the same model.
  from_hf = dataclasses.replace(base, hf_checkpoint="/ckpt/qwen3")
  assert records.warmup_identity(from_hf)["hf_checkpoint"] == "/ckpt/qwen3"
  assert records.warmup_identity(from_hf) != records.warmup_identity(base)


def test_a_resume_ignores_pr2_settings_only_without_a_predictor():
  r3, pr2 = _config(replay_mode="r3"), _config(replay_mode="pr2")
  assert "pr2" not in records.resume_identity(r3)  # dead settings there: free to change
  assert records.resume_identity(pr2)["pr2"] == records.run_identity(pr2)["pr2"]
  assert records.resume_identity(pr2)["pr2"]["adam_eps"] == 1e-3
  assert set(records.run_identity(r3)) - set(records.resume_identity(r3)) == {"pr2"}
  assert records.resume_identity(pr2) == records.run_identity(pr2)
  # pr2_r2 trains the predictor too (it predicts in the old pass): its settings are compared.
  pr2_r2 = _config(replay_mode="pr2_r2")
  assert records.resume_identity(pr2_r2) == records.run_identity(pr2_r2)
  assert "pr2" in records.resume_identity(pr2_r2)


def test_a_resume_names_another_replay_mode_once(tmp_path):
  # Runs from before 2026-12-07 recorded the mode twice (top level and under rl); the refusal
  # named both. Such a checkpoint (the extra copy added back here) is refused naming it once.
  recorded = {**records.run_identity(_config(replay_mode="r3")), "replay_mode": "r3"}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, {"x": jnp.zeros(2)}, recorded)
    ck.wait()
  with Checkpointer(str(tmp_path)) as ck, pytest.raises(SetupMismatchError) as err:
    ck.restore_newest_good({"x": jax.ShapeDtypeStruct((2,), jnp.float32)},
                           records.resume_identity(_config(replay_mode="r2")))
  assert str(err.value).count("replay_mode") == 1
  assert "rl.replay_mode: checkpoint 'r3', this run 'r2' (" in str(err.value)
  with Checkpointer(str(tmp_path)) as ck:  # and resumed by the same mode, the copy ignored
    step, *_ = ck.restore_newest_good({"x": jax.ShapeDtypeStruct((2,), jnp.float32)},
                                      records.resume_identity(_config(replay_mode="r3")))
  assert step == 1


def test_a_run_from_before_the_legacy_fields_resumes_with_their_old_values(tmp_path):
  """LEGACY_IDENTITY's paths are the identity's own: a PR2 run recorded before pr2.adam_eps and
  rl.trainable existed resumes at ε 1e-8 with every parameter trained, and is refused otherwise
  naming the field."""
  old = _config(replay_mode="pr2")
  recorded = records.run_identity(old)
  del recorded["pr2"]["adam_eps"], recorded["rl"]["trainable"]
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, {"x": jnp.zeros(2)}, recorded)
    ck.wait()
  abstract = {"x": jax.ShapeDtypeStruct((2,), jnp.float32)}
  as_before = dataclasses.replace(old, pr2=dataclasses.replace(old.pr2, adam_eps=1e-8))
  with Checkpointer(str(tmp_path)) as ck:
    step, *_ = ck.restore_newest_good(abstract, records.resume_identity(as_before),
                                      legacy_meta=records.LEGACY_IDENTITY)
    assert step == 1
    routers = dataclasses.replace(as_before, rl=dataclasses.replace(old.rl, trainable="routers"))
    with pytest.raises(SetupMismatchError, match=r"rl.trainable: checkpoint 'all', this run "
                                                 r"'routers' \("):
      ck.restore_newest_good(abstract, records.resume_identity(routers),
                             legacy_meta=records.LEGACY_IDENTITY)


def test_holds_checkpoint_needs_a_numbered_step_directory(tmp_path):
  assert not records.holds_checkpoint(str(tmp_path / "missing"))
  assert not records.holds_checkpoint(str(tmp_path))
  (tmp_path / "3.orbax-checkpoint-tmp-1").mkdir()  # an unfinished save
  (tmp_path / "7").write_text("")                   # a file, not a step
  assert not records.holds_checkpoint(str(tmp_path))
  (tmp_path / "12").mkdir()
  assert records.holds_checkpoint(str(tmp_path))


def test_a_workdir_holds_one_run_at_a_time(tmp_path):
  """Two runs in one workdir interleaved their metrics rows and wrote the same checkpoints; the
  second now fails naming the first's pid, and the lock goes when the holder does (a process
  that dies holding it leaves no stale lock). The lock file holds the holder's pid alone, also
  over a longer pid an earlier run left there."""
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, records.LOCK_FILE), "w") as f:
    f.write("9" * 40 + "\n")
  with records.workdir_lock(workdir):
    assert open(os.path.join(workdir, records.LOCK_FILE)).read() == f"{os.getpid()}\n"
    with pytest.raises(SetupError, match=rf"workdir '{workdir}' is in use by another run "
                                         rf"\(pid {os.getpid()}\): wait for it"):
      with records.workdir_lock(workdir):
        pass
  with records.workdir_lock(workdir):  # released on exit, also by an exception:
    pass
  with pytest.raises(KeyError), records.workdir_lock(workdir):
    raise KeyError("interrupted")
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from pr2_jax.rl import records\n"
      f"with records.workdir_lock({workdir!r}):\n  print('held', flush=True); time.sleep(60)")],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "held\n"
    with pytest.raises(SetupError, match=rf"\(pid {holder.pid}\)"):
      with records.workdir_lock(workdir):
        pass
  finally:
    holder.kill()
    holder.wait()
  with records.workdir_lock(workdir):  # killed while holding it: free again
    pass


def test_fields_that_change_what_a_step_computes_enter_the_identity():
  """A resume may change only how long a run goes, how it is evaluated and the logits' chunking;
  the replay mode, the batch split (κ, M), sampling, clipping and balancing change what a step
  computes, so a checkpoint written with another value must not be taken up (each one here
  changes the identity)."""
  base = records.run_identity(_config())
  changed = dict(replay_mode="r2", off_policy_k=1, micro_steps=1, temperature=0.5,
                 top_p=0.9, clip_low=0.1, rollout_dtype="float32", balance_mode="eplb_step")
  for field, value in changed.items():
    identity = records.run_identity(_config(**{field: value}))
    assert identity["rl"][field] == value and identity != base, field
