"""Tests for pr2_jax.train.checkpoint: sharded round trip, newest-step bookkeeping."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from pr2_jax.parallel.mesh import make_mesh
from pr2_jax.train import checkpoint
from pr2_jax.train.checkpoint import (CheckpointError, Checkpointer, SetupMismatchError,
                                      abstract_like)


def test_round_trip_keeps_values_and_shardings(tmp_path):
  mesh = make_mesh(2, 4)
  shard = NamedSharding(mesh, PartitionSpec("expert"))
  state = {"w": jax.device_put(jnp.arange(16.0).reshape(8, 2), shard), "step": jnp.int32(3)}
  shardings = {"w": shard, "step": NamedSharding(mesh, PartitionSpec())}
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(3, state, {"rl_step": 3})
    ck.save(5, jax.tree.map(lambda x: x + 1, state), {"rl_step": 5})
    ck.wait()
    assert ck.latest_step() == 5 and ck.all_steps() == [3, 5]
    restored, meta = ck.restore(3, abstract_like(state, shardings))
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.arange(16.0).reshape(8, 2))
  assert restored["w"].sharding == shard and int(restored["step"]) == 3
  assert meta == {"rl_step": 3}


def test_keeps_only_newest(tmp_path):
  with Checkpointer(str(tmp_path), max_to_keep=2) as ck:
    for step in (1, 2, 3):
      ck.save(step, {"x": jnp.float32(step)}, {})
    ck.wait()
    assert ck.all_steps() == [2, 3]


def test_empty_directory_has_no_step(tmp_path):
  with Checkpointer(str(tmp_path / "none")) as ck:
    assert ck.latest_step() is None


def corrupt(directory):
  """Truncates every data file of a checkpoint step (as a disk fault would)."""
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))


def test_a_field_added_since_counts_as_its_legacy_value(tmp_path):
  """A checkpoint written before `pr2.adam_eps` existed ran with 1e-8: with that legacy value a
  resume at 1e-8 matches and one at 1e-3 is refused naming 1e-08, not an unfixable
  '<missing>'."""
  state = {"x": jnp.arange(2.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, {"pr2": {"lr_mult": 1.0}})
    ck.wait()
  legacy = {"pr2.adam_eps": 1e-8}
  with Checkpointer(str(tmp_path)) as ck:
    step, _, _, _ = ck.restore_newest_good(abstract, {"pr2": {"lr_mult": 1.0, "adam_eps": 1e-8}},
                                           legacy_meta=legacy)
    assert step == 1
    with pytest.raises(SetupMismatchError, match=r"pr2.adam_eps: checkpoint 1e-08, this run "
                                                  r"0.001 \(use another workdir"):
      ck.restore_newest_good(abstract, {"pr2": {"lr_mult": 1.0, "adam_eps": 1e-3}},
                             legacy_meta=legacy)
    with pytest.raises(SetupMismatchError, match=r"pr2.adam_eps: checkpoint '<missing>', this "
                                                  r"run 0.001"):
      ck.restore_newest_good(abstract, {"pr2": {"lr_mult": 1.0, "adam_eps": 1e-3}})


def test_damaged_newest_falls_back_to_previous(tmp_path):
  state = {"x": jnp.arange(4.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, {"model": {"d": 1}})
    ck.save(2, {"x": state["x"] + 1}, {"model": {"d": 1}})
    ck.wait()
  corrupt(str(tmp_path / "2"))
  with Checkpointer(str(tmp_path)) as ck:
    step, restored, _, problems = ck.restore_newest_good(abstract, {"model": {"d": 1}})
    assert ck.all_steps() == [1, 2], "a reader leaves the damaged step alone"
  assert step == 1 and len(problems) == 1 and "step 2" in problems[0]
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(4.0))


def test_a_restore_error_without_a_message_still_falls_back(tmp_path, monkeypatch):
  """An exception whose str() is empty (a bare AssertionError from Orbax) made the report an
  IndexError inside the fallback; the report names the exception's type instead."""
  state = {"x": jnp.arange(4.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, {})
    ck.save(2, {"x": state["x"] + 1}, {})
    ck.wait()
  restore = Checkpointer.restore

  def fails_at_2(self, step, abstract_state):
    if step == 2:
      raise AssertionError()
    return restore(self, step, abstract_state)

  monkeypatch.setattr(Checkpointer, "restore", fails_at_2)
  with Checkpointer(str(tmp_path)) as ck:
    step, restored, _, problems = ck.restore_newest_good(abstract)
  assert step == 1
  assert problems == [f"checkpoint step 2 in {tmp_path} is unreadable (AssertionError)"]
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(4.0))


