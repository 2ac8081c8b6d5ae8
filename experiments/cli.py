"""Command-line plumbing shared by entry points: absl's `app.run` with one-line errors for bad
flags and config files, flag validators, and how a run exits (usage error, Ctrl-C, SIGTERM).

A user's mistake gets one `error:` line naming it and exit code 2; tracebacks are for bugs.
"""

import contextlib
import os
import re
import runpy
import signal
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from experiments import allocator


def exit_with_error(message: str, code: int = 2):
  """A user error (bad config, a workdir of another setup): one line on stderr (line breaks
  folded), exit code 2, no traceback (those are for bugs). A run that failed on its own (it
  diverged) exits the same way with code 1."""
  sys.stderr.write(f"error: {' '.join(message.split())}\n")
  raise SystemExit(code)


def exit_interrupted(code: int):
  """Ends the process now, after loop.run has unwound (its checkpoints closed), skipping the
  interpreter's teardown: after a Ctrl-C that landed while the warm-up compiled, the teardown
  segfaulted in jaxlib (SIGSEGV, 'Fatal Python error', not exit 130) in every one of 18 runs
  on glibc's plain malloc with JAX probing its other backends (none in 16 with this)."""
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(code)


@contextlib.contextmanager
def bad_config_exits():
  """A setting the config dataclasses, the mesh or a flag check refuses (ValueError, KeyError,
  flags.ValidationError) raised inside is a usage error: `error: bad config: ...`, exit 2."""
  try:
    yield
  except (ValueError, KeyError, flags.ValidationError) as e:
    exit_with_error(f"bad config: {e}")


class Terminated(KeyboardInterrupt):
  """SIGTERM (a scheduler preempting or cancelling the job), raised like Ctrl-C so that what
  unwinds on Ctrl-C runs too: a checkpoint save in flight finishes instead of being lost."""


_signalled: list[type[KeyboardInterrupt]] = []  # what the handlers below raised, in order


def _interrupted(signum, frame):
  del frame
  _signalled.append(Terminated if signum == signal.SIGTERM else KeyboardInterrupt)
  raise _signalled[-1]()


def handle_signals():
  """Ctrl-C raises KeyboardInterrupt and SIGTERM `Terminated`, each remembered for
  `raises_signalled`."""
  _signalled.clear()
  for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, _interrupted)


def raises_signalled(callback):
  """`callback`, but first raising again a Ctrl-C or SIGTERM whose exception Python dropped.

  An exception raised while a garbage-collector callback runs (JAX registers one) is printed
  as 'Exception ignored in: <function _xla_gc_callback ...>' and lost: the run went on and
  only a second Ctrl-C stopped it; a lost SIGTERM left the job to be killed unsaved. Called
  after every step, the wrapped callback stops the run there. A signal raised normally ends
  the run, so no callback sees it twice."""
  def checked(*args, **kwargs):
    if _signalled:
      raise _signalled[-1]()
    return callback(*args, **kwargs)
  return checked


def run(main, positional: bool = False):
  """`app.run(main)` for our entry points: flags parsed by `parse_flags`, and a
  `flags.ValidationError` or `app.UsageError` raised in `main` (a bad flag combination) is one
  error line too (absl printed the whole help for a UsageError, exit 1). Arguments that are not
  flags are an error unless `positional` (`main` reads them): `main configs/tiny.py runs/r2`
  ran the default setup in the default workdir, its arguments ignored.
  Started as a script, the process first re-executes itself with a better C allocator for
  XLA:CPU's per-call buffers where that changes anything (`allocator`: faster CPU train steps)."""
  allocator.reexec_if_useful(os.path.dirname(os.path.abspath(__file__)))
  handle_signals()

  def checked(argv):
    try:
      if argv[1:] and not positional:
        raise app.UsageError(f"unexpected argument(s) {' '.join(argv[1:])}: every setting is a "
                             "--flag (e.g. --workdir=DIR, --config=FILE); see --help")
      return main(argv)
    except (flags.ValidationError, app.UsageError) as e:  # bad flags: one line, not the help
      exit_with_error(str(e))
  app.run(checked, flags_parser=parse_flags)


def parse_flags(argv: list[str]) -> list[str]:
  """`app.run`'s flag parser: absl's, but a bad flag (unknown, mistyped, out of bounds, or an
  unknown `--config.*` key) or a --config file that does not load is one `error:` line naming
  it, exit code 2, not a traceback. `--help` (and `--helpfull`, ...) exits 0, not absl's 1:
  asking for help is not a failure (`... --help && ...` goes on)."""
  _one_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:  # absl's help flags print the help and exit 1; nothing else exits
    raise SystemExit(0 if e.code == 1 else e.code) from None
  except (AttributeError, KeyError) as e:
    _unknown_config_key(e, argv)
  except flags.Error as e:
    exit_with_error(f"{e} (--helpfull lists every flag)")
  except (OSError, SyntaxError) as e:  # --config (or an override) loads the file right here
    exit_with_error(_config_file_error(_config_path(argv), e))


def define_config(default: str, help_text: str):
  """`config_flags.DEFINE_config_file("config", ...)`. Without `--config` on the command line,
  ml_collections applies the `--config.*` overrides here, at definition, not in parse_flags."""
  try:
    return config_flags.DEFINE_config_file("config", default, help_text)
  except (AttributeError, KeyError) as e:
    _unknown_config_key(e, sys.argv, default)


