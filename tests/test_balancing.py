"""Tests for pr2_jax.rl.balancing: bucket rule, EPLB plans, capacity needs, metrics, the loop."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax.balance import assign_replicas, eplb_rebalance, loads_from_routes
from pr2_jax.config import ModelConfig
from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.rl import balancing, loop
from pr2_jax.rl.config import ExperimentConfig, RLConfig, SFTConfig


@pytest.mark.parametrize("needed, per_doubling, limit, bucket", [
    (0, 1, 100, 1), (1, 1, 100, 1), (5, 1, 100, 8), (8, 1, 100, 8), (9, 1, 100, 16),
    (3, 2, 100, 3), (5, 2, 100, 6), (7, 2, 100, 8), (9, 2, 100, 12), (13, 2, 100, 16),
    (17, 2, 100, 24), (25, 2, 100, 32), (9, 4, 100, 10), (17, 4, 100, 20),
    (100, 2, 72, 72),  # capped at the dropless bound (tokens per shard)
])
def test_capacity_bucket_hand_values(needed, per_doubling, limit, bucket):
  assert balancing.capacity_bucket(needed, per_doubling, limit) == bucket


def test_buckets_are_few_and_tight():
  buckets = {balancing.capacity_bucket(n, 2, 10**6) for n in range(1, 1025)}
  assert len(buckets) == 20  # 1, 2, 3, 4, 6, 8, 12, ..., 768, 1024
  assert all(balancing.capacity_bucket(n, 2, 10**6) <= 1.5 * n for n in range(1, 1025))


def test_buckets_per_doubling_hold_for_every_q():
  """q = 3 in (16, 32]: ceil(16 (1 + i/3)) = 22, 27, 32; a need of 31 was rounded to a
  multiple of 32 // 6 = 5, 35, past the power of two. For q = 1..8 every (h, 2h] with h >= q
  holds exactly q buckets, the last 2h, each at most ceil((1 + 1/q) need)."""
  assert [balancing.capacity_bucket(n, 3, 100) for n in (17, 22, 23, 27, 28, 31, 32)] == [
      22, 22, 27, 27, 32, 32, 32]
  for q in range(1, 9):
    for h in (1 << j for j in range(11)):
      bucket = {n: balancing.capacity_bucket(n, q, 10**6) for n in range(h + 1, 2 * h + 1)}
      assert len(set(bucket.values())) == min(q, h) and max(bucket.values()) == 2 * h, (q, h)
      assert all(n <= b <= -(-n * (q + 1) // q) for n, b in bucket.items()), (q, h)


# DESIGN §4's EPLB example (hierarchical policy): 8 GPUs x 2 slots.
WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                   [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
PHY2LOG = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                    [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_plan_from_eplb_hand_values():
  phy2log, _, logcnt = eplb_rebalance(WEIGHT, 16, 4, 2, 8)
  np.testing.assert_array_equal(phy2log, PHY2LOG)
  plan = balancing.plan_from_eplb(phy2log, logcnt, WEIGHT, num_devices=8, slots=2)
  np.testing.assert_array_equal(plan.slot_expert[0, :2], [[5, 6], [5, 7]])
  np.testing.assert_array_equal(plan.replica_share[0, :2], [[0.5, 1.0], [0.5, 1.0]])
  # device 0 holds half of expert 5 and all of 6: 165 / 2 + 39; device 1: 165 / 2 + 4
  np.testing.assert_allclose(plan.device_load[0, :2], [121.5, 86.5])
  np.testing.assert_allclose(plan.device_load.sum(-1), WEIGHT.sum(-1))


def _routes(rng, steps_shape, num_experts):
  """Random distinct top-k routes [M, b, T, L, K] with skewed popularity."""
  m, b, t, layers, k = steps_shape
  logits = rng.gumbel(size=(m, b, t, layers, num_experts)) + np.linspace(2, 0, num_experts)
  return np.argsort(-logits, axis=-1)[..., :k].astype(np.int32)


def test_step_plan_is_eplb_rebalance_on_the_step_loads_and_its_ema():
  shape = balancing.BalanceShape(num_experts=8, num_devices=4, slots=3, token_shards=2)
  rng = np.random.default_rng(0)
  valid = np.ones((2, 2, 5), bool)
  valid[0, 1, 3:] = False  # padding is not load
  routes = [_routes(rng, (2, 2, 5, 3, 2), 8) for _ in range(2)]
  loads = [np.asarray(loads_from_routes(r.reshape(4, 5, 3, 2), valid.reshape(4, 5), 8),
                      np.float64) for r in routes]
  state = balancing.StepState()
  plan, state, _ = balancing.step_plan(shape, routes[0], valid, 0.5, state)
  phy2log, _, logcnt = eplb_rebalance(loads[0], 12, 1, 1, 4)
  np.testing.assert_array_equal(plan.slot_expert, phy2log.reshape(3, 4, 3))
  np.testing.assert_array_equal(plan.replica_count, logcnt)
  # ema = 0.75 weighs the past (not 0.5, where swapping ema and 1 - ema passed).
  plan, state, _ = balancing.step_plan(shape, routes[1], valid, 0.75, state)
  np.testing.assert_allclose(state.ema_LE, 0.75 * loads[0] + 0.25 * loads[1])
  phy2log, _, _ = eplb_rebalance(0.75 * loads[0] + 0.25 * loads[1], 12, 1, 1, 4)
  np.testing.assert_array_equal(plan.slot_expert, phy2log.reshape(3, 4, 3))


def _hand_phase():
  """E = 4 on D = 2 devices, 2 token shards of one 3-token sequence each, one layer, top-2."""
  shape = balancing.BalanceShape(num_experts=4, num_devices=2, slots=3, token_shards=2)
  routes = np.array([[[0, 1], [0, 2], [0, 1]],      # shard 0: e0 x3, e1 x2, e2 x1
                     [[3, 2], [3, 2], [1, 0]]],     # shard 1: e3 x2, e2 x2, e1, e0
                    np.int32)[None, :, :, None, :]  # [M=1, b=2, T=3, L=1, K=2]
  valid = np.ones((1, 2, 3), bool)
  valid[0, 0, 2] = False  # padding: no load and no buffer place
  return shape, routes, valid


def test_capacity_needs_and_imbalance_hand_values():
  shape, routes, valid = _hand_phase()
  step, _, _ = balancing.step_plan(shape, routes, valid, 0.0, balancing.StepState())
  native = balancing.plan_phase(shape, routes, valid, step, "native", True, 1, 3)
  # valid tokens only: shard 0 e0 x2 (the pad's e0 made it 3), shard 1 e3 x2, e2 x2
  assert native.needed == native.needed_static == 2 and native.capacity == 2
  # loads without the padding token: e0 3, e1 2, e2 3, e3 2; static devices {0,1}: 5, {2,3}: 5
  assert native.imbalance_ML["none"].tolist() == [[1.0]]
  assert native.layouts_MLDS.shape == (1, 1, 2, 2)
  # Foresight by hand. Loads e0 3, e1 2, e2 3, e3 2; 2 spare slots, at most D = 2 replicas:
  # the greedy gives them to the largest n_e / r_e, e0 then e2 (3, 3; lower id first).
  # Replicas heaviest first: e1 2, e3 2 | e0 1.5, e0 1.5 | e2 1.5, e2 1.5, in 3 rounds of 2;
  # each replica keeps its native device when it can (e0, e1 on 0; e2, e3 on 1), its twin
  # takes the other: device 0 {e1, e0, e2}, device 1 {e3, e0, e2}, 5 and 5. Old experts keep
  # their slots: [[0, 1, 2], [2, 3, 0]], global slots 0..5 = e0 e1 e2 | e2 e3 e0.
  foresight = balancing.plan_phase(shape, routes, valid, step, "foresight", True, 1, 3)
  np.testing.assert_array_equal(foresight.layouts_MLDS, [[[[0, 1, 2], [2, 3, 0]]]])
  assert foresight.imbalance_ML["foresight"].tolist() == [[1.0]]  # devices 5, 5
  # Each shard's assignments of e0 / e2 split 1:1 over slots (0, 5) / (2, 3) by rank,
  # (r + 1/2) / c below 1/2 -> first slot; the padding token is split on its own:
  #   shard 0: t0 (0, 1) -> 0, 1; t1 (0, 2) -> 5, 3; pad (0, 1) -> 5, 1
  #   shard 1: t0 (3, 2) -> 4, 2; t1 (3, 2) -> 4, 3; t2 (1, 0) -> 1, 5
  slots = np.array([[0, 1], [5, 3], [5, 1], [4, 2], [4, 3], [1, 5]])
  plan = balancing.foresight_plan(loads_from_routes(routes[0], valid[0], 4), 2, 3)
  np.testing.assert_array_equal(
      assign_replicas(routes[0, :, :, 0].reshape(6, 2), valid[0].ravel(), plan.layer(0), 2), slots)
  real = valid[0].ravel()
  counts = [np.bincount(slots[3 * p:3 * p + 3][real[3 * p:3 * p + 3]].ravel(), minlength=6)
            for p in (0, 1)]
  np.testing.assert_array_equal(counts, [[1, 1, 0, 1, 0, 1], [0, 1, 1, 1, 2, 1]])
  assert foresight.needed == 2 and foresight.capacity == 2
  assert foresight.needed_static == 2


# A micro-step of 2 sequences x 8 slots on 2 token shards (one sequence each), E = 4, top-2,
# routes replayed in every layer. Sequence 0: 5 left pads, then 3 real tokens; sequence 1:
# 6 real tokens, then 2 right pads (after EOS). Every pad routes (0, 1).
PAD_ROUTES = np.array([[[0, 1]] * 5 + [[2, 3], [2, 0], [3, 1]],
                       [[0, 1], [2, 3], [0, 2], [1, 3], [0, 3], [1, 2]] + [[0, 1]] * 2], np.int32)
PAD_VALID = np.array([[False] * 5 + [True] * 3, [True] * 6 + [False] * 2])


def test_padding_bucket_is_the_valid_need_and_the_learner_forward_drops_nothing():
  """Host: valid tokens need 2 places per expert on shard 0 (e2, e3) and 3 on shard 1 (every
  expert): need 3, bucket 3 (q = 2). Counted, the pads made it 6 (shard 0's e0: 5 pads + 1),
  bucket 6. Device: the learner's forward (`forward_logprobs`, the same one for the
  old-log-prob pass and the update, masked by the same micro-batch `valid` the host counted
  with) on a 2-expert-shard mesh at capacity 3 drops nothing and gives the dropless log-probs
  at real positions. With the pads taking places, shard 0's e0 got 5 pad first choices before
  (t6, k1) and dropped it, and (t7, k1) at e1."""
  import flax.linen as nn

  from pr2_jax.models.transformer import MoETransformer
  from pr2_jax.rl import learner
  cfg = ModelConfig(vocab_size=24, d_model=32, num_heads=2, num_kv_heads=1, head_dim=16,
                    expert_d_ff=32, num_experts=4, top_k=2)
  routes = np.broadcast_to(PAD_ROUTES[:, :, None], (2, 8, cfg.num_moe_layers, 2))
  shape = balancing.BalanceShape(num_experts=4, num_devices=2, slots=2, token_shards=2)
  step, _, _ = balancing.step_plan(shape, routes[None], PAD_VALID[None], 0.0,
                                   balancing.StepState())
  phase = balancing.plan_phase(shape, routes[None], PAD_VALID[None], step, "native", True, 2, 8)
  assert (phase.needed, phase.needed_static, phase.capacity) == (3, 3, 3)

  tokens = np.where(PAD_VALID, np.arange(16).reshape(2, 8) % 20 + 3, 0).astype(np.int32)
  positions = np.maximum(np.cumsum(PAD_VALID, axis=1) - 1, 0).astype(np.int32)
  seq = {"tokens": jnp.asarray(tokens), "positions": jnp.asarray(positions),
         "valid": jnp.asarray(PAD_VALID)}
  params = nn.unbox(MoETransformer(cfg).init(jax.random.key(0), seq["tokens"])["params"])
  model = MoETransformer(cfg, make_mesh(1, 2, devices=jax.devices()[:2]))
  forward = jax.jit(lambda p, capacity: learner.forward_logprobs(
      model, p, seq, jnp.asarray(routes), 1.0, capacity=capacity)[::2], static_argnums=1)
  logp, out = forward(params, phase.capacity)
  ref_logp, ref_out = forward(params, None)  # the model's dropless capacity
  assert int(np.sum(out.dropped)) == 0 == int(np.sum(ref_out.dropped))
  real = PAD_VALID[:, 1:]  # log-probs of tokens[:, 1:]
  np.testing.assert_allclose(np.asarray(logp)[real], np.asarray(ref_logp)[real], atol=1e-5)



def test_planned_buffer_need_leaves_padding_out_of_the_replica_split():
  """A hand step plan: e0 in global slots 0 and 4, e1 in 1 and 5, shares 1/2. One token shard of
  8 tokens, all routed (0, 1): 4 left pads, then 4 real. The real e0 (e1) assignments split 2 | 2
  over their replicas, the pads among themselves and into no buffer: need 2, bucket 2 (q = 1);
  the native layout needs 4 (all real e0 on one slot). Split with the pads, ranks 0-3 (the pads)
  took slot 0 and the 4 real ones slot 4: need 4; counted with the pads, slot 0 held 2 + 2."""
  from pr2_jax.balance.planner import Plan
  shape = balancing.BalanceShape(num_experts=4, num_devices=2, slots=3, token_shards=1)
  share = np.array([[[0.5, 0.5, 1.0], [1.0, 0.5, 0.5]]], np.float32)
  step = Plan(slot_expert=np.array([[[0, 1, 2], [3, 0, 1]]], np.int32),
              replica_count=np.array([[2, 2, 1, 1]], np.int32), replica_share=share,
              slot_load=share, device_load=np.zeros((1, 2), np.float32))
  routes = np.broadcast_to(np.array([0, 1], np.int32), (1, 1, 8, 1, 2))
  valid = np.array([[[False] * 4 + [True] * 4]])
  phase = balancing.plan_phase(shape, routes, valid, step, "step", True, 1, 8)
  assert (phase.needed, phase.needed_static, phase.capacity) == (2, 4, 2)
  np.testing.assert_array_equal(phase.layouts_MLDS, step.slot_expert[None])


def test_live_old_pass_of_r2_keeps_the_native_layout_and_the_model_capacity():
  """r2's old-log-prob pass routes live (only its update replays): under foresight and
  capacity_mode 'bucket' its phase runs the native layout with the model's capacity (a bucket
  or plan from the rollout's routes would size buffers for routes it does not see), while the
  update plans foresight on the replayed routes (_hand_phase: layout [[0, 1, 2], [2, 3, 0]],
  need 2, bucket 2)."""
  shape, routes, valid = _hand_phase()
  bal = balancing.StepBalancer(shape, "foresight", "r2", "bucket", capacity_buckets=1,
                               eplb_ema=0.0, tokens_per_shard=3, model_capacity=(3, 3))
  micro = {"rollout_routes": routes, "valid": valid}
  step, old, _, _ = bal.plan_old_pass(micro, balancing.StepState())
  assert old.capacity is None and bal.used_capacity(old, False) == 3
  assert old.layouts_MLDS.shape == (1, 1, 2, 2)  # native: E/D = 2 slots per device
  update = bal.plan_update(dict(micro, replay_routes=routes.copy()), step, old)
  np.testing.assert_array_equal(update.layouts_MLDS, [[[[0, 1, 2], [2, 3, 0]]]])
  assert update.capacity == 2 and bal.used_capacity(update, True) == 2

def test_eplb_step_imbalance_splits_each_expert_over_its_replicas_hand_values():
  """The eplb_step counterfactual: the step plan's devices carry each held expert's load over
  its replica count. Loads (padding excluded) e0 3, e1 2, e2 3, e3 2; a hand plan with e0 and
  e1 twice: device 0 {e0, e1, e0} = 1.5 + 1 + 1.5 = 4, device 1 {e2, e3, e1} = 3 + 2 + 1 = 6,
  so max / mean = 6 / 5 (whole loads per slot, replicas ignored, would give 8 / 7.5)."""
  from pr2_jax.balance.planner import Plan
  shape, routes, valid = _hand_phase()
  slot_LDS = np.array([[[0, 1, 0], [2, 3, 1]]], np.int32)
  share_LDS = np.array([[[0.5, 0.5, 0.5], [1.0, 1.0, 0.5]]], np.float32)
  step = Plan(slot_expert=slot_LDS, replica_count=np.array([[2, 2, 1, 1]], np.int32),
              replica_share=share_LDS, slot_load=share_LDS, device_load=np.zeros((1, 2)))
  phase = balancing.plan_phase(shape, routes, valid, step, "native", True, 1, 3)
  np.testing.assert_allclose(phase.imbalance_ML["eplb_step"], [[1.2]], rtol=1e-6)
  np.testing.assert_allclose(phase.imbalance_ML["none"], [[1.0]])  # static {0, 1} | {2, 3}


def test_one_device_skips_the_planner_unless_the_phase_runs_its_plan():
  """D = 1: every plan puts the whole load on the one device, so a native phase reports
  foresight's imbalance (1) without compiling the planner; a foresight phase still plans."""
  shape = balancing.BalanceShape(num_experts=4, num_devices=1, slots=5, token_shards=1)
  routes = _routes(np.random.default_rng(1), (2, 2, 6, 2, 2), 4)
  valid = np.ones((2, 2, 6), bool)
  step, _, _ = balancing.step_plan(shape, routes, valid, 0.0, balancing.StepState())
  native = balancing.plan_phase(shape, routes, valid, step, "native", False, 1, 12)
  assert (shape, routes.shape, False) in balancing._COMPILED
  assert (shape, routes.shape, True) not in balancing._COMPILED
  planned = balancing.plan_phase(shape, routes, valid, step, "foresight", False, 1, 12)
  assert planned.layouts_MLDS.shape == (2, 2, 1, 5)  # a replica in the spare slot
  for mode in balancing.MODES:
    assert native.imbalance_ML[mode].tolist() == [[1.0, 1.0]] * 2
    assert planned.imbalance_ML[mode].tolist() == [[1.0, 1.0]] * 2


