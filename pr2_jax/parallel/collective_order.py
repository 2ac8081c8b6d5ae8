"""Collectives that a compiled XLA:CPU program may start in different orders on different devices.

Works on a compiled program's HLO text (`jax.jit(f).lower(...).compile().as_text()`); no
dimensions.

Why it matters: XLA:CPU runs a program's independent operations concurrently, each device on its
own, and a collective blocks until every device of its group reaches it. When two collectives
can start in either order, some devices may start one and the rest the other; each then waits in
a rendezvous that the others never reach, and XLA aborts after 40 s ("Termination timeout for
`all gather RendezvousKey{...}`"). XLA:CPU keeps the collectives of one computation in program
order, but a loop that runs collectives escapes it. Measured on jaxlib 0.10.2, 8 fake devices on
2 cores, 300 calls a run:
  * a `while` loop's `psum` beside an `all_gather` of the same 8 devices, neither needing the
    other, compiled fresh: 4 runs of 9 aborted (the program in tests/test_collective_order.py);
  * outside loops, no abort: two `psum`s of different device groups (3 runs), a `switch` over
    `psum`s beside another `psum` (3), a `switch` over all-gathers beside an all-gather (4), two
    independent `switch`es over all-gathers (4 fresh, 6 from the persistent compile cache).
One branch case did abort: eplb_step's replica fetch, two `conditional`s that XLA hoisted out of
the micro-step loop, beside the loss denominators' all-gather, whenever the update came from the
persistent compile cache (2026-12-06, docs/scaling.md). `branches=True` reports branches too; it
is off by default: the MoE layers' `cond`s hold collectives beside others, unordered, in the
learner of both balance modes and in the warm-up step with FSDP on 8 devices (8-11 pairs a
program), and ran without an abort in the suite and in the knob sweeps.

The cure is a dependence (feed one's result into the other), or no collective inside the loop
(run the loop on replicated data, as `pr2_jax.rl.balancing`'s analysis does).
"""

from __future__ import annotations

import re
from typing import NamedTuple

COLLECTIVES = frozenset(
    f"{op}{suffix}" for op in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                               "collective-permute", "collective-broadcast", "ragged-all-to-all")
    for suffix in ("", "-start"))
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)"
                    r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_CONTROL = re.compile(r"control-predecessors=\{([^}]*)\}")
_NAME = re.compile(r"%?([\w.\-]+)")


class Instruction(NamedTuple):
  name: str
  opcode: str
  operands: tuple[str, ...]   # data operands and control predecessors
  called: tuple[str, ...]     # computations it runs (loop body, branches, reducers...)


class UnorderedPair(NamedTuple):
  computation: str
  first: str    # instruction names, as in the HLO text
  second: str


def _closing(text: str, start: int) -> int:
  """Index of the parenthesis that closes the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]!r}")


def _instruction(line: str) -> Instruction | None:
  """One `%name = type opcode(operands), attributes` line; None for anything else."""
  lhs, sep, rhs = line.strip().removeprefix("ROOT ").partition(" = ")
  if not sep:
    return None
  rhs = rhs.strip()
  # The result type is one token or a parenthesised tuple; the opcode follows it.
  rest = rhs[_closing(rhs, 0) + 1:] if rhs.startswith("(") else rhs.partition(" ")[2]
  opcode, paren, args = rest.strip().partition("(")
  if not paren:
    return None
  end = _closing("(" + args, 0) - 1
  attrs = args[end + 1:]
  called = _CALLS.findall(attrs) + [n for g in _BRANCHES.findall(attrs) for n in _NAME.findall(g)]
  control = [n for g in _CONTROL.findall(attrs) for n in _NAME.findall(g)]
  operands = re.findall(r"%([\w.\-]+)", args[:end]) + control
  return Instruction(lhs.strip().lstrip("%"), opcode.strip(), tuple(operands), tuple(called))


def parse_hlo(text: str) -> dict[str, list[Instruction]]:
  """{computation name: its instructions} of an HLO module's text."""
  computations: dict[str, list[Instruction]] = {}
  current = None
  for line in text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      current = _NAME.match(line.removeprefix("ENTRY ")).group(1)
      computations[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None and (inst := _instruction(line)) is not None:
      computations[current].append(inst)
  if not computations:
    raise ValueError("unordered_collectives: no HLO computation found in the text (pass "
                     "`jax.jit(f).lower(...).compile().as_text()`)")
  return computations


def unordered_collectives(hlo_text: str, branches: bool = False) -> list[UnorderedPair]:
  """Pairs of operations that may start their collectives in either order (module docstring):
  both reach a collective, one of them through a `while` loop (or, with `branches`, through any
  loop, branch or call), and neither depends on the other. An empty list means every loop that
  runs a collective is ordered by data or control against the collectives beside it."""
  computations = parse_hlo(hlo_text)
  memo: dict[tuple[str, bool], bool] = {}

  def runs(name: str, in_loop: bool) -> bool:
    """Computation `name` runs a collective (in_loop: inside a while loop), at any depth."""
    key = (name, in_loop)
    if key not in memo:
      memo[key] = False  # HLO has no recursion; this only guards against a malformed text
      memo[key] = any((i.opcode in COLLECTIVES and not in_loop)
                      or any(runs(c, in_loop and i.opcode != "while") for c in i.called)
                      for i in computations.get(name, ()))
    return memo[key]

  pairs = []
  for comp, insts in computations.items():
    by_name = {i.name: i for i in insts}
    nodes = [i for i in insts if i.opcode in COLLECTIVES or any(runs(c, False) for c in i.called)]
    looped = {i.name for i in nodes if i.opcode not in COLLECTIVES
              and any(runs(c, i.opcode != "while" and not branches) for c in i.called)}
    if not looped:
      continue
    ancestors = {i.name: _ancestors(i.name, by_name) for i in nodes}
    for a_index, a in enumerate(nodes):
      for b in nodes[a_index + 1:]:
        if ({a.name, b.name} & looped and a.name not in ancestors[b.name]
            and b.name not in ancestors[a.name]):
          pairs.append(UnorderedPair(comp, a.name, b.name))
  return pairs


def _ancestors(name: str, by_name: dict[str, Instruction]) -> set[str]:
  """Every instruction `name` depends on within its computation."""
  seen: set[str] = set()
  stack = list(by_name[name].operands)
  while stack:
    op = stack.pop()
    if op in by_name and op not in seen:
      seen.add(op)
      stack.extend(by_name[op].operands)
  return seen
