"""moe_experts under shard_map equals the single-device result; replicas change nothing; drops
counted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax import moe_experts
from pr2_jax.models import experts as ex
from pr2_jax.parallel.mesh import make_mesh

N, D, F, E, K = 32, 16, 16, 8, 2
IMPLS = ("capacity", "dense", "ragged", "grouped")
MESHES = ((2, 4), (1, 8))


@functools.lru_cache(maxsize=None)
def _mesh(data, expert):
  return make_mesh(data, expert)


def _problem(seed=0, skew=False):
  rng = np.random.default_rng(seed)
  if skew:  # expert 0 is hot: every token's first choice
    ids = np.stack([[0, rng.integers(1, E)] for _ in range(N)])
  else:
    ids = np.stack([rng.permutation(E)[:K] for _ in range(N)])
  x = rng.normal(size=(N, D)).astype(np.float32)
  gates = rng.uniform(0.1, 1.0, size=(N, K)).astype(np.float32)
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  w = ex.ExpertWeights(jax.random.normal(ks[0], (E, D, F)) * 0.3,
                       jax.random.normal(ks[1], (E, D, F)) * 0.3,
                       jax.random.normal(ks[2], (E, F, D)) * 0.3)
  return jnp.asarray(x), jnp.asarray(ids, jnp.int32), jnp.asarray(gates), w


def _value_and_grads(x, ids, gates, w, **kw):
  """One jit: forward output, dropped count and grads of <y, cot> w.r.t. (x, gates, weights)."""
  cot = jax.random.normal(jax.random.PRNGKey(42), (N, D))

  @jax.jit
  def run(x, gates, w):
    def loss(x, gates, w):
      y, dropped = moe_experts(x, ids, gates, w, **kw)
      return jnp.sum(y * cot), (y, dropped)
    (_, (y, dropped)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        x, gates, w)
    return y, dropped, grads

  return run(x, gates, w)


def _assert_close(a, b, what, rtol=1e-5, atol=1e-5):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=what)


@functools.lru_cache(maxsize=None)
def _reference(impl):
  x, ids, gates, w = _problem()
  return _value_and_grads(x, ids, gates, w, impl=impl, mesh=None)


def test_single_device_paths_agree():
  """Without a mesh the three impls agree in output and gradients; nothing dropped."""
  y_ref, dropped, g_ref = _reference("dense")
  assert int(dropped) == 0
  assert float(jnp.max(jnp.abs(y_ref))) > 0
  for impl in ("capacity", "ragged", "grouped"):
    y, dropped, g = _reference(impl)
    assert int(dropped) == 0
    _assert_close(y, y_ref, impl, rtol=1e-4)
    _assert_close(g, g_ref, impl, rtol=1e-4)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_sharded_equals_single_device(impl, shape):
  """On meshes (2,4) and (1,8) output and grads (x, gates, weights) equal the mesh=None result."""
  x, ids, gates, w = _problem()
  y, dropped, g = _value_and_grads(x, ids, gates, w, impl=impl, mesh=_mesh(*shape))
  y_ref, _, g_ref = _reference(impl)
  assert int(dropped) == 0
  _assert_close(y, y_ref, f"{impl} {shape} forward")
  _assert_close(g, g_ref, f"{impl} {shape} grads")


@pytest.mark.parametrize("shape", ((8, 1),) + MESHES)
def test_dropless_capacity_runs_grouped(shape):
  """A dropless capacity (the whole shard) takes the grouped path: no [P, S, n, D] buffer
  and no all_to_all, tokens all-gathered over 'expert' when it is split. Values and
  gradients equal the dense reference; on (8, 1) the weight gradients (partial sums per
  data shard) must add up over 'data'. A capacity with a factor keeps the all_to_all."""
  x, ids, gates, w = _problem()
  y, dropped, g = _value_and_grads(x, ids, gates, w, impl="capacity", mesh=_mesh(*shape))
  y_ref, _, g_ref = _reference("dense")
  assert int(dropped) == 0
  _assert_close(y, y_ref, "forward", rtol=1e-4)
  _assert_close(g, g_ref, "grads", rtol=1e-4)

  def hlo(**kw):
    fn = jax.jit(lambda x, g, w: moe_experts(x, ids, g, w, impl="capacity",
                                             mesh=_mesh(*shape), **kw))
    return fn.lower(x, gates, w).compile().as_text()
  dropless = hlo()
  assert "all-to-all" not in dropless
  assert ("all-gather" in dropless) == (shape[1] > 1)
  if shape[1] > 1:
    assert "all-to-all" in hlo(capacity_factor=1.25)


def _replica_map(shape):
  """Per device its E/P native experts plus one extra slot holding a copy of a hot expert."""
  p = shape[1]
  native = E // p
  hot = [0, 0, 1, 3, 0, 2, 1, 0][:p]
  return np.concatenate([np.r_[np.arange(d * native, (d + 1) * native), hot[d]] for d in range(p)]
                        ).astype(np.int32)


def _spread_over_replicas(ids, slot_expert, seed=0):
  """A planner-like choice: each assignment goes to a random slot holding its expert."""
  rng = np.random.default_rng(seed)
  ids = np.asarray(ids)
  out = np.empty_like(ids)
  for idx, e in np.ndenumerate(ids):
    out[idx] = rng.choice(np.flatnonzero(slot_expert == e))
  return out.astype(np.int32)


@pytest.mark.parametrize("shape", MESHES)
def test_grouped_with_a_hot_expert_equals_single_device_dense(shape):
  """Expert 0 takes every first choice: its shard's group exceeds the one-einsum capacity
  and runs the blocks while the other shards fit (a per-shard run-time choice); output
  and grads still equal the single-device dense reference."""
  x, ids, gates, w = _problem(seed=5, skew=True)
  y_ref, _, g_ref = _value_and_grads(x, ids, gates, w, impl="dense", mesh=None)
  y, dropped, g = _value_and_grads(x, ids, gates, w, impl="grouped", mesh=_mesh(*shape))
  assert int(dropped) == 0
  _assert_close(y, y_ref, f"grouped {shape} hot expert forward", rtol=1e-4)
  _assert_close(g, g_ref, f"grouped {shape} hot expert grads", rtol=1e-4)


@pytest.mark.parametrize("shape", MESHES)
@pytest.mark.parametrize("impl", IMPLS)
def test_replica_slots_change_nothing(impl, shape):
  """With extra replica slots used by real tokens, output and all grads equal no-replication;
  the expert-weight gradient is the owner's (replica grads sum back into it)."""
  x, ids, gates, w = _problem(skew=True)
  slot_expert = _replica_map(shape)
  slot_ids = _spread_over_replicas(ids, slot_expert)
  hot_slots = [s for s in range(len(slot_expert)) if (slot_expert[:s] == slot_expert[s]).any()]
  assert np.isin(slot_ids, hot_slots).any()  # replicas really receive tokens
  mesh = _mesh(*shape)
  y_ref, _, g_ref = _value_and_grads(x, ids, gates, w, impl=impl, mesh=mesh)
  y, dropped, g = _value_and_grads(x, ids, gates, w, impl=impl, mesh=mesh,
                                   slot_expert_X=jnp.asarray(slot_expert),
                                   slot_ids_NK=jnp.asarray(slot_ids))
  assert int(dropped) == 0
  assert g[2].gate_SDF.shape == (E, D, F)
  _assert_close(y, y_ref, f"{impl} {shape} replicas forward")
  _assert_close(g, g_ref, f"{impl} {shape} replicas grads")


