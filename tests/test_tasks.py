"""Tests for pr2_jax.rl.tasks: hand-worked rewards, splits, determinism."""

import numpy as np
import pytest

from pr2_jax.rl import expressions, tasks
from pr2_jax.rl.char_tokenizer import CharTokenizer

ALL_TASKS = [
    tasks.Arithmetic(),
    tasks.Arithmetic(num_digits=3, ops="+-*/", allow_negative=True),
    tasks.Countdown(),
    tasks.Countdown(num_numbers=4, max_number=12, parens=True, shuffle=True),
    tasks.Mixture([tasks.Arithmetic(), tasks.Countdown()], weights=[3, 1]),
]


def _problem(prompt):
  """The arithmetic Problem for a hand-written prompt like '12+34='."""
  op = next(c for c in "+-*/" if c in prompt[1:])
  a, b = prompt[:-1].split(op)
  value = expressions.apply_op(int(a), op, int(b))
  return tasks.Problem(prompt, str(value), str(value), (int(a), op, int(b), value), "arithmetic")


def test_arithmetic_rewards():
  task = tasks.Arithmetic()
  p = _problem("12+34=")
  assert task.reward(p, "46") == 1.0
  assert task.reward(p, " 46 ") == 1.0  # surrounding spaces are not an error
  assert task.reward(p, "046") == 1.0   # parses to the exact integer
  for wrong in ["47", "-46", "4 6", "46=", "46+0", "", "=", "4.6e1", "x", "９"]:
    assert task.reward(p, wrong) == 0.0, wrong
  q = _problem("3-15=")
  assert task.reward(q, "-12") == 1.0 and task.reward(q, "12") == 0.0
  assert task.reward(q, "-0012") == 1.0 and task.reward(q, "--12") == 0.0


def test_arithmetic_reward_of_a_very_long_answer_is_a_value_not_an_error():
  """int() refuses strings of more than 4,300 digits: a long response raised ValueError."""
  task = tasks.Arithmetic()
  assert task.reward(_problem("12+34="), "1" * 4301) == 0.0
  assert task.reward(_problem("12+34="), "0" * 5000 + "46") == 1.0  # as int() would read it
  zero = _problem("5-5=")
  assert task.reward(zero, "0") == task.reward(zero, "-0") == task.reward(zero, "000") == 1.0


def test_arithmetic_generation():
  task = tasks.Arithmetic(num_digits=2, ops="+-")
  assert (task.max_prompt_len, task.max_answer_len) == (6, 3)  # "99+99=" -> "198"
  for p in task.sample(np.random.default_rng(0), 500):
    a, op, b, value = p.meta
    assert p.prompt == f"{a}{op}{b}=" and 0 <= a <= 99 and 0 <= b <= 99
    assert value == (a + b if op == "+" else a - b) >= 0 and p.answer == p.solution == str(value)
  div = tasks.Arithmetic(num_digits=2, ops="/")
  for p in div.sample(np.random.default_rng(1), 300):
    a, _, b, value = p.meta
    assert b >= 1 and a == b * value and a <= 99


class _Draws:
  """A stand-in rng whose `integers` returns the given values in order (to pin a draw)."""

  def __init__(self, *values):
    self.values = iter(values)

  def integers(self, *args, **kwargs):
    return next(self.values)


def test_arithmetic_multiplication():
  """Every '*' problem's value is a*b of its operands; "12*34=" is hand-worked: 408."""
  task = tasks.Arithmetic(num_digits=2, ops="*")
  assert (task.max_prompt_len, task.max_answer_len) == (6, 4)  # "99*99=" -> "9801"
  for p in task.sample(np.random.default_rng(2), 500):
    a, op, b, value = p.meta
    assert op == "*" and p.prompt == f"{a}*{b}=" and 0 <= a <= 99 and 0 <= b <= 99
    assert value == a * b and p.answer == p.solution == str(a * b), p
  p = task._generate(_Draws(0, 12, 34))  # draws: op index, a, b
  assert p == tasks.Problem("12*34=", "408", "408", (12, "*", 34, 408), "arithmetic")
  assert task.reward(p, "408") == 1.0 and task.reward(p, " 408") == 1.0
  for wrong in ["407", "409", "4080", "-408", "12*34"]:
    assert task.reward(p, wrong) == 0.0, wrong


