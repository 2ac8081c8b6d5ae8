"""docs/metrics.md's key tables, read as data: which keys a metrics.jsonl row carries, and when.

Each table row is `| `key` | meaning | unit / range | rows |`. The "rows" cell lists
alternatives separated by ';'. Each is a phase (sft, sft_eval, rl), optionally followed by ':'
and conditions separated by ',': `replay_mode a / b`, `balance_mode a / b` or `eval steps`.
Used by tests/test_docs.py (the code's keys) and tests/test_loop.py (a real run's rows).
"""

import pathlib
import re

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "metrics.md"
PHASES = ("sft", "sft_eval", "rl")


def documented() -> dict[str, list[str]]:
  """{key: its "rows" cells} from every table whose header starts with `| key |`. A key in two
  tables (`loss` of rl and sft rows) collects both cells."""
  keys: dict[str, list[str]] = {}
  in_table = False
  for line in DOC.read_text().splitlines():
    if not line.startswith("|"):
      in_table = False
      continue
    cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
    if cells[0] == "key":
      assert cells[-1] == "rows", f"docs/metrics.md: a key table's last column is 'rows': {line}"
      in_table = True
      continue
    if not in_table or set(cells[0]) <= set("-:"):
      continue
    names = re.findall(r"`([^`]+)`", cells[0])
    assert len(names) == 1, f"docs/metrics.md: one `key` per table row: {line}"
    keys.setdefault(names[0], []).append(cells[-1])
  return keys


def _holds(alternative: str, phase: str, settings: dict) -> bool:
  """Whether one alternative of a "rows" cell (e.g. `rl: replay_mode r2 / pr2_r2`) covers a row
  of `phase` under `settings` (replay_mode, balance_mode, eval: whether the row has an eval)."""
  head, _, conditions = alternative.partition(":")
  head = head.strip()
  assert head in PHASES, f"docs/metrics.md: unknown phase {head!r} in {alternative!r}"
  if head != phase:
    return False
  for condition in filter(None, (c.strip() for c in conditions.split(","))):
    if condition == "eval steps":
      if not settings["eval"]:
        return False
      continue
    name, _, values = condition.partition(" ")
    assert name in ("replay_mode", "balance_mode"), \
        f"docs/metrics.md: unknown condition {condition!r} in {alternative!r}"
    if settings[name] not in [v.strip() for v in values.split("/")]:
      return False
  return True


def expected_keys(phase: str, replay_mode: str = "r3", balance_mode: str = "none",
                  eval: bool = False) -> set[str]:
  """The keys docs/metrics.md says a row of `phase` carries under these settings."""
  settings = {"replay_mode": replay_mode, "balance_mode": balance_mode, "eval": eval}
  return {key for key, cells in documented().items()
          if any(_holds(alt, phase, settings) for cell in cells for alt in cell.split(";"))}


def row_expected_keys(row: dict, replay_mode: str, balance_mode: str) -> set[str]:
  """`expected_keys` of a real row (its phase; an rl row is an eval step if it has eval_reward,
  which `run` adds exactly at the eval steps)."""
  return expected_keys(row["phase"], replay_mode, balance_mode, eval="eval_reward" in row)
