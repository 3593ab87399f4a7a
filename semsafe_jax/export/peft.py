"""Adapters as a PEFT LoRA directory: `adapter_config.json` + `adapter_model.safetensors`.

`peft.PeftModel.from_pretrained(base_model, out_dir)` reproduces the adapted
model. LoRA factors map one to one (`lora_A.weight = a[i].T` [r, in],
`lora_B.weight = b[i].T` [out, r], `lora_alpha / r` scaling). The embedding MLP
has no PEFT layer type, but it acts per token, so it is folded into a new
input table shipped through `modules_to_save=["embed_tokens"]`. PEFT wraps the
embedding in a ModulesToSaveWrapper holding a copy, and the LM head keeps
pointing at the original (tied) weight, so tied models stay exact as long as
`ensure_weight_tying` stays False (PEFT warns about the tied layer; that
untying is the intent here). PEFT needs at least one LoRA target, so an
embedding MLP without LoRA ships with an exactly-zero rank-1 LoRA on q_proj.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors.numpy

from semsafe_jax.adapters import lora_modules
from semsafe_jax.export import hf, merged, staging
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]
Adapters = dict[str, Any]

_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def peft_config_dict(lora: Params, *, lora_alpha: float, base_model_name_or_path: str,
                     embed_tokens: bool) -> dict[str, Any]:
  """adapter_config.json for a LoRA on the modules in `lora` (and a saved input table)."""
  targets = sorted({m.rsplit("/", 1)[-1] for m in lora_modules(lora)})
  r = merged.lora_rank(lora)
  alpha = float(lora_alpha)
  return {
      "peft_type": "LORA",
      "task_type": "CAUSAL_LM",
      "base_model_name_or_path": base_model_name_or_path,
      "r": r,
      "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
      "lora_dropout": 0.0,
      "bias": "none",
      "fan_in_fan_out": False,
      "use_rslora": False,
      "use_dora": False,
      "init_lora_weights": True,
      "inference_mode": True,
      "target_modules": targets,
      "modules_to_save": ["embed_tokens"] if embed_tokens else None,
      # Keep the LM head on the original table when the input table changes.
      "ensure_weight_tying": False,
  }


def peft_tensors(cfg: ModelConfig, lora: Params) -> dict[str, np.ndarray]:
  """PEFT state-dict entries (float32) of our LoRA factors."""
  out = {}
  for module, ab in sorted(lora_modules(lora).items()):
    a_LxIxR = np.asarray(ab["a"], np.float32)
    b_LxRxO = np.asarray(ab["b"], np.float32)
    name = hf.hf_module_name(cfg, module)
    for i in range(a_LxIxR.shape[0]):
      out[_PREFIX + name.format(i=i) + ".lora_A.weight"] = np.ascontiguousarray(a_LxIxR[i].T)
      out[_PREFIX + name.format(i=i) + ".lora_B.weight"] = np.ascontiguousarray(b_LxRxO[i].T)
  return out


def save_peft(out_dir: str, base_params: Params, cfg: ModelConfig, adapters: Adapters, *,
              lora_alpha: float, base_model_name_or_path: str = "",
              dtype: str = "float32") -> str:
  """Writes a PEFT LoRA directory for `adapters` on the base model `base_params`.

  Args:
    out_dir: written afresh and renamed into place; an existing folder is replaced
      only if an earlier export wrote it (see `staging.write_export`).
    base_params: the frozen base params (needed to fold the embedding MLP).
    cfg: their ModelConfig.
    adapters: {"lora": ..., "embed_mlp": ...} (either may be absent).
    lora_alpha: LoRA alpha (scaling alpha / r, as in training).
    base_model_name_or_path: recorded for `AutoPeftModelForCausalLM`.
    dtype: on-disk dtype of the folded input table (LoRA factors stay float32).
  Returns:
    out_dir (absolute).
  """
  return staging.write_export(
      out_dir, {"format": "peft", "base_model_name_or_path": base_model_name_or_path},
      lambda path: write_peft(path, base_params, cfg, adapters, lora_alpha=lora_alpha,
                              base_model_name_or_path=base_model_name_or_path, dtype=dtype))


def write_peft(out_dir: str, base_params: Params, cfg: ModelConfig, adapters: Adapters, *,
               lora_alpha: float, base_model_name_or_path: str = "",
               dtype: str = "float32") -> str:
  """`save_peft`'s files, written straight into `out_dir` (created if missing)."""
  os.makedirs(out_dir, exist_ok=True)
  lora = adapters.get("lora") or None
  embed_mlp = adapters.get("embed_mlp")
  if lora is None and embed_mlp is None:
    raise ValueError("Nothing to export: the adapters hold neither LoRA nor an embedding MLP.")
  if lora is None:
    # PEFT refuses a LoRA config with no target: an exactly-zero rank-1 LoRA on
    # q_proj gives it one, and the input table rides along in modules_to_save.
    L, d_in, d_out = np.shape(base_params["layers"]["attn"]["q_proj"]["kernel"])
    lora = {"layers": {"attn": {"q_proj": {"a": np.zeros((L, d_in, 1), np.float32),
                                           "b": np.zeros((L, 1, d_out), np.float32)}}}}
  tensors = peft_tensors(cfg, lora)
  if embed_mlp is not None:
    # PEFT saves a modules_to_save copy under the wrapped module's own name.
    name = _PREFIX + hf.hf_module_name(cfg, "embed") + ".weight"
    tensors[name] = merged.fold_embed_mlp(base_params, cfg, embed_mlp).astype(hf.np_dtype(dtype))
  config = peft_config_dict(lora, lora_alpha=lora_alpha,
                            base_model_name_or_path=base_model_name_or_path,
                            embed_tokens=embed_mlp is not None)
  with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  safetensors.numpy.save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"),
                              metadata={"format": "pt"})
  return out_dir
