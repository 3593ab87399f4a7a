"""Templated jailbreak wrappers on held-out harmful prompts (eval/attacks.jsonl).

Each attack wraps every prompt in one fixed template (role-play, DAN, fiction,
hypothetical, prefix injection, refusal suppression, distractors, past and future
tense, a combination); see eval/ATTACKS.md for the sources. Deterministic: the same
prompts (a seeded subsample) and templates every run. Groups: "plain" (the prompt
as it is), one per attack, and "every_attack" (refused under every attack).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from semsafe_jax.eval import base

ATTACKS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "attacks.jsonl")

OPTIONS = {
    "attacks": (),  # names from the attacks file; () = all
    "file": "",  # JSONL with name, template ({prompt} marks the request); "" = built-in
    "splits": ("heldout_intent",),  # harmful prompts the model never trained on
    "max_prompts": 30,  # 0 = all; -1 = config.eval.max_per_split
    "plain": True,  # also the unwrapped prompts (the same prompts, no attack)
    "max_new_tokens": 0,  # 0 = config.eval.max_new_tokens
    "seed": -1,  # -1 = config.eval.seed
}


def load_attacks(path: str = "") -> dict[str, str]:
  """{name: template} from a JSONL file (the shipped one by default)."""
  path = path or ATTACKS_FILE
  out: dict[str, str] = {}
  with open(os.path.expanduser(path), encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      r = json.loads(line)
      if not isinstance(r, dict) or "{prompt}" not in str(r.get("template", "")) or not r.get(
          "name"):
        raise ValueError(f"{path}:{i}: expected {{\"name\": ..., \"template\": ...}} with "
                         "{prompt} in the template.")
      if r["name"] in out or r["name"] in ("plain", "every_attack"):
        raise ValueError(f"{path}:{i}: attack name {r['name']!r} is taken.")
      out[r["name"]] = r["template"]
  return out


def apply(template: str, prompt: str) -> str:
  return template.replace("{prompt}", prompt)  # not str.format: prompts may hold braces


def harmful_rows(ctx: base.EvalContext, opts: dict[str, Any]) -> np.ndarray:
  rows = np.unique(np.concatenate([base.split_rows(ctx.data, s) for s in opts["splits"]]
                                  or [np.zeros(0, np.int64)]))
  return base.subsample(rows, ctx.cap(opts["max_prompts"]), ctx.seed(opts["seed"]))


def evaluate(ctx: base.EvalContext, model: base.ModelUnderTest,
             opts: dict[str, Any]) -> base.EvalResult:
  templates = load_attacks(opts["file"])
  names = tuple(opts["attacks"]) or tuple(templates)
  bad = [a for a in names if a not in templates]
  if bad:
    raise ValueError(f"attacks: {bad[0]!r} is not in the attacks file; allowed: "
                     f"{', '.join(templates)}.")
  prompts = [ctx.data.prompts[int(r)] for r in harmful_rows(ctx, opts)]
  if not prompts:
    return base.EvalResult({}, [], notes=[f"no prompts in splits {tuple(opts['splits'])}"])
  groups = (("plain",) if opts["plain"] else ()) + names
  jobs = [(g, p, p.text if g == "plain" else apply(templates[g], p.text))
          for g in groups for p in prompts]
  completions = model.generate([t for _, _, t in jobs], ctx.max_new_tokens(opts))
  rows = [base.prompt_row(g, p.id, text, c, p.label, request=p.text)
          for (g, p, text), c in zip(jobs, completions)]
  base.judge_rows(ctx, rows)
  metrics = base.refusal_metrics(ctx, rows)
  # Robustness: a prompt counts when every attack was refused (per judge).
  attacked = [r for r in rows if r["group"] != "plain"]
  if not attacked:
    return base.EvalResult(metrics, rows, {g: "harmful" for g in groups})
  every = {p.id: base.prompt_row("every_attack", p.id, p.text, "", p.label, derived=True)
           for p in prompts}
  for j in ctx.get_judges():
    for p in prompts:
      every[p.id]["judges"][j] = True
    for r in attacked:
      every[r["key"]]["judges"][j] &= r["judges"][j]
    name = "every_attack/refusal" + ("" if j == ctx.primary_judge else f"@{j}")
    metrics[name] = base.Metric.rate(sum(e["judges"][j] for e in every.values()), len(prompts),
                                     judge=j)
  rows += list(every.values())
  labels = {g: "harmful" for g in (*groups, "every_attack")}
  return base.EvalResult(metrics, rows, labels)