def test_replica_map_default_slot_choice_and_no_mesh():
  """Without slot_ids the first slot holding each expert is used; mesh=None accepts a slot map."""
  x, ids, gates, w = _problem(seed=1, skew=True)
  slot_expert = jnp.asarray(_replica_map((2, 4)))
  y_ref, _, g_ref = _value_and_grads(x, ids, gates, w, impl="capacity", mesh=None)
  for mesh in (None, _mesh(2, 4)):
    y, _, g = _value_and_grads(x, ids, gates, w, impl="capacity", mesh=mesh,
                               slot_expert_X=slot_expert)
    _assert_close(y, y_ref, f"default slots, mesh={mesh}")
    _assert_close(g, g_ref, f"default slots, mesh={mesh}")


@pytest.mark.parametrize("shape", [(1, 1), (2, 4), (1, 8)])
def test_dropped_count_and_output_with_small_capacity(shape):
  """Capacity 2 per (source shard, slot): dropped = numpy count per token shard, and the output
  equals the dense path with the dropped gates zeroed."""
  x, ids, gates, w = _problem(seed=2, skew=True)
  mesh = None if shape == (1, 1) else _mesh(*shape)
  shards = shape[0] * shape[1]
  capacity = 2
  y, dropped, _ = _value_and_grads(x, ids, gates, w, impl="capacity", mesh=mesh, capacity=capacity)
  # numpy oracle: per token shard, k-major arrival, at most `capacity` per slot.
  ids_np, keep = np.asarray(ids), np.zeros((N, K), bool)
  n = N // shards
  for s in range(shards):
    count = np.zeros(E, int)
    for k in range(K):
      for t in range(s * n, (s + 1) * n):
        keep[t, k] = count[ids_np[t, k]] < capacity
        count[ids_np[t, k]] += 1
  assert int(dropped) == int((~keep).sum()) > 0
  ref = ex.dense_experts(x, ids, jnp.where(keep, gates, 0.0), w)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)


