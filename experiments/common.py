"""Shell helpers shared by entry points: devices, mesh, configs, metrics file."""

import json
import os

from absl import flags

_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 0, "If > 0, run on this many fake CPU devices (tries expert parallelism "
    "without accelerators). Must be set before JAX starts.")


def setup_devices():
  import jax
  if _CPU_DEVICES.value > 0:
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)


def build_mesh(cfg):
  import jax
  from pr2_jax.parallel.mesh import make_mesh
  n = jax.device_count()
  expert = int(cfg.mesh_expert)
  if expert < 1 or n % expert:
    raise flags.ValidationError(f"--config.mesh_expert={expert} must divide the {n} devices")
  data = int(cfg.mesh_data) or n // expert
  return make_mesh(data, expert)


def model_config(cfg):
  from pr2_jax.config import ModelConfig
  mc = ModelConfig.from_dict(cfg.model.to_dict())
  mc.validate_mesh(int(cfg.mesh_expert))
  return mc


class MetricsWriter:
  """Appends one JSON object per line to WORKDIR/metrics.jsonl."""

  def __init__(self, workdir: str):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")

  def write(self, metrics: dict):
    with open(self.path, "a") as f:
      f.write(json.dumps(metrics, sort_keys=True) + "\n")
