"""The ring shuffle against numpy's x[order], and what it compiles to."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pr2_jax.parallel import distributed
from pr2_jax.parallel.mesh import TOKEN_AXES, make_mesh
from pr2_jax.parallel.shuffle import shuffle_into_chunks
from pr2_jax.rl import data

# Ahead-of-time lowering: the public function checks concrete row ids on the host, then jits.
_jitted = jax.jit(shuffle_into_chunks, static_argnames=("num_chunks", "mesh"))


def _batch(rng, rows=32):
  return {"routes": rng.integers(0, 9, (rows, 6, 2, 2)).astype(np.int32),
          "adv": rng.normal(size=rows).astype(np.float32),
          "valid": rng.random((rows, 6)) > 0.5}


@pytest.mark.parametrize("data_axis, expert_axis", [(1, 1), (2, 4), (8, 1), (1, 8), (2, 2)])
@pytest.mark.parametrize("num_chunks", [1, 4])
def test_equals_the_host_split_on_every_mesh(data_axis, expert_axis, num_chunks):
  rng = np.random.default_rng(data_axis * 10 + expert_axis + num_chunks)
  mesh = make_mesh(data_axis, expert_axis, devices=jax.devices()[:data_axis * expert_axis])
  batch, order = _batch(rng), rng.permutation(32)
  placed = distributed.to_global(batch, NamedSharding(mesh, P(TOKEN_AXES)))
  out = shuffle_into_chunks(placed, order, num_chunks=num_chunks, mesh=mesh)
  expected = data.split_micro(batch, num_chunks, order)  # the oracle: numpy's x[order]
  for key in batch:
    np.testing.assert_array_equal(np.asarray(out[key]), expected[key])
    assert out[key].dtype == batch[key].dtype
    assert out[key].sharding.is_equivalent_to(
        NamedSharding(mesh, P(None, TOKEN_AXES)), out[key].ndim)


def test_repeated_row_ids_are_taken_like_numpy():
  """Any row ids work, not only permutations (a row may land on every shard)."""
  mesh = make_mesh(2, 4)
  batch = _batch(np.random.default_rng(1), rows=16)
  order = np.array([5] * 8 + [15, 0, 7, 8, 3, 3, 12, 1])
  out = shuffle_into_chunks(distributed.to_global(batch, NamedSharding(mesh, P(TOKEN_AXES))),
                            order, num_chunks=2, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out["routes"]), batch["routes"][order].reshape(
      (2, 8) + batch["routes"].shape[1:]))


def test_compiles_to_a_ring_of_permutes_not_a_whole_batch_collective():
  """x[order] left to the partitioner all-reduces the whole [B, ...] result on every device;
  the ring moves one shard's rows at a time: one loop for all leaves, a ppermute per leaf."""
  mesh = make_mesh(2, 4)
  rng = np.random.default_rng(2)
  placed = distributed.to_global(_batch(rng), NamedSharding(mesh, P(TOKEN_AXES)))
  text = _jitted.lower(placed, rng.permutation(32), num_chunks=4, mesh=mesh).compile().as_text()
  ops = collections.Counter(op for line in text.splitlines()
                            for op in ("all-gather(", "all-reduce(", "all-to-all(",
                                       "collective-permute(") if op in line)
  assert ops == {"collective-permute(": 3}
  assert sum(" while(" in line for line in text.splitlines()) == 1


def test_a_device_holds_two_shards_of_rows_not_the_batch():
  mesh = make_mesh(2, 4)
  rows = NamedSharding(mesh, P(TOKEN_AXES))
  x = {"x": jax.ShapeDtypeStruct((64, 1024), jnp.int32, sharding=rows)}  # 32 KiB a shard
  order = jax.ShapeDtypeStruct((64,), jnp.int32, sharding=NamedSharding(mesh, P()))
  shard = 64 * 1024 * 4 // 8

  def plain(tree, order):
    return jax.tree.map(lambda v: jax.lax.with_sharding_constraint(
        v[order].reshape(4, 16, 1024), NamedSharding(mesh, P(None, TOKEN_AXES))), tree)

  ring = _jitted.lower(x, order, num_chunks=4, mesh=mesh).compile()
  assert ring.memory_analysis().temp_size_in_bytes <= 2 * shard + 4096  # + row-id buffers
  whole = jax.jit(plain).lower(x, order).compile()
  assert whole.memory_analysis().temp_size_in_bytes >= 8 * shard  # why the ring exists


def test_rows_that_do_not_split_evenly_are_refused():
  mesh = make_mesh(2, 4)
  placed = distributed.to_global({"x": np.zeros(24, np.float32)},
                                 NamedSharding(mesh, P(TOKEN_AXES)))
  with pytest.raises(ValueError, match="24 rows do not split into num_chunks=2 chunks"):
    shuffle_into_chunks(placed, np.arange(24), num_chunks=2, mesh=mesh)
  for bad in (0, -2, 2.0):  # were a ZeroDivisionError, a negative shape, a float shape
    with pytest.raises(ValueError, match=f"num_chunks must be a positive int, got {bad}"):
      shuffle_into_chunks(placed, np.arange(24), num_chunks=bad, mesh=mesh)


def test_order_of_another_length_or_dtype_is_refused():
  mesh = make_mesh(2, 4)
  placed = distributed.to_global({"x": np.zeros(16, np.float32)},
                                 NamedSharding(mesh, P(TOKEN_AXES)))
  with pytest.raises(ValueError, match=r"same number of rows; leaves \[\(16,\)\], order_B \(8,\)"):
    shuffle_into_chunks(placed, np.arange(8), num_chunks=2, mesh=mesh)
  with pytest.raises(ValueError, match="order_B has dtype float32, expected integer row ids"):
    shuffle_into_chunks(placed, np.arange(16, dtype=np.float32), num_chunks=2, mesh=mesh)


def test_row_ids_outside_the_batch_are_refused_outside_jit():
  """An out-of-range id gave a silent row of zeros (numpy raises, jnp clamps). Refused where
  the ids are concrete; under jit (ids traced) the documented zeros stay."""
  mesh = make_mesh(2, 4)
  placed = distributed.to_global({"x": np.arange(16, dtype=np.float32)},
                                 NamedSharding(mesh, P(TOKEN_AXES)))
  for bad, where in ((16, 3), (-1, 3)):
    order = np.arange(16)
    order[where] = bad
    with pytest.raises(ValueError, match=rf"order_B\[3\] = {bad} is not a row id in \[0, 16\) "
                                         r"\(1 such ids\)"):
      shuffle_into_chunks(placed, order, num_chunks=2, mesh=mesh)
  order = np.arange(16)
  order[3] = 16
  traced = jax.jit(lambda x, o: shuffle_into_chunks(x, o, num_chunks=2, mesh=mesh))(placed, order)
  got = np.asarray(traced["x"]).reshape(-1)
  want = np.arange(16, dtype=np.float32)
  want[3] = 0.0
  np.testing.assert_array_equal(got, want)