def test_capacity_factor_sets_capacity():
  """capacity_factor=1 on one shard: even share 32*2/8 = 8 per slot; the hot expert drops 24."""
  x, ids, gates, w = _problem(seed=3, skew=True)  # expert 0 gets all 32 first choices
  _, dropped, _ = _value_and_grads(x, ids, gates, w, impl="capacity", mesh=None,
                                   capacity_factor=1.0)
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
  assert int(dropped) == int(np.maximum(counts - 8, 0).sum())
  assert int(dropped) >= 24



@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_capacity_factor_outside_model_configs_range_is_refused(bad):
  """-1 ran as dropless (capacity_for reads any factor <= 0 so) and NaN or inf failed in int();
  ModelConfig refuses them. 0 and 1 give their capacities, under jit too."""
  x, ids, gates, w = _problem(seed=3, skew=True)
  with pytest.raises(ValueError, match=rf"capacity_factor={bad} must be a finite number >= 0 "
                                       r"\(0 = dropless\)"):
    moe_experts(x, ids, gates, w, capacity_factor=bad)
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=E)
  for factor, dropped in ((0.0, 0), (1.0, int(np.maximum(counts - 8, 0).sum()))):
    y, eager = moe_experts(x, ids, gates, w, capacity_factor=factor)
    jitted = jax.jit(lambda x: moe_experts(x, ids, gates, w, capacity_factor=factor))(x)
    assert int(eager) == int(jitted[1]) == dropped
    np.testing.assert_allclose(jitted[0], y, rtol=1e-6, atol=1e-6)

def test_bfloat16_compute_is_close_to_float32():
  """dtype=bfloat16 runs sharded and stays near the float32 result; output is float32."""
  x, ids, gates, w = _problem()
  y32, _, _ = _reference("capacity")
  y16, _ = jax.jit(functools.partial(moe_experts, impl="capacity", mesh=_mesh(2, 4),
                                     dtype=jnp.bfloat16))(
      x, ids, gates, w)
  assert y16.dtype == jnp.float32
  np.testing.assert_allclose(y16, y32, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(y32))))


def test_errors():
  """Indivisible tokens, experts or slots, and capacity < 1, raise with a clear message."""
  x, ids, gates, w = _problem()
  with pytest.raises(ValueError, match=r"30 tokens cannot be split over 8 token shards"):
    moe_experts(x[:30], ids[:30], gates[:30], w, mesh=_mesh(2, 4))
  w6 = ex.ExpertWeights(*(a[:6] for a in w))
  with pytest.raises(ValueError, match=r"num_experts=6 must be divisible by the "
                                       r"'expert' axis size 4"):
    moe_experts(x, ids % 6, gates, w6, mesh=_mesh(2, 4))
  with pytest.raises(ValueError, match=r"slot_expert has 10 slots, not a multiple of the "
                                       r"'expert' axis size 8"):
    moe_experts(x, ids, gates, w, mesh=_mesh(1, 8),
                slot_expert_X=jnp.arange(10, dtype=jnp.int32) % E)
  with pytest.raises(ValueError, match=r"capacity=0 must be >= 1"):
    moe_experts(x, ids, gates, w, mesh=None, capacity=0)
  # Were cut to 2 silently, taken as 1, and a TracerBoolConversionError.
  for bad in (2.5, True):
    with pytest.raises(ValueError, match=rf"capacity={bad} must be >= 1, a static int"):
      moe_experts(x, ids, gates, w, mesh=None, capacity=bad)
  with pytest.raises(ValueError, match=r"capacity=.*Tracer.* must be >= 1, a static int"):
    jax.jit(lambda c: moe_experts(x, ids, gates, w, mesh=None, capacity=c)[0])(4)


