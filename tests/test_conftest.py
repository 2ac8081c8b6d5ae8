"""The suite's guard against running out of memory mappings (conftest.release_programs_if_over)."""

import jax
import jax.numpy as jnp
import pytest

from conftest import MAP_BUDGET, memory_map_count, release_programs_if_over

pytestmark = pytest.mark.skipif(memory_map_count() is None, reason="needs /proc/self/maps")


def _compile_distinct_programs(count: int) -> None:
  # A new shape is a new program with new kernels, each JIT-linked into its own mappings.
  for n in range(8, 8 + count):
    x = jnp.ones((n, n + 1))
    jax.jit(lambda a: jnp.tanh(a @ a.T).sum(0) * jnp.exp(a[:, 0]))(x).block_until_ready()


def test_map_count_matches_proc_maps():
  with open("/proc/self/maps") as f:
    lines = len(f.readlines())
  assert abs(memory_map_count() - lines) <= 2  # the open file itself may come and go


def test_budget_is_a_third_of_the_kernel_limit():
  with open("/proc/sys/vm/max_map_count") as f:
    assert MAP_BUDGET == int(f.read()) // 3


def test_compiled_programs_hold_mappings_until_released():
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
