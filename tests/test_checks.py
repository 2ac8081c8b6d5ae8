"""Tests for pr2_jax.checks: the shared static and host-side input checks."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pr2_jax import checks


def test_is_concrete_is_false_inside_jit_and_true_outside():
  seen = []
  jax.jit(lambda x: seen.append(checks.is_concrete(x)) or x)(jnp.ones(2))
  assert seen == [False]
  assert checks.is_concrete(jnp.ones(2)) and checks.is_concrete(np.ones(2))
  assert checks.is_concrete(3.0)


def test_check_shape_is_exact_and_works_on_tracers():
  checks.check_shape("x", np.ones((2, 3)), (2, 3), "[B, T]")
  with pytest.raises(ValueError, match=r"adv has shape \(3, 3\), expected \[B\] = \(3,\): per seq"):
    checks.check_shape("adv", np.ones((3, 3)), (3,), "[B]", ": per seq")
  with pytest.raises(ValueError, match=r"x has shape \(2, 1\), expected \[B, T\] = \(2, 3\)"):
    jax.eval_shape(lambda x: checks.check_shape("x", x, (2, 3), "[B, T]"), jnp.ones((2, 1)))


def test_check_ids_names_the_first_bad_entry():
  checks.check_ids(np.array([[0, 3], [2, 1]]), "ids", 0, 4, "E")
  with pytest.raises(ValueError, match=r"ids\[1, 0\] = 4 is outside \[0, E=4\)"):
    checks.check_ids(np.array([[0, 3], [4, -1]]), "ids", 0, 4, "E")
  with pytest.raises(ValueError, match=r"ids\[1\] = -2 is outside \[-1, E=4\)"):
    checks.check_ids(np.array([-1, -2]), "ids", -1, 4, "E")
  with pytest.raises(TypeError, match="ids has dtype float32, expected an integer dtype"):
    checks.check_ids(np.array([0.0, 1.0], np.float32), "ids", 0, 4, "E")


def test_check_int_dtype_is_static():
  """Reads only the dtype, so it runs on tracers too (check_ids skips them)."""
  checks.check_int_dtype("ids", np.array([1], np.int64))
  checks.check_int_dtype("ids", [1, 2])
  with pytest.raises(TypeError, match=r"ids has dtype float32, expected an integer dtype"):
    jax.jit(lambda x: checks.check_int_dtype("ids", x) or x)(jnp.array([1.0]))
  with pytest.raises(ValueError, match=r"routes has dtype bool, expected int32 expert ids"):
    checks.check_int_dtype("routes", np.array([True]), "int32 expert ids", ValueError)


def test_as_array_converts_only_what_is_not_an_array():
  x = np.array([1, 2], np.int64)
  assert checks.as_array(x) is x  # numpy int64 keeps its values for the checks
  y = jnp.ones(2)
  assert checks.as_array(y) is y
  got = checks.as_array([[1.0, 2.0]])
  assert isinstance(got, jax.Array) and got.shape == (1, 2) and got.dtype == jnp.float32


def test_check_finite_and_lower_bound():
  checks.check_finite("r", np.array([0.0, -1.0]))
  with pytest.raises(ValueError, match=r"r\[1\] = inf is not finite \(why\)"):
    checks.check_finite("r", np.array([0.0, np.inf]), "why")
  checks.check_finite("loads", np.array([[0.0, 2.0]]), low=0)
  with pytest.raises(ValueError, match=r"loads\[0, 1\] = -1.0 is not a finite number >= 0"):
    checks.check_finite("loads", np.array([[0.0, -1.0]]), low=0)


def test_check_finite_refuses_values_that_are_not_real():
  """A complex load used to be cast to float with only numpy's ComplexWarning."""
  with pytest.raises(TypeError, match="loads has dtype complex64, expected real numbers"):
    checks.check_finite("loads", np.array([1 + 2j], np.complex64), low=0)
  with pytest.raises(TypeError, match="r has dtype <U1, expected real numbers"):
    checks.check_finite("r", ["a"])
  with pytest.raises(TypeError, match="complex64"):  # static: also under jit
    jax.jit(lambda x: checks.check_finite("x", x))(jnp.ones(2, jnp.complex64))
  for ok in (np.array([True]), jnp.ones(2, jnp.bfloat16), [1, 2], np.int8(3)):
    checks.check_finite("ok", ok)


def test_check_count_scalar_finite_positive():
  checks.check_count("denom", None)
  checks.check_count("denom", jnp.float32(3.0))
  for bad in (0.0, -1.0, float("nan")):
    with pytest.raises(ValueError, match=rf"denom={bad} must be a finite count > 0"):
      checks.check_count("denom", bad)
  with pytest.raises(ValueError, match=r"denom has shape \(2,\), expected a scalar count"):
    checks.check_count("denom", np.ones(2))
  jax.jit(lambda d: checks.check_count("denom", d) or d)(jnp.float32(0.0))  # no host sync


def test_check_rank_and_value_checks_pass_over_tracers():
  checks.check_rank("x", np.ones((2, 3)), 2, "[B, T]")
  with pytest.raises(ValueError, match=r"x has shape \(2,\), expected rank 2 \[B, T\]"):
    checks.check_rank("x", np.ones(2), 2, "[B, T]")

  def traced(ids, values):  # inside jit the values cannot be read: no check, no host sync
    checks.check_ids(ids, "ids", 0, 4, "E")
    checks.check_finite("values", values)
    return ids
  jax.jit(traced)(jnp.array([9]), jnp.array([jnp.nan]))


