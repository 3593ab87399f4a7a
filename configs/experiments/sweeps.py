"""Sweeps of ours on the embedded default: tau, lambda, and the hidden layer that
hidden-state consistency compares.

  python -m semsafe_jax.main --config=configs/experiments/sweeps.py --workdir=runs/sweeps

One seed per point; the default (tau = 0.7, lambda = 1, refusal-probability consistency) is
one cell that every tau and lambda curve shares. Hidden layers of SmolLM2-135M's 30
(hidden_states index; 0 = the embeddings): early 6, middle 15, late 24. Same step and
evaluation budget as main_table.py. summary.md and plots/sweep_*.png show safety and
over-refusal against each swept value.
"""

import os

from semsafe_jax.configs import load_sibling

_SEMSAFE = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "methods", "semsafe.py"))


def get_config():
  c = load_sibling(__file__, "base.py")
  e = c.experiment
  e.methods = {"semsafe": _SEMSAFE}
  e.seeds = (0,)
  sets = {"default": ()}
  sets.update({f"tau{int(100 * t)}": (f"data.tau={t}",) for t in (0.6, 0.8, 0.9)})
  sets.update({"lam" + str(lam).replace(".", "_"): (f"loss.lam={lam}",)
               for lam in (0, 0.1, 0.3, 3)})
  sets.update({f"hidden_{name}": ("loss.consistency_repr=hidden", f"loss.hidden_layer={layer}")
               for name, layer in (("early", 6), ("middle", 15), ("late", 24))})
  e.override_sets = sets
  e.overrides = ("train.steps=100", "eval.max_per_split=40")
  e.baseline = ""  # one method: no paired tests, the curves are the result
  return c
