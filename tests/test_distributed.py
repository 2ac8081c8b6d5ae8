"""Multi-host glue: config validation, host <-> global moves, and a real 2-process run vs 1
process."""

import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pr2_jax.parallel import distributed
from pr2_jax.parallel.mesh import make_mesh

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("kwargs, match", [
    ({"num_processes": -1}, "num_processes=-1"),
    ({"num_processes": 2}, "coordinator_address"),
    ({"num_processes": 2, "coordinator_address": "127.0.0.1:1", "process_id": 2}, "process_id=2"),
    ({"num_processes": 2, "coordinator_address": "localhost"}, "host:port"),
    # Half a multi-process command: this host would train alone.
    ({"coordinator_address": "127.0.0.1:1", "process_id": 1},
     r"coordinator_address='127.0.0.1:1', process_id=1 set for a single process "
     r"\(num_processes=0\)"),
    ({"coordinator_address": "127.0.0.1:1"}, "set for a single process"),
    ({"process_id": 0, "num_processes": 1}, r"process_id=0 set for a single process"),
    # Dropped by initialize(), which then asked for a process_id the user had set.
    ({"num_processes": 2, "coordinator_address": "127.0.0.1:1", "process_id": -5},
     r"process_id=-5 must be -1 \(auto-detect\) or a rank >= 0"),
])
def test_config_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.DistributedConfig(**kwargs)


def test_single_process_is_not_distributed():
  assert not distributed.DistributedConfig().enabled
  assert distributed.DistributedConfig(num_processes=2, coordinator_address="h:1").enabled
  distributed.initialize(distributed.DistributedConfig())  # a no-op, must not raise
  assert distributed.is_main_process()


def test_initialize_names_the_setting_jax_could_not_detect(monkeypatch):
  """--process_id left at -1 (auto) outside a cluster JAX detects was a traceback from
  jax/_src/distributed.py; JAX's own refusals with everything given pass through."""
  def refuse(**kwargs):
    raise ValueError("The process id of the current process must be defined.")
  monkeypatch.setattr(distributed.jax.distributed, "initialize", refuse)
  monkeypatch.setattr(distributed.jax.config, "update", lambda *args: None)  # no gloo switch
  cfg = distributed.DistributedConfig("127.0.0.1:1", 2)
  with pytest.raises(ValueError, match=r"could not detect what was left unset \(process_id\): "
                                       r"The process id .* must be defined. Set process_id"):
    distributed.initialize(cfg)
  with pytest.raises(ValueError, match=r"^The process id of the current process must be"):
    distributed.initialize(distributed.DistributedConfig("127.0.0.1:1", 2, 1))


def test_local_block_of_one_process_is_everything():
  mesh = make_mesh(2, 4)
  sharding = NamedSharding(mesh, P(None, ("data", "expert")))
  assert distributed.local_block(sharding, (3, 16, 5)) == (slice(0, 3), slice(0, 16), slice(0, 5))


def test_to_global_and_back_round_trips_every_layout():
  mesh = make_mesh(2, 4)
  tree = {"rows": np.arange(16 * 3).reshape(16, 3), "micro": np.arange(2 * 8 * 4).reshape(2, 8, 4),
          "scalar": np.float32(2.5)}
  shard = {"rows": NamedSharding(mesh, P(("data", "expert"))),
           "micro": NamedSharding(mesh, P(None, ("data", "expert"))),
           "scalar": NamedSharding(mesh, P())}
  placed = distributed.to_global(tree, shard)
  assert placed["rows"].sharding == shard["rows"]
  assert len(placed["micro"].addressable_shards) == 8
  assert placed["micro"].addressable_shards[3].data.shape == (2, 1, 4)  # one row of b per device
  back = distributed.to_host(placed)
  for key in tree:
    np.testing.assert_array_equal(back[key], tree[key])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# 30 SFT steps first: from the random init every reward is 0, so every advantage, policy loss