def test_check_top_k_wants_an_int_in_one_to_num_experts():
  """lax.top_k failed obscurely for k > E and returned [N, 0] for k = 0; True meant k = 1."""
  for k in (1, 4, np.int64(2)):
    checks.check_top_k(k, np.ones((3, 4)), "probs_NE")
  jax.eval_shape(lambda x: checks.check_top_k(2, x, "probs_NE") or x, jnp.ones((3, 4)))
  for k in (0, 5, -1, True, 2.0, "2"):
    with pytest.raises(ValueError, match=rf"k={k!r} must be an int in \[1, num_experts=4\]"):
      checks.check_top_k(k, np.ones((3, 4)), "probs_NE")
  with pytest.raises(ValueError, match=r"probs_NE has shape \(\), expected \[\.\.\., E\]"):
    checks.check_top_k(1, np.float32(1.0), "probs_NE")


def test_check_bound_closed_range_numbers_only():
  """[low, high] is closed; numpy scalars count as numbers; a traced value passes (its bound
  is checked where it is concrete); `what` replaces the range in the message."""
  checks.check_bound("clip", 0.0, 0.0, 1.0)
  checks.check_bound("clip", np.float32(1.0), 0.0, 1.0)
  with pytest.raises(ValueError, match=r"clip=1.5 must be in \[0, 1\]"):
    checks.check_bound("clip", 1.5, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"cap=-1 must be > 0"):
    checks.check_bound("cap", -1, 1e-30, what="> 0")
  jax.jit(lambda v: checks.check_bound("clip", v, 0.0, 1.0) or v)(5.0)


def test_check_bound_reads_concrete_jax_and_numpy_scalars():
  """jnp.float32(1.5) is a 0-d jax.Array, not a numbers.Real: it passed unchecked (dapo_loss
  accepted clip_low=jnp.float32(1.5), a negative lower ratio bound). Traced ones still pass."""
  checks.check_bound("clip", jnp.float32(0.5), 0.0, 1.0)
  for bad, shown in ((jnp.float32(1.5), "1.5"), (np.array(-0.25), "-0.25"),
                     (jnp.float32(jnp.nan), "nan")):
    with pytest.raises(ValueError, match=rf"clip={shown} must be in \[0, 1\]"):
      checks.check_bound("clip", bad, 0.0, 1.0)
  jax.jit(lambda v: checks.check_bound("clip", v, 0.0, 1.0) or v)(jnp.float32(5.0))


def test_check_count_refuses_an_infinite_count():
  """x / inf is a silent 0, not an error: a denominator must be finite as well as > 0."""
  for bad in (float("inf"), np.float32(np.inf)):
    with pytest.raises(ValueError, match=r"denom=inf must be a finite count > 0"):
      checks.check_count("denom", bad)


def test_check_finite_with_a_lower_bound_still_refuses_nan_and_inf():
  """NaN compares False with any bound, so `a < low` alone lets it through: the finiteness test
  must hold with `low` too."""
  for bad, shown in ((np.nan, "nan"), (np.inf, "inf")):
    with pytest.raises(ValueError, match=rf"loads\[1\] = {shown} is not a finite number >= 0"):
      checks.check_finite("loads", np.array([1.0, bad]), low=0)


def test_check_distribution_wants_rows_that_sum_to_one_and_passes_over_tracers():
  """Rows summing to 1 within 0.01 pass (rounding); logits (or a negative entry) are refused
  naming the row; inside jit nothing is read."""
  probs = np.array([[0.25, 0.75], [0.5, 0.505]])
  checks.check_distribution("p", probs, "what")
  with pytest.raises(ValueError, match=r"p\[1\] sums to 3, expected 1: what \(not its logits\)"):
    checks.check_distribution("p", np.array([[0.25, 0.75], [1.0, 2.0]]), "what")
  with pytest.raises(ValueError, match=r"p\[0, 0\] = -1.0 is not a finite number >= 0 \(what\)"):
    checks.check_distribution("p", np.array([[-1.0, 2.0]]), "what")
  jax.jit(lambda p: checks.check_distribution("p", p, "what") or p)(jnp.full((1, 2), 3.0))


def test_safe_div_is_a_true_weighted_mean_and_zero_when_nothing_counts():
  np.testing.assert_allclose(checks.safe_div(jnp.array([0.5, 3.0, 0.0]),
                                             jnp.array([0.25, 2.0, 0.0])), [2.0, 1.5, 0.0])


def test_check_distribution_refuses_rows_just_beyond_the_one_percent_tolerance():
  """The tolerance is 0.01, no wider: a row summing to 1.05 or 0.95 (probabilities of a
  mis-scaled softmax, say) is refused, while 1.009 and 0.991 (bfloat16 rounding) pass. The
  existing cases (sums 1.005 and 3) left a tolerance of 0.1 unnoticed."""
  checks.check_distribution("p", np.array([[0.5, 0.509], [0.5, 0.491]]), "what")
  for row, total in (([0.5, 0.55], "1.05"), ([0.5, 0.45], "0.95")):
    with pytest.raises(ValueError, match=rf"p\[1\] sums to {total}, expected 1"):
      checks.check_distribution("p", np.array([[0.25, 0.75], row]), "what")


def test_an_array_not_held_whole_by_this_process_is_not_concrete():
  """A jax.Array spanning other processes cannot be read on the host (np.asarray raises): it is
  not concrete, so the value checks pass over it and require_concrete names it. Only the
  tracer half of the rule was tested; a stand-in array reports is_fully_addressable=False."""
  spanning = mock.create_autospec(jax.Array, instance=True)
  spanning.is_fully_addressable = False
  assert not checks.is_concrete(spanning)
  checks.check_ids(spanning, "ids", 0, 4, "num_experts")  # passes over it, reads nothing
  with pytest.raises(TypeError, match="an array not held whole by this process"):
    checks.require_concrete("x", spanning, "fn")
