"""Bad input fails early with a ValueError (or an absl usage error) naming the field and what is
allowed.

One test per row of issue 9 (Reliability, item 4). Each checks the message, not
only the exception type: "ValueError somewhere in XLA" is what these guard against.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pr2_jax as p2
from pr2_jax.models import experts as ex
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import data
from pr2_jax.rl.char_tokenizer import CharTokenizer
from pr2_jax.rl.config import ExperimentConfig, PR2Config, RLConfig, SFTConfig
from pr2_jax.rl.tasks import Problem, make_task
from pr2_jax.train.checkpoint import Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, expert_d_ff=32,
             num_experts=4, top_k=2)


def _weights(num_experts, d=8, f=8):
  return ex.ExpertWeights(jnp.zeros((num_experts, d, f)), jnp.zeros((num_experts, d, f)),
                          jnp.zeros((num_experts, f, d)))


def _cli(*flags):
  """Runs experiments.main with `flags`; returns (exit code, stderr)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "experiments.main", "--config=configs/tiny.py",
                         *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return proc.returncode, proc.stderr


def test_experts_not_divisible_by_the_expert_axis():
  with pytest.raises(ValueError, match=r"ModelConfig.num_experts=6 must be divisible by the "
                                       r"mesh's 'expert' axis size 4"):
    p2.ModelConfig(num_experts=6).validate_mesh(4)
  # The pure function says the same to callers that bypass ModelConfig.
  ids, gates = jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2))
  with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by the "
                                       r"'expert' axis size 4"):
    p2.moe_experts(jnp.zeros((8, 8)), ids, gates, _weights(6), mesh=make_mesh(2, 4))


def test_top_k_above_experts():
  with pytest.raises(ValueError, match=r"ModelConfig.top_k=9 must be <= num_experts=8"):
    p2.ModelConfig(num_experts=8, top_k=9)


def test_batch_not_divisible_by_kappa_times_micro_steps():
  with pytest.raises(ValueError, match=r"prompts_per_step\*group_size=6 must be divisible by "
                                       r"off_policy_k\*micro_steps=2\*2"):
    RLConfig(prompts_per_step=3, group_size=2, off_policy_k=2, micro_steps=2)


def test_micro_batch_not_divisible_by_token_shards():
  rl = RLConfig(prompts_per_step=4, group_size=2, off_policy_k=2, micro_steps=2)  # micro-batch 2
  with pytest.raises(ValueError, match=r"micro-batch size 2 .* must be divisible by "
                                       r"the 8 token shards"):
    rl.validate_mesh(8)


def test_mesh_size_differs_from_device_count():
  with pytest.raises(ValueError, match=r"mesh data=2 x expert=3 = 6 devices, but 8 are available"):
    make_mesh(2, 3)


def test_capacity_below_one():
  ids, gates = jnp.zeros((8, 2), jnp.int32), jnp.ones((8, 2))
  with pytest.raises(ValueError, match=r"capacity=0 must be >= 1"):
    p2.moe_experts(jnp.zeros((8, 8)), ids, gates, _weights(4), capacity=0)
  with pytest.raises(ValueError, match=r"ModelConfig.capacity_factor=-1.0 must be >= 0 "
                                       r"\(0 = dropless\)"):
    p2.ModelConfig(capacity_factor=-1.0)


def test_unknown_replay_mode():
  with pytest.raises(ValueError, match=r"RLConfig.replay_mode='r4' must be one of "
                                       r"\('none', 'r2', 'r3', 'pr2', 'pr2_r2'\)"):
    RLConfig(replay_mode="r4")


def test_unknown_loss():
  with pytest.raises(ValueError, match=r"RLConfig.loss='ppo' must be one of \('dapo', 'gspo'\)"):
    RLConfig(loss="ppo")


def test_unknown_pr2_loss_or_feature_rule():
  with pytest.raises(ValueError, match=r"PR2Config.loss='kl' must be one of "
                                       r"\('post', 'delta', 'l2'\)"):
    PR2Config(loss="kl")
  with pytest.raises(ValueError, match=r"PR2Config.feature_rule='all' must be one of "
                                       r"\('random', 'response'\)"):
    PR2Config(feature_rule="all")


def test_unknown_task_name_fails_before_compiling():
  with pytest.raises(ValueError, match=r"unknown task 'sudoku'; allowed: "
                                       r"\['arithmetic', 'countdown'\]"):
    make_task("sudoku")
  with pytest.raises(ValueError, match=r"unknown task 'sudoku'"):  # with the config, no model
    ExperimentConfig(model=p2.ModelConfig(**SMALL),
                     rl=RLConfig(prompts_per_step=4, group_size=2, eval_size=8),
                     sft=SFTConfig(), task="sudoku")


@pytest.mark.parametrize("flag, message", [
    ("--config.seed=-1", "bad config: ExperimentConfig.seed must be an int >= 0, got -1"),
    ("--config.model.vocab_size=16", "ModelConfig.vocab_size=16 is below the tokenizer's 24 ids"),
    ("--config.init_from=/nonexistent/dir", "init_from='/nonexistent/dir' holds no checkpoint"),
])
def test_cli_setup_errors_are_one_line_and_exit_code_2(flag, message, tmp_path):
  """Found before training (config, task, tokenizer, workdir): an `error:` line, no traceback."""
  code, err = _cli(f"--workdir={tmp_path}", flag)
  last = err.strip().splitlines()[-1]  # after the log's mesh line, when the engine found it
  assert code == 2 and last.startswith(f"error: {message}") and "Traceback" not in err, err


ROUTE_DIMS = dict(batch=2, length=3, num_layers=2, top_k=2, num_experts=4)


