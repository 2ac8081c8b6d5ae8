"""The suite's guard against running out of memory mappings (conftest.release_programs_if_over)
and its tolerance log (PR2_TEST_TOL_LOG)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (MAP_BUDGET, logging_assert_allclose, memory_map_count,
                      release_programs_if_over, tolerance_used)

needs_proc_maps = pytest.mark.skipif(memory_map_count() is None, reason="needs /proc/self/maps")


def _compile_distinct_programs(count: int) -> None:
  # A new shape is a new program with new kernels, each JIT-linked into its own mappings.
  for n in range(8, 8 + count):
    x = jnp.ones((n, n + 1))
    jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0) * jnp.exp(a[:, 0]))(x).block_until_ready()


@needs_proc_maps
def test_map_count_matches_proc_maps():
  with open("/proc/self/maps") as f:
    lines = len(f.readlines())
  assert abs(memory_map_count() - lines) <= 2  # the open file itself may come and go


@needs_proc_maps
def test_budget_is_a_third_of_the_kernel_limit():
  with open("/proc/sys/vm/max_map_count") as f:
    assert MAP_BUDGET == int(f.read()) // 3


@needs_proc_maps
def test_compiled_programs_hold_mappings_until_released():
  # A process's first program also starts XLA's thread pools (72 threads), whose stacks stay
  # mapped: run alone in a new process, this test saw 181 of 300 new mappings stay after the
  # release, and failed.
  _compile_distinct_programs(1)
  release_programs_if_over(0)
  base = memory_map_count()
  _compile_distinct_programs(40)
  grown = memory_map_count()
  assert grown - base >= 40  # measured: ~190 for these 40 programs
  assert not release_programs_if_over(grown + 1000)
  # Under budget the programs stay (other mappings come and go: a quarter is slack enough).
  assert memory_map_count() - base >= (grown - base) * 3 // 4
  assert release_programs_if_over(base)
  assert memory_map_count() - base <= (grown - base) // 2


@pytest.mark.parametrize("actual, desired, rtol, atol, used", [
    ([1.0, 2.0], [1.0, 2.5], 0.1, 0.25, 1.0),  # 0.5 / (0.25 + 0.1 * 2.5): at the limit
    ([1.0, 2.0], [1.0, 2.001], 1e-3, 0.0, 0.001 / 2.001e-3),
    ([[1.0, 2.0]], 1.0, 0.0, 2.0, 0.5),  # broadcast, as assert_allclose does
    ([np.nan, np.inf, 1.0], [np.nan, np.inf, 1.5], 0.0, 1.0, 0.5),  # non-finite ones left out
    (1.0, 2.0, 0.0, 0.0, np.inf),  # unequal under a zero tolerance
    (3.0, 3.0, 0.0, 0.0, 0.0),
    ([], [], 1e-7, 0.0, 0.0),
])
def test_tolerance_used_hand_values(actual, desired, rtol, atol, used):
  assert tolerance_used(actual, desired, rtol, atol) == pytest.approx(used, rel=1e-12)


def test_the_tolerance_log_names_the_share_used_the_line_and_the_test(tmp_path):
  log = tmp_path / "tol.log"
  check = logging_assert_allclose(str(log))
  line = inspect.currentframe().f_lineno + 1
  check(np.array([1.0, 2.0]), [1.0, 2.001], rtol=1e-3)
  with pytest.raises(AssertionError):  # logged, then failed as assert_allclose fails
    check(1.0, 1.1, 1e-3)
  first, second = (row.split() for row in log.read_text().splitlines())
  assert first[:3] == ["0.4998", "0.001", "0"] and second[:3] == ["90.91", "0.001", "0"]
  assert first[3] == f"tests/test_conftest.py:{line}"
  assert first[4] == second[4] == (
      "tests/test_conftest.py::test_the_tolerance_log_names_the_share_used_the_line_and_the_test")
