"""The main table: every safety-training method and ablation on the embedded default.

  python -m semsafe_jax.main --config=configs/experiments/main_table.py --workdir=runs/main_table

Three seeds for ours, the primary baseline (lora_sft) and the lambda = 0 ablation, one for
the rest: 20 cells. Every cell trains 100 steps (about 330 s of training at the default's
3.3 s/step on a quiet 2-core machine) and evaluates at most 40 prompts per split. With every
evaluation in configs/default.py a cell of configs/experiments/consistency.py (the same
budget) took 40-60 minutes on a shared 2-core machine, so the 20 cells do not fit 3 hours
there: run them as a job array (--config.experiment.print_commands=True), or fewer
evaluations. Full fine-tuning steps cost more.
"""

import os

from semsafe_jax.configs import load_sibling

_METHODS = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "methods"))
THREE_SEEDS = ("semsafe", "lora_sft", "semsafe_lam0")
ONE_SEED = ("lora_sft_qv", "full_ft", "dpo", "safedpo", "paraphrase_aug", "contrastive",
            "circuit_breakers", "deep_alignment", "semsafe_lora_only", "semsafe_mlp_only",
            "semsafe_full_ft", "semsafe_hidden", "semsafe_next_token", "semsafe_classifier",
            "semsafe_soft_pattern", "semsafe_probe", "semsafe_probe_pairs")


def get_config():
  c = load_sibling(__file__, "base.py")
  e = c.experiment
  e.methods = {name: {"config": os.path.join(_METHODS, f"{name}.py"),
                      "seeds": (0, 1, 2) if name in THREE_SEEDS else (0,)}
               for name in THREE_SEEDS + ONE_SEED}
  e.overrides = ("train.steps=100", "eval.max_per_split=40")
  e.baseline = "lora_sft"
  return c
