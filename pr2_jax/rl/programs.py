"""The jitted functions of an experiment, shared by every Engine that runs the same programs.

An `Engine` (pr2_jax.rl.loop) jits a sampler, the learner's two phases, the
warm-up step and the state init. Tracing and lowering them takes about 10 s a
run on the tiny config even when XLA's persistent cache holds the executables,
and a sweep in one process (seeds, a warm-up and the runs that start from it, a
run resumed in place) builds many Engines whose programs are identical. Engines
whose configs differ only in what no program reads (`program_key`: the seed, the
RL step count, evaluation cadence and size, checkpointing, init_from, and the PR2
settings of a mode without the predictor) get the same `Programs`, so only the
first of them traces. The warm-up's settings (`SFTConfig`, its step count among
them: the learning-rate schedule spans it) are left out too: a Programs rebuilds
only its warm-up step when they change.

The last `KEEP` Programs stay alive (with their executables); `clear()` drops them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
from typing import Callable

import jax
from jax.sharding import Mesh

from pr2_jax.models.transformer import MoETransformer
from pr2_jax.rl import learner
from pr2_jax.rl.config import ExperimentConfig, PR2Config, SFTConfig
from pr2_jax.rl.sampler import SamplerConfig, generate
from pr2_jax.train import supervised
from pr2_jax.train.state import (make_optimizer, predictor_initializer, state_initializer,
                                 train_only)

# RLConfig fields only the host loop reads: runs that differ in them run the same programs.
HOST_ONLY_RL_FIELDS = ("num_steps", "eval_every", "eval_size", "max_consecutive_skips")
KEEP = 2
_CACHE: collections.OrderedDict = collections.OrderedDict()


def program_key(config: ExperimentConfig, mesh: Mesh) -> tuple:
  """What the RL programs depend on: everything but the seed, `HOST_ONLY_RL_FIELDS`, the
  warm-up's settings (`Programs.warmup` is keyed on them), checkpointing, init_from (data,
  not programs), and `config.pr2` when the replay mode runs no predictor."""
  rl = tuple((f.name, getattr(config.rl, f.name)) for f in dataclasses.fields(config.rl)
             if f.name not in HOST_ONLY_RL_FIELDS)
  return (config.model, rl, _pr2_settings(config), config.task,
          json.dumps(dict(config.task_kwargs), sort_keys=True), config.hf_checkpoint, mesh)


def _pr2_settings(config: ExperimentConfig) -> PR2Config:
  """`config.pr2`, or the defaults in a mode that never reads it (so no program can differ)."""
  return config.pr2 if config.rl.phases.uses_predictor else PR2Config()


def warmup_optimizer(sft: SFTConfig):
  """The warm-up's AdamW: linear warm-up over `sft.warmup_steps`, then a cosine decay to 10 %
  at `sft.num_steps` (so the step count is part of the warm-up's identity)."""
  return make_optimizer(sft.learning_rate, warmup_steps=sft.warmup_steps,
                        total_steps=sft.num_steps)


class Programs:
  """One experiment's models, optimizers and jitted functions; the learner's and warm-up's
  are built on first use (a run may have no warm-up, an evaluation-only run no learner)."""

  def __init__(self, config: ExperimentConfig, mesh: Mesh, eos_id: int | tuple[int, ...],
               pad_id: int):
    rl, pr2 = config.rl, _pr2_settings(config)
    self.mesh = mesh  # not the config: its seed etc. are not ours
    self.model = MoETransformer(config.model, mesh)  # the training engine: model.dtype
    # The rollout engine is dropless whatever the learner's capacity_factor, as inference
    # engines are: a decode step's capacity from B tokens dropped pairs every step, unreported.
    rollout_model = MoETransformer(
        config.model.replace(dtype=rl.rollout_dtype, capacity_factor=0.0), mesh)
    sampling = SamplerConfig(rl.max_new_tokens, rl.temperature, rl.top_p, eos_id, pad_id,
                             pr2.predicted_gates, pr2.feature_dtype)
    self.sampling = sampling  # the rollout's SamplerConfig
    evaluation = dataclasses.replace(sampling, temperature=rl.eval_temperature)
    self.sample = jax.jit(functools.partial(generate, rollout_model, config=sampling))
    # Evaluating at the rollout's temperature reuses its sampler, so an eval batch of the
    # rollout's shape (tiny.py's) reuses its compiled program as well.
    self.eval_sample = self.sample if evaluation == sampling else jax.jit(
        functools.partial(generate, rollout_model, config=evaluation))
    self.tx = make_optimizer(rl.learning_rate, weight_decay=rl.weight_decay,
                             grad_clip=rl.grad_clip)
    if rl.trainable in learner.TRAINED_PARAMS:
      self.tx = train_only(self.tx, learner.TRAINED_PARAMS[rl.trainable])
    self.pred_tx = (make_optimizer(rl.learning_rate * pr2.lr_mult, grad_clip=rl.grad_clip,
                                   eps=pr2.adam_eps)
                    if rl.phases.uses_predictor else None)
    self.learner = learner.Learner(self.model, rl, self.tx, pr2, self.pred_tx)
    self.pred_init = (predictor_initializer(config.model, self.pred_tx, mesh)
                      if self.pred_tx else None)
    self._state_init = self._warmup = self._learner_fns = None

  def init_state(self, key: jax.Array):
    """(RL train state from `key`, its shardings); traced once per Programs."""
    if self._state_init is None:
      self._state_init = state_initializer(self.model, self.tx, self.mesh, key)
    init, shardings = self._state_init
    return init(key), shardings

  def warmup(self, key: jax.Array, sft: SFTConfig):
    """(init, shardings, step) of the supervised warm-up of `sft`: its own optimizer and
    schedule. Kept for the last `sft` asked for (another one builds them again)."""
    if self._warmup is None or self._warmup[0] != sft:
      tx = warmup_optimizer(sft)
      init, shardings = state_initializer(self.model, tx, self.mesh, key)
      step = supervised.make_train_step(self.model, tx, self.mesh, shardings,
                                        batch_keys=("tokens", "valid", "positions", "loss_mask"))
      self._warmup = sft, (init, shardings, step)
    return self._warmup[1]

  def learner_fns(self, state_shardings, example_batch: Callable[[], dict]):
    """`learner.make_learner_fns` for this experiment's batches, built on the first call
    (`example_batch()` gives a mini-batch with the update's keys)."""
    if self._learner_fns is None:
      self._learner_fns = learner.make_learner_fns(self.learner, self.mesh, state_shardings,
                                                   example_batch())
    return self._learner_fns


def programs_for(config: ExperimentConfig, mesh: Mesh, eos_id: int | tuple[int, ...],
                 pad_id: int) -> Programs:
  """The Programs of `program_key(config, mesh)`: a kept one, or a new one (dropping the
  least recently used beyond KEEP). The tokenizer's ids follow from the key's task and
  checkpoint."""
  key = (program_key(config, mesh), eos_id, pad_id)
  if key in _CACHE:
    _CACHE.move_to_end(key)
  else:
    _CACHE[key] = Programs(config, mesh, eos_id, pad_id)
    while len(_CACHE) > KEEP:
      _CACHE.popitem(last=False)
  return _CACHE[key]


def clear() -> None:
  """Drops the kept Programs (and so, once unreferenced, their executables)."""
  _CACHE.clear()
