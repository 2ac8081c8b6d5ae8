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


def test_plan_figure_titles_an_empty_layer_as_balanced():
  """A layer no token routed to is balanced, as balance.imbalance says (1); the figure's own
  max / mean said 0.00."""
  fig = viz.plan_figure([0, 0, 0, 0], [[0, 1], [2, 3]], [[0, 0], [0, 0]])
  assert [ax.get_title() for ax in fig.axes] == ["static (no replicas): imbalance 1.00",
                                                 "planned (replicas + split): imbalance 1.00"]
  assert [ax.get_xticks().tolist() for ax in fig.axes] == [[0, 1], [0, 1]]  # one per device
