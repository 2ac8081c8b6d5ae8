"""Water-filling token split: a hand-worked round, invariants."""

import jax.numpy as jnp
import numpy as np

from pr2_jax.balance import split


# Replicas in placement order of the planner's [3, 3, 4, 2] example (D=2, S=3):
# e1 (slot 0), e2 (slot 3), e2 (slot 1), e3 (slot 4), e0 (slot 5), e0 (slot 2).
N = jnp.array([3., 4., 4., 2., 3., 3.])
EXPERT = jnp.array([1, 2, 2, 3, 0, 0])
SLOT = jnp.array([0, 3, 1, 4, 5, 2])
X0 = jnp.array([3., 2., 2., 2., 1.5, 1.5])  # device loads 6.5 / 5.5


def test_one_round_by_hand():
  """Targets: e2 level (4 + 4.5 + 3.5)/2 = 6 -> 2.5 on d1, 1.5 on d0; e0 level (3 + 4 + 5)/2
  = 6 -> 2 on d1, 1 on d0. Half a step: e2 2.25/1.75, e0 1.75/1.25 -> devices 6 / 6."""
  got = split.water_fill(N, EXPERT, SLOT, X0, 2, 3, iters=1)
  np.testing.assert_allclose(got, [3, 2.25, 1.75, 2, 1.75, 1.25], atol=1e-6)
  # A full step overshoots (5.5 / 6.5 is no better than 6.5 / 5.5): rejected, nothing moves.
  np.testing.assert_allclose(split.water_fill(N, EXPERT, SLOT, X0, 2, 3, iters=1, step=1.0), X0)
  # After the rejection the step halves and the next round lands on 6 / 6.
  got2 = split.water_fill(N, EXPERT, SLOT, X0, 2, 3, iters=2, step=1.0)
  np.testing.assert_allclose(got2, [3, 2.25, 1.75, 2, 1.75, 1.25], atol=1e-6)


def test_conserves_and_never_raises_the_peak():
  rng = np.random.default_rng(0)
  d, s, e = 8, 4, 16
  for _ in range(10):
    count = 1 + rng.multinomial(d * s - e, np.full(e, 1 / e))
    count = np.minimum(count, d)
    count[0] += d * s - count.sum()
    expert = np.repeat(np.arange(e), count)
    n = rng.lognormal(0, 1, e) * 100
    slot = rng.permutation(d * s)
    x0 = n[expert] / count[expert]
    got = np.asarray(split.water_fill(jnp.asarray(n[expert], jnp.float32), jnp.asarray(expert),
                                      jnp.asarray(slot), jnp.asarray(x0, jnp.float32), d, s, 8))
    assert np.all(got >= -1e-4)
    np.testing.assert_allclose(np.bincount(expert, got, minlength=e), n, rtol=1e-4)
    peak = lambda x: np.bincount(slot // s, x, minlength=d).max()  # noqa: E731
    assert peak(got) <= peak(x0) + 1e-3


def test_a_round_from_an_uneven_split_fills_against_the_other_replicas_only():
  """D=2, S=2: d0 [e0 3, e1 3], d1 [e0 1, e2 1] (n = [4, 3, 1]); e0 starts uneven, 3 / 1.

  The rest of each e0 replica's device is 3 (d0) and 1 (d1), its level (4 + 3 + 1) / 2 = 4,
  so the targets are 1 / 3; half a step gives 2 / 2 (devices 5 / 3, peak 6 -> 5: kept), a
  full step 1 / 3 (4 / 4). Counting a replica's own load as the rest of its device (level 6,
  targets 0 / 4) is the same from an even split, so the hand-worked round above cannot see it."""
  n = jnp.array([4., 3., 4., 1.])
  expert, slot = jnp.array([0, 1, 0, 2]), jnp.array([0, 1, 2, 3])
  x0 = jnp.array([3., 3., 1., 1.])
  np.testing.assert_allclose(split.water_fill(n, expert, slot, x0, 2, 2, iters=1),
                             [2, 3, 2, 1], atol=1e-6)
  np.testing.assert_allclose(split.water_fill(n, expert, slot, x0, 2, 2, iters=1, step=1.0),
                             [1, 3, 3, 1], atol=1e-6)
