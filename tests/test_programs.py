"""Tests for pr2_jax.rl.programs: which configs share jitted programs, the LRU, and that a run
on shared programs equals a run on fresh ones."""

import dataclasses

import jax
import numpy as np
import pytest

from pr2_jax.config import ModelConfig
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import loop, programs
from pr2_jax.rl.char_tokenizer import CharTokenizer
from pr2_jax.rl.config import ExperimentConfig, PR2Config, RLConfig, SFTConfig


def _config(seed=0, **rl):
  model = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                      expert_d_ff=32, num_experts=4, top_k=2)
  rl = RLConfig(**{**dict(num_steps=1, prompts_per_step=8, group_size=2, off_policy_k=2,
                          micro_steps=2, max_new_tokens=6, eval_every=0, eval_size=16), **rl})
  return ExperimentConfig(model=model, rl=rl, sft=SFTConfig(num_steps=4, batch_size=8),
                          task="countdown", checkpoint_every=0, seed=seed)


def _rl(cfg, **kw):
  return dataclasses.replace(cfg, rl=dataclasses.replace(cfg.rl, **kw))


MESH = make_mesh(1, 1, devices=jax.devices()[:1])
IDS = dict(eos_id=CharTokenizer().eos_id, pad_id=CharTokenizer().pad_id)  # the loop's tokenizer


def test_program_key_ignores_only_what_no_program_reads():
  base = _config()
  key = programs.program_key(base, MESH)
  same = [dataclasses.replace(base, seed=3), dataclasses.replace(base, checkpoint_every=5),
          dataclasses.replace(base, init_from="/somewhere"),
          _rl(base, num_steps=9), _rl(base, eval_every=4), _rl(base, eval_size=64),
          _rl(base, max_consecutive_skips=2)]
  for cfg in same:
    assert programs.program_key(cfg, MESH) == key, cfg
  other = [_rl(base, temperature=0.5), _rl(base, eval_temperature=0.0), _rl(base, learning_rate=1.0),
           _rl(base, replay_mode="r2"), _rl(base, micro_steps=1),
           dataclasses.replace(base, model=base.model.replace(d_model=64)),
           dataclasses.replace(base, sft=SFTConfig(num_steps=5, batch_size=8)),
           dataclasses.replace(base, pr2=PR2Config(lr_mult=2.0)),
           dataclasses.replace(base, task_kwargs={"num_numbers": 2})]
  for cfg in other:
    assert programs.program_key(cfg, MESH) != key, cfg
  assert programs.program_key(base, make_mesh(1, 2, devices=jax.devices()[:2])) != key


def test_programs_for_keeps_the_last_two():
  programs.clear()
  a, b, c = (_config(**{"learning_rate": lr}) for lr in (1e-3, 2e-3, 3e-3))
  first = programs.programs_for(a, MESH, **IDS)
  assert programs.programs_for(dataclasses.replace(a, seed=7), MESH, **IDS) is first
  second = programs.programs_for(b, MESH, **IDS)
  assert programs.programs_for(a, MESH, **IDS) is first  # now the most recently used
  programs.programs_for(c, MESH, **IDS)  # evicts b, the least recently used
  assert programs.programs_for(a, MESH, **IDS) is first
  assert programs.programs_for(b, MESH, **IDS) is not second
  programs.clear()
  assert programs.programs_for(a, MESH, **IDS) is not first


@pytest.mark.slow
def test_a_second_seed_traces_nothing_and_matches_fresh_programs(tmp_path):
  """Seed 1 after seed 0 in one process runs seed 0's traced programs (one trace each) and ends
  exactly where seed 1 on fresh programs does: no program may close over the seed."""
  programs.clear()
  loop.run(_config(seed=0), MESH, str(tmp_path / "seed0"))
  shared = loop.run(_config(seed=1), MESH, str(tmp_path / "seed1"))
  kept = programs.programs_for(_config(), MESH, **IDS)
  assert kept.sample._cache_size() == 1
  _, update_fn = kept.learner_fns(None, lambda: None)
  assert update_fn.jitted._cache_size() == 1
  programs.clear()
  fresh = loop.run(_config(seed=1), MESH, str(tmp_path / "seed1_fresh"))
  assert programs.programs_for(_config(), MESH, **IDS) is not kept
  assert shared["final"]["reward_mean"] == fresh["final"]["reward_mean"]
  for a, b in zip(jax.tree.leaves(shared["state"]), jax.tree.leaves(fresh["state"]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  seed0 = loop.run(_config(seed=0), MESH, str(tmp_path / "seed0"))  # resumes: nothing to do
  assert not np.array_equal(np.asarray(jax.tree.leaves(seed0["state"].params)[0]),
                            np.asarray(jax.tree.leaves(fresh["state"].params)[0]))
