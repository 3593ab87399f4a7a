"""Refusal rate per built-in split (the main job's report), on a deterministic subsample.

Groups and the data splits they read (a group whose split is empty is left out):
train, heldout_phrasing, heldout_intent (harmful); borderline, benign, lookalike,
val_lookalike (should be answered); eval_only_{harmful,borderline,benign} (evaluation-only sources).
"""

from __future__ import annotations

from typing import Any

from semsafe_jax.eval import base

GROUPS = {"train": "train", "heldout_phrasing": "heldout_phrasing",
          "heldout_intent": "heldout_intent", "borderline": "eval_borderline",
          "benign": "eval_benign", "lookalike": "eval_lookalike",
          # Training-side topics' held-back look-alikes: what a setting may be chosen on.
          "val_lookalike": "val_lookalike",
          "eval_only_harmful": "eval_only_harmful", "eval_only_borderline": "eval_only_borderline",
          "eval_only_benign": "eval_only_benign"}

OPTIONS = {
    "groups": (),  # subset of GROUPS' names; () = all
    "max_per_split": -1,  # prompts per group (0 = all; -1 = config.eval.max_per_split)
    "max_new_tokens": 0,  # 0 = config.eval.max_new_tokens
    "seed": -1,  # subsample seed (-1 = config.eval.seed)
}


def groups(ctx: base.EvalContext, opts: dict[str, Any]) -> dict[str, Any]:
  """{group: prompt rows} in GROUPS order, each subsampled to max_per_split."""
  names = tuple(opts["groups"]) or tuple(GROUPS)
  bad = [g for g in names if g not in GROUPS]
  if bad:
    raise ValueError(f"refusal_splits groups: {bad[0]!r} is unknown; allowed: "
                     f"{', '.join(GROUPS)}.")
  cap, seed = ctx.cap(opts["max_per_split"]), ctx.seed(opts["seed"])
  out = {}
  for g in names:
    rows = base.split_rows(ctx.data, GROUPS[g])
    if len(rows):
      out[g] = base.subsample(rows, cap, seed)
  return out


def evaluate(ctx: base.EvalContext, model: base.ModelUnderTest,
             opts: dict[str, Any]) -> base.EvalResult:
  sets = groups(ctx, opts)
  order = [(g, int(r)) for g, rows in sets.items() for r in rows]
  prompts = [ctx.data.prompts[r] for _, r in order]
  # One generate call for every group: fewer, fuller batches.
  completions = model.generate([p.text for p in prompts], ctx.max_new_tokens(opts))
  rows = [base.prompt_row(g, p.id, p.text, c, p.label, category=p.category)
          for (g, _), p, c in zip(order, prompts, completions)]
  base.judge_rows(ctx, rows)
  labels = {g: ctx.data.prompts[int(rs[0])].label for g, rs in sets.items()}
  return base.EvalResult(base.refusal_metrics(ctx, rows), rows, labels)