def test_countdown_rewards():
  task = tasks.Countdown()
  p = tasks.Problem("3 5 8:23=", "3*5+8", "3*5+8", ((3, 5, 8), 23), "countdown")
  assert task.reward(p, "3*5+8") == 1.0
  assert task.reward(p, "8+5*3") == 1.0     # any order
  assert task.reward(p, "(8+3)*5-32") == 0.0  # 32 was not given
  assert task.reward(p, "3*5+8+0") == 0.0   # 0 was not given
  assert task.reward(p, "3*5+5+3") == 0.0   # reuses 5 and 3
  assert task.reward(p, "3+5+8") == 0.1     # well formed, legal numbers, wrong value
  assert task.reward(p, "8") == 0.1         # a subset is legal
  for bad in ["3*5+", "23", "3*5+8=", "", "3 * 5 + 8)", "(3*5)+8x"]:
    assert task.reward(p, bad) == (0.0), bad
  q = tasks.Problem("4 4 2:6=", "4+4-2", "4+4-2", ((4, 4, 2), 6), "countdown")
  assert task.reward(q, "4+4-2") == 1.0     # duplicates may each be used once
  assert task.reward(q, "4+4+4-2*3") == 0.0
  strict = tasks.Countdown(format_reward=0.0)
  assert strict.reward(p, "3+5+8") == 0.0 and strict.reward(p, "3*5+8") == 1.0


def test_countdown_generation():
  task = tasks.Countdown(num_numbers=3, max_number=9)
  assert (task.max_prompt_len, task.max_answer_len) == (10, 5)  # "9 9 9:729=" -> "9*9*9"
  for p in task.sample(np.random.default_rng(0), 500):
    numbers, target = p.meta
    assert p.prompt == " ".join(map(str, numbers)) + f":{target}="
    assert 0 <= target <= 729 and all(1 <= x <= 9 for x in numbers)
    # shuffle=False: the numbers are listed in the order the solution uses them
    assert expressions.evaluate_expression(p.solution) == (target, list(numbers))
  capped = tasks.Countdown(max_target=20)
  assert all(p.meta[1] <= 20 for p in capped.sample(np.random.default_rng(0), 300))
  assert capped.max_prompt_len == 9


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: repr(t)[:40])
def test_every_solution_is_correct_and_fits(task):
  tok = CharTokenizer()
  problems = task.sample(np.random.default_rng(3), 2000) + task.eval_set(100, seed=3)
  for p in problems:
    assert task.reward(p, p.solution) == 1.0, p
    assert len(p.prompt) <= task.max_prompt_len, p
    assert len(p.solution) <= task.max_answer_len and len(p.answer) <= task.max_answer_len, p
    tok.encode(p.prompt + p.solution)  # every character is in the vocabulary
    assert 0.0 <= task.reward(p, "1+2") <= 1.0


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: repr(t)[:40])
def test_train_eval_disjoint(task):
  train = {p.prompt for p in task.sample(np.random.default_rng(0), 5000)}
  eval_problems = task.eval_set(300, seed=0)
  held_out = {p.prompt for p in eval_problems}
  assert len(held_out) == 300  # distinct
  assert not train & held_out
  assert all(task.is_eval(p) for p in eval_problems)


