"""Tests for experiments/cli.py: one-line usage errors for bad flags, bounds, validation errors
in main and --config files or keys that give no config, and exit codes."""

import gc
import os
import signal
import subprocess
import sys

import pytest
from absl import app, flags
from absl.testing import flagsaver

from experiments import cli


def test_exit_with_error_is_one_line_and_code_2(capsys):
  with pytest.raises(SystemExit) as e:
    cli.exit_with_error("bad config: x")
  assert e.value.code == 2 and capsys.readouterr().err == "error: bad config: x\n"


def test_exit_with_error_folds_line_breaks_into_one_line(capsys):
  # A ValueError of the config dataclasses may span lines; one `error:` line is the contract
  # (tests/_cli.one_error_line counts them), so the breaks and runs of spaces are folded.
  with pytest.raises(SystemExit) as e:
    cli.exit_with_error("bad config: a\n  b\tc\n", code=1)
  assert e.value.code == 1 and capsys.readouterr().err == "error: bad config: a b c\n"


@pytest.mark.parametrize("error", [ValueError("top_k=99"), KeyError("top_k=99"),
                                   flags.ValidationError("top_k=99")])
def test_bad_config_exits_on_each_refusal_with_code_2(error, capsys):
  with pytest.raises(SystemExit) as e:
    with cli.bad_config_exits():
      raise error
  # str(KeyError) quotes its message: the line shows what the dataclass said, as it said it.
  assert e.value.code == 2 and capsys.readouterr().err == f"error: bad config: {error}\n"


def test_bad_config_exits_lets_a_bug_through():
  with pytest.raises(TypeError):  # not a user's setting: a traceback, not a usage error
    with cli.bad_config_exits():
      raise TypeError("a bug")


@pytest.fixture(autouse=True)
def _restore_flags():
  """These flags live on absl's global FLAGS, which every in-process parse validates: a value a
  refusal test left (--nonempty_list_flag=) failed the parse of whichever test ran next, in
  this file or another (tests/test_bench_model.py, in reverse order)."""
  with flagsaver.flagsaver():
    yield


_COUNT = flags.DEFINE_integer("test_cli_count", 3, "A count only these tests use.")
cli.at_least(1, "test_cli_count")
_OPTIONAL = flags.DEFINE_integer("unset_bound_flag", None, "Unset unless given.")
cli.at_least(0, "unset_bound_flag")
_LIST = flags.DEFINE_list("nonempty_list_flag", ["1"], "A list only these tests use.")
cli.non_empty("nonempty_list_flag")
cli.distinct("nonempty_list_flag")
_PAIR = flags.DEFINE_list("number_pair_flag", ["0.5", "1"], "Two numbers only these tests use.")
cli.numbers_at_least(float, 0.5, "number_pair_flag", count=2)
# --help and its kin, as app.run defines them before it parses (these tests call the parser
# alone). Here, not in a test: flagsaver deletes the flags a test defines.
app.define_help_flags()