def test_planner_method_reaches_host_and_step_planning():
  """RLConfig.planner_method: the host phase plan (BalanceShape) and the jitted step's
  `micro_layout` both plan with it, so they agree; lpt and rounds differ here."""
  from types import SimpleNamespace

  from pr2_jax.balance import plan_placement
  from pr2_jax.rl import learner
  rng = np.random.default_rng(4)
  routes = _routes(rng, (2, 4, 16, 3, 2), 8)
  valid = np.ones((2, 4, 16), bool)
  step, _, _ = balancing.step_plan(balancing.BalanceShape(8, 4, 3, 2), routes, valid, 0.0,
                                   balancing.StepState())
  mesh = make_mesh(2, 4, devices=jax.devices()[:8])
  layouts = {}
  for method in ("lpt", "rounds"):
    shape = balancing.BalanceShape(8, 4, 3, 2, planner_method=method)
    phase = balancing.plan_phase(shape, routes, valid, step, "foresight", True, 1, 64)
    lr = SimpleNamespace(rl=RLConfig(balance_mode="foresight", planner_method=method),
                         model=SimpleNamespace(config=ModelConfig(num_experts=8, top_k=2),
                                               mesh=mesh))
    for m in range(2):
      loads = loads_from_routes(routes[m], valid[m], 8)
      want = plan_placement(loads, 4, 3, method=method).slot_expert
      np.testing.assert_array_equal(phase.layouts_MLDS[m], want)
      in_step = jax.jit(lambda r, v: learner.micro_layout(lr, r, v).slot_expert)
      np.testing.assert_array_equal(in_step(routes[m], valid[m]), want)
    layouts[method] = phase.layouts_MLDS
  assert not np.array_equal(layouts["lpt"], layouts["rounds"])


