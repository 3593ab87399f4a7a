"""The retention table: the five retention methods from one safety run, on the embedded default.

  python -m semsafe_jax.main --config=configs/experiments/retention.py:runs/demo \
      --workdir=runs/retention

The argument after ':' is the safety run's workdir (default runs/demo, what `make run`
trains): its latest checkpoint is the aligned model of every cell. The cells must use that
run's data settings (same held-out prompts; the job checks): a safety run with other `data`
settings needs them in `experiment.overrides` too (docs/results/retention/README.md shows
how). Each cell fine-tunes the aligned model on the built-in task set for 50 steps of 8
tasks (about 1.2 epochs) and evaluates at most 30 prompts per refusal split, 20 under each
attack and prefill, and 60 held-out tasks; the aligned model's own answers ("before") are
generated once, in the first cell. On the quiet 2-core development machine a cell took 5-7
minutes, ours 13-20 (its step carries our safety-training blocks). Δ and paired tests are
against plain LoRA (task_lora).
"""

import os

from semsafe_jax.configs import load_sibling

_METHODS = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "methods"))
METHODS = ("task_lora", "salora", "asft", "alignguard_lora", "semsafe_retain")


def get_config(aligned_workdir="runs/demo"):
  c = load_sibling(__file__, "base.py")
  e = c.experiment
  e.methods = {name: os.path.join(_METHODS, f"{name}.py") for name in METHODS}
  # Ours without L_capability: what the safety term alone does to benign prompts.
  e.methods.semsafe_retain_nocap = {"config": e.methods.semsafe_retain,
                                    "overrides": ("loss.w_capability=0",)}
  e.overrides = (f"retention.aligned_workdir={aligned_workdir}", "train.steps=50",
                 "eval.max_per_split=30", "evals.attacks.max_prompts=20",
                 "evals.prefill.max_prompts=20", "evals.task.max_prompts=60")
  e.baseline = "task_lora"
  e.safety_metric = "refusal:heldout_intent/refusal"
  e.overrefusal_metric = "refusal:lookalike/refusal"
  return c