def test_a_resume_deletes_the_damaged_steps_it_will_write_again(tmp_path):
  """Orbax refuses to save a step that exists: a run resumed from step 1 past a damaged step 2
  crashed at its next save until the resume deleted step 2."""
  state = {"x": jnp.arange(4.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path), max_to_keep=3) as ck:
    for step in (1, 2, 3):
      ck.save(step, {"x": state["x"] + step}, {})
    ck.wait()
  corrupt(str(tmp_path / "2"))
  corrupt(str(tmp_path / "3"))
  with Checkpointer(str(tmp_path), max_to_keep=3) as ck:
    step, _, _, problems = ck.restore_newest_good(abstract, delete_unreadable=True)
    assert step == 1 and ck.all_steps() == [1]
    assert problems[-1].startswith("deleted the unreadable step(s) [3, 2]")
    ck.save(2, {"x": state["x"] * 10}, {})
    ck.wait()
    restored, _ = ck.restore(2, abstract)
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(4.0) * 10)


def test_no_usable_checkpoint_is_an_error(tmp_path):
  state = {"x": jnp.arange(4.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, {})
    ck.wait()
  corrupt(str(tmp_path / "1"))
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(ValueError, match="no usable checkpoint: checkpoint step 1 .* unreadable"):
      ck.restore_newest_good(abstract)


def flip_bytes(step_dir, count=64):
  """XORs `count` bytes a third into the largest data file of a step (a silent disk error: the
  size stays, and Orbax restored such a step with wrong values and no error)."""
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(step_dir, "state"))
           for name in names]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 3, len(data) // 3 + count):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)
  return os.path.relpath(path, step_dir)


def _random_states():
  keys = jax.random.split(jax.random.key(0), 2)
  return [{"w": jax.random.normal(k, (64, 256)), "n": jnp.int32(i)} for i, k in enumerate(keys)]


def test_flipped_bytes_are_found_and_the_step_before_restored_exactly(tmp_path):
  states = _random_states()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[0])
  with Checkpointer(str(tmp_path)) as ck:
    for step, state in enumerate(states, 1):
      ck.save(step, state, {"model": {"d": 1}})
    ck.wait()
    intact, _ = ck.restore(2, abstract)  # an intact step restores bit-identically
  np.testing.assert_array_equal(np.asarray(intact["w"]), np.asarray(states[1]["w"]))
  damaged = flip_bytes(str(tmp_path / "2"))
  with Checkpointer(str(tmp_path)) as ck:
    step, restored, _, problems = ck.restore_newest_good(abstract, {"model": {"d": 1}})
  assert step == 1 and len(problems) == 1
  assert problems[0].startswith(f"checkpoint step 2 in {tmp_path} is unreadable (CheckpointError: "
                                f"{damaged} changed since it was saved (CRC-32 "), problems
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states[0]), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_every_step_records_the_checksums_of_its_files(tmp_path, monkeypatch):
  """Written before Orbax renames the step's temporary directory: a step is never listed
  without them, and they cover every file of its two items."""
  seen = []

  def write(step_dir):  # where the checksums go, and whether the step was already committed
    seen.append((step_dir, os.path.exists(tmp_path / "1")))
    write_checksums(step_dir)

  write_checksums = checkpoint.write_checksums
  monkeypatch.setattr(checkpoint, "write_checksums", write)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, _random_states()[0], {"a": 1})
    ck.wait()
  assert seen == [(str(tmp_path / "1.orbax-checkpoint-tmp"), False)]
  step_dir = str(tmp_path / "1")
  with open(os.path.join(step_dir, checkpoint.CHECKSUMS)) as f:
    recorded = json.load(f)["files"]
  on_disk = sorted(os.path.relpath(os.path.join(root, name), step_dir)
                   for item in ("state", "meta")
                   for root, _, names in os.walk(os.path.join(step_dir, item)) for name in names)
  assert sorted(recorded) == on_disk and "state/manifest.ocdbt" in recorded
  assert recorded == checkpoint.file_checksums(step_dir)