@pytest.mark.parametrize("routes, message", [
    (np.zeros((2, 3, 2, 3), np.int32),
     r"shape \(2, 3, 2, 3\), expected \[B, T, L, K\] = \(2, 3, 2, 2\)"),
    (np.zeros((2, 3, 2, 2), np.float64), r"dtype float64, expected int32 or another integer"),
    (np.full((2, 3, 2, 2), 4, np.int32), r"expert id 4 >= num_experts=4"),
    (np.full((2, 3, 2, 2), -2, np.int32),
     r"value -2 < -1; -1 \(live router\) is the only negative"),
    (np.tile(np.array([0, -1], np.int32), (2, 3, 2, 1)), r"mixes -1 and expert ids"),
    (np.ones((2, 3, 2, 2), np.int32), r"repeats an expert: \[1, 1\]"),
])
def test_routes_of_wrong_shape_dtype_or_range(routes, message):
  with pytest.raises(ValueError, match=message):
    p2.validate_routes(routes, **ROUTE_DIMS)


def test_token_ids_outside_the_vocabulary():
  cfg = p2.ModelConfig(**SMALL)
  model = p2.MoETransformer(cfg)
  good = jnp.array([[1, 5, 23, 0]], jnp.int32)
  params = model.init(jax.random.key(0), good)["params"]
  # Without the check the embedding lookup gives NaN for 24 and wraps -3: no error at all.
  for bad_id in (24, -3):
    with pytest.raises(ValueError, match=rf"token id {bad_id} at index \(0, 2\) is outside the "
                                         r"vocabulary \[0, ModelConfig.vocab_size=24\)"):
      model.apply({"params": params}, good.at[0, 2].set(bad_id))
  with pytest.raises(ValueError, match=r"dtype float32, expected an integer dtype"):
    p2.validate_tokens(np.zeros((1, 2), np.float32), 24)


def test_prompts_longer_than_the_maximum_length():
  # RL prompts: a task whose prompt exceeds its declared max_prompt_len (the prompt slots).
  tok, long = CharTokenizer(), Problem(prompt="1+2+3+4+5=", answer="15", solution="15", meta=())
  with pytest.raises(ValueError, match=r"is 11 tokens long \(with BOS\), more than length=8"):
    data.encode_prompts(tok, [long], prompt_slots=8)
  # Decoding: more tokens than the KV cache holds would be clipped silently by the cache write.
  cfg = p2.ModelConfig(**SMALL)
  model = p2.MoETransformer(cfg)
  tokens = jnp.ones((1, 6), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  cache = p2.init_cache(cfg, 1, 4)
  with pytest.raises(ValueError, match=r"6 tokens do not fit the KV cache of max_len=4"):
    model.apply({"params": params}, tokens, positions=jnp.arange(6)[None], cache=cache)


def test_checkpoint_of_a_different_model_config(tmp_path):
  small, wide = p2.ModelConfig(**SMALL), p2.ModelConfig(**{**SMALL, "d_model": 64})
  meta = lambda c: {"model": {"d_model": c.d_model, "num_experts": c.num_experts}}
  state = {"x": jnp.arange(4.0)}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, meta(small))
    ck.wait()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(ValueError, match=r"written with another setup than this run: "
                                         r"model\.d_model: checkpoint 32, this run 64 \("):
      ck.restore_newest_good(abstract, meta(wide))


def test_cli_bad_config_value_names_field_and_choices(tmp_path):
  code, err = _cli(f"--workdir={tmp_path}", "--config.rl.replay_mode=bogus")
  assert code != 0
  assert "RLConfig.replay_mode='bogus' must be one of ('none', 'r2', 'r3', 'pr2', 'pr2_r2')" in err
  assert not os.path.exists(tmp_path / "metrics.jsonl"), "failed before writing anything"


def test_cli_unknown_config_key(tmp_path):
  # ml_collections refuses the key while parsing flags; its near-miss hint is kept, in one line.
  code, err = _cli(f"--workdir={tmp_path}", "--config.rl.replay_mod=r2")
  assert code == 2 and "Traceback" not in err, err
  assert err.strip() == ("error: unknown config key 'replay_mod' Did you mean \"replay_mode\" "
                         "instead of \"replay_mod\"? (in --config.rl.replay_mod=r2)")


def test_cli_unknown_config_key_without_config_flag(tmp_path):
  # Without --config, ml_collections applies the overrides where the flag is defined (import).
  proc = subprocess.run([sys.executable, "-m", "experiments.main", f"--workdir={tmp_path}",
                         "--config.rl.replay_mod=r2"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith("error: unknown config key 'replay_mod' "
                                                         "Did you mean"), proc.stderr


def test_cli_config_file_that_does_not_load(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.main", f"--workdir={tmp_path}",
                         "--config=configs/nope.py"], cwd=REPO, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
  code, err = proc.returncode, proc.stderr
  assert code == 2 and "Traceback" not in err, err
  assert err.startswith("error: bad --config: ") and "configs/nope.py" in err
  assert len(err.strip().splitlines()) == 1


def test_bad_balancing_fields_name_the_field():
  with pytest.raises(ValueError, match=r"RLConfig.balance_mode='eplb' must be one of "
                                       r"\('none', 'eplb_step', 'foresight'\)"):
    RLConfig(balance_mode="eplb")
  with pytest.raises(ValueError, match=r"RLConfig.eplb_ema=1.5 must be in \[0, 1\)"):
    RLConfig(eplb_ema=1.5)
  with pytest.raises(ValueError, match=r"RLConfig.capacity_buckets must be a positive int, got 0"):
    RLConfig(capacity_buckets=0)
  # Every other int field took numpy ints; this one alone refused them.
  assert RLConfig(capacity_mode="bucket", capacity_buckets=np.int64(4)).capacity_buckets == 4