def test_split_is_stable_and_shared_across_settings():
  # The split is a property of the prompt alone; these values are golden.
  held = [f"{a}+{b}=" for a in range(10) for b in range(10)
          if tasks.is_eval_prompt(f"{a}+{b}=", 0.1)]
  assert held == ["3+3=", "3+7=", "3+8=", "5+3=", "5+6=", "6+2=", "6+7=", "7+1=", "7+5=", "7+9=",
                  "8+3=", "8+5=", "8+8=", "9+5="]
  assert not tasks.is_eval_prompt("12+34=", 0.1) and tasks.is_eval_prompt("12+34=", 0.9)
  small = {p.prompt for p in tasks.Arithmetic(num_digits=1).eval_set(8)}
  big_train = {p.prompt
               for p in tasks.Arithmetic(num_digits=2).sample(np.random.default_rng(0), 5000)}
  assert not small & big_train
  fractions = np.mean([tasks.is_eval_prompt(str(i), 0.1) for i in range(20000)])
  assert 0.09 < fractions < 0.11


@pytest.mark.parametrize("task", ALL_TASKS, ids=lambda t: repr(t)[:40])
def test_deterministic_under_seed(task):
  assert task.sample(np.random.default_rng(5), 50) == task.sample(np.random.default_rng(5), 50)
  assert task.eval_set(40, seed=2) == task.eval_set(40, seed=2)
  assert task.eval_set(40, seed=2) != task.eval_set(40, seed=3)
  assert task.sample(np.random.default_rng(5), 50) != task.sample(np.random.default_rng(6), 50)


def test_mixture():
  mix = tasks.Mixture([tasks.Arithmetic(), tasks.Countdown()], weights=[3, 1])
  assert mix.name == "mixture(arithmetic,countdown)"
  assert (mix.max_prompt_len, mix.max_answer_len) == (10, 5)
  names = [p.task for p in mix.sample(np.random.default_rng(0), 4000)]
  assert 0.72 < names.count("arithmetic") / len(names) < 0.78
  ev = mix.eval_set(10)
  # 7.5/2.5 -> 8/2 (ties: first)
  assert [p.task for p in ev] == ["arithmetic"] * 8 + ["countdown"] * 2
  cd = next(p for p in ev if p.task == "countdown")
  assert mix.reward(cd, cd.solution) == 1.0 and mix.reward(ev[0], ev[0].answer) == 1.0
  with pytest.raises(ValueError, match="not in mixture"):
    mix.reward(tasks.Problem("1+1=", "2", "2", (1, "+", 1, 2), "other"), "2")
  with pytest.raises(ValueError, match="distinct names"):
    tasks.Mixture([tasks.Arithmetic(), tasks.Arithmetic(num_digits=3)])
  # A nested Mixture's problems carry its inner tasks' names: it sampled, then could not score.
  with pytest.raises(ValueError, match=r"Mixture of mixtures \['mixture\(arithmetic,countdown"):
    tasks.Mixture([mix, tasks.Arithmetic(num_digits=3, name="a3")])
  named = tasks.Mixture([tasks.Arithmetic(), tasks.Arithmetic(num_digits=3, name="arith3")])
  assert {p.task for p in named.sample(np.random.default_rng(0), 100)} == {"arithmetic", "arith3"}


def test_make_task_and_validation():
  assert isinstance(tasks.make_task("arithmetic", num_digits=3), tasks.Arithmetic)
  assert tasks.make_task("countdown", num_numbers=4).num_numbers == 4
  with pytest.raises(ValueError, match=r"unknown task 'sudoku'; allowed: "
                                       r"\['arithmetic', 'countdown'\]"):
    tasks.make_task("sudoku")
  with pytest.raises(ValueError, match=r"Arithmetic.num_digits must be a positive int, got 0"):
    tasks.Arithmetic(num_digits=0)
  with pytest.raises(ValueError, match="ops="):
    tasks.Arithmetic(ops="+%")
  with pytest.raises(ValueError, match="ops="):
    tasks.Countdown(ops="+/")
  with pytest.raises(ValueError, match=r"Countdown.max_number must be an int >= 2, got 1"):
    tasks.Countdown(max_number=1)
  with pytest.raises(ValueError, match="eval_fraction"):
    tasks.Countdown(eval_fraction=1.0)
  with pytest.raises(ValueError, match="found only"):
    tasks.Arithmetic(num_digits=1, ops="+").eval_set(50)  # 100 prompts, ~10 held out


