"""Atomic, resumable checkpoints with Orbax: sharded train state + JSON metadata.

Orbax writes each step into a temporary directory and renames it when
complete, so a run killed mid-write leaves no half checkpoint behind (it is
never listed as a step). Saves are asynchronous: `wait()` before relying on
one, and `close()` before the process exits.

Orbax checks no data bytes when reading (a flipped byte in a data file restored
wrong values silently), so every step also records the size and CRC-32 of each file
it wrote (`checksums.json`), and a restore verifies them first.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import zlib
from typing import Any

import jax
import orbax.checkpoint as ocp


CHECKSUMS = "checksums.json"  # in each step directory, beside Orbax's items
_ITEMS = ("state", "meta")


class SetupMismatchError(ValueError):
  """A checkpoint was written by another setup than the one asking to resume from it."""


class CheckpointError(ValueError):
  """A checkpoint cannot be used: damaged files, or no step of a directory restores."""


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying shardings: restore places each array straight in its shards."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


# Orbax globs inside a step's directory (merging OCDBT files: `glob('ocdbt.process_*')` on the
# whole path), so brackets or a backslash in the path are read as glob syntax, match nothing,
# and every save "succeeds" with a step that cannot be read back. An unpaired '[' works; all
# three are refused alike, which is simpler to state.
GLOB_UNSAFE = "[]\\"


def check_directory(directory: str) -> None:
  """Raises ValueError if Orbax cannot checkpoint under `directory` (see GLOB_UNSAFE)."""
  bad = "".join(c for c in GLOB_UNSAFE if c in directory)
  if bad:
    raise ValueError(f"checkpoint directory {directory!r} contains {bad!r}: Orbax reads '[', ']' "
                     "and '\\' in a path as glob syntax and would write checkpoints it cannot "
                     "read back; choose a path without them")


class Checkpointer:
  """Keeps the newest `max_to_keep` steps of {'state': pytree, 'meta': dict} under `directory`.
  Raises ValueError for a directory Orbax cannot use (`check_directory`)."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    check_directory(directory)
    self.directory = os.path.abspath(directory)
    self._saving = None  # the step whose save is in flight (its checksums are still to write)
    # The callback runs on process 0 once every process's files are written and merged, just
    # before Orbax renames the temporary directory: the checksums commit with the step.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict) -> None:
    with interrupts_deferred():
      self._manager.wait_until_finished()  # the previous save's callback has read _saving
      self._saving = step
      self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

  def _write_checksums(self) -> None:
    final = os.path.join(self.directory, str(self._saving))
    tmp = final + ".orbax-checkpoint-tmp"  # Orbax's name for a step being written
    write_checksums(tmp if os.path.isdir(tmp) else final)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into the shapes/shardings of `abstract_state` (see `abstract_like`).
    Raises CheckpointError if a file differs from what the save recorded."""
    verify_checksums(self._step_dir(step), _ITEMS)
    out = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_meta(self, step: int) -> dict:
    """The JSON metadata of `step` alone (cheap: no array is read)."""
    verify_checksums(self._step_dir(step), ("meta",))
    return dict(self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore_newest_good(self, abstract_state: Any, expect_meta: dict | None = None,
                          delete_unreadable: bool = False, start_over: bool = False,
                          legacy_meta: dict | None = None):
    """Restores the newest step that reads back; returns (step, state, meta, problems).

    A damaged or incomplete newest checkpoint is reported in `problems` (one
    message per step tried) and the previous one is used. A run that resumes
    from it writes the newer step numbers again, which Orbax refuses while
    they exist: `delete_unreadable` deletes them once an older step restored
    (a reader, e.g. a probe, leaves them alone). When steps exist but none
    restores, `start_over` deletes them all and returns no step (the caller
    starts from scratch); otherwise that raises CheckpointError. Raises
    SetupMismatchError when `expect_meta` entries differ from what a checkpoint
    recorded (e.g. another model config): the metadata is compared before any
    array is read, so the error names the fields that differ instead of an
    Orbax shape or tree-structure mismatch. `legacy_meta` maps dotted paths of entries added
    after older checkpoints were written ("pr2.adam_eps") to the value those ran with: it
    stands in for the entry such a checkpoint lacks.
    """
    problems, unreadable = [], []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        meta = self.restore_meta(step)
      except Exception as e:  # Orbax raises many types for damaged files
        problems.append(_unreadable(self.directory, step, e))
        unreadable.append(step)
        continue
      differences = [d for key, want in (expect_meta or {}).items() if key in meta
                     for d in _differences(key, meta[key], want, legacy_meta)]
      if differences:
        raise SetupMismatchError(
            f"checkpoint step {step} in {self.directory} was written with another setup than "
            "this run: " + "; ".join(differences) + " (use another workdir, or the "
            "checkpoint's settings)")
      try:
        state, meta = self.restore(step, abstract_state)
      except Exception as e:
        problems.append(_unreadable(self.directory, step, e))
        unreadable.append(step)
        continue
      if unreadable and delete_unreadable:
        self._delete(unreadable)
        problems.append(f"deleted the unreadable step(s) {unreadable} in {self.directory}: "
                        f"restored step {step} instead, and a resumed run writes them again")
      return step, state, meta, problems
    if problems and not start_over:
      raise CheckpointError("no usable checkpoint: " + "; ".join(problems))
    if problems:
      self._delete(unreadable)
      problems.append(f"deleted the unreadable step(s) {unreadable} in {self.directory}: no "
                      "step restores, so the run starts over")
    return None, None, None, problems

  def _delete(self, steps) -> None:
    for step in steps:
      self._manager.delete(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    with interrupts_deferred():  # close() waits for the commit in flight: let it finish
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


@contextlib.contextmanager
def interrupts_deferred(signals=(signal.SIGINT, signal.SIGTERM)):
  """Ctrl-C / SIGTERM arriving inside the block take effect when it ends.

  Orbax starts a save on the calling thread (its temporary directory, the
  arrays' copies) and commits it in the background: an interrupt raised in the
  first part abandoned the step's temporary directory, so the run lost the
  checkpoint it was writing. A second signal acts at once (a save that hangs,
  e.g. on a stuck file system, stays interruptible). Python handlers only run
  on the main thread; elsewhere, or for a handler not set from Python, this
  does nothing.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught, previous = [], {}

  def defer(signum, frame):
    if caught:
      caught.clear()  # acts now, not once more at the end
      previous[signum](signum, frame)
    else:
      caught.append(signum)

  for signum in signals:
    if callable(signal.getsignal(signum)):
      previous[signum] = signal.signal(signum, defer)
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)
    if caught:
      signal.raise_signal(caught[0])  # now the original handler runs