@pytest.mark.parametrize("argv, message", [
    (["prog", "--test_cli_count=0"],
     "error: flag --test_cli_count=0: --test_cli_count must be >= 1 (--helpfull lists "
     "every flag)\n"),
    (["prog", "--test_cli_count=abc"],
     "error: flag --test_cli_count=abc: invalid literal for int() with base 10: 'abc' "
     "(--helpfull lists every flag)\n"),
    (["prog", "--test_cli_nope=1"],
     "error: Unknown command line flag 'test_cli_nope'. Did you mean: test_cli_count ? "
     "(--helpfull lists every flag)\n"),
])
def test_a_bad_flag_is_one_error_line_and_exit_code_2(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(argv)
  assert e.value.code == 2 and capsys.readouterr().err == message


@pytest.mark.parametrize("help_flag, shows", [
    ("--help", "Try --helpfull"), ("-?", "Try --helpfull"), ("--helpfull", "--test_cli_count")])
def test_help_prints_the_flags_and_exits_0(help_flag, shows, capsys):
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(["prog", help_flag])
  assert e.value.code == 0 and shows in capsys.readouterr().out


def test_bounded_flag_accepts_its_minimum():
  cli.parse_flags(["prog", "--test_cli_count=1"])
  assert _COUNT.value == 1


def test_an_unset_optional_flag_passes_its_bound():
  # None >= 0 is a TypeError: without the `v is None` case every run without the flag failed.
  cli.parse_flags(["prog"])
  assert _OPTIONAL.value is None
  cli.parse_flags(["prog", "--unset_bound_flag=0"])
  assert _OPTIONAL.value == 0


@pytest.mark.parametrize("argv, message", [
    (["--nonempty_list_flag="], "--nonempty_list_flag must list at least one value"),
    (["--number_pair_flag=0.5"], "--number_pair_flag must list 2 floats >= 0.5"),  # one short
    (["--number_pair_flag=1,2,3"], "--number_pair_flag must list 2 floats >= 0.5"),  # one too many
    (["--number_pair_flag=0.49,1"], "--number_pair_flag must list 2 floats >= 0.5"),
    (["--number_pair_flag=1,x"], "--number_pair_flag must list 2 floats >= 0.5"),  # not a number
    (["--nonempty_list_flag=3,4,3"], "--nonempty_list_flag lists a value twice"),
])
def test_list_validators_refuse_with_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.parse_flags(["prog", *argv])
  assert e.value.code == 2 and message in capsys.readouterr().err


def test_list_validators_accept_their_edges():
  # One entry is not empty; the minimum itself is allowed, as at_least's is.
  cli.parse_flags(["prog", "--nonempty_list_flag=7", "--number_pair_flag=0.5,0.5"])
  assert _LIST.value == ["7"] and _PAIR.value == ["0.5", "0.5"]


# absl's app.run prints the whole help for an app.UsageError and exits 1.
@pytest.mark.parametrize("error", [
    flags.ValidationError("--mesh_expert=3 does not divide the 8 devices"),
    app.UsageError("--ref_workdir needs --workdir")])
def test_run_turns_a_validation_or_usage_error_in_main_into_one_line(error, capsys, monkeypatch):
  def main(argv):
    raise error
  monkeypatch.setattr("sys.argv", ["prog"])
  with pytest.raises(SystemExit) as e:
    cli.run(main)
  assert e.value.code == 2
  assert capsys.readouterr().err == f"error: {error}\n"


def test_run_refuses_arguments_that_are_not_flags_unless_main_reads_them(capsys, monkeypatch):
  """`main --config=configs/tiny.py runs/r2` ran in the default workdir, `runs/r2` ignored."""
  seen = []
  monkeypatch.setattr("sys.argv", ["prog", "runs/r2", "x"])
  with pytest.raises(SystemExit) as e:
    cli.run(seen.append)
  assert e.value.code == 2 and not seen
  assert capsys.readouterr().err.startswith("error: unexpected argument(s) runs/r2 x: every "
                                            "setting is a --flag (e.g. --workdir=DIR")
  with pytest.raises(SystemExit) as e:  # app.run exits with main's return value
    cli.run(seen.append, positional=True)  # e.g. experiments.plot's workdirs
  assert e.value.code is None
  assert seen == [["prog", "runs/r2", "x"]]


_CONFIG_FILES = {"syntax.py": "def get_config(:\n", "noget.py": "x = 1\n",
                 "five.py": "def get_config():\n  return 5\n"}


@pytest.mark.parametrize("args, message", [
    # Each was a traceback (SyntaxError, KeyError, AttributeError) or a misleading line
    # ("unknown config key module 'config_config' has no attribute 'get_config' (in )").
    (["--config={tmp}/syntax.py"], "bad --config: {tmp}/syntax.py: invalid syntax at line 1"),
    (["--config={tmp}/noget.py"], "bad --config: {tmp}/noget.py: defines no get_config() (a "
     "config file returns its ml_collections.ConfigDict from get_config(), as configs/tiny.py "
     "does)"),
    (["--config={tmp}/five.py"], "bad --config: {tmp}/five.py: get_config() returned a value of "
     "type int, not an ml_collections.ConfigDict"),
    (["--config={tmp}/five.py", "--config.rl.num_steps=3"], "bad --config: {tmp}/five.py: "
     "get_config() returned a value of type int, not an ml_collections.ConfigDict"),
    # Was "Failed loading config file config_config / Attempted [Relative path]: ...".
    (["--config={tmp}/nope.py"], "bad --config: {tmp}/nope.py: no such file (relative to the "
     "current directory {repo})"),
    # With an override the file loads while the flags parse (an OSError there, not later).
    (["--config={tmp}/nope.py", "--config.rl.num_steps=3"], "bad --config: {tmp}/nope.py: no "
     "such file (relative to the current directory {repo})"),
    (["--config={tmp}"], "bad --config: {tmp}: is a directory; give a config file such as "
     "configs/tiny.py"),
    (["--config.seed.x=1"], "unknown config key 'seed.x': seed is of type int, not a section "
     "with fields (in --config.seed.x=1)"),
    # The missing field's name occurs twice in these keys: the first blamed the file and `rl`.
    (["--config.seed.seed=1"], "unknown config key 'seed.seed': seed is of type int, not a "
     "section with fields (in --config.seed.seed=1)"),
    (["--config.rl.num_steps.num_steps=2"], "unknown config key 'rl.num_steps.num_steps': "
     "rl.num_steps is of type int, not a section with fields (in "
     "--config.rl.num_steps.num_steps=2)"),
    # Was "unknown config key 'hf_checkpoint'" (checked against the first file, which does not
    # have it) or absl's "The flag 'config.rl.num_steps' is defined twice".
    (["--config=configs/tiny.py", "--config", "configs/hf_pr2.py", "--config.rl.num_steps=1"],
     "--config given 2 times (configs/tiny.py, configs/hf_pr2.py): give one config file and "
     "change its fields with --config.KEY=VALUE"),
])
def test_a_config_file_or_key_that_gives_no_config_is_one_error_line(tmp_path, args, message):
  import _cli
  for name, text in _CONFIG_FILES.items():
    (tmp_path / name).write_text(text)
  fill = lambda s: s.format(tmp=tmp_path, repo=_cli.REPO)  # noqa: E731
  proc = _cli.run("experiments.main", f"--workdir={tmp_path}/run", *map(fill, args))
  assert _cli.one_error_line(proc) == "error: " + fill(message)
  assert not (tmp_path / "run").exists()


@pytest.fixture
def cli_signal_handlers():
  previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  cli.handle_signals()
  yield
  cli.handle_signals()  # forgets the signals the test sent
  for signum, handler in previous.items():
    signal.signal(signum, handler)


# Python reports the dropped exception through sys.unraisablehook; pytest would warn about it.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("signum, exception", [(signal.SIGINT, KeyboardInterrupt),
                                                (signal.SIGTERM, cli.Terminated)])