@pytest.mark.parametrize("make, match", [
    # A float passed every range check and became a buffer length (max_prompt_len 6.0) or a
    # prompt length from str(9.5); a bool is not a digit count.
    (lambda: tasks.Arithmetic(num_digits=2.0), r"Arithmetic.num_digits .* got 2.0"),
    (lambda: tasks.Arithmetic(num_digits=True), r"Arithmetic.num_digits .* got True"),
    (lambda: tasks.Arithmetic(num_digits=19), r"num_digits=19 must be <= 18"),
    (lambda: tasks.Countdown(max_number=9.5), r"Countdown.max_number .* got 9.5"),
    (lambda: tasks.Countdown(num_numbers="3"), r"Countdown.num_numbers .* got '3'"),
    (lambda: tasks.Countdown(max_target=-1), r"Countdown.max_target .* got -1"),
    (lambda: tasks.Countdown(format_reward=float("nan")), r"Countdown.format_reward .* nan"),
    (lambda: tasks.Countdown(eval_fraction=float("nan")), r"Countdown.eval_fraction .* nan"),
    # NaN/inf weights passed construction and failed in numpy at sample time.
    (lambda: tasks.Mixture([tasks.Arithmetic(), tasks.Countdown()], [float("nan"), 1]),
     r"weights=\[nan, 1\] must be 2 finite"),
    (lambda: tasks.Mixture([tasks.Arithmetic(), tasks.Countdown()], [float("inf"), 1]),
     r"weights=\[inf, 1\] must be 2 finite"),
])
def test_task_options_of_the_wrong_type_are_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_arithmetic_scores_answers_of_any_length():
  """The answer pattern allowed 30 digits: a correct 32-digit product scored 0. 18 digits
  (the int64 limit) multiply to 36."""
  task = tasks.Arithmetic(num_digits=18, ops="*")
  problems = task.sample(np.random.default_rng(0), 20)
  assert max(len(p.answer) for p in problems) > 30
  assert [task.reward(p, p.solution) for p in problems] == [1.0] * 20
  big = problems[0]
  assert task.reward(big, str(big.meta[-1] + 1)) == 0.0


def test_make_task_rejects_options_of_another_task():
  """configs/tiny.py's task_kwargs are countdown's: `--config.task=arithmetic` used to die in
  Arithmetic.__init__ with a bare TypeError; now the error names the keys, whose they are, the
  task's own options with defaults and the flag forms that work for a dict-valued field."""
  tiny_kwargs = {"num_numbers": 3, "max_number": 9}
  with pytest.raises(ValueError) as err:
    tasks.make_task("arithmetic", **tiny_kwargs)
  assert str(err.value) == (
      "task 'arithmetic' does not take task_kwargs ['max_number', 'num_numbers'] (options of "
      "'countdown'); it accepts (defaults): num_digits=2, ops='+-', allow_negative=False, "
      "eval_fraction=0.1, name=None. task_kwargs is a dict in the config: replace it whole with "
      "e.g. --config.task_kwargs=\"{'num_digits': 2}\" (--config.task_kwargs={} for the "
      "defaults), change a key it already has with --config.task_kwargs.KEY=VALUE, or edit the "
      "config file")
  # A key no task has: no owner named; one bad key among good ones is still caught.
  with pytest.raises(ValueError, match=r"task 'countdown' does not take task_kwargs \['digits'\]; "
                     r"it accepts \(defaults\): num_numbers=3, max_number=9, ops='\+-\*', "):
    tasks.make_task("countdown", num_numbers=4, digits=2)
  # Options the task shares with another (ops, eval_fraction, name) are its own: accepted.
  task = tasks.make_task("countdown", **tiny_kwargs, ops="+", eval_fraction=0.2, name="cd")
  assert (task.num_numbers, task.max_number, task.ops, task.eval_fraction, task.name) == (
      3, 9, "+", 0.2, "cd")
  assert tasks.make_task("arithmetic").num_digits == 2  # {} = the defaults


