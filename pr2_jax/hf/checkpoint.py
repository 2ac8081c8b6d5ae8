"""Load and save Hugging Face Qwen3-MoE checkpoints (config.json + safetensors).

Dimension legend:
  E experts, D d_model, F expert hidden width; `layout.py` has the full
  tensor-name map between the hub layout and our parameter tree.

Memory: parameters are loaded one at a time, each straight into its sharding,
so no device holds more than its own shards. A sharded parameter is built by
`jax.make_array_from_callback`, which reads one block per local device and
keeps them until it copies them over: expert tensors are read per expert
shard (only that shard's experts leave the disk); other tensors are read
whole, then cut (with fsdp, once per local device). A fully replicated
parameter is read whole once and `jax.device_put`. So the host holds one
parameter's local blocks plus at most one whole tensor, not the model (the
test of peak host memory checks this). Each read opens its own
safetensors handle and closes it at once: an open handle keeps the pages it
has touched resident (they are memory-mapped), so one handle kept over the
whole load would count the checkpoint twice in host memory.
Only safetensors and JSON are read or written: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections import defaultdict
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from pr2_jax.config import ModelConfig
from pr2_jax.hf import layout
from pr2_jax.hf.config_map import (config_from_hf, config_to_hf, read_hf_config,
                                   read_json)
from pr2_jax.models.transformer import MoETransformer
from pr2_jax.parallel.mesh import DATA, EXPERT, tree_shardings

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
DEFAULT_SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size
DTYPE_NAMES = {np.dtype(jnp.float32): "float32", np.dtype(jnp.bfloat16): "bfloat16",
               np.dtype(jnp.float16): "float16"}


@contextlib.contextmanager
def _open(file: str):
  """`safe_open` whose errors name the file (a truncated one said only "incomplete metadata")."""
  try:
    handle = safe_open(file, "numpy")
  except Exception as e:  # safetensors raises its own SafetensorError, or OSError
    raise ValueError(f"cannot read {file}: {type(e).__name__}: {e}") from e
  with handle as f:
    yield f


def tensor_files(path: str) -> dict[str, str]:
  """Checkpoint tensor name -> the safetensors file holding it (single file or index)."""
  single, index = os.path.join(path, SINGLE_FILE), os.path.join(path, INDEX_FILE)
  if os.path.isfile(single):
    with _open(single) as f:
      return {key: single for key in f.keys()}
  if os.path.isfile(index):
    contents = read_json(index)
    weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index} has no 'weight_map' object")
    return {key: os.path.join(path, name) for key, name in weight_map.items()}
  raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in checkpoint directory {path!r} "
                   "(only safetensors checkpoints are supported)")


def _by_file(files: Mapping[str, str], keys: Sequence[str]) -> dict[str, list[str]]:
  groups = defaultdict(list)
  for key in keys:
    groups[files[key]].append(key)
  return groups


def tensor_shapes(files: Mapping[str, str]) -> dict[str, tuple[int, ...]]:
  """Shapes from the safetensors headers only (no tensor data is read)."""
  shapes = {}
  for file, keys in _by_file(files, list(files)).items():
    if not os.path.isfile(file):
      raise ValueError(f"the index names shard {file!r}, which does not exist")
    with _open(file) as f:
      present = set(f.keys())
      for key in keys:
        if key not in present:
          raise ValueError(f"the index maps tensor {key} to {file!r}, which does not hold it")
        shapes[key] = tuple(f.get_slice(key).get_shape())
  return shapes


def read_tensors(files: Mapping[str, str], keys: Sequence[str], index=()) -> list[np.ndarray]:
  """Reads `tensor[index]` for each key, one short-lived handle per file (see module doc)."""
  out = {}
  for file, group in _by_file(files, keys).items():
    with _open(file) as f:
      for key in group:
        out[key] = f.get_slice(key)[index] if index else f.get_tensor(key)
  return [out[key] for key in keys]


def _fmt(names: Sequence[str], limit: int = 6) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_tensors(sources: Mapping[layout.Path, layout.Source], shapes: Mapping[str, tuple],
                  config: ModelConfig) -> None:
  """Raises ValueError naming missing, unexpected or misshapen checkpoint tensors."""
  expected = {key: src.hf_shape for src in sources.values() for key in src.keys}
  # A tied checkpoint may still store the duplicate head: it is the embedding.
  allowed = {"lm_head.weight"} if config.tie_embeddings else set()
  missing = set(expected) - set(shapes)
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensors that its config.json "
                     f"implies: {_fmt(missing)}")
  unexpected = set(shapes) - set(expected) - allowed
  if unexpected:
    raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensors: {_fmt(unexpected)}")
  bad = [f"{key} has shape {list(shapes[key])}, expected {list(shape)}"
         for key, shape in expected.items() if tuple(shapes[key]) != tuple(shape)]
  if bad:
    raise ValueError(f"checkpoint tensor shape mismatch with config.json: {'; '.join(bad[:6])}")


def abstract_params(config: ModelConfig):
  """Boxed abstract parameters of `MoETransformer(config)` (shapes and logical axes, no memory)."""
  model = MoETransformer(config)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def param_shardings(boxed, mesh: Mesh | None, fsdp: bool = False):
  """Flat {path: sharding}: from the logical axes with a mesh, else the default device."""
  if mesh is None:
    device = SingleDeviceSharding(jax.devices()[0])
    return {p: device for p in traverse_util.flatten_dict(nn.unbox(boxed))}
  return traverse_util.flatten_dict(tree_shardings(mesh, boxed, fsdp))


def read_block(files: Mapping[str, str], src: layout.Source, shape: tuple[int, ...],
               index: tuple[slice, ...], dtype) -> np.ndarray:
  """The `index` block of our parameter (full `shape`) read from the checkpoint.

  Expert parameters read only the experts in `index[0]`, so an expert shard
  costs its own size; other parameters are read whole, then cut.
  """
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  if src.kind in ("experts", "fused"):
    experts = range(shape[0])[index[0]]
    if src.kind == "experts":
      tensors = read_tensors(files, src.keys[index[0]])
    else:
      rows = slice(*src.rows) if src.rows else slice(None)
      expert_slice = slice(experts.start, experts.stop, experts.step)
      tensors = read_tensors(files, src.keys, (expert_slice, rows))
    block = layout.to_ours(src, tensors, (len(experts),) + shape[1:])[(slice(None),) + index[1:]]
  else:
    block = layout.to_ours(src, read_tensors(files, src.keys), shape)[index]
  block = np.ascontiguousarray(block, dtype=dtype)
  if not np.isfinite(block).all():  # else the run trains on NaN losses, skipping every update
    raise ValueError(f"checkpoint tensor(s) {_fmt(src.keys)} hold non-finite values")
  return block


def load_hf_checkpoint(path: str, *, mesh: Mesh | None = None, dtype=None,
                       fsdp: bool = False) -> tuple[ModelConfig, dict[str, Any]]:
  """Loads a Hugging Face Qwen3-MoE checkpoint directory.

  Reads `config.json` and `model.safetensors` or a sharded
  `model.safetensors.index.json`, in the hub layout (per-expert tensors) or
  transformers' fused expert layout.

  Args:
    path: checkpoint directory.
    mesh: optional ('data', 'expert') mesh; each parameter is created directly
      in the sharding its logical axes give (experts split over 'expert'),
      shard by shard, so no device ever holds the whole model.
    dtype: dtype of the returned parameters; default float32, as `model.init`
      makes them. `jnp.bfloat16` halves memory (the model casts per op).
    fsdp: read into `ModelConfig.fsdp`'s shardings (d_model also split over
      'data'); the returned config has `fsdp` set to match.

  Returns:
    (config, params): the `ModelConfig` and the plain-array parameter tree of
    `MoETransformer(config)`, ready for `model.apply({'params': params}, ...)`.

  Raises:
    ValueError: naming the field or tensor, for an unsupported config, a
      missing, unexpected, misshapen or non-finite tensor, an unsupported
      `dtype`, or experts not divisible by the mesh's 'expert' axis.
  """
  dtype = np.dtype(jnp.float32 if dtype is None else dtype)
  if dtype not in DTYPE_NAMES:  # a cast to an integer type would silently zero the weights
    raise ValueError(f"dtype={dtype} is not supported; use one of {list(DTYPE_NAMES.values())}")
  config = config_from_hf(read_hf_config(path)).replace(fsdp=fsdp)
  if mesh is not None and EXPERT in mesh.shape:
    config.validate_mesh(mesh.shape[EXPERT], mesh.shape.get(DATA, 1))
  files = tensor_files(path)
  shapes = tensor_shapes(files)
  fused = [i for i in config.moe_layers if layout.fused_gate_up_key(i) in shapes]
  sources = layout.hf_sources(config, fused)
  check_tensors(sources, shapes, config)
  boxed = abstract_params(config)
  abstract = traverse_util.flatten_dict(nn.unbox(boxed))
  if set(abstract) != set(sources):  # the model and layout.py drifted apart: our bug
    raise RuntimeError("layout.hf_sources disagrees with the model on "
                       f"{set(abstract) ^ set(sources)}")
  shardings = param_shardings(boxed, mesh, config.fsdp)

  def place(p: layout.Path) -> jax.Array:
    shape, src, sharding = tuple(abstract[p].shape), sources[p], shardings[p]
    if sharding.is_fully_replicated:  # read once, not once per device
      return jax.device_put(read_block(files, src, shape, (), dtype), sharding)
    return jax.make_array_from_callback(
        shape, sharding, lambda index: read_block(files, src, shape, index, dtype))

  params = {p: place(p) for p in abstract}
  return config, traverse_util.unflatten_dict(params)


def check_params(config: ModelConfig, flat: Mapping[layout.Path, Any]) -> None:
  """Raises ValueError naming parameter paths that are missing, extra or misshapen."""
  want = traverse_util.flatten_dict(nn.unbox(abstract_params(config)))
  missing, extra = set(want) - set(flat), set(flat) - set(want)
  if missing or extra:
    missing_s, extra_s = (_fmt(["/".join(p) for p in paths]) for paths in (missing, extra))
    raise ValueError(f"params do not match the config: missing [{missing_s}], "
                     f"unexpected [{extra_s}]")
  for p, leaf in want.items():
    if tuple(flat[p].shape) != tuple(leaf.shape):
      raise ValueError(f"param {'/'.join(p)} has shape {list(flat[p].shape)}, expected "
                       f"{list(leaf.shape)} for config {config}")


def plan_shards(sources: Mapping[layout.Path, layout.Source], itemsize: int,
                max_shard_bytes: int) -> list[list[str]]:
  """Greedy split of the tensor names, in write order, into files under `max_shard_bytes`."""
  shards, size = [[]], 0
  for src in sources.values():
    nbytes = int(np.prod(src.hf_shape)) * itemsize
    for key in src.keys:
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append([])
        size = 0
      shards[-1].append(key)
      size += nbytes
  return shards


def _check_output_dir(path: str) -> None:
  """`path` is a directory or can be made one: os.makedirs raised a bare FileExistsError on a
  file (NotADirectoryError under one), after the params had been checked and gathered."""
  existing = os.path.abspath(path)
  while not os.path.exists(existing):  # the nearest ancestor that exists (at worst, the root)
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "" if existing == os.path.abspath(path) else f" is under {existing!r}, which"
    raise ValueError(f"save_hf_checkpoint: output path {os.fspath(path)!r}{where} is a file, "
                     "expected a directory")


def _remove_old_checkpoint(path: str) -> None:
  # A stale single file or shard would shadow or mix with the new checkpoint.
  for name in os.listdir(path):
    if name in (SINGLE_FILE, INDEX_FILE) or SHARD_FILE.fullmatch(name):
      os.remove(os.path.join(path, name))


def save_hf_checkpoint(config: ModelConfig, params, path: str, *, dtype=None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       extra_config: Mapping[str, Any] | None = None) -> None:
  """Writes `params` as a Hugging Face Qwen3-MoE checkpoint that transformers loads.

  Writes `config.json` and the hub layout (per-expert tensors): one
  `model.safetensors`, or `model-0000i-of-0000n.safetensors` shards plus
  `model.safetensors.index.json` past `max_shard_bytes`. Parameters are
  gathered to host one at a time, so host memory holds one parameter plus
  one shard file's tensors.

  Single process only: every parameter must be fully addressable from this
  process (multi-host: gather the params to one process first); every process
  would otherwise write the same files.

  Args:
    config: the model's config.
    params: its parameter tree (plain or boxed arrays, sharded or not, on this
      process's devices).
    path: output directory (created; an old checkpoint in it is replaced).
    dtype: stored dtype; default the embedding's dtype.
    max_shard_bytes: largest safetensors file before splitting.
    extra_config: extra `config.json` fields, e.g. `read_hf_config(source_dir)`
      to keep bos/eos ids and max_position_embeddings.

  Raises ValueError, before anything is written, on parameters that do not fit `config`,
  hold a NaN or inf (`load_hf_checkpoint` would refuse the checkpoint) or span other
  processes' devices, and on a `path` that is (or is under) a file.
  """
  _check_output_dir(path)
  flat = traverse_util.flatten_dict(nn.unbox(params))
  check_params(config, flat)
  # device_get cannot fetch other processes' shards (it raises deep inside jax).
  remote = [".".join(k) for k, x in flat.items() if not getattr(x, "is_fully_addressable", True)]
  if remote:
    raise ValueError(f"params {_fmt(remote)} span devices of other processes: "
                     "save_hf_checkpoint is single process (gather the params to one "
                     "process first)")
  # On the devices, one leaf at a time; before the old checkpoint in `path` is removed.
  bad = [".".join(k) for k, x in flat.items() if not bool(jnp.all(jnp.isfinite(x)))]
  if bad:
    raise ValueError(f"params {_fmt(bad)} hold non-finite values: not written (a diverged "
                     "run's state? load_hf_checkpoint refuses such a checkpoint)")
  sources = layout.hf_sources(config)
  dtype = np.dtype(flat[("embed_tokens",)].dtype if dtype is None else dtype)
  if dtype not in DTYPE_NAMES:
    raise ValueError(f"dtype={dtype} is not supported; use one of {list(DTYPE_NAMES.values())}")
  os.makedirs(path, exist_ok=True)
  _remove_old_checkpoint(path)
  shards = plan_shards(sources, dtype.itemsize, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  shard_of = {key: i for i, keys in enumerate(shards) for key in keys}
  current, tensors, total = 0, {}, 0
  for p, src in sources.items():
    host = np.asarray(jax.device_get(flat[p])).astype(dtype, copy=False)
    host = host.reshape(layout.ours_shape(src))
    for key, tensor in layout.to_hf(src, host):
      if shard_of[key] != current:
        save_file(tensors, os.path.join(path, names[current]), metadata={"format": "pt"})
        current, tensors = shard_of[key], {}
      tensors[key] = tensor
      total += tensor.nbytes
  save_file(tensors, os.path.join(path, names[current]), metadata={"format": "pt"})
  if len(shards) > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: names[i] for k, i in shard_of.items()}}
    with open(os.path.join(path, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config, DTYPE_NAMES[dtype], extra_config), f, indent=2)
