"""pr2_jax/viz.py's input checks (the figures themselves: tests/test_plot.py)."""

import pytest

from pr2_jax import viz


@pytest.mark.parametrize("loads_E, slot_expert_DS, slot_load_DS, match", [
    ([6, 2, 2], [[0, 1], [2, 0]], [[4, 2], [2, 2]], "3 experts do not split evenly over 2"),
    ([6, 2, 2, 2], [[0, 1, -1], [2, 3, 0]], [[4, 2], [2, 2]], "of one shape"),
    ([[6, 2, 2, 2]], [[0, 1], [2, 3]], [[6, 2], [2, 2]], "loads_E \\[E\\]"),
])
def test_plan_figure_names_bad_shapes(loads_E, slot_expert_DS, slot_load_DS, match):
  """Were numpy reshape errors or, for mismatched slot arrays, misaligned bars."""
  with pytest.raises(ValueError, match=match):
    viz.plan_figure(loads_E, slot_expert_DS, slot_load_DS)
