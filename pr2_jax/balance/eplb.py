"""EPLB-compatible expert placement: DeepSeek's expert-parallel load balancer, in numpy.

Host-only: numpy loops over concrete loads; do not jit (a traced input raises TypeError).

A host-side baseline for step-level balancing (`eplb_step` mode); the
per-micro-step planner is `pr2_jax.balance.planner`.

Dimension legend:
  L layers, E logical experts, X physical experts (replicas, = num_replicas),
  G expert groups, N nodes, U GPUs, I items being packed (any count). Inside
  the hierarchical policy's per-node steps: Q = L*N rows (layer, node), M = E/N
  logical and V = X/N physical experts of one node.
  N here is nodes and G groups, not the models' tokens and kv heads; GPUs are U.

Semantics (DeepSeek's `rebalance_experts` with a stable sort, which DESIGN prescribes; the
reference's `torch.sort` is not stable on larger arrays, so there the two may place tied
replicas differently, with the same replica counts and per-GPU loads):
  * hierarchical policy when `num_groups % num_nodes == 0`:
    1. pack expert groups onto nodes (balanced packing, equal count per node);
    2. inside each node, replicate its experts up to X/N physical experts
       (each new replica goes to the expert with the largest load per replica);
    3. pack the node's physical experts onto its GPUs (balanced packing).
  * otherwise the global policy: the same with one group and one node.
Balanced packing: items heaviest first (stable sort, so equal weights keep
index order), each into the lightest pack that still has room (first such
pack on ties). Arithmetic is float32, like the reference, so ties break alike.
Physical expert p lives on GPU p // (X/U); a replica gets 1/count of its
expert's tokens.
"""

from __future__ import annotations

import numpy as np

from pr2_jax.checks import check_finite, check_ids, check_real_dtype, is_concrete
from pr2_jax.config import check_int


def _balanced_packing(weight_LI: np.ndarray, num_packs: int):
  """Items -> packs with equal item counts; returns (pack_LI, rank_in_pack_LI)."""
  num_layers, num_items = weight_LI.shape
  per_pack = num_items // num_packs
  if per_pack == 1:
    ident = np.broadcast_to(np.arange(num_items), weight_LI.shape).copy()
    return ident, np.zeros_like(ident)
  pack_LI = np.full(weight_LI.shape, -1, np.int64)
  rank_LI = np.full(weight_LI.shape, -1, np.int64)
  for l in range(num_layers):
    pack_weight = np.zeros(num_packs, np.float32)
    pack_items = np.zeros(num_packs, np.int64)
    for item in np.argsort(-weight_LI[l], kind="stable"):
      # Full packs are masked with +inf so argmin (first minimum) sees only open ones.
      pack = int(np.argmin(np.where(pack_items < per_pack, pack_weight, np.inf)))
      pack_LI[l, item] = pack
      rank_LI[l, item] = pack_items[pack]
      pack_weight[pack] += weight_LI[l, item]
      pack_items[pack] += 1
  return pack_LI, rank_LI


def _replicate(weight_LE: np.ndarray, num_physical: int):
  """Greedy replication; returns (phy2log_LX, phy_rank_LX, count_LE).

  Physical expert i < E is logical expert i; each extra one copies the expert
  with the largest weight / count (first on ties), and its rank is the
  number of copies that expert already had.
  """
  num_layers, num_log = weight_LE.shape
  rows = np.arange(num_layers)
  phy2log = np.tile(np.arange(num_physical, dtype=np.int64), (num_layers, 1))
  rank = np.zeros((num_layers, num_physical), np.int64)
  count = np.ones((num_layers, num_log), np.int64)
  for i in range(num_log, num_physical):
    best = np.argmax(weight_LE / count.astype(np.float32), axis=-1)
    phy2log[:, i] = best
    rank[:, i] = count[rows, best]
    count[rows, best] += 1
  return phy2log, rank, count


def _inverse(perm_LI: np.ndarray) -> np.ndarray:
  inv = np.empty_like(perm_LI)
  np.put_along_axis(inv, perm_LI, np.broadcast_to(np.arange(perm_LI.shape[1]), perm_LI.shape),
                    axis=1)
  return inv