def _small():
  """N=16 tokens, E=4 experts, top-2 (the review's example)."""
  rng = np.random.default_rng(11)
  ids = np.stack([rng.permutation(4)[:2] for _ in range(16)]).astype(np.int32)
  w = ex.ExpertWeights(jnp.ones((4, D, F)), jnp.ones((4, D, F)), jnp.ones((4, F, D)))
  return jnp.ones((16, D)), ids, jnp.ones((16, 2)), w


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [9, 4, -1])
def test_expert_ids_outside_the_experts_raise(impl, bad):
  """An id >= E or < 0 used to be dropped silently (and `dropped` still said 0)."""
  x, ids, gates, w = _small()
  ids[3, 1] = bad
  match = rf"expert_ids_NK\[3, 1\] = {bad} is outside \[0, num_experts=4\)"
  with pytest.raises(ValueError, match=match):
    moe_experts(x, jnp.asarray(ids), gates, w, impl=impl)
  with pytest.raises(ValueError, match=match):
    moe_experts(x, jnp.asarray(ids), gates, w, impl=impl, mesh=_mesh(2, 4))


@pytest.mark.parametrize("impl", IMPLS)
def test_mismatched_shapes_and_unknown_impl_raise_even_under_jit(impl):
  x, ids, gates, w = _small()
  ids = jnp.asarray(ids)
  run = lambda *a, **kw: jax.jit(functools.partial(moe_experts, impl=impl, **kw))(*a)  # noqa: E731
  with pytest.raises(ValueError, match=r"expert_ids has 16 tokens but x has 8"):
    run(x[:8], ids, gates, w)
  with pytest.raises(ValueError, match=r"gates has shape \(16, 1\), expected expert_ids' "
                                       r"\(16, 2\)"):
    run(x, ids, gates[:, :1], w)
  with pytest.raises(ValueError, match=r"slot_ids has shape \(16, 1\)"):
    run(x, ids, gates, w, slot_ids_NK=ids[:, :1])
  with pytest.raises(ValueError, match=r"x must be \[N, D\] and expert_ids \[N, K\]; got shapes "
                                       r"\(16, 16\) and \(16,\)"):
    run(x, ids[:, 0], gates, w)
  with pytest.raises(ValueError, match=r"x has d_model 4, the expert weights 16"):
    run(x[:, :4], ids, gates, w)
  # (1,) and (8,) are [N]-like but not N: (1,) broadcast over every token without a mesh.
  for bad, shape, dtype in (((2, 8), r"\(2, 8\)", "bool"), (16, r"\(16,\)", "int32"),
                            (1, r"\(1,\)", "bool"), (8, r"\(8,\)", "bool")):
    with pytest.raises(ValueError, match=rf"valid_N has shape {shape} and dtype {dtype}; "
                                         r"expected bool \[N\] = \(16,\)"):
      run(x, ids, gates, w, valid_N=jnp.ones(bad, jnp.dtype(dtype)))
  with pytest.raises(TypeError, match=r"expert_ids has dtype float32"):
    run(x, ids.astype(jnp.float32), gates, w)
  with pytest.raises(ValueError, match=r"impl='fast' is not one of \('capacity', 'ragged', "):
    moe_experts(x, ids, gates, w, impl="fast")


