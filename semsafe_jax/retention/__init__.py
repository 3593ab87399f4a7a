"""The retention scenario: does a refusal survive later benign fine-tuning?

A safety-training run (any method, `config.retention.aligned_workdir`) gives the aligned
model: its adapters merged into the frozen base (`aligned.py`). A retention run fine-tunes
that model on a benign instruction task (`tasks.py`, `config.retention.task_sources`)
with one of the methods in METHODS, each a plug-in of semsafe_jax/methods:

  task_lora        plain LoRA on the task: the reference
  salora           SaLoRA (Li et al., ICLR 2025): LoRA output projected off the aligned
                   layer's principal output directions on harmful prompts
  asft             AsFT (Yang et al., 2025): penalises the LoRA update off the alignment
                   direction W_aligned - W_base
  alignguard_lora  AlignGuard-LoRA (Das et al., 2025): Fisher-weighted penalties on the
                   update, from the safety loss and from the task loss
  semsafe_retain   ours as the regulariser: task loss + our safety and consistency terms

The main job is unchanged: its "before" model is the aligned model, so every evaluation
reads as retention (before = after the safety training, after = after the task), and the
`task` evaluation measures what the fine-tuning was for. The pure regularisers are in
`regularizers.py`, the host stages the methods share in `common.py`.
"""

from __future__ import annotations

from typing import Any

METHODS = ("task_lora", "salora", "asft", "alignguard_lora", "semsafe_retain")


def section(config: Any) -> Any:
  """config.retention, or None outside the scenario (a ConfigDict or a saved dict)."""
  try:
    return config.get("retention", None) or None
  except AttributeError:
    return None


def enabled(config: Any) -> bool:
  return section(config) is not None
