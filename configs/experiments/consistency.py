"""Does the consistency term carry refusals to prompts without targets? Three arms, 3 seeds.

  python -m semsafe_jax.main --config=configs/experiments/consistency.py \
      --workdir=runs/consistency

- semsafe: ours, as configured by default (the unlabelled pool as partners), plus the
  generated variants of the training prompts as unlabelled partners;
- semsafe_lam0: the same run with lambda = 0 (partners and variants present, unused);
- paraphrase_aug: LoRA SFT on the same generated variants, each with its source's target:
  the fair rival, which uses the extra prompts as pseudo-labels.

Every arm gets the same variants, 2 style rewrites per training prompt (data/rewrite.py).
Paraphrases by the model are left out here: SmolLM2-135M mostly answers a request instead of
rewriting it, so few survive the cosine filter, and the stage costs half an hour on 2 cores
(add "method.paraphrases_per_prompt=1" to `overrides` to include them). Each cell trains 100
steps and evaluates at most 40 prompts per split, so the 9 cells fit in about 90 minutes. Paired p-values are against lambda = 0.
AdvBench and XSTest (../shared/data, read by experiments only) are evaluation-only sets:
nothing within tau of them is trained on.
"""

import os

from semsafe_jax.configs import load_sibling

_HERE = os.path.dirname(os.path.abspath(__file__))
_METHODS = os.path.relpath(os.path.join(_HERE, "..", "methods"))
_SHARED = os.path.relpath(os.path.join(_HERE, "..", "..", "..", "shared", "data"))


def get_config():
  c = load_sibling(__file__, "base.py")
  e = c.experiment
  e.methods = {name: os.path.join(_METHODS, f"{name}.py")
               for name in ("semsafe", "semsafe_lam0", "paraphrase_aug")}
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
