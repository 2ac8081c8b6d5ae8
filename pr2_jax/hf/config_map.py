"""Hugging Face Qwen3-MoE `config.json` <-> `ModelConfig`.

Dimension legend (HF name -> ours):
  hidden_size D -> d_model, num_attention_heads H -> num_heads,
  num_key_value_heads G -> num_kv_heads, head_dim Z, moe_intermediate_size F
  -> expert_d_ff, intermediate_size -> dense_d_ff, num_experts E,
  num_experts_per_tok K -> top_k, num_hidden_layers L -> num_layers.

Only fields that change what the network computes are mapped. Anything that
would make our forward differ from `transformers` (rope scaling, attention
biases, sliding windows, another activation) is rejected with a ValueError
naming the field, because silently ignoring it would give wrong logits.
Training knobs (`config.RUNTIME_FIELDS`: `dtype`, `expert_impl`, `fsdp`, ...)
are ours, not the checkpoint's: they keep `ModelConfig` defaults. Shape fields
must be positive ints (ValueError naming the field otherwise).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from pr2_jax.config import ModelConfig

MODEL_TYPE = "qwen3_moe"
ARCHITECTURE = "Qwen3MoeForCausalLM"
# Shape fields with no sensible default: a config without them is not a model.
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "moe_intermediate_size", "num_experts_per_tok")
# transformers' Qwen3MoeConfig defaults for fields a config.json may omit.
# norm_topk_prob defaults to False there (ours is True), and num_key_value_heads to 4 whatever
# num_attention_heads is (Llama's config falls back to the latter), so absence matters.
HF_DEFAULTS = {"num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 10_000.0,
               "norm_topk_prob": False, "tie_word_embeddings": False, "decoder_sparse_step": 1,
               "hidden_act": "silu", "attention_bias": False, "use_sliding_window": False,
               "intermediate_size": 6144}  # the dense layers' MLP width
HF_SLIDING_WINDOW = 4096  # its window when use_sliding_window is set and sliding_window omitted


def read_json(file: str, fields: str | None = None) -> Any:
  """The JSON in `file`; a ValueError naming the file if it does not parse (json's own message
  names a line, not the file), or, with `fields` (what they are, for the message), if it is
  not an object of fields. Every JSON file we parse ourselves (config.json, the safetensors
  index, the special-token files) is read through this; tokenizer.json is parsed by
  `tokenizers`, and `HFTokenizer.from_dir` turns its errors into the same ValueError."""
  with open(file) as f:
    try:
      contents = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{file} is not valid JSON: {e}") from None
  if fields is not None and not isinstance(contents, dict):  # else an AttributeError on .get
    raise ValueError(f"{file} holds a JSON {type(contents).__name__}, not an object of {fields}")
  return contents


def read_hf_config(path: str) -> dict[str, Any]:
  """Reads `config.json` from a checkpoint directory as a plain dict."""
  file = os.path.join(path, "config.json")
  if not os.path.isdir(path):  # a mistyped path read as a checkpoint missing one file
    raise ValueError(f"checkpoint directory {path!r} does not exist" if not os.path.exists(path)
                     else f"checkpoint path {path!r} is a file, expected a directory")
  if not os.path.isfile(file):
    raise ValueError(f"no config.json in checkpoint directory {path!r}")
  return read_json(file, "config fields")


def _real(key: str, value: Any) -> float:
  """A float config field, or a ValueError naming it (not float()'s bare message)."""
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise ValueError(f"config.json field {key}={value!r} must be a number")
  try:
    return float(value)
  except ValueError:
    raise ValueError(f"config.json field {key}={value!r} must be a number") from None


def _int(key: str, value: Any) -> int:
  """An int config field, or a ValueError naming it: a float would be truncated silently
  (`intermediate_size=48.7` read as 48), a string or 0 crash in arithmetic before
  `ModelConfig` could name the field."""
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"config.json field {key}={value!r} must be a positive int")
  return value


def _get(hf: Mapping[str, Any], key: str) -> Any:
  return hf[key] if hf.get(key) is not None else HF_DEFAULTS[key]


def _rope_theta(hf: Mapping[str, Any]) -> float:
  """Plain RoPE base from either the v4 (`rope_theta`, `rope_scaling`) or v5
  (`rope_parameters`) form."""
  scaling = hf.get("rope_scaling")
  if scaling:
    raise ValueError(f"config.json field rope_scaling={scaling!r} is not supported "
                     "(plain RoPE only)")
  params = hf.get("rope_parameters") or {}
  rope_type = params.get("rope_type", params.get("type", "default"))
  extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
  if rope_type != "default" or extra:
    raise ValueError(f"config.json field rope_parameters={params!r} is not supported "
                     "(only rope_type='default' with rope_theta)")
  return _real("rope_theta", params.get("rope_theta", _get(hf, "rope_theta")))