def _crc32(path: str, block: int = 1 << 24) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(block):
      crc = zlib.crc32(chunk, crc)
  return crc


def file_checksums(step_dir: str, items=_ITEMS) -> dict[str, dict]:
  """{path relative to `step_dir`: {'bytes', 'crc32'}} of every file of the `items` dirs."""
  out = {}
  for item in items:
    for root, dirs, files in os.walk(os.path.join(step_dir, item)):
      dirs.sort()
      for name in sorted(files):
        path = os.path.join(root, name)
        out[os.path.relpath(path, step_dir)] = {"bytes": os.path.getsize(path),
                                                "crc32": _crc32(path)}
  return out


def write_checksums(step_dir: str) -> None:
  """Records `file_checksums` in `step_dir`/checksums.json (once Orbax wrote the items)."""
  tmp = os.path.join(step_dir, CHECKSUMS + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": file_checksums(step_dir)}, f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, CHECKSUMS))


def verify_checksums(step_dir: str, items=_ITEMS) -> None:
  """Raises CheckpointError if checksums.json is missing (every step `Checkpointer` lists has
  it: it commits with the step) or names a file of `items` that is missing or differs. Every
  process checks every file, so all reach the same verdict without a collective."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.exists(path):
    # Not "saved before checksums existed": read unverified, a damaged step restored silently.
    raise CheckpointError(f"{CHECKSUMS} is missing (the step was copied in part or damaged)")
  try:
    with open(path) as f:
      recorded = json.load(f)["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise CheckpointError(f"{path} is damaged ({type(e).__name__}: {e})") from None
  for rel, want in sorted(recorded.items()):
    if rel.split(os.sep)[0] not in items:
      continue
    full = os.path.join(step_dir, rel)
    if not os.path.isfile(full):
      raise CheckpointError(f"{rel} is missing")
    size = os.path.getsize(full)
    if size != want["bytes"]:
      raise CheckpointError(f"{rel} has {size} bytes, {want['bytes']} when saved")
    crc = _crc32(full)
    if crc != want["crc32"]:
      raise CheckpointError(f"{rel} changed since it was saved (CRC-32 {crc:08x}, saved "
                            f"{want['crc32']:08x})")


def _unreadable(directory: str, step: int, e: Exception) -> str:
  # A bare `AssertionError()` (Orbax raises some) has no message: its type name is the report.
  first = (str(e).splitlines() or [""])[0][:200]
  return (f"checkpoint step {step} in {directory} is unreadable "
          f"({type(e).__name__}{': ' + first if first else ''})")


def _differences(key: str, had, want, legacy: dict | None = None) -> list[str]:
  """'key.field: checkpoint X, this run Y' for every leaf where two JSON values differ; a field
  the checkpoint lacks counts as its `legacy` value (dotted path), else as "<missing>"."""
  legacy = legacy or {}
  if isinstance(had, dict) and isinstance(want, dict):
    return [d for k in sorted(set(had) | set(want), key=str)
            for d in _differences(f"{key}.{k}", had.get(k, legacy.get(f"{key}.{k}", "<missing>")),
                                  want.get(k, "<missing>"), legacy)]
  return [] if had == want else [f"{key}: checkpoint {had!r}, this run {want!r}"]
