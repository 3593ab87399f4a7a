"""mode=export: the trained adapters of a workdir as PEFT, a merged model, or Orbax.

  python -m semsafe_jax.main --config=configs/default.py --workdir=W \\
      --config.mode=export --config.export.format=peft     # -> W/export/peft
  ... --config.export.format=merged                        # -> W/export/merged
  ... --config.export.format=orbax                         # -> W/export/orbax

The adapters come from the latest checkpoint in W (or `export.step`); the base
model and adapter settings come from the config the run was trained with
(W/config.json), falling back to the given config. Each export folder carries
`semsafe_export.json` (format, step, source run), the mark that lets a later export
replace it; see export/staging.py for what is never written over. A run trained with
`gate.use=True` also leaves `gate.json` there (probes/gate.py says how to apply it).
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable
from typing import Any

import jax
from absl import logging

from semsafe_jax import files
from semsafe_jax.errors import ConfigError, MissingInputError
from semsafe_jax.export import hf, merged, native, peft, staging
from semsafe_jax.models import loading, registry
from semsafe_jax.probes import gate as gate_lib
from semsafe_jax.retention import aligned as aligned_lib
from semsafe_jax.train.checkpoint import available_steps, load_adapters

FORMATS = ("peft", "merged", "orbax")


def _section(saved: dict[str, Any], config: Any, name: str) -> dict[str, Any]:
  """A config section as trained (W/config.json), else as given."""
  if saved.get(name):
    return dict(saved[name])
  section = config.get(name) if hasattr(config, "get") else None
  return section.to_dict() if hasattr(section, "to_dict") else dict(section or {})


def _adapters_of(trainable: Any) -> dict[str, Any]:
  adapters = {k: trainable[k] for k in ("lora", "embed_mlp", "full")
              if isinstance(trainable, dict) and trainable.get(k) is not None}
  if not adapters:
    raise MissingInputError("The checkpoint holds no adapters (expected 'lora' and/or "
                            "'embed_mlp').")
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


def _with_gate(workdir: str, write: Callable[[str], None]) -> Callable[[str], None]:
  """write, then a copy of the run's probe gate (W/gate.json, when the run has one): a
  merged model cannot hold it, and a PEFT adapter has no field for it."""
  src = os.path.join(workdir, gate_lib.GATE_FILE)

  def both(path: str) -> None:
    write(path)
    if files.exists(src):
      files.write_text(os.path.join(path, gate_lib.GATE_FILE), files.read_text(src))
      logging.info("The export carries the probe gate: %s.", gate_lib.GATE_FILE)

  return both


def run(config: Any, workdir: str) -> str:
  """Exports the workdir's adapters in `config.export.format`; returns the output dir.

  The export is written beside its place and renamed into it; an existing out_dir is
  replaced only when an earlier export wrote it (its `semsafe_export.json`), and the
  workdir itself is never a target (export/staging.py).
  """
  ex = config.export
  fmt = ex.format
  if fmt not in FORMATS:
    raise ConfigError("export.format", fmt, f"expected one of {', '.join(FORMATS)}")
  save_base = {"auto": None, "yes": True, "no": False}.get(str(ex.save_base).lower(), "bad")
  if save_base == "bad":
    raise ConfigError("export.save_base", ex.save_base, "expected auto, yes or no")
  # Refuse a bad target before restoring anything or loading a model.
  out_dir = staging.check_out_dir(ex.out_dir or os.path.join(workdir, "export", fmt),
                                  workdir=workdir)
  step = None if ex.step is None or int(ex.step) < 0 else int(ex.step)
  got = load_adapters(workdir, step=step, fallback=False,
                      hint="Export another with --config.export.step=N.")
  if got is None:
    steps = available_steps(workdir)
    if steps:
      raise MissingInputError(f"No checkpoint at step {step} in "
                              f"{os.path.join(workdir, 'checkpoints')}; its steps: "
                              f"{', '.join(map(str, steps))} (--config.export.step=N, -1 = "
                              "the latest).")
    raise MissingInputError(
        f"No adapters to export: {workdir} has no checkpoint (looked in "
        f"{os.path.join(workdir, 'checkpoints')}). Train first: python -m semsafe_jax.main "
        f"--config=... --workdir={workdir} --config.mode=train")
  adapters = _adapters_of(got.trainable)
  saved = got.config
  model_section = _section(saved, config, "model")
  adapter_section = _section(saved, config, "adapters")
  name = str(model_section["name_or_path"])
  lora_alpha = float(adapter_section.get("lora_alpha", 16.0))
  # A retention run's adapters sit on its aligned model (semsafe_jax/retention).
  final = aligned_lib.final_adapters(workdir, adapters, adapter_section)
  if final is not None:
    adapters, lora_alpha = final
  if jax.process_index() != 0:  # one writer; every process restored the same adapters
    return out_dir
  run_dir = workdir if files.is_remote(workdir) else os.path.abspath(workdir)
  marker = {"format": fmt, "step": got.step, "source_run": run_dir,
            "base_model": name}

  if fmt == "orbax":
    staging.write_export(out_dir, marker, _with_gate(workdir, lambda path: native.write_orbax(
        path, adapters, adapter_config={"base_model_name_or_path": name,
                                        "adapters": adapter_section})), workdir=workdir)
    print(f"Wrote the adapters (Orbax, step {got.step}) to {out_dir}\n  restore: "
          f"semsafe_jax.export.load_orbax({out_dir!r})", flush=True)
    return out_dir

  pre = loading.load_pretrained(name)  # float32: export precision is export.dtype
  base_params, base_cfg = pre.params, pre.cfg
  if final is not None:  # ... and the aligned model is the base written
    base_params, base_cfg = aligned_lib.model_of(workdir, pre.params, pre.cfg)
    save_base = True
  dtype = ex.dtype
  shard_bytes = float(ex.max_shard_gb) * 1e9
  if fmt == "merged":
    staging.write_export(out_dir, marker, _with_gate(workdir, lambda path: merged.write_merged(
        path, base_params, base_cfg, adapters, lora_alpha=lora_alpha, tokenizer=pre.tokenizer,
        config_dict=source_config_dict(name), dtype=dtype, max_shard_bytes=shard_bytes)),
                         workdir=workdir)
    print(f"Wrote the merged model (step {got.step}) to {out_dir}\n  load: "
          f"transformers.AutoModelForCausalLM.from_pretrained({out_dir!r})", flush=True)
    return out_dir

  if adapters.get("full") is not None:
    raise ConfigError("export.format", fmt, "merged or orbax: this run trained every weight "
                      "(full fine-tuning), which a PEFT adapter cannot hold")
  if save_base is None:
    save_base = not transformers_loadable(name)
  base_ref = ex.base_model_name_or_path
  if save_base:
    base_ref = base_ref or os.path.join(out_dir, "base")  # where it is after the rename
  elif not base_ref:
    base_ref = os.path.abspath(name) if os.path.isdir(name) else name

  def write(path: str) -> None:
    if save_base:
      hf.write_hf_model(os.path.join(path, "base"), base_params, base_cfg,
                        config_dict=source_config_dict(name), tokenizer=pre.tokenizer,
                        dtype=dtype, max_shard_bytes=shard_bytes)
    peft.write_peft(path, base_params, base_cfg, adapters, lora_alpha=lora_alpha,
                    base_model_name_or_path=base_ref, dtype=dtype)

  staging.write_export(out_dir, {**marker, "base_model_name_or_path": base_ref},
                       _with_gate(workdir, write), workdir=workdir)
  print(f"Wrote the PEFT adapter (step {got.step}) to {out_dir} (base model: {base_ref})\n"
        f"  load: peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM"
        f".from_pretrained({base_ref!r}), {out_dir!r})", flush=True)
  return out_dir
