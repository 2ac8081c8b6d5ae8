"""Input checks shared by the library's pure functions.

Two kinds, so that no check ever costs a jitted caller anything:
  * static checks of shapes and dtypes (`check_shape`, `check_int_dtype`): they read only what
    tracing knows, so they also run, for free, when the caller is jitted;
  * value checks (`check_ids`, `check_finite`, ...) on host numpy: they pass over
    any array `is_concrete` says cannot be read (a tracer inside jit, where
    reading would be a device-to-host sync, or an array this process holds
    only part of). Jitted callers check their inputs on the host before the call.

Why bother: the gathers, scatters and one-hots these arrays feed do not fail
on bad input. They clamp, drop, wrap or return NaN, and the result is a
silently wrong answer far from its cause.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np


# Why a mask must be finite and >= 0 (check_finite's `why`): a negative weight subtracts its
# token from a sum or mean, a NaN one poisons every one.
MASK_WHY = "a token weight: 1 counts, 0 does not"


def safe_div(num, den):
  """num / den, 0 where nothing counted (den = 0): the weighted mean of a mask's weights. Masks
  may be fractional weights, and dividing by max(den, 1) shrank every mean whose weights sum
  below 1 towards 0 (a ratio towards 1)."""
  return num / jnp.where(den > 0, den, 1.0)


def is_concrete(x) -> bool:
  """True when x's values can be read on the host: not a tracer and, for a jax.Array,
  held whole by this process."""
  if isinstance(x, jax.core.Tracer):
    return False
  return not isinstance(x, jax.Array) or x.is_fully_addressable


def require_concrete(name: str, x, fn: str) -> None:
  """`fn` reads `name`'s values on the host: a tracer (inside jit, vmap or grad) or an array
  held partly by other processes is a TypeError saying so, not a silent pass or numpy's
  TracerArrayConversionError."""
  if not is_concrete(x):
    raise TypeError(f"{fn} checks the values of {name} on the host, but got "
                    f"{type(x).__name__} (a traced value inside jax.jit/vmap/grad, or an array "
                    "not held whole by this process): call it before jit, on concrete arrays")


def as_array(x):
  """x itself if it is already an array (numpy, jax, a tracer), else `jnp.asarray(x)`: a nested
  list or a number is then checked and used like the array it spells, not an AttributeError
  on `.shape` or `.astype` (an integer beyond int32 raises OverflowError there)."""
  return x if hasattr(x, "shape") and hasattr(x, "dtype") else jax.numpy.asarray(x)


def check_shape(name: str, x, expected: tuple, dims: str, why: str = "") -> None:
  """Exactly `expected` (static, works under jit): broadcasting would otherwise misalign
  e.g. a [B, T] array with B == T where [B] is meant. `dims` names the axes in the message."""
  shape, expected = tuple(np.shape(x)), tuple(expected)
  if shape != expected:
    raise ValueError(f"{name} has shape {shape}, expected {dims} = {expected}{why}")


def check_rank(name: str, x, rank: int, dims: str) -> None:
  """Static: `x` has `rank` axes, named `dims` in the message (e.g. "[B, T]")."""
  if np.ndim(x) != rank:
    raise ValueError(f"{name} has shape {tuple(np.shape(x))}, expected rank {rank} {dims}")


def check_top_k(k, scores, name: str) -> None:
  """Static: `scores` has an expert axis [..., E] and `k` is an int in [1, E]. lax.top_k fails
  obscurely for k > E and returns nothing for k = 0; a bool k (True) would silently mean 1."""
  if np.ndim(scores) == 0:
    raise ValueError(f"{name} has shape (), expected [..., E] (an expert axis)")
  e = np.shape(scores)[-1]
  if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= e:
    raise ValueError(f"k={k!r} must be an int in [1, num_experts={e}]")


def check_ids(ids, name: str, low: int, high: int, bound: str) -> None:
  """Concrete integer ids: raises naming the first one outside [low, high) (no-op on
  arrays that are not concrete). `bound` names the upper bound (e.g. "num_experts")."""
  if not is_concrete(ids):
    return
  a = np.asarray(ids)
  check_int_dtype(name, a)
  bad = (a < low) | (a >= high)
  if np.any(bad):
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(f"{name}{list(idx)} = {int(a[idx])} is outside [{low}, {bound}={high})")


def check_int_dtype(name: str, x, expected: str = "an integer dtype (int32)",
                    error: type[Exception] = TypeError) -> None:
  """Static (works under jit): x has an integer dtype, not float or bool. Ids are cast to int32
  before a gather, one-hot or scatter, which would truncate a float id silently; `check_ids`
  reads values, so it skips tracers. `expected` and `error` keep a caller's existing message."""
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if not jax.numpy.issubdtype(dtype, np.integer):
    raise error(f"{name} has dtype {dtype}, expected {expected}")


