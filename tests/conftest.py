"""Every test sees 8 fake CPU devices (set before any JAX operation).

The whole suite, its xdist workers and the runs it starts as subprocesses share
one persistent XLA compilation cache: many end-to-end tests compile the same
tiny-config programs (a run and its resumed rerun, two runs compared), and on
2 CPU cores compiling is a large part of their time. Set
JAX_COMPILATION_CACHE_DIR yourself to choose the directory, or to "" to turn it off.

The suite's models are tiny, so XLA's compile time dwarfs their run time: tests
compile with LLVM optimisation off (--xla_backend_optimization_level=0), which
cuts the compile time of an end-to-end run by about 40 %, and with XLA:CPU's
older fusion emitters (--xla_cpu_use_fusion_emitters=false), which cuts a
learner test's compile time by 40 % more (11.3 -> 6.7 s) and a cold suite's from
16.1 to 13.5 min on 2 cores; with the cache filled the suite runs a little slower
(7.7 -> 8.8 min), but a fresh CI machine starts cold. Both go into XLA_FLAGS,
inherited by the subprocesses; a flag you put in XLA_FLAGS yourself wins.
"""

import gc
import os
import sys
import tempfile

import numpy as np
import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"pr2_jax_xla_cache_{os.getuid()}"))
# Every program, however small: the two xdist workers and the subprocess runs would otherwise
# each compile the same hundreds of op-by-op programs (~20-40 ms each at -O0).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
for flag, value in (("--xla_backend_optimization_level", "0"),
                    ("--xla_cpu_use_fusion_emitters", "false")):
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        filter(None, [os.environ.get("XLA_FLAGS"), f"{flag}={value}"]))

import jax  # noqa: E402

from pr2_jax.parallel.distributed import use_cpu_devices  # noqa: E402

use_cpu_devices(8)  # with a thread pool that lets collectives on 8 devices all run


def memory_map_count() -> int | None:
  """How many memory mappings this process has (Linux), else None."""
  try:
    with open("/proc/self/maps") as f:
      return sum(1 for _ in f)
  except OSError:
    return None


def _map_budget() -> int:
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read()) // 3
  except (OSError, ValueError):
    return 65530 // 3  # Linux's default limit


# XLA:CPU links every compiled kernel as its own small object, mapped in three pieces (code,
# constants, data), and JAX keeps every program a worker compiles alive in its caches. A worker
# of the full suite reached 63,901 maps of Linux's default limit of 65,530 (vm.max_map_count;
# test_learner.py alone adds ~44,000). Past the limit the JIT's next mmap fails, jaxlib reports
# "Failed to materialize symbols" and segfaults while unwinding that error: the crash the
# Makefile's rerun rule was added for. Clearing JAX's caches each time a worker passes a third of
# the limit keeps it far below. Not after every test: that makes test_learner.py 4x slower
# (every test re-traces and reloads programs its neighbours share).
MAP_BUDGET = _map_budget()


def release_programs_if_over(budget: int) -> bool:
  """Drops JAX's compiled programs (and their kernels' mappings) when this process holds more
  than `budget` memory mappings; True if it did."""
  count = memory_map_count()
  if count is None or count <= budget:
    return False
  jax.clear_caches()
  gc.collect()
  return True


def pytest_addoption(parser):
  parser.addoption("--reverse-order", action="store_true",
                   help="run the tests in reverse order: a test that passes only after another "
                        "(state left on a global) then fails")


def pytest_collection_modifyitems(config, items):
  if config.getoption("reverse_order"):
    items.reverse()


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
  yield
  release_programs_if_over(MAP_BUDGET)


def tolerance_used(actual, desired, rtol: float, atol: float) -> float:
  """How much of np.testing.assert_allclose's tolerance a comparison used: the largest
  |actual - desired| / (atol + rtol·|desired|) over the elements finite in both (0 if none; inf
  where they differ under a zero tolerance). 1 is the limit; near it, another CPU's rounding
  (other instructions, other summation orders) can fail the test."""
  a, d = np.broadcast_arrays(np.asarray(actual, np.float64), np.asarray(desired, np.float64))
  both = np.isfinite(a) & np.isfinite(d)
  a, d = a[both], d[both]
  diff, tol = np.abs(a - d), atol + rtol * np.abs(d)
  with np.errstate(divide="ignore", invalid="ignore"):
    return float(np.max(np.where(diff == 0, 0.0, diff / tol), initial=0.0))


def logging_assert_allclose(log_path: str, assert_allclose=np.testing.assert_allclose):
  """`assert_allclose` that first appends a line to `log_path`: the tolerance the comparison
  used (`tolerance_used`), rtol, atol, the calling line and the test id."""
  def logged(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
    try:
      used = tolerance_used(actual, desired, rtol, atol)
    except (TypeError, ValueError):  # not real numbers, or shapes that do not broadcast
      used = None
    if used is not None:
      caller = sys._getframe(1)
      site = f"{os.path.relpath(caller.f_code.co_filename)}:{caller.f_lineno}"
      test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
      with open(log_path, "a") as f:
        f.write(f"{used:.4g} {rtol:g} {atol:g} {site} {test}\n")
    return assert_allclose(actual, desired, rtol, atol, *args, **kwargs)
  return logged


# conftest runs before the test modules are imported, so a module that imports
# assert_allclose by name gets the logging one too.
if os.environ.get("PR2_TEST_TOL_LOG"):
  np.testing.assert_allclose = logging_assert_allclose(os.environ["PR2_TEST_TOL_LOG"])


if os.environ.get("PR2_TEST_CPU_LOG"):
  import resource
  import time

  from jax import monitoring

  # JAX reports each jit's tracing, lowering to MLIR and XLA compile as durations. A persistent
  # cache hit skips only the XLA compile, so the first two are paid on every new jit wrapper.
  _JAX_PHASES = {"/jax/core/compile/jaxpr_trace_duration": 0,
                 "/jax/core/compile/jaxpr_to_mlir_module_duration": 1,
                 "/jax/core/compile/backend_compile_duration": 2}
  _jax_seconds = [0.0, 0.0, 0.0, 0]  # trace, lower, XLA compile (this process), XLA compiles

  def _count_jax_phase(event, duration, **_):
    if (i := _JAX_PHASES.get(event)) is not None:
      _jax_seconds[i] += duration
      _jax_seconds[3] += i == 2

  monitoring.register_event_duration_secs_listener(_count_jax_phase)

  @pytest.hookimpl(hookwrapper=True)
  def pytest_runtest_protocol(item, nextitem):
    """Appends a line per test to PR2_TEST_CPU_LOG: CPU seconds (this process plus its
    subprocesses, then each alone), wall seconds, then this process's seconds tracing, lowering
    and XLA-compiling and its XLA compiles, then the test id. The suite is CPU-bound on 2 cores,
    and tests that run subprocesses side by side use more CPU than their wall time (--durations)
    shows; most of an in-process test's time is often the three JAX phases."""
    def cpu():
      own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
      return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime
    (own0, kids0), wall0, jax0 = cpu(), time.time(), list(_jax_seconds)
    yield
    (own1, kids1), wall1 = cpu(), time.time()
    trace, lower, xla, compiles = (b - a for a, b in zip(jax0, _jax_seconds))
    with open(os.environ["PR2_TEST_CPU_LOG"], "a") as f:
      f.write(f"{own1 - own0 + kids1 - kids0:.2f} {own1 - own0:.2f} {kids1 - kids0:.2f} "
              f"{wall1 - wall0:.2f} {trace:.2f} {lower:.2f} {xla:.2f} {compiles} "
              f"{item.nodeid}\n")