def test_a_missing_file_is_named_before_orbax_reads_the_step(tmp_path, capfd):
  """Orbax's failed read of a step without its manifest printed 82 tracebacks ('Event loop is
  closed', from TensorStore callbacks) before the warning; the checksums name the file first."""
  states = _random_states()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[0])
  with Checkpointer(str(tmp_path)) as ck:
    for step, state in enumerate(states, 1):
      ck.save(step, state, {})
    ck.wait()
  os.remove(tmp_path / "2" / "state" / "manifest.ocdbt")
  with Checkpointer(str(tmp_path)) as ck:
    step, _, _, problems = ck.restore_newest_good(abstract)
  assert step == 1 and problems == [f"checkpoint step 2 in {tmp_path} is unreadable "
                                    "(CheckpointError: state/manifest.ocdbt is missing)"]
  assert "Traceback" not in capfd.readouterr().err


def test_a_step_without_its_checksums_is_reported_and_the_one_before_restored(tmp_path):
  """A missing checksums.json used to mean "saved before checksums existed": the step was read
  unverified, and its flipped bytes restored as wrong values without a word."""
  states = _random_states()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[0])
  with Checkpointer(str(tmp_path)) as ck:
    for step, state in enumerate(states, 1):
      ck.save(step, state, {"a": step})
    ck.wait()
  os.remove(tmp_path / "2" / checkpoint.CHECKSUMS)
  with Checkpointer(str(tmp_path)) as ck:
    step, restored, meta, problems = ck.restore_newest_good(abstract)
  assert step == 1 and meta == {"a": 1} and problems == [
      f"checkpoint step 2 in {tmp_path} is unreadable (CheckpointError: checksums.json is "
      "missing (the step was copied in part or damaged))"]
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(states[0]["w"]))


@pytest.mark.parametrize("name", ["exp[lr=1e-3]", "a[1]b", "back\\slash"])
def test_a_directory_orbax_would_glob_is_refused(tmp_path, name):
  """Orbax globs a step's directory path: with these names it wrote steps it could not read."""
  with pytest.raises(ValueError, match="contains .* Orbax reads '\\[', '\\]' and"):
    Checkpointer(str(tmp_path / name))
  assert os.listdir(tmp_path) == []
  with Checkpointer(str(tmp_path / "spaces, % and * are fine")) as ck:
    ck.save(1, {"x": jnp.float32(2)}, {})
    ck.wait()
    assert float(ck.restore(1, {"x": jax.ShapeDtypeStruct((), jnp.float32)})[0]["x"]) == 2.0


def test_start_over_deletes_the_steps_when_none_restores(tmp_path):
  abstract = {"x": jax.ShapeDtypeStruct((4,), jnp.float32)}
  with Checkpointer(str(tmp_path)) as ck:
    for step in (1, 2):
      ck.save(step, {"x": jnp.arange(4.0) + step}, {})
    ck.wait()
  for step in (1, 2):
    flip_bytes(str(tmp_path / str(step)))
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(CheckpointError, match="no usable checkpoint: checkpoint step 2 .*; "
                                              "checkpoint step 1 .* unreadable"):
      ck.restore_newest_good(abstract)
    assert ck.all_steps() == [1, 2], "without start_over nothing is deleted"
    step, state, meta, problems = ck.restore_newest_good(abstract, start_over=True)
    assert (step, state, meta) == (None, None, None) and ck.all_steps() == []
  assert len(problems) == 3 and problems[-1] == (
      f"deleted the unreadable step(s) [2, 1] in {tmp_path}: no step restores, so the run starts "
      "over")