def test_bad_slot_maps_raise():
  """A map without a slot for an expert used to send its tokens to slot 0's weights; a slot
  holding expert 7 of 4 (or 20, NaN logits through the model) was accepted."""
  x, ids, gates, w = _small()
  ids = jnp.asarray(ids)
  with pytest.raises(ValueError, match=r"slot_expert_X has no slot for expert\(s\) \[3\] of "
                                       r"num_experts=4"):
    moe_experts(x, ids, gates, w, slot_expert_X=jnp.array([0, 1, 2, 2], jnp.int32))
  with pytest.raises(ValueError, match=r"slot_expert_X\[4\] = 7 is outside \[0, num_experts=4\)"):
    moe_experts(x, ids, gates, w, slot_expert_X=jnp.array([0, 1, 2, 3, 7, 0, 1, 2], jnp.int32))
  with pytest.raises(ValueError, match=r"slot_expert_X\[0\] = 20 is outside"):
    moe_experts(x, ids, gates, w, slot_expert_X=jnp.full((8,), 20, jnp.int32), mesh=_mesh(2, 4))
  with pytest.raises(ValueError, match=r"slot_expert_X must be one layer's map \[X\]"):
    moe_experts(x, ids, gates, w, slot_expert_X=jnp.arange(4, dtype=jnp.int32)[None])
  slot_expert = jnp.array([0, 1, 2, 3, 0, 1], jnp.int32)
  slot_ids = np.asarray(ids).copy()
  slot_ids[5, 0] = 6
  with pytest.raises(ValueError, match=r"slot_ids_NK\[5, 0\] = 6 is outside "
                                       r"\[0, number of slots=6\)"):
    moe_experts(x, ids, gates, w, slot_expert_X=slot_expert, slot_ids_NK=jnp.asarray(slot_ids))
  other = (int(ids[5, 0]) + 1) % 4  # slot `other` holds expert `other`
  slot_ids[5, 0] = other
  with pytest.raises(ValueError, match=rf"slot_ids_NK\[5, 0\] = {other} holds expert {other}, "
                                       rf"but expert_ids_NK\[5, 0\] = {int(ids[5, 0])}"):
    moe_experts(x, ids, gates, w, slot_expert_X=slot_expert, slot_ids_NK=jnp.asarray(slot_ids))


def test_valid_replica_slot_choice_is_accepted_and_matches_the_default():
  """The value checks accept a planner's choice of replicas (slot 4 holds expert 0 too)."""
  x, ids, gates, w = _problem(seed=2)
  slot_expert = jnp.asarray(np.r_[np.arange(E), np.arange(E)].astype(np.int32))
  slot_ids = np.where(np.asarray(ids) == 0, E, np.asarray(ids)).astype(np.int32)
  y, _ = moe_experts(x, ids, gates, w, impl="dense", slot_expert_X=slot_expert,
                     slot_ids_NK=jnp.asarray(slot_ids))
  y_ref, _ = moe_experts(x, ids, gates, w, impl="dense")
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype, num_slots", [("float32", 8), ("bfloat16", 8),
                                              ("float32", 2 ** 24),  # the last two: 3 gathers
                                              ("float32", 2 ** 24 + 1)])