def _hierarchical(weight_LE, num_physical, num_groups, num_nodes, num_gpus):
  num_layers, num_log = weight_LE.shape
  group_size = num_log // num_groups
  groups_per_node = num_groups // num_nodes
  log_per_node, phy_per_node = num_log // num_nodes, num_physical // num_nodes
  phy_per_gpu = num_physical // num_gpus

  # 1. Groups -> nodes. "mlog" numbers experts node-major: node n owns mlog ids
  #    [n * log_per_node, (n + 1) * log_per_node).
  group_weight_LG = weight_LE.reshape(num_layers, num_groups, group_size).sum(-1)
  group_pack_LG, group_rank_LG = _balanced_packing(group_weight_LG, num_nodes)
  first_mlog_LG = (group_pack_LG * groups_per_node + group_rank_LG) * group_size
  log2mlog_LE = (first_mlog_LG[..., None] + np.arange(group_size)).reshape(num_layers, num_log)
  mlog2log_LE = _inverse(log2mlog_LE)

  # 2. Replicate inside each node. From here rows are Q = (layer, node) pairs, each node's
  #    M experts with node-local ids (mlog - n * M), until step 3 folds them back into L.
  mlog_weight_QM = np.take_along_axis(weight_LE, mlog2log_LE, -1).reshape(-1, log_per_node)
  phy2mlog_QV, phy_rank_QV, mlog_count_QM = _replicate(mlog_weight_QM, phy_per_node)

  # 3. Physical experts of a node -> its GPUs, by load per replica. "pphy" numbers a node's
  #    physical experts GPU-major (their final order).
  phy_weight_QV = np.take_along_axis(mlog_weight_QM / mlog_count_QM.astype(np.float32),
                                     phy2mlog_QV, -1)
  pack_QV, rank_QV = _balanced_packing(phy_weight_QV, num_gpus // num_nodes)
  pphy2phy_QV = _inverse(pack_QV * phy_per_gpu + rank_QV)
  pphy2mlog_QV = np.take_along_axis(phy2mlog_QV, pphy2phy_QV, -1)  # node-local mlog ids
  # Back to L rows: node n's V physical experts follow node n - 1's, ids made global.
  pphy2mlog_LX = (pphy2mlog_QV.reshape(num_layers, num_nodes, -1)
                  + (np.arange(num_nodes) * log_per_node)[None, :, None]).reshape(num_layers, -1)
  phy2log_LX = np.take_along_axis(mlog2log_LE, pphy2mlog_LX, -1)
  phy_rank_LX = np.take_along_axis(phy_rank_QV, pphy2phy_QV, -1).reshape(num_layers, -1)
  log_count_LE = np.take_along_axis(mlog_count_QM.reshape(num_layers, -1), log2mlog_LE, -1)
  return phy2log_LX, phy_rank_LX, log_count_LE


def _check_host(fn: str, weight) -> None:
  """These functions loop in numpy over concrete loads: a tracer raised jax's
  TracerArrayConversionError deep inside np.asarray, naming neither the function nor a fix."""
  if not is_concrete(weight):
    raise TypeError(f"{fn} is host-only (numpy; do not jit): weight is a traced or not fully "
                    "addressable array; call it outside jit on concrete loads (jax.device_get)")


def eplb_rebalance(weight, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int):
  """DeepSeek EPLB: replicate and place experts from a load estimate.

  Host-only, numpy; do not jit: `weight` must be concrete (a traced one raises TypeError), and
  the result is numpy arrays.

  Args:
    weight: [L, E] load per logical expert (any real dtype).
    num_replicas: physical experts X (multiple of num_gpus, >= E).
    num_groups: expert groups (E % num_groups == 0); the hierarchical policy
      needs num_groups % num_nodes == 0, else the global policy is used.
    num_nodes: server nodes (num_gpus % num_nodes == 0 for the hierarchical policy; the
      global one ignores nodes, as the reference does).
    num_gpus: GPUs; GPU u holds physical experts [u * X/U, (u + 1) * X/U).
  Returns:
    phy2log int64 [L, X]: logical expert of each physical expert;
    log2phy int64 [L, E, X - E + 1]: physical ids of each logical expert, padded with -1
      (the reference's fixed width: the most replicas one expert can get);
    logcnt int64 [L, E]: replicas per logical expert.
  """
  _check_host("eplb_rebalance", weight)
  # A NaN expert took half the replicas; a negative one made NaN device loads. Checked after
  # the float32 cast the reference computes in (1e39 is finite in float64, inf in float32).
  check_real_dtype("weight", weight)
  with np.errstate(over="ignore"):  # an overflow becomes inf, refused by name below
    weight_LE = np.asarray(weight, np.float32)
  check_finite("weight", weight_LE, "a load estimate", low=0)
  if weight_LE.ndim != 2 or 0 in weight_LE.shape:
    raise ValueError(f"weight must be [layers, experts], both >= 1, got shape {weight_LE.shape}")
  num_layers, num_log = weight_LE.shape
  for name, value in (("num_replicas", num_replicas), ("num_groups", num_groups),
                      ("num_nodes", num_nodes), ("num_gpus", num_gpus)):
    check_int("eplb_rebalance", name, value)  # 16.0 or True: a typo, not a count
  if num_replicas < num_log or num_replicas % num_gpus:
    raise ValueError(f"num_replicas={num_replicas} must be >= num_experts={num_log} and a "
                     f"multiple of num_gpus={num_gpus}")
  if num_groups % num_nodes == 0:
    if num_gpus % num_nodes:
      raise ValueError(f"num_gpus={num_gpus} must be a multiple of num_nodes={num_nodes}")
    if num_log % num_groups:
      raise ValueError(f"num_experts={num_log} must be a multiple of num_groups={num_groups}")
    if num_replicas % num_nodes or num_log % num_nodes:
      raise ValueError(f"num_replicas={num_replicas} and num_experts={num_log} must be "
                       f"multiples of num_nodes={num_nodes}")
    phy2log, phy_rank, logcnt = _hierarchical(weight_LE, num_replicas, num_groups, num_nodes,
                                              num_gpus)
  else:
    phy2log, phy_rank, logcnt = _hierarchical(weight_LE, num_replicas, 1, 1, num_gpus)
  max_count = num_replicas - num_log + 1  # static, whatever the loads
  log2phy = np.full((num_layers, num_log * max_count), -1, np.int64)
  np.put_along_axis(log2phy, phy2log * max_count + phy_rank,
                    np.broadcast_to(np.arange(num_replicas), phy2log.shape), axis=1)
  return phy2log, log2phy.reshape(num_layers, num_log, max_count), logcnt


def eplb_device_load(weight, phy2log, logcnt, num_gpus: int) -> np.ndarray:
  """Per-GPU load [L, U] when every replica gets an even 1/count of its expert's load.
  Host-only, numpy; do not jit (a traced `weight` raises TypeError)."""
  _check_host("eplb_device_load", weight)
  weight_LE = np.asarray(weight, np.float64)
  check_int("eplb_device_load", "num_gpus", num_gpus)
  phy2log, logcnt = np.asarray(phy2log), np.asarray(logcnt)
  if weight_LE.ndim != 2 or logcnt.shape != weight_LE.shape or phy2log.ndim != 2 or \
      phy2log.shape[0] != weight_LE.shape[0] or phy2log.shape[1] % num_gpus:
    raise ValueError(f"eplb_device_load: weight {weight_LE.shape} and logcnt {logcnt.shape} must "
                     f"be [L, E] and phy2log {phy2log.shape} [L, X] with X a multiple of "
                     f"num_gpus={num_gpus} (eplb_rebalance's outputs for this weight)")
  check_ids(phy2log, "phy2log", 0, weight_LE.shape[1], "num_experts")  # -1 wrapped to the last
  counted = np.stack([np.bincount(row, minlength=weight_LE.shape[1]) for row in phy2log])
  if not np.array_equal(counted, logcnt):  # else loads split by the wrong counts (or inf at 0)
    layer, expert = (int(i) for i in np.argwhere(counted != logcnt)[0])
    raise ValueError(f"eplb_device_load: logcnt[{layer}, {expert}] = {logcnt[layer, expert]}, but "
                     f"phy2log holds expert {expert} {counted[layer, expert]} time(s) in layer "
                     f"{layer}")
  per_replica_LX = np.take_along_axis(weight_LE / logcnt, phy2log, -1)
  return per_replica_LX.reshape(weight_LE.shape[0], num_gpus, -1).sum(-1)