def test_churn_hand_values():
  prev = np.array([[[0, 1], [2, 3]]])
  layouts = np.array([[[[0, 1], [2, 3]]],   # unchanged
                      [[[0, 2], [2, 3]]],   # one slot: device 0 fetches expert 2
                      [[[2, 0], [2, 3]]]])  # two slots swapped inside device 0: no fetch
  changed, moved = balancing.churn(layouts, prev, bytes_per_expert=10.0)
  assert changed.tolist() == [0, 1, 2] and moved.tolist() == [0.0, 10.0, 0.0]


def test_churn_counts_fetches_not_evictions():
  """Bytes count experts a device receives, not ones it lets go: device 0 trading expert 1 for a
  second replica of its expert 0 fetches nothing, and getting expert 1 back fetches it (the
  other way round gave 10, 0)."""
  prev = np.array([[[0, 1], [2, 3]]])
  layouts = np.array([[[[0, 0], [2, 3]]], [[[0, 1], [2, 3]]]])
  changed, moved = balancing.churn(layouts, prev, bytes_per_expert=10.0)
  assert changed.tolist() == [1, 1] and moved.tolist() == [0.0, 10.0]


def test_churn_against_another_expert_mesh_is_unknown():
  """A run resumed on another 'expert' axis has a last layout of another shape: it reported 0
  slots changed (the layout against itself); the first micro-step is NaN now, the rest counted."""
  prev = np.array([[[0, 1], [2, 3]]])                         # [L=1, D=2, S=2]
  layouts = np.array([[[[0], [1], [2], [3]]],                  # [M=2, L=1, D=4, S=1]
                      [[[1], [0], [2], [3]]]])                  # devices 0 and 1 swap experts
  changed, moved = balancing.churn(layouts, prev, bytes_per_expert=10.0)
  assert np.isnan(changed[0]) and np.isnan(moved[0])
  assert changed[1:].tolist() == [2.0] and moved[1:].tolist() == [20.0]


