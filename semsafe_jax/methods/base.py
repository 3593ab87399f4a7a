"""What every training method shares: typed batches and the bundle a method hands to `fit`.

A method is one module of this package with

  prepare(ctx: methods.context.Context) -> Prepared

`Prepared.loss_fn(trainable, frozen, batch, rng) -> (loss, metrics)` is pure and jit-able;
`Prepared.batch_fn(step)` returns the step's typed batch as numpy arrays, a pure function
of (seed, step) (so a resumed run replays the same data). Every method draws its prompts
from the same batcher (`safety_batch_fn`), so every method sees the same harmful and
benign prompts at every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import numpy as np

from semsafe_jax.train import inputs, packing

Params = Any
LossFn = Callable[[Params, Any, Any, Any], tuple[Any, dict[str, Any]]]


@flax.struct.dataclass
class Tokens:
  """Right-padded chat rows: prompt tokens, then the response the loss reads."""
  ids: Any  # int32 [B, L]
  mask: Any  # bool [B, L]
  target_mask: Any  # bool [B, L], True at response tokens
  prompt_end: Any  # int32 [B], index of the last prompt token
  weight: Any  # float32 [B], per-row loss weight
  # Rows may also come packed, several to a row (train/packing.py): the forward then runs
  # on the packed rows and reads the states back into this [B, L] layout.
  packed: packing.Packed | None = None

  @classmethod
  def take(cls, rows: inputs.Rows, idx: np.ndarray, weight: np.ndarray | None = None
           ) -> "Tokens":
    idx = np.asarray(idx)
    w = np.ones(len(idx), np.float32) if weight is None else np.asarray(weight, np.float32)
    return cls(ids=rows.ids[idx], mask=rows.mask[idx], target_mask=rows.target_mask[idx],
               prompt_end=rows.prompt_end[idx], weight=w)


@flax.struct.dataclass
class Pairs:
  """Consistency pairs: positions in the global harmful block."""
  index: Any  # int32 [P, 2]
  weight: Any  # float32 [P], SBERT cosine (x probe weight); 0 for padding
  valid: Any  # bool [P]


@flax.struct.dataclass
class SafetyBatch:
  """One step of supervised safety training: harmful rows with refusal targets, benign and
  borderline rows with the base model's own answers, and pairs among the harmful rows."""
  harm: Tokens
  benign: Tokens
  pairs: Pairs


@dataclasses.dataclass
class Prepared:
  """Everything `train.fit` needs for one method."""
  trainable: Params  # initial trainable pytree: {"lora", "embed_mlp"} and/or {"full"}
  loss_fn: LossFn
  batch_fn: Callable[[int], Any]
  frozen: Any  # pytree passed to loss_fn unchanged; {"base": params, ...}
  frozen_axes: dict[str, tuple[str, ...]]  # "a/b/c" -> logical axes of frozen leaves
  report: dict[str, Any] = dataclasses.field(default_factory=dict)  # method's own counts
  # trained pytree -> the adapters evaluation applies to the frozen model, for a method
  # whose trainable tree is not plain adapters (SaLoRA's fixed projection); None = as is.
  finalize: Callable[[Params], Params] | None = None