def test_gather_assignments_equals_three_gathers_with_gate_gradients(dtype, num_slots):
  """One packed all-gather over 'expert' returns what three would, bit for bit (slot ids exact,
  -1 and padding's "no slot" id num_slots included), and the gates' gradient comes back to each
  shard (psum_scatter's transpose). At num_slots = 2^24 + 1 the "no slot" id is not a float32
  (it rounds to 2^24, slot num_slots - 1): packing it would send padding to the last slot."""
  from jax.sharding import PartitionSpec as P
  from pr2_jax.parallel.expert_parallel import gather_assignments
  from pr2_jax.parallel.mesh import EXPERT
  mesh = _mesh(1, 8)
  x, ids, gates, _ = _problem(3)
  x = x.astype(dtype)
  ids = ids.at[0, 1].set(-1).at[5, 0].set(num_slots - 1).at[6, 1].set(num_slots)
  cot = jnp.arange(N * K, dtype=jnp.float32).reshape(N, K)

  def run(fn):
    body = jax.shard_map(fn, mesh=mesh, in_specs=(P(EXPERT), P(EXPERT), P(EXPERT)),
                         out_specs=(P(), P(), P()), check_vma=False)
    return jax.jit(body)(x, ids, gates)

  gather = functools.partial(jax.lax.all_gather, axis_name=EXPERT, tiled=True)
  got = run(lambda a, b, c: gather_assignments(a, b, c, num_slots))
  want = run(lambda a, b, c: (gather(a), gather(b), gather(c)))
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and np.array_equal(np.asarray(g), np.asarray(w))
  np.testing.assert_array_equal(got[1], ids)  # every shard's rows, in shard order

  def gate_grad(fn):
    body = jax.shard_map(lambda a, b, c: jnp.sum(fn(a, b, c)[2] * cot), mesh=mesh,
                         in_specs=(P(EXPERT), P(EXPERT), P(EXPERT)), out_specs=P(),
                         check_vma=False)
    return np.asarray(jax.jit(jax.grad(lambda c: body(x, ids, c)))(gates))

  got_grad = gate_grad(lambda a, b, c: gather_assignments(a, b, c, num_slots))
  want_grad = gate_grad(lambda a, b, c: (gather(a), gather(b), gather(c)))
  np.testing.assert_array_equal(got_grad, want_grad)
  np.testing.assert_allclose(got_grad / got_grad[0, 1], cot / cot[0, 1], rtol=1e-6)  # ∝ cot


@pytest.mark.parametrize("impl", ["capacity", "grouped"])
def test_eager_calls_on_a_mesh_with_the_same_shapes_compile_once(impl):
  """Outside jit, shard_map ran the body op by op and compiled every op again on each call; the
  jitted shard_map traces once per shapes and static arguments. Capacity 2 of a shard's 4
  tokens: the capacity path's all_to_all, not its dropless (grouped) shortcut."""
  from test_grouped import count_lowerings
  x, ids, gates, w = _problem(5)
  call = functools.partial(moe_experts, impl=impl, mesh=_mesh(2, 4), capacity=2)
  call(x, ids, gates, w)
  x2, gates2 = x * 2, gates * 0.5  # other values, outside the count
  with count_lowerings() as built:
    y, dropped = call(x2, ids, gates2, w)
  assert built == []
  y_jit, dropped_jit = jax.jit(call)(x2, ids, gates2, w)
  np.testing.assert_array_equal(y, y_jit)
  assert int(dropped) == int(dropped_jit) and (int(dropped) > 0) == (impl == "capacity")


def test_capacity_factor_is_an_even_share_of_the_slots():
  """capacity_factor 1 over 12 slots (E = 8 plus 4 replicas) and 32 tokens x 2: a slot takes
  ceil(64 / 12) = 6. Every token's first pick is expert 0 (its first slot takes them all):
  32 - 6 = 26 dropped, the second picks (4 or 5 to each of experts 1-7) none. Sharing over the
  experts instead (capacity 8, 24 dropped) passed every test, none with replicas and a factor."""
  x, _, gates, w = _problem()
  ids = jnp.stack([jnp.zeros(N, jnp.int32), 1 + jnp.arange(N, dtype=jnp.int32) % 7], axis=1)
  slot_map = jnp.asarray(list(range(E)) + [0, 1, 2, 3], jnp.int32)
  _, dropped = moe_experts(x, ids, gates, w, capacity_factor=1.0, slot_expert_X=slot_map)
  assert int(dropped) == 26


# Padding (valid_N False) by hand: E = 4 experts, top-2, 8 tokens. Tokens 0-2 are identical left
# pads and 7 a right pad, all routed (0, 1) as a pad-hot expert pair; 3-6 are real.
PAD_IDS = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [2, 0], [2, 3], [3, 2], [0, 1]], np.int32)
PAD_VALID = np.array([False, False, False, True, True, True, True, False])
# A map copying e2 onto expert shard 0 (slot 2) and e0 onto shard 1 (slot 5), and a planner's
# slot choice sending (t4, k1) to e0's copy and (t6, k1) to e2's: nothing overflows.
PAD_SLOT_MAP = np.array([0, 1, 2, 2, 3, 0], np.int32)
PAD_SLOTS = np.array([[0, 1], [0, 1], [0, 1], [1, 0], [3, 5], [3, 4], [4, 2], [0, 1]], np.int32)