def check_real_dtype(name: str, x) -> None:
  """Static: x holds real numbers (integer, float or bool). A complex array would otherwise be
  cast to float with only numpy's ComplexWarning, silently dropping its imaginary part."""
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  if jax.numpy.issubdtype(dtype, np.complexfloating) or not (
      jax.numpy.issubdtype(dtype, np.number) or dtype == np.bool_):
    raise TypeError(f"{name} has dtype {dtype}, expected real numbers")


def check_finite(name: str, x, why: str = "", low: float | None = None) -> None:
  """Real dtype (static, always) and, on concrete values, raises naming the first NaN, inf or
  value below `low` (no-op on arrays that are not concrete)."""
  check_real_dtype(name, x)
  if not is_concrete(x):
    return
  a = np.asarray(x, np.float64)
  bad = np.argwhere(~np.isfinite(a) | (a < (-np.inf if low is None else low)))
  if bad.size:
    idx = tuple(int(i) for i in bad[0])
    what = "not finite" if low is None else f"not a finite number >= {low:g}"
    raise ValueError(f"{name}{list(idx)} = {a[idx]} is {what}" + (f" ({why})" if why else ""))


def check_distribution(name: str, probs, what: str) -> None:
  """Concrete rows [..., E] (no-op otherwise) are probability distributions: finite, >= 0 and
  summing to 1 within 0.01 (float32 or bfloat16 rounding passes). Logits passed where
  probabilities belong would otherwise be gathered or summed as probabilities, silently.
  `what` names the rows in the message, e.g. "the router's softmax ρ over the experts"."""
  check_finite(name, probs, what, low=0)
  if not is_concrete(probs):
    return
  sums = np.asarray(probs, np.float64).sum(-1)
  bad = np.argwhere(np.abs(sums - 1.0) > 1e-2)
  if bad.size:
    idx = tuple(int(i) for i in bad[0])
    raise ValueError(f"{name}{list(idx)} sums to {sums[idx]:.4g}, expected 1: {what} "
                     "(not its logits)")


def check_count(name: str, x) -> None:
  """A denominator: a scalar (static) and, when concrete, a finite count > 0 (0 gives NaN).
  None passes (the callee's default)."""
  if x is None:
    return
  if np.ndim(x) != 0:
    raise ValueError(f"{name} has shape {np.shape(x)}, expected a scalar count")
  if is_concrete(x) and not (math.isfinite(float(x)) and float(x) > 0):
    raise ValueError(f"{name}={float(x)} must be a finite count > 0")


def check_bound(name: str, value, low: float, high: float = math.inf, what: str = "") -> None:
  """A concrete hyper-parameter (a Python or numpy number, or a concrete 0-d numpy or jax array
  such as jnp.float32(1.5); traced values pass) in [low, high]. NaN is out of every range."""
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0 and is_concrete(value):
    value = value.item()  # jnp.float32(1.5) is a 0-d jax.Array, not a numbers.Real
  if isinstance(value, numbers.Real) and not (low <= float(value) <= high):
    raise ValueError(f"{name}={value!r} must be " + (what or f"in [{low:g}, {high:g}]"))