class _Unnamed(tasks.Task):
  """A new task whose _generate forgets `task=self.name`, as Problem's default allows."""
  name, max_prompt_len, max_answer_len = "unnamed", 3, 1

  def _generate(self, rng):
    a = int(rng.integers(0, 100))
    return tasks.Problem(f"{a:02d}:", str(a % 7), str(a % 7), (a,))

  def reward(self, problem, completion):
    return float(completion == problem.answer)


def test_problems_are_named_after_their_task_even_if_generate_forgets():
  """Mixture dispatches rewards on Problem.task: an unnamed one raised 'problem of task '''
  is not in mixture(...)' mid-run."""
  task = _Unnamed(eval_fraction=0.5)
  rng = np.random.default_rng(0)
  assert {p.task for p in task.sample(rng, 8) + task.eval_set(4)} == {"unnamed"}
  mix = tasks.Mixture([task, tasks.make_task("arithmetic")])
  for problem in mix.sample(rng, 16) + mix.eval_set(8):
    assert mix.reward(problem, problem.answer) == 1.0


def _assert_draws_exactly(task, space):
  """Train sampling yields every (prompt, solution) pair of `space` whose prompt is not held
  out and nothing else; eval_set yields every held-out prompt."""
  train = {pair for pair in space if not tasks.is_eval_prompt(pair[0], task.eval_fraction)}
  assert {(p.prompt, p.solution) for p in task.sample(np.random.default_rng(0), 2000)} == train
  held = {prompt for prompt, _ in space} - {prompt for prompt, _ in train}
  assert held and {p.prompt for p in task.eval_set(len(held))} == held