def _pad_problem():
  ks = jax.random.split(jax.random.PRNGKey(7), 5)
  w = ex.ExpertWeights(jax.random.normal(ks[0], (4, D, F)) * 0.3,
                       jax.random.normal(ks[1], (4, D, F)) * 0.3,
                       jax.random.normal(ks[2], (4, F, D)) * 0.3)
  x = jax.random.normal(ks[3], (8, D))
  x = x.at[:3].set(x[0])  # the left pads share one hidden state
  return x, jnp.asarray(PAD_IDS), jax.random.uniform(ks[4], (8, 2), minval=0.1), w


@pytest.mark.parametrize("mesh_shape", [None, (1, 2)])
@pytest.mark.parametrize("impl, replicas", [("capacity", False), ("capacity", True),
                                            ("grouped", False), ("grouped", True),
                                            ("dense", False), ("ragged", False)])
def test_padding_takes_no_capacity_and_gets_zero(impl, replicas, mesh_shape):
  """Capacity 2 per (token shard, slot). Without the pads (valid_N) every real assignment keeps
  its place except (t6, k1): in k-major order e2 gets t4, t5 (1st choices) then t6 (2nd), on
  one shard as on the second of two (tokens 4-7). Counted, the pads took e0's places first:
  (t3, k1) was dropped too, on one shard (e0 1st choices t0-t2, t7) and on two (t0-t2), so t3's
  output changed. With the map and slot choice of PAD_SLOTS no buffer holds more than 2 real
  assignments: nothing is dropped. Real rows equal the dense reference over the kept real
  assignments, pad rows are 0 (no gradient reaches them), `dropped` counts real ones only; the
  dropless paths agree."""
  x, ids, gates, w = _pad_problem()
  mesh = None if mesh_shape is None else make_mesh(*mesh_shape, devices=jax.devices()[:2])
  kw = dict(impl=impl, mesh=mesh, capacity=2, valid_N=jnp.asarray(PAD_VALID))
  if replicas:
    kw.update(slot_expert_X=jnp.asarray(PAD_SLOT_MAP), slot_ids_NK=jnp.asarray(PAD_SLOTS))
  keep = np.broadcast_to(PAD_VALID[:, None], (8, 2)).copy()
  if impl == "capacity" and not replicas:
    keep[6, 1] = False
  cot = jax.random.normal(jax.random.PRNGKey(9), (8, D))

  @jax.jit
  def run(x, gates, w):
    (y, dropped), vjp = jax.vjp(lambda x: moe_experts(x, ids, gates, w, **kw), x)
    return y, dropped, vjp((cot, np.zeros((), jax.dtypes.float0)))[0]

  y, dropped, dx = run(x, gates, w)
  assert int(dropped) == int((PAD_VALID[:, None] & ~keep).sum())
  want = ex.dense_experts(x, ids, jnp.where(keep, gates, 0.0), w)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y[~PAD_VALID], 0.0)
  assert np.all(np.max(np.abs(np.asarray(y)[PAD_VALID]), axis=1) > 0)
  np.testing.assert_array_equal(dx[~PAD_VALID], 0.0)
  assert float(jnp.max(jnp.abs(dx[PAD_VALID]))) > 0


def test_a_plan_or_a_list_as_the_slot_map_is_named():
  """MoETransformer takes a Plan; moe_experts takes one layer's array, and a Plan there was an
  AttributeError ('Plan' object has no attribute 'ndim')."""
  from pr2_jax.balance.planner import plan_placement
  plan = plan_placement(np.ones((1, 4), np.float32), 2, 3)
  x, ids = jnp.zeros((2, 8)), jnp.zeros((2, 2), jnp.int32).at[:, 1].set(1)
  w = ex.ExpertWeights(jnp.zeros((4, 8, 8)), jnp.zeros((4, 8, 8)), jnp.zeros((4, 8, 8)))
  for bad in (plan, [0, 1, 2, 3, 0, 1]):
    with pytest.raises(ValueError, match=r"slot_expert_X must be an int array \[X\]"):
      moe_experts(x, ids, jnp.ones((2, 2)) / 2, w, slot_expert_X=bad)
