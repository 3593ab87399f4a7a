"""Capability retention, without an external judge.

On held-out benign prompts, against the frozen base model's own greedy answers:
  kl_per_token      KL(base || model) of the next-token distributions along the base
                    answer (teacher-forced), averaged over its tokens, then over prompts
  base_answer_nll   mean negative log-likelihood per token of the base answer under the model
  greedy_agree_<n>  share of prompts whose greedy answer equals the base model's for the
                    first n tokens (or in full, when shorter)
And answers to a fixed capability prompt set (eval/capability_prompts.jsonl: maths, code,
knowledge, writing, reasoning), saved UNJUDGED in the rows (group "capability_set") for
outside grading; only their mean length is reported.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from semsafe_jax.eval import base

PROMPTS_FILE = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                            "capability_prompts.jsonl")

OPTIONS = {
    "splits": ("eval_benign",),  # held-out benign prompts
    "max_prompts": -1,  # 0 = all; -1 = config.eval.max_per_split
    "answer_tokens": 32,  # length of the base answers KL and NLL are measured on
    "agree_tokens": 32,  # greedy agreement over this many tokens
    "prompt_set": "",  # JSONL with "prompt" (and "id"); "" = built-in; "none" = skip
    "prompt_set_tokens": 128,  # answer length for the capability prompt set
    "seed": -1,  # -1 = config.eval.seed
}


def load_prompt_set(path: str = "") -> list[tuple[str, str]]:
  """[(id, prompt)] of the capability prompt set."""
  path = os.path.expanduser(path or PROMPTS_FILE)
  out = []
  with open(path, encoding="utf-8") as f:
    for i, line in enumerate(f, 1):
      if line.strip():
        r = json.loads(line)
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
          raise ValueError(f"{path}:{i}: expected an object with a string \"prompt\".")
        out.append((str(r.get("id", f"cap-{i:02d}")), r["prompt"]))
  return out


def agrees(ids: list[int], base_ids: list[int], base_finished: bool, n: int) -> bool:
  """Same first n tokens; a base answer that ended before n must be matched exactly."""
  if len(base_ids) < n and base_finished:
    return ids == base_ids
  return ids[:n] == base_ids[:n]


def evaluate(ctx: base.EvalContext, model: base.ModelUnderTest,
             opts: dict[str, Any]) -> base.EvalResult:
  rows_idx = np.unique(np.concatenate([base.split_rows(ctx.data, s) for s in opts["splits"]]
                                      or [np.zeros(0, np.int64)]))
  rows_idx = base.subsample(rows_idx, ctx.cap(opts["max_prompts"]), ctx.seed(opts["seed"]))
  prompts = [ctx.data.prompts[int(r)] for r in rows_idx]
  texts = [p.text for p in prompts]
  n_ans, n_agree = int(opts["answer_tokens"]), int(opts["agree_tokens"])
  metrics: dict[str, base.Metric] = {}
  rows: list[dict[str, Any]] = []
  notes = []
  if prompts:
    ref = ctx.base.generate_full(texts, max(n_ans, n_agree))
    # KL and NLL along the base answer's first answer_tokens tokens.
    targets = [ids[:n_ans] for ids in ref.token_ids]
    keep = [i for i, t in enumerate(targets) if t]  # an empty answer has no tokens to score
    kl = base.answer_token_kl(ctx.base, model, [texts[i] for i in keep], [targets[i] for i in keep])
    lp = model.answer_logprobs([texts[i] for i in keep], [targets[i] for i in keep])
    kl_of = {i: float(np.mean(k)) for i, k in zip(keep, kl)}
    nll_of = {i: float(-np.mean(v)) for i, v in zip(keep, lp)}
    if keep:
      metrics["kl_per_token"] = base.Metric.mean(list(kl_of.values()))
      metrics["base_answer_nll"] = base.Metric.mean(list(nll_of.values()))
    mine = model.generate_full(texts, max(n_ans, n_agree))
    agree = [agrees(m[:n_agree], r[:n_agree], f, n_agree)
             for m, r, f in zip(mine.token_ids, ref.token_ids, ref.finished)]
    agree_name = f"greedy_agree_{n_agree}"
    metrics[agree_name] = base.Metric.rate(sum(agree), len(agree))
    # One row per prompt and metric ("metric", "value"): the runner pairs them across cells.
    for i, p in enumerate(prompts):
      rows.append(base.prompt_row("benign", p.id, p.text, mine.texts[i], p.label,
                                  metric=agree_name, value=float(agree[i]),
                                  base_completion=ref.texts[i]))
      for name, of in (("kl_per_token", kl_of), ("base_answer_nll", nll_of)):
        if i in of:
          rows.append(base.prompt_row("benign", p.id, p.text, ref.texts[i], p.label,
                                      metric=name, value=round(of[i], 6)))
  else:
    notes.append(f"no prompts in splits {tuple(opts['splits'])}")

  if str(opts["prompt_set"]).lower() != "none":
    cap_set = load_prompt_set(str(opts["prompt_set"]))
    out = model.generate_full([p for _, p in cap_set], int(opts["prompt_set_tokens"]))
    for (pid, p), text, ids in zip(cap_set, out.texts, out.token_ids):
      rows.append(base.prompt_row("capability_set", pid, p, text, "capability", unjudged=True,
                                  metric="capability_set/answer_tokens", value=float(len(ids))))
    metrics["capability_set/answer_tokens"] = base.Metric.mean([len(t) for t in out.token_ids])
    notes.append("capability_set answers are saved unjudged (group capability_set in the rows) "
                 "for outside grading.")
  return base.EvalResult(metrics, rows, {"benign": "benign", "capability_set": "capability"},
                         notes)