def _config(balance_mode, replay_mode="r3", num_layers=2, **rl):
  """A tiny run; `num_layers=1` where no per-layer plan is checked (each layer compiles anew)."""
  model = ModelConfig(vocab_size=24, num_layers=num_layers, d_model=32, num_heads=2,
                      num_kv_heads=1, head_dim=16, expert_d_ff=32, num_experts=4, top_k=2)
  rl = RLConfig(num_steps=2, prompts_per_step=8, group_size=2, off_policy_k=2, micro_steps=2,
                replay_mode=replay_mode, max_new_tokens=6, eval_every=0,
                eval_size=16,  # the rollout batch: evaluation reuses the rollout's sampler
                balance_mode=balance_mode, **rl)
  return ExperimentConfig(model=model, rl=rl, sft=SFTConfig(num_steps=2, batch_size=8),
                          task="countdown", checkpoint_every=0)


BALANCE_KEYS = {f"imbalance_{m}_{s}" for m in balancing.MODES for s in ("mean", "max")} | {
    "imbalance_used_mean", "imbalance_used_max", "capacity_needed", "capacity_needed_static",
    "capacity_used", "old_capacity_needed", "old_capacity_used", "dropped", "old_dropped",
    "slots_changed", "bytes_moved", "fetched_experts", "planner_ms"}


