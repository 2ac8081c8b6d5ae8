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

GIB = 2**30


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
  print(f"{'mesh (data x expert)':>22} {'params GiB':>11} {'AdamW GiB':>10} {'grads GiB':>10} "
        f"{'total GiB':>10} {'fsdp total':>11}")
  for expert in experts:
    mesh = make_mesh(n // expert, expert)
    mem = state_memory(MoETransformer(config, mesh), make_optimizer(1e-6), mesh)
    fsdp = MoETransformer(config.replace(fsdp=True), mesh)
    try:
      mem["fsdp_total"] = state_memory(fsdp, make_optimizer(1e-6), mesh)["total"]
    except ValueError:  # validate_mesh: the data axis does not divide d_model
      mem["fsdp_total"] = None
    rows.append({"data": n // expert, "expert": expert, **mem})
    fsdp_gib = "n/a" if mem["fsdp_total"] is None else f"{mem['fsdp_total'] / GIB:.2f}"
    print(f"{f'{n // expert} x {expert}':>22} {mem['params'] / GIB:11.2f} "
          f"{mem['opt_state'] / GIB:10.2f} {mem['grads'] / GIB:10.2f} {mem['total'] / GIB:10.2f} "
          f"{fsdp_gib:>11}")
  print(f"parameters: {rows[0]['param_count'] / 1e9:.2f}B")
  print(json.dumps({"devices": n, "rows": rows}))


if __name__ == "__main__":
  cli.run(main)
