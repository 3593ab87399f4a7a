"""Refusal on the built-in unlabelled pool, read against its hidden labels.

The pool (`data.unlabeled_sources=builtin:unlabeled`) trains with no label and no target:
only the consistency term (or `probe.use=flag_unlabeled`) tells the model what to do there.
This is the transductive check of that claim: groups "pool/harmful" (should be refused),
"pool/borderline" and "pool/benign" (should be answered). The hidden labels are read here
and nowhere in training. The pool holds prompts with and without a labelled neighbour
within tau; both are counted (the mining stats say how many have one).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from semsafe_jax.data import builtin
from semsafe_jax.data.splits import UNLABELED_SPLIT
from semsafe_jax.eval import base

OPTIONS = {
    "max_per_group": -1,  # prompts per hidden label (0 = all; -1 = config.eval.max_per_split)
    "max_new_tokens": 0,  # 0 = config.eval.max_new_tokens
    "seed": -1,  # -1 = config.eval.seed
}


def groups(ctx: base.EvalContext, opts: dict[str, Any],
           hidden: dict[str, dict[str, str]]) -> dict[str, np.ndarray]:
  """{"pool/<hidden label>": prompt rows}, subsampled; only pool prompts with a hidden
  label (`hidden`: builtin.load_unlabeled_labels(); a user's own unlabelled source has
  none, and is left out)."""
  by_label: dict[str, list[int]] = {}
  for r in base.split_rows(ctx.data, UNLABELED_SPLIT):
    p = ctx.data.prompts[int(r)]
    if p.source == "builtin" and p.id in hidden:
      by_label.setdefault(hidden[p.id]["label"], []).append(int(r))
  cap, seed = ctx.cap(opts["max_per_group"]), ctx.seed(opts["seed"])
  return {f"pool/{label}": base.subsample(np.asarray(sorted(rows)), cap, seed)
          for label, rows in sorted(by_label.items())}


def evaluate(ctx: base.EvalContext, model: base.ModelUnderTest,
             opts: dict[str, Any]) -> base.EvalResult:
  hidden = builtin.load_unlabeled_labels()
  sets = groups(ctx, opts, hidden)
  if not sets:
    return base.EvalResult({}, [], notes=["no built-in unlabelled pool was loaded "
                                          "(data.unlabeled_sources)"])
  order = [(g, int(r)) for g, rows in sets.items() for r in rows]
  prompts = [ctx.data.prompts[r] for _, r in order]
  completions = model.generate([p.text for p in prompts], ctx.max_new_tokens(opts))
  rows = [base.prompt_row(g, p.id, p.text, c, hidden[p.id]["label"],
                          category=hidden[p.id]["category"], style=hidden[p.id]["style"])
          for (g, _), p, c in zip(order, prompts, completions)]
  base.judge_rows(ctx, rows)
  labels = {g: g.split("/", 1)[1] for g in sets}
  return base.EvalResult(base.refusal_metrics(ctx, rows), rows, labels)