# eplb_step's rows are checked by test_balance_state_survives_resume, and lpt's planning in
# the loop by test_planner_method_reaches_host_and_step_planning (each run costs ~40 s).
@pytest.mark.parametrize("mode, replay_mode, capacity_mode, method", [
    ("foresight", "r3", "auto", "rounds"), ("foresight", "none", "forecast", "rounds")])
def test_loop_reports_balance_metrics(tmp_path, mode, replay_mode, capacity_mode, method):
  """Two RL steps on a (2 data, 2 expert) mesh: every balance metric lands in metrics.jsonl."""
  rows = []

  def write(m):
    rows.append(json.loads(json.dumps(m)))  # what metrics.jsonl holds

  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  loop.run(_config(mode, replay_mode, num_layers=1, capacity_mode=capacity_mode,
                   planner_method=method), mesh, str(tmp_path), on_metrics=write)
  rl_rows = [r for r in rows if r.get("phase") == "rl"]
  assert len(rl_rows) == 2
  for r in rl_rows:
    assert BALANCE_KEYS <= set(r), BALANCE_KEYS - set(r)
    assert r["planner_ms"] > 0
    assert r["imbalance_foresight_mean"] <= r["imbalance_none_mean"]
    assert r["imbalance_used_mean"] == (
        r[f"imbalance_{mode if replay_mode != 'none' else 'none'}_mean"])
    assert 1 <= r["capacity_needed"] <= r["capacity_used"]
    if replay_mode != "none":  # replayed routes: the planned bucket is dropless
      assert r["dropped"] == 0
    if replay_mode == "r3":
      assert r["old_dropped"] == 0 and r["old_capacity_used"] == r["capacity_used"]


