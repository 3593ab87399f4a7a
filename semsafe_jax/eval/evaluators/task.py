"""Task quality in the retention scenario: the held-out tasks of config.retention.

On each held-out task (prompt, reference answer), with no judge:
  task_nll          mean negative log-likelihood per token of the reference answer under
                    the model (teacher-forced), averaged over tasks: the task loss
  ref_agree_<n>     share of tasks whose greedy answer starts with the reference's first
                    n tokens (all of it when shorter): the answer in the task's own form
  answer_agree      share of greedy answers (of n tokens) that contain the reference
                    answer, case and spacing aside: right, whatever the wording around it;
                    meaningful for short answers (the built-in set), near 0 for long ones

Agreement is with the reference, not with the aligned model's answers: the fine-tuning is
meant to move the model towards the task, and the capability evaluation already measures
drift from the frozen model. Outside the scenario (no config.retention) it reports nothing.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from semsafe_jax import retention
from semsafe_jax.eval import base
from semsafe_jax.models import chat as chat_lib
from semsafe_jax.retention import tasks as tasks_lib

OPTIONS = {
    "max_prompts": 0,  # held-out tasks (0 = all; -1 = config.eval.max_per_split)
    "agree_tokens": 16,  # greedy answer length; ref_agree_<n> compares this many tokens
    "seed": -1,  # subsample seed (-1 = config.eval.seed)
}


def normalise(text: str) -> str:
  return re.sub(r"\s+", " ", text).strip().lower()


def agrees(ids: list[int], ref_ids: list[int], n: int) -> bool:
  """The answer's first min(n, len(ref)) tokens are the reference's."""
  k = min(n, len(ref_ids))
  return k > 0 and list(ids[:k]) == list(ref_ids[:k])


def evaluate(ctx: base.EvalContext, model: base.ModelUnderTest,
             opts: dict[str, Any]) -> base.EvalResult:
  if not retention.enabled(ctx.config):
    return base.EvalResult({}, [], notes=["no task set: config.retention is not set"])
  held = tasks_lib.from_config(ctx.config).heldout
  rows_idx = base.subsample(np.arange(len(held)), ctx.cap(opts["max_prompts"]),
                            ctx.seed(opts["seed"]))
  chosen = [held[int(i)] for i in rows_idx]
  prompts, refs = [t.prompt for t in chosen], [t.response for t in chosen]
  n = int(opts["agree_tokens"])
  nll = [float(-np.mean(lp)) for lp in model.answer_logprobs(prompts, refs)]
  out = model.generate_full(prompts, n)
  ref_ids = [chat_lib.encode_prefill(model.tokenizer, r) for r in refs]
  agree = [agrees(ids, r, n) for ids, r in zip(out.token_ids, ref_ids)]
  found = [normalise(r) in normalise(c) for r, c in zip(refs, out.texts)]
  agree_name = f"ref_agree_{n}"
  rows = []
  for t, c, a, f, l in zip(chosen, out.texts, agree, found, nll):
    for metric, value in ((agree_name, float(a)), ("answer_agree", float(f)),
                          ("task_nll", round(l, 6))):
      rows.append(base.prompt_row("task", t.id, t.prompt, c, "task", unjudged=True,
                                  metric=metric, value=value, reference=t.response,
                                  category=t.category))
  metrics = {"task_nll": base.Metric.mean(nll),
             agree_name: base.Metric.rate(sum(agree), len(agree)),
             "answer_agree": base.Metric.rate(sum(found), len(found))}
  return base.EvalResult(metrics, rows, {"task": "task"})