def config_value(config_flag):
  """The ConfigDict of a `DEFINE_config_file` flag; a config file that does not load (missing,
  or raising) is a usage error naming the file, not a traceback."""
  cfg = config_flag.value
  path = flags.FLAGS[config_flag.name].config_filename
  try:
    cfg.to_dict()  # ml_collections defers a load error to the first use of the value
  except OSError as e:
    exit_with_error(_config_file_error(path, e))
  except AttributeError:  # was a traceback: 'int' object has no attribute 'to_dict'
    if isinstance(cfg, ml_collections.ConfigDict):
      raise
    exit_with_error(f"bad --config: {path}: get_config() returned a value of type "
                    f"{type(cfg).__name__}, not an ml_collections.ConfigDict")
  return cfg


def _unknown_config_key(e: Exception, argv: list[str], default: str | None = None):
  """ml_collections refuses an unknown `--config.*` key with an AttributeError wrapping a KeyError
  whose traceback buries its "Did you mean" hint, and a key under a plain value (`seed.x`) with
  a bare KeyError: one line instead. `default`: the config file when argv names none."""
  message = e
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  if "has no attribute 'get_config'" in str(message):  # the file loaded; it is not a config
    exit_with_error(_config_file_error(_config_path(argv, default), message))
  under = re.search(r"<class '(\w+)'>\.(\w+) does not exist.*lookup: (\S+)", str(message))
  if under:  # was a KeyError traceback
    kind, field, key = under.groups()
    parts = key.split(".")
    parent = _scalar_prefix(_config_path(argv, default), parts)
    if parent is None:  # the file did not load again: the first `field` in the key is a guess
      parent = ".".join(parts[:parts.index(field)]) if field in parts else ""
    if not parent:
      exit_with_error(f"bad --config: {_config_path(argv, default)}: get_config() returned a "
                      f"value of type {kind}, not an ml_collections.ConfigDict")
    message = f"{key!r}: {parent} is of type {kind}, not a section with fields"
  given = [a for a in argv[1:] if a.startswith("--config.")]
  exit_with_error(f"unknown config key {message} (in {' '.join(given)})")


def _scalar_prefix(path: str, parts: list[str]) -> str | None:
  """The prefix of the key `parts` naming the first value on its path that has no fields ("" =
  the config itself), found by walking the file's config; None if it does not load. (The
  error names only the missing field, which occurs twice in `seed.seed`.)"""
  try:
    node = runpy.run_path(path)["get_config"]()
  except Exception:  # noqa: BLE001 - any failure falls back to the message's words
    return None
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      return ".".join(parts[:i])
    if part not in node:
      return None
    node = node[part]
  return None


def _config_files(argv: list[str]) -> list[str]:
  """Every file a `--config` on the command line names, in order."""
  return [arg.split("=", 1)[1] if arg.startswith("--config=") else argv[i + 1]
          for i, arg in enumerate(argv[1:], 1)
          if arg.startswith("--config=") or (arg == "--config" and i + 1 < len(argv))]


def _one_config_file(argv: list[str]):
  """Two `--config`s run the last file but check the `--config.*` overrides against the first
  (an unknown key, or absl's "defined twice"): say what is wrong instead."""
  files = _config_files(argv)
  if len(files) > 1:
    exit_with_error(f"--config given {len(files)} times ({', '.join(files)}): give one config "
                    "file and change its fields with --config.KEY=VALUE")


def _config_path(argv: list[str], default: str | None = None) -> str:
  """The config file the command line names (its last --config), else the flag's default
  (`default` while the flag is being defined)."""
  files = _config_files(argv)
  path = files[-1] if files else default
  if path is None and "config" in flags.FLAGS:
    path = flags.FLAGS["config"].config_filename
  return path or "?"


def _config_file_error(path: str, e: BaseException) -> str:
  """Why a --config file does not give a config, in words (ml_collections says 'Failed loading
  config file config_config', the module name it gave the file, and prints its attempts)."""
  text = " ".join(str(e).split())
  if isinstance(e, SyntaxError):
    reason = f"{e.msg} at line {e.lineno}"
  elif "has no attribute 'get_config'" in text:
    reason = ("defines no get_config() (a config file returns its ml_collections.ConfigDict "
              "from get_config(), as configs/tiny.py does)")
  elif "No such file or directory" in text:
    reason = f"no such file (relative to the current directory {os.getcwd()})"
  elif "Is a directory" in text:
    reason = "is a directory; give a config file such as configs/tiny.py"
  else:
    reason = text
  return f"bad --config: {path}: {reason}"


def at_least(minimum: float, *names: str):
  """Registers `--name >= minimum` for each flag: a negative count or size fails as it is parsed
  instead of as a numpy or XLA error later (None, an unset optional flag, passes)."""
  for name in names:
    flags.register_validator(name, lambda v, m=minimum: v is None or v >= m,
                             message=f"--{name} must be >= {minimum}")


def non_empty(*names: str):
  """Registers `--name` (a list flag) as non-empty: an empty list ran the work, then failed or
  wrote an empty table."""
  for name in names:
    flags.register_validator(name, lambda v: v is None or len(v) > 0,
                             message=f"--{name} must list at least one value")


def distinct(*names: str):
  """Registers `--name` (a list flag) as free of repeats: a repeated seed ran once and the
  report still claimed both."""
  for name in names:
    flags.register_validator(name, lambda v: v is None or len(set(v)) == len(v),
                             message=f"--{name} lists a value twice")


def numbers_at_least(kind, minimum: float, *names: str, count: int | None = None):
  """Registers each `--name` (a list flag) as `count` (any if None) numbers of `kind` (int or
  float) >= minimum: a bad entry failed as int() or a range() of step 0 after the work began,
  a short list as an unpacking error."""
  def ok(values):
    try:
      return (count is None or len(values) == count) and all(kind(v) >= minimum for v in values)
    except ValueError:
      return False
  what = f"{count} " if count else ""
  for name in names:
    flags.register_validator(name, ok, message=f"--{name} must list {what}{kind.__name__}s "
                             f">= {minimum}")