def test_step_state_json_round_trip():
  state = balancing.StepState(ema_LE=np.array([[0.1, 1 / 3]]), layout_LDS=np.array([[[0, 1]]]))
  back = balancing.StepState.from_json(json.loads(json.dumps(state.to_json())))
  np.testing.assert_array_equal(back.ema_LE, state.ema_LE)  # exact, not approximately
  np.testing.assert_array_equal(back.layout_LDS, state.layout_LDS)
  assert balancing.StepState.from_json(None) == balancing.StepState()


def test_balance_state_survives_resume(tmp_path):
  """eplb_step with an EMA of past steps: the EMA and the last layout are checkpointed, so a run
  resumed at step 2 reports step 3 exactly as the uninterrupted run (EMA plan, churn)."""
  mesh = make_mesh(2, 2, devices=jax.devices()[:4])
  base = _config("eplb_step", "r2", eplb_ema=0.5)

  def run(workdir, steps):
    rows = []
    cfg = dataclasses.replace(base, rl=dataclasses.replace(base.rl, num_steps=steps),
                              checkpoint_every=1)
    loop.run(cfg, mesh, str(workdir), on_metrics=lambda m: rows.append(json.loads(json.dumps(m))))
    return [r for r in rows if r.get("phase") == "rl"]

  full = run(tmp_path / "full", 3)
  for r in full:
    assert BALANCE_KEYS <= set(r), BALANCE_KEYS - set(r)
    assert r["imbalance_used_mean"] == r["imbalance_eplb_step_mean"]
    assert 1 <= r["capacity_needed"] <= r["capacity_used"] and r["dropped"] == 0
    assert r["planner_ms"] > 0
    # one plan per step: at most the first micro-step changes slots
    assert r["slots_changed"] <= 2 * 3 * 2 / 4
  run(tmp_path / "split", 2)
  resumed = run(tmp_path / "split", 3)
  assert [r["step"] for r in resumed] == [3]
  keys = sorted(BALANCE_KEYS - {"planner_ms"})  # a wall time
  assert {k: resumed[0][k] for k in keys} == pytest.approx({k: full[2][k] for k in keys}, rel=1e-6)
  assert full[2]["slots_changed"] > 0  # the step-3 plan moved experts: churn was measured


