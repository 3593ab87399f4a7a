"""Our params and ModelConfig in transformers' layout: tensor names, config.json, safetensors.

The inverse of the import mapping: our stacked [L, in, out] kernels become
per-layer torch `Linear.weight` tensors [out, in] under transformers' module
names, and a ModelConfig becomes a `config.json` dict that `from_hf_dict` maps
back to the same ModelConfig.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import safetensors.numpy

from semsafe_jax.adapters.lora import flat_paths
from semsafe_jax.export import staging
from semsafe_jax.models import families
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]

_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": "bfloat16"}


def hf_names(cfg: ModelConfig) -> dict[str, tuple[str, str]]:
  """Our param path -> (transformers tensor name, "{i}" = layer; transform).

  The inverse of the import table in `models/families.py`, so names are
  defined once for loading and export.
  """
  if cfg.family not in families.HF_TABLES:
    raise ValueError(f"No transformers names for family {cfg.family!r}.")
  out: dict[str, tuple[str, str]] = {}
  for name, path, transform in families.HF_TABLES[cfg.family]:
    out.setdefault(path, (name, transform))
  return out


def hf_module_name(cfg: ModelConfig, module_path: str) -> str:
  """transformers module name of one of our modules, e.g. layers/attn/q_proj ->
  model.layers.{i}.self_attn.q_proj."""
  names = hf_names(cfg)
  for leaf in ("kernel", "embedding", "scale"):
    if f"{module_path}/{leaf}" in names:
      return names[f"{module_path}/{leaf}"][0].rsplit(".", 1)[0]
  raise KeyError(f"No transformers name for parameter module {module_path!r}.")


def np_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"Unsupported export dtype {name!r}; choose one of {sorted(_DTYPES)}.")
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return ml_dtypes.bfloat16
  return _DTYPES[name]


# A lazily materialised tensor: name, shape, and a thunk giving the array.
Tensor = tuple[str, tuple[int, ...], Callable[[], np.ndarray]]


def hf_tensors(params: Params, cfg: ModelConfig) -> Iterator[Tensor]:
  """Every parameter as transformers tensors, lazily (one layer slice at a time)."""
  names = hf_names(cfg)
  for path, value in sorted(flat_paths(params).items()):
    if path not in names:
      raise KeyError(f"No transformers name for parameter {path!r} ({cfg.family}).")
    name, transform = names[path]
    shape = tuple(value.shape)
    transpose = transform == families.LINEAR  # our [in, out] -> torch Linear [out, in]
    if transpose:
      shape = shape[:-2] + shape[:-3:-1]
    if path.startswith("layers/"):
      for i in range(shape[0]):
        yield (name.format(i=i), shape[1:],
               lambda v=value, i=i, t=transpose: _to_np(v[i], t))
    else:
      yield name, shape, lambda v=value, t=transpose: _to_np(v, t)


def _to_np(x, transpose: bool) -> np.ndarray:
  x = np.asarray(x)
  return np.ascontiguousarray(x.T if transpose else x)


def write_safetensors(out_dir: str, tensors: list[Tensor], *, dtype: str = "float32",
                      max_shard_bytes: float = 5e9, basename: str = "model") -> list[str]:
  """Writes `basename.safetensors`, or shards plus `basename.safetensors.index.json`,
  into `out_dir` (a fresh folder: see `staging.write_export`).

  Shards are planned from shapes first, then each shard is materialised and
  written on its own, so peak host memory is about one shard.
  """
  dt = np_dtype(dtype)
  itemsize = np.dtype(dt).itemsize
  shards: list[list[Tensor]] = [[]]
  size = 0
  for t in tensors:
    nbytes = math.prod(t[1]) * itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  n = len(shards)
  files = ([f"{basename}.safetensors"] if n == 1 else
           [f"{basename}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
  weight_map, total = {}, 0
  for fname, shard in zip(files, shards):
    arrays = {name: fn().astype(dt) for name, _, fn in shard}
    for name, a in arrays.items():
      weight_map[name] = fname
      total += a.nbytes
    safetensors.numpy.save_file(arrays, os.path.join(out_dir, fname), metadata={"format": "pt"})
    del arrays
  if n > 1:
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, f"{basename}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  return files


# ----------------------------------------------------------------------------
# ModelConfig -> config.json. Written with both the transformers v4 keys
# (rope_theta, rope_scaling, rope_local_base_freq) and the v5 rope_parameters,
# so either major version reads it.


def hf_config_dict(cfg: ModelConfig, *, dtype: str = "float32") -> dict[str, Any]:
  """The transformers config.json dict of `cfg` (inverse of `from_hf_dict`).

  Only what ModelConfig carries; `save_hf_model` adds token ids and the source
  checkpoint's other fields (context length, ...).
  """
  L = cfg.num_layers
  d: dict[str, Any] = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=L,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_eps,
      tie_word_embeddings=cfg.tie_word_embeddings, torch_dtype=dtype, dtype=dtype)
  scaling = cfg.rope_scaling_dict
  glob = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
  if cfg.family == "gemma3":
    local = {"rope_type": "default", "rope_theta": cfg.rope_local_theta or 10000.0}
    types = ["sliding_attention" if s else "full_attention" for s in cfg.sliding_layers]
    d.update(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_intlike(cfg.attn_scale**-2),
        sliding_window=cfg.sliding_window, layer_types=types,
        attention_bias=cfg.qkv_bias, final_logit_softcapping=cfg.final_logit_softcap,
        attn_logit_softcapping=None, rope_theta=cfg.rope_theta, rope_scaling=scaling,
        rope_local_base_freq=local["rope_theta"],
        rope_parameters={"full_attention": glob, "sliding_attention": local})
  else:
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    if cfg.family not in arch:
      raise ValueError(f"No transformers config for family {cfg.family!r}.")
    d.update(model_type=cfg.family, architectures=[arch[cfg.family]], hidden_act=cfg.act,
             rope_theta=cfg.rope_theta, rope_scaling=scaling, rope_parameters=glob)
    if cfg.family in ("llama", "mistral", "qwen3"):
      d["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
      d["mlp_bias"] = cfg.mlp_bias
    if cfg.family == "mistral":
      d["sliding_window"] = cfg.sliding_window
    if cfg.family == "qwen2":
      sliding = cfg.sliding_window is not None
      first = next((i for i, s in enumerate(cfg.sliding_layers) if s), L)
      d.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
               max_window_layers=first,
               layer_types=["sliding_attention" if s else "full_attention"
                            for s in cfg.sliding_layers])
    if cfg.family == "qwen3":
      d.update(use_sliding_window=False, sliding_window=None)
  return d


def _intlike(x: float) -> float | int:
  return int(round(x)) if abs(x - round(x)) < 1e-6 else x


def tokenizer_config_extra(tokenizer) -> dict[str, Any]:
  """Special-token ids for config.json, taken from the tokenizer."""
  if tokenizer is None:
    return {}
  out = {}
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    value = getattr(tokenizer, key, None)
    if value is not None:
      out[key] = int(value)
  return out


# Source config fields that would misdescribe the exported float weights.
_DROPPED_SOURCE_KEYS = ("quantization_config", "auto_map", "_name_or_path", "transformers_version")


def save_hf_model(out_dir: str, params: Params, cfg: ModelConfig, *,
                  config_dict: dict[str, Any] | None = None, tokenizer=None,
                  dtype: str = "float32", max_shard_bytes: float = 5e9) -> str:
  """Writes params as a transformers checkpoint directory.

  Args:
    out_dir: written afresh and renamed into place; an existing folder is replaced
      only if an earlier export wrote it (see `staging.write_export`).
    params: our params dict; `lm_head/kernel` must be present iff the config is untied.
    cfg: the ModelConfig the params belong to.
    config_dict: the checkpoint's original config.json dict when known; the
      fields our ModelConfig covers are overwritten from `cfg`. Default: built
      from `cfg` alone (e.g. for GGUF or random models).
    tokenizer: a transformers tokenizer saved next to the weights (optional).
    dtype: float32 | bfloat16 | float16 on disk.
    max_shard_bytes: shard size above which `model.safetensors` is split.
  Returns:
    out_dir (absolute).
  """
  return staging.write_export(
      out_dir, {"format": "hf"},
      lambda path: write_hf_model(path, params, cfg, config_dict=config_dict,
                                  tokenizer=tokenizer, dtype=dtype,
                                  max_shard_bytes=max_shard_bytes))


def write_hf_model(out_dir: str, params: Params, cfg: ModelConfig, *,
                   config_dict: dict[str, Any] | None = None, tokenizer=None,
                   dtype: str = "float32", max_shard_bytes: float = 5e9) -> str:
  """`save_hf_model`'s files, written straight into `out_dir` (created if missing)."""
  os.makedirs(out_dir, exist_ok=True)
  if ("lm_head" in params) == cfg.tie_word_embeddings:
    raise ValueError("params must hold lm_head/kernel exactly when the config is untied.")
  config = hf_config_dict(cfg, dtype=dtype)
  source = {}
  if config_dict and config_dict.get("model_type") == config["model_type"]:
    source = {k: v for k, v in config_dict.items() if k not in _DROPPED_SOURCE_KEYS}
  config = {**tokenizer_config_extra(tokenizer), **source, **config}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  write_safetensors(out_dir, list(hf_tensors(params, cfg)), dtype=dtype,
                    max_shard_bytes=max_shard_bytes)
  if tokenizer is not None:
    tokenizer.save_pretrained(out_dir)
  return out_dir
