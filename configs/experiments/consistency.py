"""Does the consistency term carry refusals to prompts without targets? Three arms.

  python -m semsafe_jax.main --config=configs/experiments/consistency.py \
      --workdir=runs/consistency

- semsafe: ours as configured by default (the unlabelled pool as partners), plus style
  rewrites of the training prompts (2 each, data/rewrite.py) as further unlabelled partners;
- semsafe_lam0: the same run with lambda = 0 (partners present, unused);
- paraphrase_aug: the fair rival on the same extra prompts: LoRA SFT on the training prompts
  plus the same style rewrites, each trained with its source's target (pseudo-labels instead
  of consistency).
Paired p-values are against lambda = 0. Paraphrases by the model itself are off (SmolLM2-135M
mostly answers a request instead of rewriting it, and the stage costs half an hour on 2
cores); "method.paraphrases_per_prompt=1" adds them.

Each cell trains 100 steps and evaluates at most 40 prompts per split. On the 2-core machine
a cell took 40-60 minutes while other jobs shared it (the first also answers every
evaluation with the base model). AdvBench and XSTest (../shared/data, read by experiments
only) are evaluation-only sets: nothing within tau of them is trained on.
"""

import os

from semsafe_jax.configs import load_sibling

_HERE = os.path.dirname(os.path.abspath(__file__))
_METHODS = os.path.relpath(os.path.join(_HERE, "..", "methods"))
_SHARED = os.path.relpath(os.path.join(_HERE, "..", "..", "..", "shared", "data"))


def get_config():
  c = load_sibling(__file__, "base.py")
  e = c.experiment
  e.methods = {name: os.path.join(_METHODS, f"{name}.py") for name in (
      "semsafe", "semsafe_lam0", "paraphrase_aug")}
  e.seeds = (0, 1, 2)
  e.overrides = (
      "train.steps=100", "eval.max_per_split=40",
      "method.rule_rewrites=2", "method.paraphrases_per_prompt=0",
      "data.sources=builtin",
      f"data.sources=xstest:{_SHARED}/xstest/xstest_prompts.csv",
      f"data.sources=advbench:{_SHARED}/advbench/harmful_behaviors.csv",
      "data.eval_only_sources=advbench")
  e.baseline = "semsafe_lam0"
  e.overrefusal_metric = "lookalike/refusal"
  return c
