"""Tests for pr2_jax.train.checkpoint: sharded round trip, newest-step bookkeeping."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.train.checkpoint import Checkpointer, abstract_like


def test_round_trip_keeps_values_and_shardings(tmp_path):
  mesh = make_mesh(2, 4)
  shard = NamedSharding(mesh, PartitionSpec("expert"))
  state = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), shard), "step": jnp.int32(3)}
  shardings = {"w": shard, "step": NamedSharding(mesh, PartitionSpec())}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(3, state, {"rl_step": 3})
    ck.save(5, jax.tree.map(lambda x: x + 1, state), {"rl_step": 5})
    ck.wait()
    assert ck.latest_step() == 5 and ck.all_steps() == [3, 5]
    restored, meta = ck.restore(3, abstract_like(state, shardings))
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16.0).reshape(8, 2))
  assert restored["w"].sharding == shard and int(restored["step"]) == 3
  assert meta == {"rl_step": 3}


def test_keeps_only_newest(tmp_path):
  with Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, {"x": jnp.float32(step)}, {})
    ck.wait()
    assert ck.all_steps() == [2, 3]


def test_empty_directory_has_no_step(tmp_path):
  with Checkpointer(str(tmp_path / "none")) as ck:
    assert ck.latest_step() is None