_DIGITS = range(10)
_ARITH_SPACES = [  # (ops, allow_negative, every (prompt, answer) of 1-digit operands, by hand)
    ("+", False, {(f"{a}+{b}=", str(a + b)) for a in _DIGITS for b in _DIGITS}),
    ("-", False, {(f"{a}-{b}=", str(a - b)) for a in _DIGITS for b in _DIGITS if a >= b}),
    ("-", True, {(f"{a}-{b}=", str(a - b)) for a in _DIGITS for b in _DIGITS}),
    ("/", False, {(f"{q * b}/{b}=", str(q)) for b in range(1, 10) for q in range(9 // b + 1)}),
]


@pytest.mark.parametrize("ops, allow_negative, space", _ARITH_SPACES)
def test_arithmetic_draws_exactly_its_problem_space(ops, allow_negative, space):
  """Sampling reaches every train prompt of the space and nothing else: operands in [0, 9]
  (both ends), negative differences iff allow_negative, every exact quotient up to 9 // b.
  The lengths are tight: max_prompt_len / max_answer_len are reached ("9+9=" -> "18",
  "0-9=" -> "-9", "9/1=" -> "9")."""
  task = tasks.Arithmetic(num_digits=1, ops=ops, allow_negative=allow_negative)
  _assert_draws_exactly(task, space)
  assert task.max_prompt_len == 4 == max(len(p) for p, _ in space)
  assert task.max_answer_len == max(len(a) for _, a in space) == {
      ("+", False): 2, ("-", False): 1, ("-", True): 2, ("/", False): 1}[ops, allow_negative]


def test_arithmetic_answer_length_per_op():
  """Each op's longest answer, by hand for 2 digits: "99+99=" -> "198", "0-99=" -> "-99" only
  with allow_negative, "99*99=" -> "9801", "99/1=" -> "99"; a mix takes the longest."""
  lens = {ops: tasks.Arithmetic(num_digits=2, ops=ops).max_answer_len
          for ops in ["+", "-", "*", "/", "-/", "+-"]}
  assert lens == {"+": 3, "-": 2, "*": 4, "/": 2, "-/": 2, "+-": 3}
  assert tasks.Arithmetic(num_digits=2, ops="-", allow_negative=True).max_answer_len == 3
  assert tasks.Arithmetic(num_digits=2, ops="-/", allow_negative=True).max_answer_len == 3
  p = tasks.Arithmetic(num_digits=2, ops="-", allow_negative=True)._generate(_Draws(0, 3, 15))
  assert (p.prompt, p.answer, p.meta) == ("3-15=", "-12", (3, "-", 15, -12))  # not swapped


def test_countdown_draws_exactly_its_problem_space():
  """Numbers in [1, max_number] (both ends), targets in [0, max_target] (both ends: "1 1:0="
  and "3 3:9="), negative values redrawn; every (prompt, solution) by hand for 2 numbers <= 3."""
  task = tasks.Countdown(num_numbers=2, max_number=3)
  assert task.max_target == 9
  space = {(f"{a} {b}:{v}=", f"{a}{op}{b}") for a in range(1, 4) for b in range(1, 4)
           for op, v in [("+", a + b), ("-", a - b), ("*", a * b)] if v >= 0}
  _assert_draws_exactly(task, space)
  capped = tasks.Countdown(num_numbers=2, max_number=3, max_target=4)
  _assert_draws_exactly(capped, {(p, s) for p, s in space if int(p[4:-1]) <= 4})


def test_countdown_shuffle_lists_numbers_in_random_order():
  """shuffle=True lists the solution's numbers in either order ("3 1:4=" for "1+3"), and meta
  holds the numbers as shown (shuffle=False: test_countdown_generation)."""
  task = tasks.Countdown(num_numbers=2, max_number=3, ops="+", shuffle=True)
  space = {(f"{x} {y}:{a + b}=", f"{a}+{b}") for a in range(1, 4) for b in range(1, 4)
           for x, y in [(a, b), (b, a)]}
  _assert_draws_exactly(task, space)
  problems = task.sample(np.random.default_rng(0), 200) + task.eval_set(3)
  assert all(p.prompt.startswith(" ".join(map(str, p.meta[0])) + ":") for p in problems)


def test_countdown_max_target_is_capped_by_the_reachable_bound():
  """A max_target above what the numbers can reach (9**3 = 729) does not widen the prompt."""
  task = tasks.Countdown(max_target=10**6)
  assert (task.max_target, task.max_prompt_len) == (729, 10)
  assert tasks.Countdown(ops="+-", max_target=10**6).max_target == 27  # 9+9+9


def test_split_boundary_bucket():
  """The held-out buckets are [0, round(f * 10000)): "13+29=" hashes to bucket 999, held out at
  0.1; "92+53=" to bucket 1000, the first one kept for training at 0.1 (held out at 0.1001)."""
  assert tasks.is_eval_prompt("13+29=", 0.1) and not tasks.is_eval_prompt("13+29=", 0.0999)
  assert not tasks.is_eval_prompt("92+53=", 0.1) and tasks.is_eval_prompt("92+53=", 0.1001)


def test_mixture_eval_set_largest_remainder():
  """weights 2:1 -> exact shares 2.67/1.33 of 4 -> 3/1 (the larger remainder gets the spare),
  of 5 -> 3.33/1.67 -> 3/2."""
  mix = tasks.Mixture([tasks.Arithmetic(), tasks.Countdown()], weights=[2, 1])
  assert [p.task for p in mix.eval_set(4)] == ["arithmetic"] * 3 + ["countdown"]
  assert [p.task for p in mix.eval_set(5)] == ["arithmetic"] * 3 + ["countdown"] * 2


@pytest.mark.parametrize("make, match", [
    (lambda: tasks.Arithmetic(eval_fraction=0.0), r"eval_fraction=0.0 must be in \(0, 1\)"),
    (lambda: tasks.Countdown(format_reward=1.0), r"format_reward=1.0 must be in \[0, 1\)"),
    (lambda: tasks.Arithmetic(ops="++"), r"ops='\+\+' must be distinct"),
    (lambda: tasks.Countdown(ops="**"), r"ops='\*\*' must be distinct"),
])
def test_option_bounds(make, match):
  """eval_fraction 0 has no held-out split; format_reward 1 pays a wrong value in full; a
  repeated op silently reweights the ops."""
  with pytest.raises(ValueError, match=match):
    make()
