"""Multi-host glue: JAX's distributed runtime, host <-> global array moves, process-0 duties.

One program runs on every process (multi-controller JAX). Every process builds
the same *global* mesh from all processes' devices; host data enters it with
`to_global`, where each process hands over only the rows its own devices hold
(`jax.make_array_from_process_local_data`), and leaves it with `to_host`, which
gathers a sharded array to every process. Per-row host work (decoding and
scoring a rollout) uses `local_rows`, each process reading only the rows its
devices hold, and `gather_rows`, which shares just the small per-row results.
Single-process runs take the same code path, so what the tests check on one
process is what runs on many.

Arrays here are any shape; the batch axis is the one split over processes.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """`jax.distributed.initialize` settings; all empty = single process (or auto-detect)."""
  coordinator_address: str = ""  # host:port of process 0; "" = none / auto-detect
  num_processes: int = 0         # 0 = single process unless auto-detection finds a cluster
  process_id: int = -1           # this process's rank; -1 = auto-detect
  auto_detect: bool = False      # let JAX find the cluster (TPU pods, SLURM, Open MPI, ...)

  def __post_init__(self):
    if self.num_processes < 0:
      raise ValueError(f"num_processes={self.num_processes} must be >= 0")
    if self.process_id < -1:  # initialize() dropped it and then said process_id was unset
      raise ValueError(f"process_id={self.process_id} must be -1 (auto-detect) or a rank >= 0")
    if self.num_processes > 1 and not self.coordinator_address and not self.auto_detect:
      raise ValueError(f"num_processes={self.num_processes} needs a coordinator_address "
                       "(host:port of process 0) or auto_detect")
    if self.process_id >= max(self.num_processes, 1) and self.num_processes:
      raise ValueError(f"process_id={self.process_id} must be below num_processes="
                       f"{self.num_processes}")
    # A host whose command lost --num_processes would otherwise train alone, writing into the
    # workdir the other processes share while process 0 waits for it.
    given = [f"{name}={value!r}" for name, value, unset in (
        ("coordinator_address", self.coordinator_address, ""),
        ("process_id", self.process_id, -1)) if value != unset]
    if given and self.num_processes <= 1 and not self.auto_detect:
      raise ValueError(f"{', '.join(given)} set for a single process (num_processes="
                       f"{self.num_processes}): give num_processes (the total) for a "
                       "multi-process run, or auto_detect, or drop them")
    if self.coordinator_address and ":" not in self.coordinator_address:
      raise ValueError(f"coordinator_address={self.coordinator_address!r} must be host:port")

  @property
  def enabled(self) -> bool:
    return self.auto_detect or self.num_processes > 1


# XLA:CPU runs every device's share of a program on one pool of max(cores, devices) threads
# (PJRT_NPROC replaces the core count), and a device waiting in a collective's rendezvous holds
# its thread. With one thread per fake device, a device that runs two operations at once (a loop
# beside a collective), or the next call queued behind this one, leaves some device without a
# thread to reach the rendezvous: the others wait forever and XLA aborts after 40 s
# ("Termination timeout for `all gather RendezvousKey...`", exit 134). On 8 fake devices and 2
# cores (jaxlib 0.10.2), 300 queued calls of a balance analysis aborted 4 runs of 4 with the
# default 8 threads and 2 of 2 with 10, 12 or 14; with 16, 3 runs of 300 and 2 of 1,500 calls
# passed. Four per device leaves a margin.
CPU_THREADS_PER_DEVICE = 4


def use_cpu_devices(count: int) -> None:
  """Run on `count` fake CPU devices; call before any other JAX work.

  With more devices than cores it also sizes XLA:CPU's thread pool (`PJRT_NPROC`, unless the
  environment sets it) at CPU_THREADS_PER_DEVICE threads a device, so that devices waiting in
  a collective cannot take every thread (see above).
  """
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ValueError(f"use_cpu_devices: count={count!r} must be a positive int")
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", count)
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  if count > (cores or 1):
    os.environ.setdefault("PJRT_NPROC", str(CPU_THREADS_PER_DEVICE * count))


def initialize(cfg: DistributedConfig) -> None:
  """Joins the cluster (a no-op for a single process). Call before any other JAX work.

  On CPU the cross-process collectives need gloo (in-process collectives only reach devices
  of the same process). The pinned jax 0.10.2 already defaults to gloo; setting it keeps a
  run right on a jax whose default is not (DESIGN §6 names the switch).
  """
  if not cfg.enabled:
    return
  platforms = jax.config.jax_platforms  # None or "" = let JAX choose, which may be the CPU
  if not platforms or "cpu" in platforms:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:  # a setting JAX could not detect: say which of ours supplies it
    missing = [name for name, unset in (("process_id", cfg.process_id < 0),
                                        ("coordinator_address", not cfg.coordinator_address),
                                        ("num_processes", not cfg.num_processes)) if unset]
    if not missing:
      raise
    raise ValueError(f"jax.distributed.initialize could not detect what was left unset "
                     f"({', '.join(missing)}): {e} Set {' and '.join(missing)}, or run where "
                     "JAX detects the cluster (TPU, SLURM, Open MPI)") from None


def is_main_process() -> bool:
  """Metrics, logs and side files come from process 0 only."""
  return jax.process_index() == 0


def local_block(sharding: NamedSharding, shape: tuple[int, ...]) -> tuple[slice, ...]:
  """The block of a global `shape` array this process's devices hold, one slice per axis.

  The block must be contiguous along every axis (it is when the mesh lists
  devices process by process, as `jax.make_mesh` does); the batch axis is the
  one the processes split.
  """
  block = []
  indices = list(sharding.addressable_devices_indices_map(shape).values())
  for axis, size in enumerate(shape):
    covered = set()
    for index in indices:
      covered.update(range(*index[axis].indices(size)))
    lo, hi = min(covered), max(covered) + 1
    if len(covered) != hi - lo:
      raise ValueError(f"process {jax.process_index()} holds non-contiguous parts of axis {axis} "
                       f"of a {shape} array under {sharding.spec}; list mesh devices by process")
    block.append(slice(lo, hi))
  return tuple(block)


def to_global(tree, shardings):
  """Host arrays (the same full value on every process) -> global jax.Arrays.

  Each process contributes only its own rows, so nothing is sent between
  processes and no process needs device memory for the whole batch.
  `shardings` is one sharding or a matching tree of them.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)

  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x[local_block(sharding, x.shape)],
                                                  x.shape)

  return jax.tree.map(put, tree, shardings)