@pytest.mark.slow
def test_a_resume_on_another_expert_mesh_says_so_and_reports_unknown_churn(tmp_path):
  """eplb_step from 2 to 4 expert devices: the checkpoint reshards (the feature), the log says
  the mesh changed, and the first step's churn is NaN (its saved layout has another shape)."""
  base = _config("eplb_step", "r2", num_layers=1)
  devices = jax.devices()[:4]
  loop.run(dataclasses.replace(base, rl=dataclasses.replace(base.rl, num_steps=1)),
           make_mesh(2, 2, devices=devices), str(tmp_path))
  messages, rows = [], []
  out = loop.run(base, make_mesh(1, 4, devices=devices), str(tmp_path), info=messages.append,
                 on_metrics=rows.append)
  assert out["resumed_from"] == 1 and [r["step"] for r in rows] == [2]
  assert messages[1] == ("the checkpoint was written on the mesh {'data': 2, 'expert': 2}, this "
                         "run's is {'data': 1, 'expert': 4}: its arrays were resharded to it")
  assert np.isnan(rows[0]["slots_changed"]) and np.isnan(rows[0]["bytes_moved"])
  assert np.isfinite(rows[0]["loss"]) and rows[0]["imbalance_used_mean"] >= 1


def test_r2_summary_reports_the_update_layout_and_each_phase_capacity():
  """r2 under foresight, capacity_mode 'model' (no buckets), model capacities 2 on the native
  layout and 3 on the 6-slot one: the live old pass ran the native layout (old_capacity_used 2),
  the replayed update the foresight plan (capacity_used 3), and imbalance_used is foresight's.
  The update's routes all pick (0, 1), both on device 0: native imbalance 10 / 5 = 2, which
  imbalance_used reported when it asked whether the old pass replays."""
  shape, routes, valid = _hand_phase()
  bal = balancing.StepBalancer(shape, "foresight", "r2", "model", capacity_buckets=1,
                               eplb_ema=0.0, tokens_per_shard=3, model_capacity=(2, 3))
  micro = {"rollout_routes": routes, "valid": valid,
           "replay_routes": np.broadcast_to(np.array([0, 1], np.int32), routes.shape)}
  step, old, state, _ = bal.plan_old_pass(micro, balancing.StepState())
  update = bal.plan_update(micro, step, old)
  out, _ = bal.summary(old, update, 0.0, 0.0, state)
  assert (out["old_capacity_used"], out["capacity_used"]) == (2, 3)
  assert out["imbalance_none_mean"] == 2.0 and out["imbalance_foresight_mean"] < 2.0
  assert out["imbalance_used_mean"] == out["imbalance_foresight_mean"]


def _phase_plan(layouts_MLDS, needed=2, capacity=None, planner_ms=7.0):
  """A hand PhasePlan: imbalance per mode none 2, eplb_step 1.5, foresight 1.25 (one layer)."""
  m = len(layouts_MLDS)
  imb = {"none": np.full((m, 1), 2.0), "eplb_step": np.full((m, 1), 1.5),
         "foresight": np.full((m, 1), 1.25)}
  return balancing.PhasePlan(needed=needed, needed_static=needed + 1, capacity=capacity,
                             imbalance_ML=imb, layouts_MLDS=np.asarray(layouts_MLDS, np.int32),
                             planner_ms=planner_ms)


def test_summary_churn_fetch_and_saved_layout_hand_values():
  """E = 4 on D = 2 devices of 3 slots, foresight + r3, two micro-steps after a previous layout
  [[0, 1, 2], [2, 3, 1]]. Micro-step 0 [[0, 1, 2], [2, 3, 0]]: 1 slot changed, device 1
  fetches e0 (10 bytes); its replica fetch is one all_to_all of bound 1 (2 slabs). Micro-step 1
  [[2, 3, 1], [0, 1, 0]]: 3 + 2 slots changed, devices fetch e3 and e1 (20 bytes); device 0
  needs two experts of device 1, past the bound: the all-gather fallback (E = 4 slabs). So
  slots_changed = mean(1, 5) = 3, bytes_moved = mean(10, 20) = 15, fetched_experts =
  mean(2, 4) / E = 0.75, and the state keeps the last micro-step's layout for the next step."""
  shape = balancing.BalanceShape(num_experts=4, num_devices=2, slots=3, token_shards=2,
                                 bytes_per_expert=10.0)
  bal = balancing.StepBalancer(shape, "foresight", "r3", "bucket", capacity_buckets=1,
                               eplb_ema=0.0, tokens_per_shard=3, model_capacity=(3, 3))
  layouts = [[[[0, 1, 2], [2, 3, 0]]], [[[2, 3, 1], [0, 1, 0]]]]
  update = _phase_plan(layouts, needed=2, capacity=2)
  state = balancing.StepState(layout_LDS=np.array([[[0, 1, 2], [2, 3, 1]]]))
  out, new_state = bal.summary(update, update, 99.0, 0.0, state)
  assert out["slots_changed"] == 3.0 and out["bytes_moved"] == 15.0
  assert out["fetched_experts"] == 0.75
  np.testing.assert_array_equal(new_state.layout_LDS, layouts[1])
  assert out["imbalance_used_mean"] == 1.25 and out["imbalance_none_max"] == 2.0
  assert (out["capacity_needed"], out["capacity_needed_static"], out["capacity_used"]) == (
      2, 3, 2)
  assert out["planner_ms"] == 7.0  # foresight: the host planner's own time per micro-step