# and policy gradient would be 0 and equal whatever the processes did. A float32 rollout engine:
# in bfloat16, running the collectives across processes (gloo) changes the rollout's rounding
# enough that the RL loss differs (0.00169 in one process against 0.00138 in two; 1.6e-4
# relative in float32).
_RUN = ["-m", "experiments.main", "--config=configs/tiny.py", "--config.sft.num_steps=30",
        "--config.rl.num_steps=2", "--config.rl.prompts_per_step=8",
        "--config.rl.group_size=4", "--config.rl.eval_every=2", "--config.rl.eval_size=16",
        "--config.mesh_expert=4", "--config.rl.replay_mode=pr2",
        "--config.rl.rollout_dtype=float32",
        # One layer: what crosses processes has no layer axis of its own, and each of the three
        # processes compiles every layer anew (cold compile cache: 226 CPU-s with two, 166).
        "--config.model.num_layers=1"]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# The predictor's metrics after its first update amplify a change in summation order more than
# the rest (its gradient is the router's small change over an update, softmax(p_θ) against the
# rollout's softmax(p_old): a difference of nearly equal numbers). In ONE process, splitting the
# weights over 'data' (FSDP) instead of replicating them moved step 2's bias_logit_ratio by
# 6.1e-4 and pred_loss by 2.6e-4 relative (2 processes against 1: 8.3e-4 and 2.5e-4; every other
# metric < 4e-5 or below atol; AMD EPYC Zen 4 VM, 2026-12-07).
_RTOL = {"bias_logit_ratio": 5e-3, "pred_loss": 5e-3}


def _close(a, b, path=""):
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), path
    for k in a:
      if k != "elapsed_s":
        _close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, (list, float)):
    rtol = _RTOL.get(path.rpartition(".")[2], 2e-4)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=2e-5, err_msg=path)
  else:
    assert a == b, path


def _saved_specs(step_dir):
  """{state leaf path: partition spec} as the Orbax checkpoint recorded them."""
  with open(os.path.join(step_dir, "state", "_sharding")) as f:
    saved = json.load(f)
  return {base64.b64decode(k).decode(): json.loads(v)["partition_spec"] for k, v in saved.items()}


def _launch(cmds, logs, env):
  """Runs the commands concurrently; all must exit 0. Kills every one of them whatever happens."""
  procs = []
  try:
    for cmd, log in zip(cmds, logs):
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True))
    for proc, log in zip(procs, logs):
      code = proc.wait(timeout=600)
      log.seek(0)
      assert code == 0, log.read()[-3000:]
  finally:
    for proc in procs:  # a hung or failed peer must not outlive the test
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# Each of two processes holds half the rows of a global [16, 3] array: `local_rows` must read
# exactly those rows (no all-gather) and `gather_rows` must hand every process all 16 results.
_ROWS_CHILD = """
import json, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_num_cpu_devices", 4)
from pr2_jax.parallel import distributed
from pr2_jax.parallel.mesh import make_mesh
distributed.initialize(distributed.DistributedConfig(sys.argv[1], 2, int(sys.argv[2])))
x = np.arange(16 * 3).reshape(16, 3)
placed = distributed.to_global(x, NamedSharding(make_mesh(2, 4), P(("data", "expert"))))
rows, local = distributed.local_rows(placed)
sums = distributed.gather_rows(rows, local.sum(1), 16)
print(json.dumps({"rows": [rows.start, rows.stop], "local": local.tolist(), "sums": sums.tolist()}))
"""


def test_local_rows_and_gather_rows_across_two_processes(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  address = f"127.0.0.1:{_free_port()}"
  cmds = [[sys.executable, "-c", _ROWS_CHILD, address, str(i)] for i in range(2)]
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(tmp_path / f"log{i}.txt", "w+")) for i in range(2)]
    _launch(cmds, logs, env)
  x = np.arange(16 * 3).reshape(16, 3)
  for i in range(2):
    out = json.loads((tmp_path / f"log{i}.txt").read_text().strip().splitlines()[-1])
    assert out["rows"] == [8 * i, 8 * i + 8]  # process i's devices hold the i-th half
    np.testing.assert_array_equal(out["local"], x[8 * i:8 * i + 8])
    np.testing.assert_array_equal(out["sums"], x.sum(1))


