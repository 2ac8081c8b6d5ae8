"""experiments/balance_traces.py: the cost model of one RL step (`simulate_step`, behind the
`sim_speedup` of docs/results/balance.md) and the device loads and transfers of the balancing
modes (`evaluate_modes`), on hand-worked traces. End to end: tests/test_bench_balance.py."""

import numpy as np
import pytest

from experiments.balance_traces import (CostModel, evaluate_modes, layout_error, plan_fn,
                                        simulate_step, trace_from_routes)
from pr2_jax.balance import fetched_experts

import _cli

# Round rates: expert_flops = 2·3·1·1 = 6, dense_flops = 2·1 + 2·1·1 = 4, expert_bytes = 3.
# At gpu_flops 2: 3 s per (token, k) assignment, 2 s per token and layer of dense compute.
# All-to-all per layer: 2 · (peak · 1 byte / 1 B/s + 0.5 s) = 2·peak + 1 s.
# Transfers per expert: 3 · 10 / 3 = 10 s of weights, 3 · 20 / 3 = 20 s of gradients.
COST = CostModel(d_model=1, expert_ff=1, attn_params=1, heads_x_dim=1, seq_len=1, gpu_flops=2.0,
                 a2a_bytes_per_s=1.0, a2a_latency_s=0.5, xfer_bytes_per_s=3.0, act_bytes=1,
                 weight_bytes=10, grad_bytes=20)


def test_cost_model_rates():
  assert (COST.expert_flops, COST.dense_flops, COST.expert_bytes) == (6, 4, 3)


def _two_micro_steps():
  """M=2 micro-steps, L=2 layers, D=2 devices."""
  load_MLD = np.array([[[3.0, 1.0], [1.0, 1.0]],    # peaks 3, 1
                       [[2.0, 2.0], [0.0, 1.0]]])   # peaks 2, 1
  # The device fetching most over all layers: step 0 [3+1, 1+3] -> 4; step 1 [2+0, 0+3] -> 3
  # (the max per layer summed would be 6 and 5).
  transfers_MLD = np.array([[[3, 1], [1, 3]], [[2, 0], [0, 3]]])
  return {"device_load": load_MLD, "transfers": transfers_MLD}


def test_simulate_step_hand_worked():
  # micro_tokens 2 on 2 devices: dense = 2/2 · 4/2 = 2 s per layer.
  # Forward per layer = dense 2 + expert 3·peak + all-to-all 2·peak + 1:
  #   step 0: peak 3 -> 2 + 9 + 7 = 18, peak 1 -> 2 + 3 + 3 = 8: fwd_0 = 26
  #   step 1: peak 2 -> 2 + 6 + 5 = 13, peak 1 -> 8:               fwd_1 = 21
  # Fetches: 4 and 3 experts -> 40 s and 30 s; gradients 80 s and 60 s.
  # Old-log-prob pass (x1): step 0's fetch is serial (40); step 1's fetch (30) hides behind
  #   step 0's compute (26) but for 4 s: max(26, 30) = 30; step 1 hides nothing: 21.
  #   40 + 30 + 21 = 91.
  # Update (x3 = 78, 63): 40 serial; step 0 computes 78 while step 1's weights (30) come in;
  #   step 1 computes 63 while step 0's gradients (80) go back: 80; the last gradients (60)
  #   are serial. 40 + 78 + 80 + 60 = 258.
  result = _two_micro_steps()
  assert simulate_step(result, 2, 2, COST) == pytest.approx(91 + 258, rel=1e-12)
  # A planner time of 5 s per micro-step is serial, but also lengthens what transfers hide
  #   behind: x1: 40 + max(31, 30) + 26 = 97; x3: 40 + max(83, 30) + max(68, 80) + 60 = 263.
  assert simulate_step(result, 2, 2, COST, planner_s=5.0) == pytest.approx(97 + 263, rel=1e-12)


def test_simulate_step_without_transfers_is_four_forward_passes():
  result = _two_micro_steps()
  result["transfers"] = np.zeros_like(result["transfers"])
  assert simulate_step(result, 2, 2, COST) == pytest.approx(4 * (26 + 21), rel=1e-12)
  # Twice the tokens: dense 4 s per layer instead of 2, 4 layer-steps -> +8 per pass.
  assert simulate_step(result, 4, 2, COST) == pytest.approx(4 * (26 + 21 + 8), rel=1e-12)


