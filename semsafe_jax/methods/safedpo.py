"""safedpo: SafeDPO (Kim et al., 2025, "SafeDPO: A Simple Approach to Direct Preference
Optimization with Enhanced Safety", arXiv 2505.20065) with LoRA. No reward or cost model.

SafeDPO starts from helpfulness preferences with a binary safety label on every response
(h = 1: unsafe) and trains DPO on a transformed dataset T(D) with a safety margin:

  T(D): keep a pair whose preferred response is safe; swap a pair whose preferred
        response is unsafe and dispreferred one safe; drop a pair of two unsafe responses;
  loss = -log sigmoid(beta * d - (h_l - h_w) * Delta), d the DPO log-ratio difference,

so the margin Delta >= 0 applies to safe-vs-unsafe pairs only (losses/preference.py).

Our pairs: the same prompts and responses as `dpo`, in helpfulness order (the response
that does what was asked is preferred): for every prompt, the base model's own answer over
a refusal (the harmful prompt's refusal target; a built-in refusal for a benign one).
Labels: a refusal is safe; a benign prompt's answer is safe; a harmful prompt's base
answer is unsafe unless the string-match judge (eval/judge.is_refusal) reads it as a
refusal. So T(D) swaps every pair whose base answer complies with a harmful request (and
adds Delta to it), and keeps the rest as they are: benign pairs prefer the answer, and a
harmful pair whose base answer already refuses prefers that refusal, with no margin. No
pair here has two unsafe responses, so none is dropped (the transform handles it). The
run log counts kept, swapped, dropped and safe-vs-unsafe pairs. Same LoRA placement as ours.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from semsafe_jax.losses.preference import safedpo_transform
from semsafe_jax.methods import dpo
from semsafe_jax.methods.base import Prepared


def helpfulness_pairs(harm_answers, harm_refusals, benign_answers, benign_refusals):
  """(preferred, dispreferred, preferred unsafe, dispreferred unsafe) in helpfulness order:
  harmful pairs first, then benign ones."""
  preferred = list(harm_answers) + list(benign_answers)
  dispreferred = list(harm_refusals) + list(benign_refusals)
  preferred_unsafe = np.concatenate([dpo.compliant(harm_answers),
                                     np.zeros(len(benign_answers), bool)])
  return preferred, dispreferred, preferred_unsafe, np.zeros(len(dispreferred), bool)


def ordered_pairs(preferred, dispreferred, preferred_unsafe, dispreferred_unsafe,
                  delta: float):
  """(chosen texts, rejected texts, SafePairs): T(D) applied to texts and labels."""
  t = safedpo_transform(preferred_unsafe, dispreferred_unsafe, delta)
  chosen = [r if s else p for p, r, s in zip(preferred, dispreferred, t.swap)]
  rejected = [p if s else r for p, r, s in zip(preferred, dispreferred, t.swap)]
  return chosen, rejected, t


def prepare(ctx) -> Prepared:
  sft, data, config = ctx.sft, ctx.data, ctx.config
  n_harm, n_benign = len(sft.harm_rows), len(sft.benign_rows)
  chosen, rejected, t = ordered_pairs(
      *helpfulness_pairs(ctx.harmful_answers, sft.harm_targets, sft.benign_answers,
                         ctx.refusal_targets(sft.benign_rows)),
      dpo.method_knob(config, "delta"))
  weight = np.concatenate([sft.harm_weight, np.ones(n_benign, np.float32)]) * t.weight
  table = dpo.pair_table(ctx, data.texts(sft.harm_rows) + data.texts(sft.benign_rows), chosen,
                         rejected, weight, t.margin, n_harm)
  counts = {"pairs_harmful": n_harm, "pairs_benign": n_benign,
            "pairs_swapped": int(t.swap.sum()), "pairs_dropped": int((t.weight == 0).sum()),
            "pairs_kept": int(((t.weight > 0) & ~t.swap).sum()),
            "pairs_safe_vs_unsafe": int((t.rejected_unsafe & ~t.chosen_unsafe
                                         & (t.weight > 0)).sum())}
  logging.info("SafeDPO pairs: %s.", ", ".join(f"{k} {v}" for k, v in counts.items()))
  return dpo.preference_prepared(ctx, table, dpo.method_knob(config, "beta"), report=counts)