def test_summary_of_a_native_update_fetches_nothing_and_eplb_ms_is_per_micro_step():
  """Foresight without replay runs the native layout: no replica fetch (fetched_experts 0, even
  though `fetch_slabs` of [[0, 1], [2, 3]] on 2 devices is 2 slabs), imbalance_used is the
  native one, and the model's capacity is used. eplb_step reports its EPLB time over the M
  micro-steps it covers: 99 ms / 2."""
  shape = balancing.BalanceShape(num_experts=4, num_devices=2, slots=3, token_shards=2,
                                 bytes_per_expert=10.0)
  bal = balancing.StepBalancer(shape, "foresight", "none", "forecast", capacity_buckets=1,
                               eplb_ema=0.0, tokens_per_shard=3, model_capacity=(3, 2))
  native = _phase_plan([[[[0, 1], [2, 3]]]] * 2)
  out, _ = bal.summary(native, native, 99.0, 0.0, balancing.StepState())
  assert out["fetched_experts"] == 0.0 and out["imbalance_used_mean"] == 2.0
  assert out["capacity_used"] == 3 and out["slots_changed"] == 0.0
  eplb = balancing.StepBalancer(shape, "eplb_step", "r3", "bucket", capacity_buckets=1,
                                eplb_ema=0.0, tokens_per_shard=3, model_capacity=(3, 2))
  step = _phase_plan([[[[0, 1, 2], [2, 3, 0]]]] * 2)
  out, _ = eplb.summary(step, step, 99.0, 0.0, balancing.StepState())
  assert out["planner_ms"] == 49.5 and out["imbalance_used_mean"] == 1.5
  assert out["fetched_experts"] == 0.5  # bound-1 all_to_all: 2 of 4 slabs
  assert out["capacity_used"] == 2  # the model's capacity on the 6-slot layout


def test_create_sizes_the_balancer_from_the_configs_and_the_mesh():
  """A (2 data, 2 expert) mesh: D = 2, P = 4 token shards, S = 4 / 2 + 1 redundant = 3. The
  micro-batch is 16 / (2 * 2) = 4 sequences of 20 slots: 80 tokens, 20 per shard. Capacity
  factor 1.5 at top-2: native E = 4 slots ceil(1.5 * 20 * 2 / 4) = 15, the 6-slot layout
  ceil(1.5 * 20 * 2 / 6) = 10. One expert's weights: 3 float32 [32, 32] matrices, 12288 B."""
  cfg = _config("foresight")
  model = dataclasses.replace(cfg.model, capacity_factor=1.5)
  bal = balancing.StepBalancer.create(cfg.rl, model, make_mesh(2, 2, devices=jax.devices()[:4]),
                                      seq_len=20)
  assert (bal.shape.num_experts, bal.shape.num_devices, bal.shape.slots,
          bal.shape.token_shards) == (4, 2, 3, 4)
  assert bal.tokens_per_shard == 20 and bal.model_capacity == (15, 10)
  assert bal.shape.bytes_per_expert == 12288.0
  assert bal.capacity_mode == "bucket" and bal.balance_mode == "foresight"
  ragged = balancing.StepBalancer.create(cfg.rl, dataclasses.replace(model, expert_impl="ragged"),
                                         make_mesh(2, 2, devices=jax.devices()[:4]), seq_len=20)
  assert ragged.model_capacity == (0, 0)


def test_no_capacity_path_means_no_bucket():
  """Dense / ragged experts (model_capacity 0) are dropless with no capacity to bucket: a
  replayed phase under capacity_mode 'bucket' keeps capacity None and reports 0 used."""
  shape, routes, valid = _hand_phase()
  bal = balancing.StepBalancer(shape, "foresight", "r3", "bucket", capacity_buckets=1,
                               eplb_ema=0.0, tokens_per_shard=3, model_capacity=(0, 0))
  _, old, _, _ = bal.plan_old_pass({"rollout_routes": routes, "valid": valid},
                                   balancing.StepState())
  assert old.needed == 2 and old.capacity is None and bal.used_capacity(old, True) == 0