def test_simulate_step_single_micro_step_transfers_are_serial():
  # Nothing to hide behind: fetch 40 before, gradients 80 after: 40 + 26 + 40 + 78 + 80.
  result = {k: v[:1] for k, v in _two_micro_steps().items()}
  assert simulate_step(result, 2, 2, COST) == pytest.approx(264, rel=1e-12)


# evaluate_modes: one RL step of 2 sequences, 1 layer, 4 experts on 2 devices with 3 slots each
# (native layout: device 0 = experts 0, 1; device 1 = experts 2, 3; one spare slot each).
SEQ_LOADS = np.array([[[6.0, 2.0, 0.0, 0.0]],    # sequence A
                      [[2.0, 0.0, 2.0, 0.0]]])   # sequence B; step total [8, 2, 2, 0]


def test_evaluate_modes_none_and_eplb_step_hand_worked():
  out = evaluate_modes([SEQ_LOADS], num_devices=2, slots=3, micro_seqs=1)
  none, eplb = out["none"], out["eplb_step"]
  assert none["device_load"].shape == (2, 1, 2)  # [M, L, D]: one micro-step per sequence
  # Micro-steps are the step's sequences in shuffled order; find which is A by its loads.
  a = int(np.argmax(none["device_load"][:, 0, 0]))
  b = 1 - a
  # none: A puts 6 + 2 on device 0, nothing on device 1; B 2 and 2. No experts move.
  np.testing.assert_array_equal(none["device_load"][[a, b], 0], [[8, 0], [2, 2]])
  np.testing.assert_allclose(none["imbalance"][[a, b], 0], [2.0, 1.0])
  assert not none["transfers"].any()
  # eplb_step from the step total [8, 2, 2, 0], 6 physical slots: the two extra replicas go
  # to expert 0 (8/1, then 8/2 is still the largest), 3 replicas of 8/3 each. Balanced packing,
  # heaviest first, into the lightest open device: 8/3 -> d0, 8/3 -> d1, 8/3 -> d0 (tie: first),
  # 2 -> d1, 2 -> d1 (14/3 < 16/3), 0 -> d0. Layout d0 = [0, 0, 3], d1 = [0, 1, 2].
  # A, even split of expert 0 over its 3 replicas: d0 = 2 + 2 + 0, d1 = 2 + 2 + 0.
  # B: d0 = 2/3 + 2/3 + 0, d1 = 2/3 + 0 + 2.
  np.testing.assert_allclose(eplb["device_load"][[a, b], 0], [[4, 4], [4 / 3, 8 / 3]])
  np.testing.assert_allclose(eplb["imbalance"][[a, b], 0], [1.0, 4 / 3], rtol=1e-6)
  # Moved once, before the step's first micro-step: d0 fetches expert 3 (it held 0 and 1),
  # d1 fetches 0 and 1 (it held 2 and 3).
  np.testing.assert_array_equal(eplb["transfers"][:, 0], [[1, 2], [0, 0]])
  # eplb_ema has no past on the first step: the native layout.
  np.testing.assert_array_equal(out["eplb_ema"]["device_load"], none["device_load"])
  assert not out["eplb_ema"]["transfers"].any()


def test_evaluate_modes_one_micro_step_holds_the_whole_step():
  out = evaluate_modes([SEQ_LOADS], num_devices=2, slots=3, micro_seqs=2)
  np.testing.assert_array_equal(out["none"]["device_load"], [[[10, 2]]])
  # Step total on the eplb layout: d0 = 8/3 + 8/3 + 0, d1 = 8/3 + 2 + 2.
  np.testing.assert_allclose(out["eplb_step"]["device_load"], [[[16 / 3, 20 / 3]]])
  # foresight plans for the micro-step itself: never worse than the static layout.
  fs = out["foresight"]
  assert fs["device_load"].sum() == pytest.approx(12.0)
  assert fs["imbalance"][0, 0] <= out["none"]["imbalance"][0, 0]


