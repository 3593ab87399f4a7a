"""The aligned model: a safety-training run's latest checkpoint merged into the frozen base.

LoRA merges into the kernels and the embedding MLP folds into the input table
(export/merged.py: a tied model becomes untied, the LM head keeping the original table),
so the aligned model is a plain params dict that every stage (generation, probes, the
methods' losses) runs as it runs the base model. Full fine-tuning runs are taken as
their trained weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from absl import logging

from semsafe_jax import files
from semsafe_jax.adapters import lora_modules, lora_scale
from semsafe_jax.adapters.lora import get_path
from semsafe_jax.data.schema import DataError
# The splits an evaluation reads, and the splits a safety run trains on: they must not meet.
from semsafe_jax.data.splits import EVAL_SPLITS, TRAINABLE_SPLITS
from semsafe_jax.errors import ConfigError, MissingInputError
from semsafe_jax.export import merged as merged_lib
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.retention import section
from semsafe_jax.train import checkpoint as ckpt_lib

Params = dict[str, Any]
RECORD_FILE = "aligned.json"  # in a retention run's W: the aligned model it started from


@dataclasses.dataclass(frozen=True)
class Aligned:
  workdir: str  # absolute
  step: int
  adapters: Params  # the safety run's trained adapters (numpy): lora, embed_mlp, full
  adapter_cfg: dict[str, Any]  # its config.adapters (the LoRA scale it trained with)
  method: str
  params: Params  # base + adapters, a plain model
  cfg: ModelConfig  # untied when the input table was folded
  base_params: Params = dataclasses.field(repr=False, default=None)  # the model it started from

  @property
  def identity(self) -> str:
    """What the aligned model's outputs depend on beyond the base model: caches key on it."""
    return f"{self.workdir}@{self.step}"

  def describe(self) -> dict[str, Any]:
    return {"workdir": self.workdir, "step": self.step, "method": self.method,
            "adapters": sorted(self.adapters)}

  def lora_factors(self, module: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(x [L, in, r], y [L, r, out]) with W_aligned - W_base = x @ y for one kernel stack
    (module 'layers/attn/q_proj'), when the safety run adapted it with LoRA alone."""
    if self.adapters.get("full") is not None:
      return None
    node = lora_modules(self.adapters.get("lora") or {}).get(module)
    if not node:
      return None
    return (lora_scale(self.adapter_cfg) * np.asarray(node["a"], np.float32),
            np.asarray(node["b"], np.float32))

  def kernel_delta(self, module: str) -> np.ndarray:
    """W_aligned - W_base [L, in, out] of one kernel stack, dense."""
    get = lambda tree: np.asarray(get_path(tree, f"{module}/kernel"), np.float32)
    return get(self.params) - get(self.base_params)


def workdir_of(config: Any) -> str:
  """config.retention.aligned_workdir, absolute."""
  raw = str(section(config).aligned_workdir or "")
  if not raw.strip():
    raise ConfigError("retention.aligned_workdir", raw, "give the workdir of a "
                      "safety-training run (e.g. runs/demo)")
  return raw if files.is_remote(raw) else os.path.abspath(os.path.expanduser(raw))


def load(workdir: str, model_name: str, base_params: Params, base_cfg: ModelConfig, *,
         step: int | None = None, field: str = "retention.aligned_workdir") -> Aligned:
  """The aligned model of a safety run's checkpoint (its latest, or `step`)."""
  got = ckpt_lib.load_adapters(workdir, step=step)
  if got is None:
    raise MissingInputError(f"config.{field}={workdir!r} has no checkpoint"
                            f"{'' if step is None else f' at step {step}'}; train the safety "
                            "model there first (python -m semsafe_jax.main "
                            f"--config=configs/default.py --workdir={workdir})")
  saved = got.config or {}
  if section(saved) is not None:
    raise ConfigError(field, workdir, "that workdir holds a retention run; give a "
                      "safety-training run's workdir")
  model = str((saved.get("model") or {}).get("name_or_path", ""))
  if model and model != model_name:
    raise ConfigError(field, workdir, f"it was trained on {model!r}, not on "
                      f"model.name_or_path={model_name!r}")
  adapters = {k: got.trainable[k] for k in ("lora", "embed_mlp", "full")
              if isinstance(got.trainable, dict) and got.trainable.get(k) is not None}
  adapter_cfg = dict(saved.get("adapters") or {})
  params, cfg = merged_lib.merged_params(base_params, base_cfg, adapters,
                                         lora_alpha=float(adapter_cfg.get("lora_alpha", 16.0)))
  method = str((saved.get("method") or {}).get("name", ""))
  logging.info("Aligned model: %s step %d (%s; %s) merged into %s.", workdir, got.step,
               method or "?", ", ".join(sorted(adapters)), model_name)
  return Aligned(workdir, int(got.step), adapters, adapter_cfg, method, params, cfg,
                 base_params)


def check_splits(aligned: Aligned, data: Any) -> None:
  """No prompt this run evaluates on may have been a training prompt of the safety run
  (the same data settings give the same splits; other settings might not)."""
  path = os.path.join(aligned.workdir, "splits.json")
  if not files.exists(path):
    logging.warning("%s is missing: cannot check that the evaluation prompts are held out "
                    "from the safety training.", path)
    return
  with files.as_path(path).open("r") as f:
    theirs = json.load(f)
  trained = {i for s in TRAINABLE_SPLITS for i in theirs.get(s, [])}
  ours = [data.prompts[int(r)].id for s in EVAL_SPLITS for r in data.splits.get(s, [])]
  leaked = [i for i in ours if i in trained]
  if leaked:
    raise DataError(f"{len(leaked)} evaluation prompt(s) of this run (e.g. {leaked[0]!r}) were "
                    f"training prompts of the safety run in {aligned.workdir}: use its data "
                    "settings (config.data) so that the splits match")


def read_record(workdir: str) -> dict[str, Any] | None:
  """W/aligned.json of a retention run: which aligned model (workdir, step) it trained on."""
  path = os.path.join(workdir, RECORD_FILE)
  return files.read_json(path) if files.exists(path) else None


def load_for_run(config: Any, workdir: str, base_params: Params, base_cfg: ModelConfig,
                 data: Any = None, primary: bool = True) -> Aligned | None:
  """The main job's entry: None outside the retention scenario. A resumed run keeps the
  step it started from (W/aligned.json), even if the safety run has trained on since."""
  if section(config) is None:
    return None
  record = read_record(workdir)
  source = workdir_of(config)
  keep = record and record.get("workdir") == source and not config.get("overwrite", False)
  step = int(record["step"]) if keep else None
  aligned = load(source, str(config.model.name_or_path), base_params, base_cfg, step=step)
  if data is not None:
    check_splits(aligned, data)
  if primary and step is None:
    files.dump_json(os.path.join(workdir, RECORD_FILE),
                    {**aligned.describe(), "retention_method": str(config.method.name)})
  return aligned


def final_adapters(workdir: str, trainable: Params, adapter_cfg: Any
                   ) -> tuple[Params, float] | None:
  """A finished retention run's final adapters (export, generation) and the LoRA alpha
  that gives them the run's scale at the rank they have; None for any other run."""
  record = read_record(workdir)
  if record is None:
    return None
  from semsafe_jax import methods  # pylint: disable=g-import-not-at-top; methods import us
  final = getattr(methods.get(record["retention_method"]), "final_adapters", None)
  adapters = final(workdir, trainable) if final is not None else trainable
  ranks = {int(m["a"].shape[-1]) for m in lora_modules(adapters.get("lora") or {}).values()}
  return adapters, lora_scale(adapter_cfg) * (ranks.pop() if len(ranks) == 1 else 1)


def model_of(workdir: str, params: Params, cfg: ModelConfig) -> tuple[Params, ModelConfig]:
  """The aligned model a retention run in `workdir` trained on (its recorded step), built
  on the base model's params and config."""
  record = read_record(workdir)
  saved = ckpt_lib.read_config(workdir) or {}
  model = str((saved.get("model") or {}).get("name_or_path", ""))
  aligned = load(record["workdir"], model, params, cfg, step=int(record["step"]),
                 field="retention.aligned_workdir (W/aligned.json)")
  return aligned.params, aligned.cfg
