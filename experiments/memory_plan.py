r"""Per-device memory of the train state for a config over several mesh shapes (no allocation).

    python -m experiments.memory_plan --config=configs/qwen3_30b_a3b.py --cpu_devices=64 \
        --mesh_expert=8,16,32,64

The shapes come from `jax.eval_shape`, the layout from the same logical-axis
rules the run uses, so the table is what each device would hold: parameters,
AdamW state and gradients (activations and the rollout KV cache come on top).
The last column is the total with `model.fsdp=True` (weights also split over
'data'). Fake CPU devices stand in for the accelerators. The last line is JSON.
"""

import json

from absl import flags

from experiments import cli, common

_CONFIG = cli.define_config("configs/qwen3_30b_a3b.py", "Experiment config.")
_EXPERT = flags.DEFINE_list("mesh_expert", ["8"], "Expert-axis sizes to tabulate; the data axis "
                            "takes the remaining devices.")
cli.non_empty("mesh_expert")
flags.register_validator("mesh_expert", lambda v: all(e.isdigit() and int(e) >= 1 for e in v),
                         message="--mesh_expert must list positive integers")

# The table's unit: the largest that keeps its biggest entry >= 1 (a tiny config printed 0.00 GiB
# in every cell).
UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
COUNTS = (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))


def pick(value: float, units: tuple) -> tuple[str, float]:
  """(name, size) of the largest unit in `units` that `value` is at least one of."""
  return next(((name, size) for name, size in units if value >= size), units[-1])


def main(argv):
  del argv
  common.setup_devices()
  import jax
  from pr2_jax.config import ModelConfig
  from pr2_jax.models.transformer import MoETransformer
  from pr2_jax.parallel.mesh import make_mesh
  from pr2_jax.train.state import make_optimizer, state_memory

  with cli.bad_config_exits():
    config = ModelConfig.from_dict(cli.config_value(_CONFIG).model.to_dict())
  n = jax.device_count()
  experts = [int(e) for e in _EXPERT.value]
  for expert in experts:  # every entry, before the table's first row
    if n % expert:
      raise flags.ValidationError(f"--mesh_expert={expert} does not divide the {n} devices "
                                  "(--cpu_devices=N fakes N)")
    try:
      config.validate_mesh(expert)
    except ValueError as e:
      raise flags.ValidationError(f"--mesh_expert={expert}: {e}") from None
  rows = []
  for expert in experts:
    mesh = make_mesh(n // expert, expert)
    mem = state_memory(MoETransformer(config, mesh), make_optimizer(1e-6), mesh)
    fsdp = MoETransformer(config.replace(fsdp=True), mesh)
    try:
      mem["fsdp_total"] = state_memory(fsdp, make_optimizer(1e-6), mesh)["total"]
    except ValueError:  # validate_mesh: the data axis does not divide d_model
      mem["fsdp_total"] = None
    rows.append({"data": n // expert, "expert": expert, **mem})
  unit, size = pick(max(r["total"] for r in rows), UNITS)
  print(f"{'mesh (data x expert)':>22} {f'params {unit}':>11} {f'AdamW {unit}':>10} "
        f"{f'grads {unit}':>10} {f'total {unit}':>10} {'fsdp total':>11}")
  for r in rows:
    fsdp_total = "n/a" if r["fsdp_total"] is None else f"{r['fsdp_total'] / size:.2f}"
    mesh_name = f"{r['data']} x {r['expert']}"
    print(f"{mesh_name:>22} {r['params'] / size:11.2f} "
          f"{r['opt_state'] / size:10.2f} {r['grads'] / size:10.2f} {r['total'] / size:10.2f} "
          f"{fsdp_total:>11}")
  suffix, count = pick(rows[0]["param_count"], COUNTS)
  print(f"parameters: {rows[0]['param_count'] / count:.2f}{suffix}")
  print(json.dumps({"devices": n, "rows": rows}))


if __name__ == "__main__":
  cli.run(main)