def test_local_rows_of_one_process_are_the_whole_batch_in_any_layout():
  mesh = make_mesh(2, 4)
  x = np.arange(16 * 2 * 3).reshape(16, 2, 3)
  for spec in (P(("data", "expert")), P("data", None, None), P()):
    rows, local = distributed.local_rows(distributed.to_global(x, NamedSharding(mesh, spec)))
    assert rows == slice(0, 16)
    np.testing.assert_array_equal(local, x)
  np.testing.assert_array_equal(distributed.gather_rows(slice(0, 16), x[:, 0, 0], 16), x[:, 0, 0])
  with pytest.raises(ValueError, match="rows cover 8 of 16"):
    distributed.gather_rows(slice(0, 8), x[:8, 0, 0], 16)


@pytest.mark.slow
def test_two_processes_match_one_and_resume(tmp_path):
  """2 processes x 4 CPU devices (gloo) give the metrics of 1 process x 8, then resume together.

  The two processes also split their weights over 'data' (model.fsdp), an axis that spans
  both of them, so the collective checkpoint holds arrays no process has whole; the
  single-process reference keeps them replicated."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  pair = lambda steps: [
      [sys.executable, *_RUN, f"--config.rl.num_steps={steps}", f"--workdir={tmp_path / 'two'}",
       "--cpu_devices=4", "--config.model.fsdp=True",
       f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2",
       f"--process_id={i}"] for i in range(2)]
  cmds = [[sys.executable, *_RUN, f"--workdir={tmp_path / 'one'}", "--cpu_devices=8"]]
  cmds += pair(2)
  cmds[2][-3] = cmds[1][-3]  # both ranks need the same coordinator port
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(tmp_path / f"log{i}.txt", "w+")) for i in range(3)]
    _launch(cmds, logs, env)
  one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
  assert [r["phase"] for r in two] == [r["phase"] for r in one]
  assert [r["phase"] for r in one].count("rl") == 2
  assert all(r["grad_norm"] > 0 and r["loss"] != 0 for r in one if r["phase"] == "rl")
  for a, b in zip(one, two):
    _close(a, b)
  assert "pred_loss" in two[-1]  # PR2's predictor and feature cache ran across processes
  # Only process 0 logs: rank 1's output has no progress lines and no summary.
  rank0, rank1 = (tmp_path / "log1.txt").read_text(), (tmp_path / "log2.txt").read_text()
  assert "rl step 2/2" in rank0 and "== summary ==" in rank0
  assert "rl step" not in rank1 and "== summary ==" not in rank1
  # Both ranks wrote the checkpoint collectively; both restore it and carry on to step 3.
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / "rl")) == ["0", "2"]
  specs = _saved_specs(tmp_path / "two" / "checkpoints" / "rl" / "2")
  assert specs["params.embed_tokens"] == [None, "data"]  # [V, D]: D split over the processes
  assert specs["params.layers_0.mlp.gate_proj"] == ["expert", "data", None]  # [E, D, F]
  # Without evaluation (not part of the checkpoint's identity): the resumed ranks then compile
  # no evaluation sampler, which PR2's rollout sampler (it takes the predictor) cannot stand in for.
  resume = [cmd + ["--config.rl.eval_every=0"] for cmd in pair(3)]
  resume[1][-4] = resume[0][-4]
  with contextlib.ExitStack() as stack:
    logs = [stack.enter_context(open(tmp_path / f"resume{i}.txt", "w+")) for i in range(2)]
    _launch(resume, logs, env)
  resumed = _rows(tmp_path / "two")
  assert resumed[:len(two)] == two  # nothing before the checkpoint was rewritten
  assert [r.get("step") for r in resumed if r["phase"] == "rl"] == [1, 2, 3]
  # Rank 0 resumed (no second warm-up) and its summary reads the warm-up's reward back.
  resumed_log = (tmp_path / "resume0.txt").read_text()
  assert "resuming from the RL checkpoint of step 2" in resumed_log
  assert "warm-up:" not in resumed_log
  warm = next(r["eval_reward"] for r in two if r["phase"] == "sft_eval")
  assert f"eval reward before RL:     {warm:.3f}" in resumed_log


def test_local_rows_refuse_rows_split_across_processes(monkeypatch):
  """A process holding half of every row (axis 1 split across processes) would score partial
  rows; one process cannot lay that out, so the block is faked."""
  placed = distributed.to_global(np.zeros((4, 6)), NamedSharding(make_mesh(2, 4), P()))
  monkeypatch.setattr(distributed, "local_block",
                      lambda sharding, shape: (slice(0, 4), slice(0, 3)))
  with pytest.raises(ValueError, match=r"needs whole rows, but axis 1 of a \(4, 6\) array"):
    distributed.local_rows(placed)


def test_local_rows_names_a_host_array_passed_by_mistake():
  with pytest.raises(TypeError, match="local_rows takes a jax.Array .* got ndarray"):
    distributed.local_rows(np.zeros(3))


# A loop's psum beside an all-gather over 8 fake devices, called 1,000 times without waiting:
# each device may run its share of the loop and the gather at once, and queued calls wait for
# threads too. With XLA:CPU's default pool (8 threads here, one per device) it aborted 3 runs
# of 3 after 40 s in a stuck rendezvous; with use_cpu_devices' pool, 2 of 2 passed in ~1 s.
# It is the regression test for the aborts an 8-device eplb_step run once hit when it loaded
# its learner from the compile cache (docs/scaling.md): the pool is what ended them, and an
# end-to-end rerun at XLA's default flags (65 CPU-s a suite) only reached this same pool.
_QUEUED_CHILD = """
import os, sys
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from pr2_jax.parallel import distributed
distributed.use_cpu_devices(8)
mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
def body(x, y):
  def step(c):
    k, acc = c
    return k + 1, acc + jax.lax.psum(y * k, ("a", "b"))
  loop = jax.lax.while_loop(lambda c: c[0] < 3, step, (0, jnp.zeros_like(y)))[1]
  return jax.lax.all_gather(x, ("a", "b"), tiled=True).sum() + loop.sum()
fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("a", "b"),) * 2, out_specs=P(),
                           check_vma=False))
x = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P("a", "b")))
outs = [fn(x, x) for _ in range(1000)]
print(os.environ.get("PJRT_NPROC"), float(outs[-1]))
"""


def test_fake_devices_have_threads_for_queued_collective_calls():
  env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
  proc = subprocess.run([sys.executable, "-c", _QUEUED_CHILD], env=env, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-1500:]
  threads, total = proc.stdout.split()
  # 8 devices on this machine's cores: 4 threads a device, unless the cores outnumber them.
  assert threads == ("32" if (os.cpu_count() or 1) < 8 else "None")
  # the gathered 16 x 16 ones (256) + 32 local elements of psum(k) over 8 devices, k = 0, 1, 2
  assert float(total) == 256 + 32 * 8 * (0 + 1 + 2)


@pytest.mark.parametrize("count", [0, -2, 1.5, True, "8"])
def test_use_cpu_devices_rejects_a_count_that_is_not_a_positive_int(count):
  with pytest.raises(ValueError, match=f"count={count!r}"):
    distributed.use_cpu_devices(count)


def test_one_process_is_not_a_cluster_to_join(monkeypatch):
  """num_processes=1 is a single process (as the config's own error message says): enabled
  is False and initialize() does not call jax.distributed.initialize, which, with no
  coordinator, would fail to start a one-process 'cluster'."""
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  for cfg in (distributed.DistributedConfig(num_processes=1), distributed.DistributedConfig()):
    assert not cfg.enabled
    distributed.initialize(cfg)
  assert calls == []
  assert distributed.DistributedConfig(auto_detect=True).enabled


def test_use_cpu_devices_sizes_the_thread_pool_only_past_the_cores(monkeypatch):
  """8 devices on 2 cores: PJRT_NPROC = 4 x 8 = 32; a PJRT_NPROC the environment sets is kept;
  no more devices than cores (2 on 2): XLA's own pool, PJRT_NPROC left unset."""
  updates = []
  monkeypatch.setattr(distributed.jax.config, "update", lambda *args: updates.append(args))
  monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
  monkeypatch.delenv("PJRT_NPROC", raising=False)
  distributed.use_cpu_devices(8)
  assert updates == [("jax_platforms", "cpu"), ("jax_num_cpu_devices", 8)]
  assert distributed.os.environ["PJRT_NPROC"] == "32"
  monkeypatch.setenv("PJRT_NPROC", "5")
  distributed.use_cpu_devices(8)
  assert distributed.os.environ["PJRT_NPROC"] == "5"
  monkeypatch.delenv("PJRT_NPROC")
  distributed.use_cpu_devices(2)
  assert "PJRT_NPROC" not in distributed.os.environ
