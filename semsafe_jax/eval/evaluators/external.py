"""Refusal rate on evaluation-only sources (XSTest, AdvBench, ... loaded as eval-only),
per source and label: group "<source>/<label>". Nothing here is ever trained on, nor
anything within tau of it (data.exclude_near_eval_only)."""

from __future__ import annotations

from typing import Any

import numpy as np

from semsafe_jax.eval import base

OPTIONS = {
    "splits": ("eval_only_harmful", "eval_only_borderline", "eval_only_benign"),
    "max_per_group": -1,  # prompts per source and label (0 = all; -1 = config.eval.max_per_split)
    "max_new_tokens": 0,  # 0 = config.eval.max_new_tokens
    "seed": -1,  # -1 = config.eval.seed
}


def groups(ctx: base.EvalContext, opts: dict[str, Any]) -> dict[str, np.ndarray]:
  cap, seed = ctx.cap(opts["max_per_group"]), ctx.seed(opts["seed"])
  by_group: dict[str, list[int]] = {}
  for split in opts["splits"]:
    for r in base.split_rows(ctx.data, split):
      p = ctx.data.prompts[int(r)]
      by_group.setdefault(f"{p.source or 'unknown'}/{p.label}", []).append(int(r))
  return {g: base.subsample(np.asarray(sorted(rs)), cap, seed)
          for g, rs in sorted(by_group.items())}


def evaluate(ctx: base.EvalContext, model: base.ModelUnderTest,
             opts: dict[str, Any]) -> base.EvalResult:
  sets = groups(ctx, opts)
  if not sets:
    return base.EvalResult({}, [], notes=["no evaluation-only prompts were loaded"])
  order = [(g, int(r)) for g, rows in sets.items() for r in rows]
  prompts = [ctx.data.prompts[r] for _, r in order]
  completions = model.generate([p.text for p in prompts], ctx.max_new_tokens(opts))
  rows = [base.prompt_row(g, p.id, p.text, c, p.label, source=p.source, category=p.category)
          for (g, _), p, c in zip(order, prompts, completions)]
  base.judge_rows(ctx, rows)
  labels = {g: g.rsplit("/", 1)[1] for g in sets}
  return base.EvalResult(base.refusal_metrics(ctx, rows), rows, labels)
