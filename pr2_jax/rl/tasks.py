"""Procedurally generated, verifiable RL tasks (pure host-side Python/numpy).

No data set can be downloaded here, so every task draws its problems from a seeded
`np.random.Generator` and checks completions with its own code.

Lengths are in characters (= tokens of `char_tokenizer.CharTokenizer`), not counting
BOS/EOS: `max_prompt_len` bounds every prompt and `max_answer_len` every `answer` and
`solution`, so a sampler can size its buffers as `1 + max_prompt_len` (BOS + prompt) and
`max_answer_len + 1` (response + EOS).

Train/eval split. A problem is held out iff a keyed hash of its prompt falls in the first
`eval_fraction` of the hash range (`is_eval_prompt`). Train sampling rejects held-out
prompts, so no amount of training ever shows an eval prompt. The hash ignores the task's
parameters, so different settings of one task (1- and 2-digit stages) agree on the split.
The split is of prompts, not of problems: a held-out "3 5 8:23=" may be trained on as
"5 3 8:23=", a held-out "2+9=" as "9+2=" (almost every held-out prompt of configs/tiny.py's
countdown has such a train twin), so eval_reward measures unseen prompts.

Tasks (defaults keep prompts <= 10 and answers <= 5 characters: a tiny model learns them on
CPU in minutes):
- `Arithmetic(num_digits=2, ops='+-')`: "12+34=" -> "46". Reward 1 iff the
  completion is exactly the integer (surrounding spaces allowed), else 0.
- `Countdown(num_numbers=3, max_number=9)`: "3 5 8:23=" -> "3*5+8". Reward 1 for an
  expression over + - * and brackets that uses each given number at most once (not
  necessarily all) and equals the target; `format_reward` (0.1) for such an expression with
  the wrong value, so early RL gets a signal for legal syntax; 0 if it is malformed or uses
  a number that was not given (or more often than given). Parsed by recursive descent
  (`expressions.evaluate_expression`), never `eval`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import re
from typing import Sequence

import numpy as np

from pr2_jax.config import check_int, check_real
from pr2_jax.rl.expressions import apply_op, evaluate_expression

_SPLIT_KEY = b"pr2_jax/eval-split/v1"
_SPLIT_BUCKETS = 10_000


@dataclasses.dataclass(frozen=True)
class Problem:
  prompt: str    # model input, e.g. "12+34="
  answer: str    # canonical reference answer (what a correct completion looks like)
  solution: str  # supervised warm-up target; EOS follows it
  meta: tuple    # task data the reward needs (operands, numbers, target)
  task: str = ""  # name of the task that made it (Mixture dispatches rewards on it)


def is_eval_prompt(prompt: str, eval_fraction: float) -> bool:
  """True iff `prompt` belongs to the held-out split (stable across runs and machines)."""
  digest = hashlib.blake2b(prompt.encode(), digest_size=8, key=_SPLIT_KEY).digest()
  return int.from_bytes(digest, "little") % _SPLIT_BUCKETS < round(eval_fraction * _SPLIT_BUCKETS)


class Task:
  """Base class: subclasses set `name`, `max_prompt_len`, `max_answer_len` and
  implement `_generate(rng) -> Problem` (one draw from the full problem
  space) and `reward(problem, completion) -> float in [0, 1]`; register the class in
  `TASKS` and add an instance to tests/test_tasks.py's ALL_TASKS (generic checks).

  Prompts and solutions use the character tokenizer's alphabet (`char_tokenizer.CHARS`).
  The held-out split is `eval_fraction` of the distinct prompts, so a run's
  `RLConfig.eval_size` needs a problem space of at least eval_size / eval_fraction prompts
  (configs/tiny.py: 256 / 0.1 = 2,560)."""

  name = "task"
  max_prompt_len: int
  max_answer_len: int

  def __init__(self, *, eval_fraction: float = 0.1, name: str | None = None):
    check_real(type(self).__name__, "eval_fraction", eval_fraction)
    if not 0.0 < eval_fraction < 1.0:
      raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    self.eval_fraction = eval_fraction
    if name is not None:
      self.name = name

  def _generate(self, rng: np.random.Generator) -> Problem:
    raise NotImplementedError

  def reward(self, problem: Problem, completion: str) -> float:
    raise NotImplementedError

  def _draw(self, rng: np.random.Generator) -> Problem:
    """`_generate`'s problem, named after this task unless it names its own (a Mixture's)."""
    problem = self._generate(rng)
    return problem if problem.task else dataclasses.replace(problem, task=self.name)

  def is_eval(self, problem: Problem) -> bool:
    return is_eval_prompt(problem.prompt, self.eval_fraction)

  def sample(self, rng: np.random.Generator, n: int) -> list[Problem]:
    """`n` i.i.d. train-split problems (held-out prompts are redrawn)."""
    out, budget = [], 1000 + 100 * n  # the budget only stops a degenerate split from hanging
    while len(out) < n:
      if budget == 0:
        raise ValueError(f"{self.name}: train split looks empty "
                         f"(eval_fraction={self.eval_fraction})")
      budget -= 1
      problem = self._draw(rng)
      if not self.is_eval(problem):
        out.append(problem)
    return out

  def eval_set(self, n: int, seed: int = 0) -> list[Problem]:
    """`n` distinct held-out problems, the same for the same (task, n, seed)."""
    rng, seen, out = np.random.default_rng(seed), set(), []
    for _ in range(1000 + 100 * n):
      if len(out) == n:
        break
      problem = self._draw(rng)
      if self.is_eval(problem) and problem.prompt not in seen:
        seen.add(problem.prompt)
        out.append(problem)
    if len(out) < n:
      raise ValueError(f"{self.name}: found only {len(out)} distinct eval problems, asked for {n}; "
                       "use a smaller n or a larger problem space")
    return out

  def __repr__(self):
    return f"{type(self).__name__}(name={self.name!r}, eval_fraction={self.eval_fraction})"


# ---------------------------------------------------------------------------- arithmetic

_INT_RE = re.compile(r"-?[0-9]+")
# Operands are drawn as int64 (numpy's integers); 10**19 - 1 is past its maximum.
MAX_DIGITS = 18


class Arithmetic(Task):
  """`a op b =` with operands in [0, 10**num_digits); '/' is exact integer division."""

  name = "arithmetic"

  def __init__(self, num_digits: int = 2, ops: str = "+-", *, allow_negative: bool = False,
               eval_fraction: float = 0.1, name: str | None = None):
    super().__init__(eval_fraction=eval_fraction, name=name)
    check_int("Arithmetic", "num_digits", num_digits)
    if num_digits > MAX_DIGITS:
      raise ValueError(f"Arithmetic.num_digits={num_digits} must be <= {MAX_DIGITS} (operands "
                       "are drawn as int64)")
    if not ops or set(ops) - set("+-*/") or len(set(ops)) != len(ops):
      raise ValueError(f"ops={ops!r} must be distinct characters from '+-*/'")
    self.num_digits, self.ops, self.allow_negative = num_digits, ops, allow_negative
    self.hi = 10**num_digits - 1
    self.max_prompt_len = 2 * num_digits + 2
    # Longest answer per op: a sum carries, a negative difference has a sign.
    lens = {"+": len(str(2 * self.hi)), "*": len(str(self.hi * self.hi)), "/": num_digits,
            "-": num_digits + 1 if allow_negative else num_digits}
    self.max_answer_len = max(lens[op] for op in ops)

  def _generate(self, rng):
    op = self.ops[int(rng.integers(len(self.ops)))]
    a, b = int(rng.integers(0, self.hi + 1)), int(rng.integers(0, self.hi + 1))
    if op == "-" and not self.allow_negative and a < b:
      a, b = b, a
    if op == "/":  # draw divisor and quotient so the division is exact and a stays in range
      b = int(rng.integers(1, self.hi + 1))
      a = b * int(rng.integers(0, self.hi // b + 1))
    value = apply_op(a, op, b)
    return Problem(prompt=f"{a}{op}{b}=", answer=str(value), solution=str(value),
                   meta=(a, op, b, value), task=self.name)

  def reward(self, problem, completion):
    text = completion.strip()
    if not _INT_RE.fullmatch(text):
      return 0.0
    # Compared as digit strings, as int(text) would compare them: int() refuses more than
    # 4,300 digits (a long response raised instead of scoring 0).
    digits = text.lstrip("-").lstrip("0") or "0"
    value = problem.meta[-1]
    return 1.0 if (digits, text[0] == "-" and digits != "0") == (
        str(abs(value)), value < 0) else 0.0


# ---------------------------------------------------------------------------- countdown

_PREC = {"+": 1, "-": 1, "*": 2}


def score_countdown(completion: str, numbers: Sequence[int], target: int,
                    format_reward: float = 0.1) -> float:
  """1 / format_reward / 0 as described in the module docstring."""
  try:
    value, used = evaluate_expression(completion)
  except ValueError:
    return 0.0
  if collections.Counter(used) - collections.Counter(numbers):  # reused or not given
    return 0.0
  return 1.0 if value == target else float(format_reward)


class Countdown(Task):
  """Reach the target with the given numbers (each at most once) and `ops`.

  Targets are built from a random expression over all the numbers, so they
  are always reachable. `parens=True` draws a random bracketing (a random
  binary tree) instead of a flat left-to-right chain. `shuffle=False` lists
  the numbers in the order the generated solution uses them (easier for a
  tiny model); `shuffle=True` lists them in random order.
  """

  name = "countdown"

  def __init__(self, num_numbers: int = 3, max_number: int = 9, *, ops: str = "+-*",
               parens: bool = False, shuffle: bool = False, max_target: int | None = None,
               format_reward: float = 0.1, eval_fraction: float = 0.1, name: str | None = None):
    super().__init__(eval_fraction=eval_fraction, name=name)
    check_int("Countdown", "num_numbers", num_numbers)
    check_int("Countdown", "max_number", max_number, minimum=2)
    check_real("Countdown", "format_reward", format_reward)
    if max_target is not None:
      check_int("Countdown", "max_target", max_target, minimum=0)
    if not ops or set(ops) - set("+-*") or len(set(ops)) != len(ops):
      raise ValueError(f"ops={ops!r} must be distinct characters from '+-*'")
    if not 0.0 <= format_reward < 1.0:
      raise ValueError(f"format_reward={format_reward} must be in [0, 1)")
    # |value| of any expression is at most the same tree with every leaf = max_number and every
    # op '+' or '*'; for leaves >= 2 a product never loses to a sum, hence max_number**n.
    bound = max_number**num_numbers if "*" in ops else num_numbers * max_number
    self.max_target = bound if max_target is None else min(max_target, bound)
    self.num_numbers, self.max_number, self.ops = num_numbers, max_number, ops
    self.parens, self.shuffle, self.format_reward = parens, shuffle, format_reward
    width = len(str(max_number))
    self.max_prompt_len = num_numbers * (width + 1) + len(str(self.max_target)) + 1
    brackets = 2 * max(num_numbers - 2, 0) if parens else 0  # the root never needs a pair
    self.max_answer_len = num_numbers * width + (num_numbers - 1) + brackets

  def _expression(self, rng, nums):
    """(text, precedence) of a random expression over `nums` in order."""
    if len(nums) == 1:
      return str(nums[0]), 3
    op = self.ops[int(rng.integers(len(self.ops)))]
    if not self.parens:  # flat chain: the last number joins the chain of the others
      left, _ = self._expression(rng, nums[:-1])
      return f"{left}{op}{nums[-1]}", _PREC[op]
    split = int(rng.integers(1, len(nums)))
    (lt, lp), (rt, rp) = self._expression(rng, nums[:split]), self._expression(rng, nums[split:])
    # Bracket only where precedence or the non-associative '-' would change the value.
    lt = f"({lt})" if lp < _PREC[op] else lt
    rt = f"({rt})" if rp < _PREC[op] or (rp == _PREC[op] and op == "-") else rt
    return f"{lt}{op}{rt}", _PREC[op]

  def _generate(self, rng):
    for _ in range(10_000):  # redraw until the target is in [0, max_target]
      nums = [int(x) for x in rng.integers(1, self.max_number + 1, size=self.num_numbers)]
      text, _ = self._expression(rng, nums)
      target, _ = evaluate_expression(text)
      if 0 <= target <= self.max_target:
        break
    else:
      raise ValueError(f"{self.name}: no target in [0, {self.max_target}] after 10000 draws")
    shown = [nums[i] for i in rng.permutation(len(nums))] if self.shuffle else nums
    prompt = " ".join(map(str, shown)) + f":{target}="
    return Problem(prompt=prompt, answer=text, solution=text, meta=(tuple(shown), target),
                   task=self.name)

  def reward(self, problem, completion):
    numbers, target = problem.meta
    return score_countdown(completion, numbers, target, self.format_reward)


# ---------------------------------------------------------------------------- mixture, registry

class Mixture(Task):
  """Problems drawn from several tasks (not mixtures) with `weights` (uniform by default)."""

  def __init__(self, tasks: Sequence[Task], weights: Sequence[float] | None = None):
    names = [t.name for t in tasks]
    nested = [t.name for t in tasks if isinstance(t, Mixture)]
    if nested:  # its problems carry the inner tasks' names, which this one could not score
      raise ValueError(f"Mixture of mixtures {nested}: list their tasks in one Mixture, with "
                       "weights multiplied out")
    if not tasks or len(set(names)) != len(names):
      raise ValueError(f"Mixture needs >= 1 task with distinct names, got {names}")
    w = np.ones(len(tasks)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(tasks),) or not np.isfinite(w).all() or np.any(w < 0) or w.sum() <= 0:
      raise ValueError(f"weights={weights} must be {len(tasks)} finite non-negative numbers, "
                       "not all 0")
    self.tasks, self.weights = list(tasks), w / w.sum()
    self._by_name = dict(zip(names, self.tasks))
    self.name = "mixture(" + ",".join(names) + ")"
    self.max_prompt_len = max(t.max_prompt_len for t in tasks)
    self.max_answer_len = max(t.max_answer_len for t in tasks)

  def _task_of(self, problem):
    if problem.task not in self._by_name:
      raise ValueError(f"problem of task {problem.task!r} is not in {self.name}")
    return self._by_name[problem.task]

  def is_eval(self, problem):
    return self._task_of(problem).is_eval(problem)

  def sample(self, rng, n):
    which = rng.choice(len(self.tasks), size=n, p=self.weights)
    drawn = [iter(t.sample(rng, int(np.sum(which == i)))) for i, t in enumerate(self.tasks)]
    return [next(drawn[i]) for i in which]

  def eval_set(self, n, seed=0):
    # Largest-remainder split of n, so the counts follow the weights and sum to n.
    exact = self.weights * n
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[:n - counts.sum()]] += 1
    return [p for t, c in zip(self.tasks, counts) for p in t.eval_set(int(c), seed=seed)]

  def reward(self, problem, completion):
    return self._task_of(problem).reward(problem, completion)

  def __repr__(self):
    return f"Mixture({self.tasks}, weights={self.weights.tolist()})"


TASKS = {"arithmetic": Arithmetic, "countdown": Countdown}


def _task_options(name: str) -> dict:
  """{option: default} of a registered task's constructor (what `task_kwargs` may set)."""
  params = inspect.signature(TASKS[name]).parameters.values()
  return {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _check_options(name: str, kwargs) -> None:
  """Unknown keys name the task's options (the usual cause: a config's task_kwargs written
  for another task; configs/tiny.py's are countdown's), not a bare TypeError from __init__."""
  options = _task_options(name)
  unknown = sorted(set(kwargs) - set(options))
  if unknown:
    owners = [t for t in sorted(TASKS) if t != name and set(unknown) <= set(_task_options(t))]
    hint = f" (options of {' / '.join(map(repr, owners))})" if owners else ""
    first, default = next(iter(options.items()))
    raise ValueError(
        f"task {name!r} does not take task_kwargs {unknown}{hint}; it accepts (defaults): "
        + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ". task_kwargs is a dict in "
        f"the config: replace it whole with e.g. --config.task_kwargs=\"{{'{first}': "
        f"{default!r}}}\" (--config.task_kwargs={{}} for the defaults), change a key it "
        "already has with --config.task_kwargs.KEY=VALUE, or edit the config file")


def make_task(name: str, /, **kwargs) -> Task:
  """Builds a registered task by name, e.g. `make_task('arithmetic', num_digits=3)`.

  `name` is positional-only so that kwargs may hold the task's own `name` option."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; allowed: {sorted(TASKS)}")
  _check_options(name, kwargs)
  return TASKS[name](**kwargs)