def test_checkpoint_of_another_model_is_refused(tmp_path):
  state = {"x": jnp.arange(4.0)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(1, state, {"model": {"num_experts": 8}})
    ck.wait()
    with pytest.raises(ValueError, match=r"another setup than this run: "
                       r"model\.num_experts: checkpoint 8, this run 16 \("):
      ck.restore_newest_good(abstract, {"model": {"num_experts": 16}})


def test_another_setup_is_named_before_any_array_is_read(tmp_path):
  # The arrays would not even fit the new abstract state: the message must still name the
  # config fields that differ (not an Orbax shape or tree-structure error), and every one.
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(3, {"x": jnp.arange(4.0)}, {"model": {"num_experts": 6, "top_k": 2}, "mode": "r3"})
    ck.wait()
  abstract = {"x": jax.ShapeDtypeStruct((8,), jnp.float32),
              "y": jax.ShapeDtypeStruct((2,), jnp.int32)}
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(ValueError) as err:
      ck.restore_newest_good(abstract, {"model": {"num_experts": 8, "top_k": 2}, "mode": "pr2"})
  message = str(err.value)
  assert "unreadable" not in message and "top_k" not in message
  assert ("model.num_experts: checkpoint 6, this run 8; mode: checkpoint 'r3', this run 'pr2'"
          in message)


def test_a_field_only_one_side_has_is_a_difference():
  """Inside a compared section a field the checkpoint has and this run lacks differs too (as
  does the reverse): comparing only this run's fields passed every test, and a checkpoint
  with a model field this run no longer sets would then resume silently."""
  assert checkpoint._differences("model", {"a": 1, "b": 2}, {"a": 1, "c": 3}) == [
      "model.b: checkpoint 2, this run '<missing>'", "model.c: checkpoint '<missing>', this run 3"]


def test_restore_meta_reads_the_metadata_alone(tmp_path):
  with Checkpointer(str(tmp_path)) as ck:
    ck.save(5, {"x": jnp.arange(4.0)}, {"rl_step": 5, "model": {"d": [1, 2]}})
    ck.wait()
    assert ck.restore_meta(5) == {"rl_step": 5, "model": {"d": [1, 2]}}


@pytest.fixture
def ctrl_c_raises():
  """Python's own SIGINT handler for the test. A suite started in the background by a shell
  without job control (`make test &` in a script) inherits SIGINT ignored, and Python then
  installs no handler: the signal these tests send would be dropped."""
  before = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield
  signal.signal(signal.SIGINT, before)


@pytest.mark.usefixtures("ctrl_c_raises")
def test_an_interrupt_inside_a_save_takes_effect_after_it(tmp_path, monkeypatch):
  """Ctrl-C inside Orbax's synchronous part of a save abandoned the step's temporary directory:
  the save defers it, then the KeyboardInterrupt comes and the step is complete."""
  real_save, seen = ocp.CheckpointManager.save, []

  def interrupted_save(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # runs the main thread's Python handler at once
    seen.append("still saving")
    return real_save(self, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", interrupted_save)
  with pytest.raises(KeyboardInterrupt):
    with Checkpointer(str(tmp_path)) as ck:
      ck.save(1, {"x": jnp.arange(4.0)}, {})
      seen.append("after the save")  # not reached: the deferred Ctrl-C is raised first
  assert seen == ["still saving"] and sorted(os.listdir(tmp_path)) == ["1"]


@pytest.mark.usefixtures("ctrl_c_raises")
def test_a_second_interrupt_inside_a_save_acts_at_once(tmp_path, monkeypatch):
  """A save that hangs stays interruptible: the second Ctrl-C is not deferred."""
  seen = []

  def hanging_save(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    seen.append("first deferred")
    os.kill(os.getpid(), signal.SIGINT)
    seen.append("second deferred")  # not reached

  monkeypatch.setattr(ocp.CheckpointManager, "save", hanging_save)
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(KeyboardInterrupt):
      ck.save(1, {"x": jnp.arange(4.0)}, {})
  assert seen == ["first deferred"]
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_by_default_the_two_newest_steps_are_kept(tmp_path):
  """max_to_keep defaults to 2: the run's checkpoint and one to fall back to. The explicit
  max_to_keep of the other tests left the default free to keep more (or fewer)."""
  with Checkpointer(str(tmp_path)) as ck:
    for step in (1, 2, 3):
      ck.save(step, {"x": jnp.float32(step)}, {})
    ck.wait()
    assert ck.all_steps() == [2, 3]


def _two_steps(tmp_path, meta):
  """Saves steps 1 and 2 of `_random_states` with `meta`; returns (states, abstract)."""
  states = _random_states()
  with Checkpointer(str(tmp_path)) as ck:
    for step, state in enumerate(states, 1):
      ck.save(step, state, meta)
    ck.wait()
  return states, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states[0])


def test_restore_verifies_the_state_and_restore_meta_the_metadata_alone(tmp_path):
  """`restore` itself checks the state's files (not only via restore_newest_good); restore_meta
  checks the metadata's files and not the state's, which it does not read. A flipped digit in
  the metadata (still valid JSON, same size) is damage, so a resume falls back to step 1: read
  unverified, it was taken for another setup (SetupMismatchError)."""
  _, abstract = _two_steps(tmp_path, {"model": {"d": 1}})
  flipped = flip_bytes(str(tmp_path / "2"))
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(CheckpointError, match=f"{flipped} changed since it was saved"):
      ck.restore(2, abstract)
    assert ck.restore_meta(2) == {"model": {"d": 1}}
  meta_file = tmp_path / "1" / "meta" / "metadata"
  meta_file.write_text(meta_file.read_text().replace("1", "7"))
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(CheckpointError, match="meta/metadata changed since it was saved"):
      ck.restore_meta(1)
  # Step 2's state and step 1's metadata damaged: a resume falls back past both, no mismatch.
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(CheckpointError, match=r"no usable checkpoint: checkpoint step 2 .*"
                                              r"; checkpoint step 1 .*meta/metadata changed"):
      ck.restore_newest_good(abstract, {"model": {"d": 1}})


def test_a_damaged_checksums_file_or_a_truncated_file_is_named(tmp_path):
  """checksums.json that is not JSON is a CheckpointError naming it (a bare JSONDecodeError
  escaped the checks' own error type); a file of another size is named with both sizes."""
  _, abstract = _two_steps(tmp_path, {})
  checksums = tmp_path / "2" / checkpoint.CHECKSUMS
  checksums.write_text(checksums.read_text()[:40])
  manifest = tmp_path / "1" / "state" / "manifest.ocdbt"
  size = os.path.getsize(manifest)
  with open(manifest, "r+b") as f:
    f.truncate(size - 1)
  with Checkpointer(str(tmp_path)) as ck:
    with pytest.raises(CheckpointError, match=rf"{checkpoint.CHECKSUMS} is damaged "
                                              r"\(JSONDecodeError: "):
      ck.restore(2, abstract)
    with pytest.raises(CheckpointError, match=rf"state/manifest.ocdbt has {size - 1} bytes, "
                                              rf"{size} when saved"):
      ck.restore(1, abstract)


def test_a_section_the_checkpoint_did_not_record_is_not_compared(tmp_path):
  """expect_meta sections a checkpoint lacks (a field added to the run identity since, such as
  hf_checkpoint) are skipped, not a KeyError out of the resume; recorded ones still count."""
  states, abstract = _two_steps(tmp_path, {"model": {"d": 1}})
  with Checkpointer(str(tmp_path)) as ck:
    step, restored, meta, problems = ck.restore_newest_good(
        abstract, {"model": {"d": 1}, "hf_checkpoint": "/some/dir"})
    assert (step, meta, problems) == (2, {"model": {"d": 1}}, [])
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(states[1]["w"]))
    with pytest.raises(SetupMismatchError, match=r"model.d: checkpoint 1, this run 2"):
      ck.restore_newest_good(abstract, {"model": {"d": 2}, "hf_checkpoint": "/some/dir"})
