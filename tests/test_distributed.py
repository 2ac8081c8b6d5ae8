"""Multi-host glue: config validation, host <-> global moves, and a real 2-process run vs 1 process."""

import json
import os
import signal
import socket
import subprocess
import sys

import jax
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
])
def test_config_rejects_bad_settings(kwargs, match):
  with pytest.raises(ValueError, match=match):
    distributed.DistributedConfig(**kwargs)


def test_single_process_is_not_distributed():
  assert not distributed.DistributedConfig().enabled
  assert distributed.DistributedConfig(num_processes=2, coordinator_address="h:1").enabled
  distributed.initialize(distributed.DistributedConfig())  # a no-op, must not raise
  assert distributed.is_main_process()


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


_RUN = ["-m", "experiments.main", "--config=configs/tiny.py", "--config.sft.num_steps=4",
        "--config.sft.batch_size=16", "--config.rl.num_steps=2", "--config.rl.prompts_per_step=8",
        "--config.rl.group_size=4", "--config.rl.eval_every=2", "--config.rl.eval_size=16",
        "--config.mesh_expert=4"]


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _close(a, b, path=""):
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), path
    for k in a:
      if k != "elapsed_s":
        _close(a[k], b[k], f"{path}.{k}")
  elif isinstance(a, list):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=path)
  elif isinstance(a, float):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=path)
  else:
    assert a == b, path


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  """2 processes x 4 CPU devices (gloo) give the metrics of 1 process x 8 devices."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  port = _free_port()
  cmds = [[sys.executable, *_RUN, f"--workdir={tmp_path / 'one'}", "--cpu_devices=8"]]
  cmds += [[sys.executable, *_RUN, f"--workdir={tmp_path / 'two'}", "--cpu_devices=4",
            f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
           for i in range(2)]
  logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(3)]
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
    for log in logs:
      log.close()
  one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
  assert [r["phase"] for r in two] == [r["phase"] for r in one]
  assert [r["phase"] for r in one].count("rl") == 2
  for a, b in zip(one, two):
    _close(a, b)
  # Both processes wrote the checkpoint collectively; only process 0 wrote metrics and the log.
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints" / "rl")) == ["0", "2"]
  log1 = open(tmp_path / "log2.txt").read()
  assert "rl step" not in log1 and "== summary ==" not in log1