def _check_supported(hf: Mapping[str, Any]) -> None:
  model_type = hf.get("model_type")
  if model_type != MODEL_TYPE:
    raise ValueError(f"config.json field model_type={model_type!r} is not supported; "
                     f"expected {MODEL_TYPE!r}")
  missing = [k for k in REQUIRED if hf.get(k) is None]
  if missing:
    raise ValueError(f"config.json is missing required fields {missing}")
  if _get(hf, "hidden_act") != "silu":
    raise ValueError(f"config.json field hidden_act={hf['hidden_act']!r} is not supported "
                     "(silu only)")
  if _get(hf, "attention_bias"):
    raise ValueError("config.json field attention_bias=true is not supported (no attention biases)")
  # transformers only applies sliding_window when use_sliding_window is set, and then an omitted
  # sliding_window means its default window (4096): only an explicit null keeps full attention.
  window = hf.get("sliding_window", HF_SLIDING_WINDOW)
  if _get(hf, "use_sliding_window") and window is not None:
    raise ValueError(f"config.json field use_sliding_window=true (sliding_window={window}"
                     f"{'' if 'sliding_window' in hf else ', transformers default'}) is not "
                     "supported (full causal attention only)")


def dense_layer_ids(num_layers: int, mlp_only_layers, decoder_sparse_step: int) -> tuple[int, ...]:
  """Layers with a dense MLP, by transformers' rule: listed, or not on the sparse step."""
  if not isinstance(decoder_sparse_step, int) or decoder_sparse_step < 1:
    raise ValueError(f"config.json field decoder_sparse_step={decoder_sparse_step!r} must be a "
                     "positive int")
  listed = set(mlp_only_layers or ())
  return tuple(i for i in range(num_layers)
               if i in listed or (i + 1) % decoder_sparse_step != 0)


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
  """Maps a Qwen3-MoE `config.json` dict to a validated `ModelConfig`.

  Raises:
    ValueError: naming the field, for another model_type, a missing shape
      field, or an option that changes the computation and that we do not
      implement (rope scaling, attention bias, sliding window, non-SiLU).
  """
  _check_supported(hf)
  # transformers v5 writes num_local_experts (attribute_map); v4 wrote num_experts.
  num_experts = (hf["num_experts"] if hf.get("num_experts") is not None
                 else hf.get("num_local_experts"))  # a null num_experts beside a real count
  if not isinstance(num_experts, int) or num_experts < 1:
    raise ValueError(f"config.json field num_experts={num_experts!r} must be a positive int "
                     "(fully dense Qwen3 models are not supported)")
  ints = {k: _int(k, hf[k]) for k in REQUIRED}
  num_layers, heads = ints["num_hidden_layers"], ints["num_attention_heads"]
  mlp_only = hf.get("mlp_only_layers") or ()
  if (isinstance(mlp_only, (str, bytes)) or not hasattr(mlp_only, "__iter__")
      or any(isinstance(i, bool) or not isinstance(i, int) for i in mlp_only)):
    # A string id ("0") would match no layer: the dense layer would silently become MoE.
    raise ValueError(f"config.json field mlp_only_layers={mlp_only!r} must be a list of int "
                     "layer ids")
  dense = dense_layer_ids(num_layers, mlp_only, _get(hf, "decoder_sparse_step"))
  # null means "unset" (transformers then derives it); 0 is a value, and a bad one
  optional = lambda key, default: _int(key, hf[key]) if hf.get(key) is not None else default
  fields = dict(
      vocab_size=ints["vocab_size"], num_layers=num_layers, d_model=ints["hidden_size"],
      num_heads=heads,
      num_kv_heads=_int("num_key_value_heads", _get(hf, "num_key_value_heads")),
      head_dim=optional("head_dim", ints["hidden_size"] // heads),
      expert_d_ff=ints["moe_intermediate_size"], num_experts=num_experts,
      top_k=ints["num_experts_per_tok"], norm_topk_prob=bool(_get(hf, "norm_topk_prob")),
      rope_theta=_rope_theta(hf), rms_norm_eps=_real("rms_norm_eps", _get(hf, "rms_norm_eps")),
      tie_embeddings=bool(_get(hf, "tie_word_embeddings")), dense_layers=dense,
      dense_d_ff=optional("intermediate_size", HF_DEFAULTS["intermediate_size"]) if dense else 0)
  try:
    return ModelConfig(**fields)
  except ValueError as e:
    raise ValueError(f"config.json describes an invalid model: {e}") from e


def config_to_hf(config: ModelConfig, torch_dtype: str = "float32",
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The `config.json` dict transformers needs to rebuild `config`.

  Args:
    config: the model.
    torch_dtype: name of the stored tensors' dtype ('float32' or 'bfloat16').
    extra: fields to carry over (e.g. bos/eos ids, max_position_embeddings
      from the source checkpoint's `read_hf_config`); ours win on conflicts.
  """
  out = dict(extra or {})
  for stale in ("rope_scaling", "num_local_experts", "dtype"):
    out.pop(stale, None)
  out.update(
      architectures=[ARCHITECTURE], model_type=MODEL_TYPE, vocab_size=config.vocab_size,
      hidden_size=config.d_model, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, moe_intermediate_size=config.expert_d_ff,
      num_experts=config.num_experts, num_experts_per_tok=config.top_k,
      norm_topk_prob=config.norm_topk_prob, rms_norm_eps=config.rms_norm_eps,
      tie_word_embeddings=config.tie_embeddings, decoder_sparse_step=1,
      mlp_only_layers=list(config.dense_layers), hidden_act="silu", attention_bias=False,
      use_sliding_window=False, sliding_window=None,
      # Both spellings: v5 reads rope_parameters, v4 and vLLM read rope_theta.
      rope_theta=config.rope_theta,
      rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
      torch_dtype=torch_dtype, dtype=torch_dtype)
  if config.dense_d_ff:
    out["intermediate_size"] = config.dense_d_ff
  return out