def test_a_signal_dropped_inside_a_gc_callback_is_raised_by_the_next_step_callback(
    cli_signal_handlers, signum, exception):
  def gc_callback(phase, info):  # as JAX's _xla_gc_callback: the signal lands while it runs
    del info
    if phase == "start":
      os.kill(os.getpid(), signum)

  rows = []
  on_metrics = cli.raises_signalled(rows.append)
  on_metrics({"step": 1})
  gc.callbacks.append(gc_callback)
  try:
    gc.collect()  # the handler raises in gc_callback, and Python drops it ...
  finally:
    gc.callbacks.remove(gc_callback)
  with pytest.raises(exception) as e:  # ... so the next step's callback raises it again
    on_metrics({"step": 2})
  assert type(e.value) is exception and rows == [{"step": 1}]


def test_a_signal_raised_normally_propagates_as_before(cli_signal_handlers):
  with pytest.raises(cli.Terminated):
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10**6):  # the handler runs at the next bytecode boundary
      pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_the_latest_signal_is_the_one_raised_again(cli_signal_handlers):
  """Ctrl-C, then the scheduler's SIGTERM: the run ends as terminated (exit 143), the last
  word, not as the first signal."""
  for signum, exception in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, cli.Terminated)):
    with pytest.raises(exception):
      os.kill(os.getpid(), signum)
      for _ in range(10**6):
        pass
  with pytest.raises(KeyboardInterrupt) as e:  # not cli.Terminated: a Ctrl-C would escape it
    cli.raises_signalled(lambda: None)()
  assert type(e.value) is cli.Terminated


def test_exit_interrupted_exits_with_the_code_and_keeps_what_was_printed():
  # os._exit skips the interpreter's flush of buffered stdout and stderr (pipes: fully
  # buffered), so "how to resume" printed just before would be lost without exit_interrupted's.
  code = ("import sys; from experiments import cli; print('resume with --workdir'); "
          "sys.stderr.write('interrupted'); cli.exit_interrupted(143)")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a job's
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert (proc.returncode, proc.stdout, proc.stderr) == (143, "resume with --workdir\n",
                                                         "interrupted")


def test_run_refuses_a_single_stray_argument(capsys, monkeypatch):
  """`main --config=configs/tiny.py runs/r2`: one stray argument is the common slip (a workdir
  typed without --workdir=); it must be refused like two, not run in the default workdir."""
  seen = []
  monkeypatch.setattr("sys.argv", ["prog", "runs/r2"])
  with pytest.raises(SystemExit) as e:
    cli.run(seen.append)
  assert e.value.code == 2 and not seen
  assert capsys.readouterr().err == (
      "error: unexpected argument(s) runs/r2: every setting is a --flag (e.g. --workdir=DIR, "
      "--config=FILE); see --help\n")


def test_an_unknown_config_key_names_only_the_overrides(capsys):
  """The '(in ...)' of an unknown-key error lists the --config.* overrides, where the mistyped
  key is, not the --config file itself. ml_collections raises an AttributeError wrapping a
  KeyError whose message is the key (as experiments.main --config.rl.nope=1 shows)."""
  argv = ["prog", "--config=configs/tiny.py", "--config.rl.nope=1", "--workdir=w",
          "--config.seed=3"]
  with pytest.raises(SystemExit) as e:
    cli._unknown_config_key(AttributeError(KeyError("'nope'")), argv)
  assert e.value.code == 2 and capsys.readouterr().err == (
      "error: unknown config key 'nope' (in --config.rl.nope=1 --config.seed=3)\n")