def to_host(tree):
  """Global jax.Arrays -> full numpy arrays on every process (an all-gather across hosts)."""
  def get(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)


def local_rows(x: jax.Array) -> tuple[slice, np.ndarray]:
  """(the batch rows this process's devices hold, their values on the host).

  Unlike `to_host`, nothing crosses processes: a rollout's tokens are decoded
  and scored where they already are.
  """
  if not isinstance(x, jax.Array):
    raise TypeError(f"local_rows takes a jax.Array (a global array), got {type(x).__name__}")
  block = local_block(x.sharding, x.shape)
  split = [a for a, b in enumerate(block[1:], 1) if (b.start, b.stop) != (0, x.shape[a])]
  if split:  # the rows would be partial: per-row results (a sum over a row) silently wrong
    raise ValueError(f"local_rows needs whole rows, but axis {split[0]} of a {x.shape} array "
                     f"under {x.sharding.spec} is split across processes")
  out = np.empty(tuple(b.stop - b.start for b in block), x.dtype)
  for shard in x.addressable_shards:  # replicated shards overwrite with equal values
    where = tuple(slice(s.indices(n)[0] - b.start, s.indices(n)[1] - b.start)
                  for s, b, n in zip(shard.index, block, x.shape))
    out[where] = np.asarray(shard.data)
  return block[0], out


def gather_rows(rows: slice, local: np.ndarray, total: int) -> np.ndarray:
  """Each process's per-row results for its `rows` (from `local_rows`) -> all `total` rows
  on every process. Every process must pass the same number of rows."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    starts, values = [rows.start], [local]
  else:
    starts = multihost_utils.process_allgather(np.int32(rows.start))
    values = multihost_utils.process_allgather(local)  # [processes, rows, ...]
  out = np.empty((total,) + local.shape[1:], local.dtype)
  covered = np.zeros(total, bool)
  for start, value in zip(np.atleast_1d(starts), values):
    out[start:start + len(value)] = value
    covered[start:start + len(value)] = True
  if not covered.all():
    raise ValueError(f"the processes' rows cover {int(covered.sum())} of {total}: rows "
                     f"{rows.start}:{rows.stop} here; every row must belong to some process")
  return out