def test_evaluate_modes_eplb_ema_plans_from_past_steps():
  # Step 2 is step 1 with the experts reversed: A' = [0, 0, 2, 6], B' = [0, 2, 0, 2]; step 3 is
  # step 1 again.
  out = evaluate_modes([SEQ_LOADS, SEQ_LOADS[..., ::-1], SEQ_LOADS], num_devices=2, slots=3,
                       micro_seqs=1, ema=0.75)
  none, step, ema = out["none"], out["eplb_step"], out["eplb_ema"]
  a = 2 + int(np.argmax(none["device_load"][2:, 0, 1]))  # A' loads device 1 with 8
  b = 5 - a
  # eplb_ema: no past at step 1 (native layout); at step 2 the average of the past steps is
  # step 1's total, so it runs on step 1's eplb layout d0 = [0, 0, 3], d1 = [0, 1, 2], moved
  # there from the native layout before step 2's first micro-step.
  # A': d0 = 0 + 0 + 6, d1 = 0 + 0 + 2; B': d0 = 0 + 0 + 2, d1 = 0 + 2 + 0.
  np.testing.assert_array_equal(ema["device_load"][:2], none["device_load"][:2])
  np.testing.assert_allclose(ema["device_load"][[a, b], 0], [[6, 2], [2, 2]])
  np.testing.assert_array_equal(ema["transfers"][:4, 0], [[0, 0], [0, 0], [1, 2], [0, 0]])
  # Step 3 plans from 0.75 · step 1's total + 0.25 · step 2's = [6, 2, 2, 2]: expert 0 gets 3
  # replicas, every replica weighs 2, so packing goes in index order: d0 = [0, 2, 0],
  # d1 = [1, 3, 0]; from step 2's layout d0 fetches 2 and d1 fetches 3.
  # A: d0 = 2 + 0 + 2, d1 = 2 + 0 + 2; B: d0 = 2/3 + 2 + 2/3, d1 = 0 + 0 + 2/3.
  a3 = 4 + int(np.argmax(none["device_load"][4:, 0, 0]))
  np.testing.assert_allclose(ema["device_load"][[a3, 9 - a3], 0], [[4, 4], [10 / 3, 2 / 3]])
  np.testing.assert_array_equal(ema["transfers"][4:, 0], [[1, 1], [0, 0]])
  # eplb_step re-plans from step 2's total [0, 2, 2, 8]: 3 replicas of expert 3, packed as in
  # step 1 with the roles of experts 0 and 3 swapped: d0 = [3, 3, 0], d1 = [3, 1, 2]. From
  # step 1's layout only d1 fetches an expert (3).
  # A': d0 = 2 + 2 + 0, d1 = 2 + 0 + 2; B': d0 = 2/3 + 2/3 + 0, d1 = 2/3 + 2 + 0.
  np.testing.assert_allclose(step["device_load"][[a, b], 0], [[4, 4], [4 / 3, 8 / 3]])
  np.testing.assert_array_equal(step["transfers"][:4, 0], [[1, 2], [0, 0], [0, 1], [0, 0]])


def test_run_as_a_command_it_says_it_is_a_library():
  _cli.says_it_is_a_library("experiments.balance_traces", "experiments.bench_balance")


def test_layout_error_names_the_flags():
  """What native_layout refuses (after the work before it), as bench_balance's flags or the
  parts of its --rollout_model."""
  assert layout_error(16, 2, 4, 4) is None and layout_error(8, 8, 4, 3) is None
  assert layout_error(15, 2, 4, 6) == "--experts=15 must be a multiple of --devices=4"
  assert layout_error(16, 2, 4, 1) == ("--slots=1 must be at least experts / devices = 4 (each "
                                       "device's native experts)")
  assert layout_error(8, 9, 4, 3, "rollout_model") == ("--rollout_model: top_k=9 must be at most "
                                                       "experts=8")


def test_trace_from_routes_counts_valid_tokens_per_sequence():
  """[B=2, T=3, L=2, K=2] routes per step: per sequence, the (token, k) pairs of each expert in
  each layer, padding (valid False) and -1 (live router) not counted; one array per step."""
  routes = np.array([[[[0, 1], [2, 3]], [[0, 2], [2, -1]], [[3, 3], [0, 0]]],     # seq 0
                     [[[1, 2], [1, 2]], [[1, 3], [3, 0]], [[0, 0], [1, 1]]]],    # seq 1
                    np.int32)
  valid = np.array([[True, True, False], [True, True, True]])
  want = np.array([[[2, 1, 1, 0], [0, 0, 2, 1]],   # seq 0: its 3rd token is padding
                   [[2, 2, 1, 1], [1, 3, 1, 1]]], np.float32)
  (step1, step2) = trace_from_routes([(routes, valid), (routes[::-1], valid)], 4)
  np.testing.assert_array_equal(step1, want)
  np.testing.assert_array_equal(step2[1], [[2, 1, 1, 2], [2, 0, 2, 1]])  # seq 0, all valid


