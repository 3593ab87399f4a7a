"""Refuse the request, not its topic: ours with the cross-label contrast term at three weights.

  python -m semsafe_jax.main --config=configs/experiments/lookalike.py --workdir=runs/lookalike

The consistency experiment's budget and data (configs/experiments/consistency.py: 100 steps,
at most 40 prompts per split, AdvBench and XSTest evaluation-only), ours with
loss.w_contrast = 0 (the default), 1 and 4: (harmful, safe) training pairs above
data.contrast_tau whose refusal scores the hinge pushes apart. One seed per weight; a
weight is chosen on `val_lookalike` (look-alikes of training topics held back from
training), never on `lookalike` (those of held-out topics, the report's). The summary's
scatter plots over-refusal on look-alikes against held-out-intent refusal, one point per
weight: the trade-off curve.
"""

from semsafe_jax.configs import load_sibling

WEIGHTS = (1, 4)


def get_config():
  c = load_sibling(__file__, "consistency.py")
  e = c.experiment
  ours = e.methods.semsafe
  e.methods = {"semsafe": ours}
  for w in WEIGHTS:
    e.methods[f"semsafe_contrast{w}"] = {"config": ours, "overrides": (f"loss.w_contrast={w}",)}
  e.seeds = (0,)
  e.baseline = "semsafe"  # paired tests against w_contrast = 0
  e.overrefusal_metric = "lookalike/refusal"
  return c
