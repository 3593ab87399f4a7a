"""mode=export: the trained adapters of a workdir as PEFT, a merged model, or Orbax.

  python -m semsafe_jax.main --config=configs/default.py --workdir=W \\
      --config.mode=export --config.export.format=peft     # -> W/export/peft
  ... --config.export.format=merged                        # -> W/export/merged
  ... --config.export.format=orbax                         # -> W/export/orbax

The adapters come from the latest checkpoint in W (or `export.step`); the base
model and adapter settings come from the config the run was trained with
(W/config.json), falling back to the given config.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import jax
from absl import logging

from semsafe_jax import export
from semsafe_jax.models import loading, registry
from semsafe_jax.train.checkpoint import load_latest_adapters

FORMATS = ("peft", "merged", "orbax")
# Files that mark a directory as an earlier export (safe to write over).
_EXPORT_MARKERS = ("adapter_config.json", "config.json", "_CHECKPOINT_METADATA")


def _section(saved: dict[str, Any], config: Any, name: str) -> dict[str, Any]:
  """A config section as trained (W/config.json), else as given."""
  if saved.get(name):
    return dict(saved[name])
  section = config.get(name) if hasattr(config, "get") else None
  return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def _adapters_of(trainable: Any) -> dict[str, Any]:
  adapters = {k: trainable[k] for k in ("lora", "embed_mlp")
              if isinstance(trainable, dict) and trainable.get(k) is not None}
  if not adapters:
    raise ValueError("The checkpoint holds no adapters (expected 'lora' and/or 'embed_mlp').")
  return adapters


def transformers_loadable(name_or_path: str) -> bool:
  """True for an HF checkpoint directory or a hub id, which transformers loads by name."""
  path = pathlib.Path(name_or_path).expanduser()
  if path.is_dir():
    return (path / "config.json").is_file()
  if path.exists() or registry.canonical_alias(name_or_path) or registry.parse_tiny(name_or_path):
    return False
  parts = name_or_path.split("/")
  return len(parts) == 2 and all(parts) and not name_or_path.endswith(".gguf")


def source_config_dict(name_or_path: str) -> dict[str, Any] | None:
  """The base checkpoint's own config.json (GGUF metadata as one), if it has one.

  Merged exports keep its extra fields (token ids, context length).
  """
  try:
    alias = registry.canonical_alias(name_or_path)
    path = (registry.embedded_gguf_path(alias)[0] if alias
            else pathlib.Path(name_or_path).expanduser())
    if path.is_dir() and (path / "config.json").is_file():
      return json.loads((path / "config.json").read_text())
    ggufs = [path] if path.is_file() else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1 and ggufs[0].suffix == ".gguf":
      import gguf  # pylint: disable=g-import-not-at-top
      return loading.gguf_hf_config(gguf.GGUFReader(str(ggufs[0])))
    if transformers_loadable(name_or_path) and not path.exists():  # hub id: the local cache
      import huggingface_hub  # pylint: disable=g-import-not-at-top
      cached = huggingface_hub.try_to_load_from_cache(name_or_path, "config.json")
      if isinstance(cached, str):
        return json.loads(pathlib.Path(cached).read_text())
  except Exception as e:  # pylint: disable=broad-except
    logging.warning("Could not read the base model's config (%s); deriving it from the "
                    "model config alone.", e)
  return None


def _prepare_out_dir(out_dir: str) -> None:
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not any(os.path.exists(os.path.join(out_dir, m)) for m in _EXPORT_MARKERS):
      raise FileExistsError(f"{out_dir} exists and does not look like an earlier export; "
                            "choose another --config.export.out_dir or remove it.")
  os.makedirs(out_dir, exist_ok=True)


def run(config: Any, workdir: str) -> str:
  """Exports the workdir's adapters in `config.export.format`; returns the output dir."""
  ex = config.export
  fmt = ex.format
  if fmt not in FORMATS:
    raise ValueError(f"Unknown export.format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  step = None if ex.step is None or int(ex.step) < 0 else int(ex.step)
  got = load_latest_adapters(workdir, step=step)
  if got is None:
    which = "checkpoint" if step is None else f"checkpoint at step {step}"
    raise FileNotFoundError(
        f"No adapters to export: {workdir} has no {which} (looked in "
        f"{os.path.join(workdir, 'checkpoints')}). Train first: python -m semsafe_jax.main "
        f"--config=... --workdir={workdir} --config.mode=train")
  trainable, saved = got
  adapters = _adapters_of(trainable)
  model_section = _section(saved, config, "model")
  adapter_section = _section(saved, config, "adapters")
  name = str(model_section["name_or_path"])
  lora_alpha = float(adapter_section.get("lora_alpha", 16.0))
  out_dir = ex.out_dir or os.path.join(workdir, "export", fmt)
  if jax.process_index() != 0:  # one writer; every process restored the same adapters
    return out_dir
  _prepare_out_dir(out_dir)

  if fmt == "orbax":
    export.save_orbax(out_dir, adapters, adapter_config={
        "base_model_name_or_path": name, "adapters": adapter_section})
    print(f"Wrote the adapters (Orbax) to {out_dir}\n  restore: "
          f"semsafe_jax.export.load_orbax({out_dir!r})", flush=True)
    return out_dir

  pre = loading.load_pretrained(name)  # float32: export precision is export.dtype
  dtype = ex.dtype
  if fmt == "merged":
    export.save_merged(out_dir, pre.params, pre.cfg, adapters, lora_alpha=lora_alpha,
                       tokenizer=pre.tokenizer, config_dict=source_config_dict(name),
                       dtype=dtype, max_shard_bytes=float(ex.max_shard_gb) * 1e9)
    print(f"Wrote the merged model to {out_dir}\n  load: transformers.AutoModelForCausalLM"
          f".from_pretrained({out_dir!r})", flush=True)
    return out_dir

  save_base = {"auto": not transformers_loadable(name), "yes": True, "no": False}.get(
      str(ex.save_base).lower())
  if save_base is None:
    raise ValueError(f"export.save_base must be auto, yes or no; got {ex.save_base!r}.")
  base_ref = ex.base_model_name_or_path
  if save_base:
    base_dir = os.path.abspath(os.path.join(out_dir, "base"))
    export.save_hf_model(base_dir, pre.params, pre.cfg, config_dict=source_config_dict(name),
                         tokenizer=pre.tokenizer, dtype=dtype,
                         max_shard_bytes=float(ex.max_shard_gb) * 1e9)
    base_ref = base_ref or base_dir
  elif not base_ref:
    base_ref = os.path.abspath(name) if os.path.isdir(name) else name
  export.save_peft(out_dir, pre.params, pre.cfg, adapters, lora_alpha=lora_alpha,
                   base_model_name_or_path=base_ref, dtype=dtype)
  print(f"Wrote the PEFT adapter to {out_dir} (base model: {base_ref})\n  load: "
        f"peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained("
        f"{base_ref!r}), {out_dir!r})", flush=True)
  return out_dir