def test_foresight_plans_are_chained_through_the_previous_micro_step():
  """One micro-step per RL step (micro_seqs = B): step 2's plan starts from step 1's layout
  (`previous`), its transfers count the experts it fetches since then, and a variant's keyword
  overrides take effect. Replayed here with the same planner, called by hand."""
  import jax.numpy as jnp
  from pr2_jax.balance import native_layout
  from pr2_jax.balance.planner import DEFAULT_METHOD
  trace = [SEQ_LOADS, SEQ_LOADS[..., ::-1], SEQ_LOADS[..., ::-1]]
  out = evaluate_modes(trace, num_devices=2, slots=3, micro_seqs=2,
                       variants={"kept": {"min_gain": 10.0}})
  for name, min_gain in (("foresight", None), ("kept", 10.0)):
    fn = plan_fn(2, 3, 0.25, 8, min_gain, DEFAULT_METHOD)
    prev = np.broadcast_to(native_layout(4, 2, 3), (1, 2, 3))
    for m, seq_loads in enumerate(trace):
      plan = fn(jnp.asarray(seq_loads.sum(0)), jnp.asarray(prev))
      new = np.asarray(plan.slot_expert)
      np.testing.assert_allclose(out[name]["device_load"][m], plan.device_load, rtol=1e-6)
      np.testing.assert_array_equal(out[name]["transfers"][m], fetched_experts(new, prev))
      prev = new
  # Step 2 reverses the loads: experts move; step 3 repeats step 2: nothing left to fetch.
  fs, kept = out["foresight"], out["kept"]
  assert fs["transfers"][1].sum() > 0 and not fs["transfers"][2].any()
  # min_gain = 10 (move only when the kept layout's peak is above 11x the new one's): from
  # step 2 on the variant keeps step 1's (full) layout, re-split, and fetches nothing.
  np.testing.assert_array_equal(kept["transfers"][0], fs["transfers"][0])
  assert not kept["transfers"][1:].any()
  assert kept["imbalance"][1, 0] > fs["imbalance"][1, 0]


def test_synthetic_routes_follow_the_popularity_and_each_sequence_cluster():
  """Logit gaps of 100 (layer 0 prefers experts 3 > 2 > 1 > 0, layer 1 the reverse) leave the
  Gumbel noise no say: without a boost every token of layer 0 takes {2, 3} and of layer 1
  {0, 1}. A boost of 1000 on one expert per sequence and layer puts it in every token's top-2,
  beside the most popular other expert: in layer 0 the pair holds 3, in layer 1 it holds 0,
  and it is the same for all tokens of a sequence. Each layer draws its own boosted expert: one
  expert c boosted in both layers gives the pairs ({c, 3} or {2, 3}, {c, 0} or {0, 1})."""
  from experiments.balance_traces import synthetic_routes
  base_LE = np.array([[0.0, 100.0, 200.0, 300.0], [300.0, 200.0, 100.0, 0.0]], np.float32)
  rng = np.random.default_rng(0)
  routes = synthetic_routes(rng, base_LE, num_seqs=3, seq_len=5, top_k=2, cluster=1, boost=0.0)
  assert routes.shape == (3, 5, 2, 2) and routes.dtype == np.int32
  assert {tuple(sorted(r)) for r in routes[:, :, 0].reshape(-1, 2)} == {(2, 3)}
  assert {tuple(sorted(r)) for r in routes[:, :, 1].reshape(-1, 2)} == {(0, 1)}
  routes = synthetic_routes(rng, base_LE, num_seqs=8, seq_len=5, top_k=2, cluster=1,
                            boost=1000.0)
  pairs = []
  for seq in routes:
    (pair_0,) = {tuple(sorted(r)) for r in seq[:, 0]}  # one pair per sequence and layer
    (pair_1,) = {tuple(sorted(r)) for r in seq[:, 1]}
    assert 3 in pair_0 and 0 in pair_1, (pair_0, pair_1)
    pairs.append((pair_0, pair_1))
  assert len({p for p, _ in pairs}) > 1  # the boosted expert differs between sequences
  shared = {(tuple(sorted({c, 3})) if c != 3 else (2, 3), tuple(sorted({c, 0})) if c else (0, 1))
            for c in range(4)}
  assert not set(pairs) <= shared, pairs
