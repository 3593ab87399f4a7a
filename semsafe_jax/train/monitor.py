"""How much the consistency term is doing in a run, from the per-step metrics.

A run can train with (almost) no valid pairs and look healthy: L_consistency is then 0
and the method is off. `consistency_summary` condenses a `fit` history into the mean
valid pairs per step and the consistency term's mean share of the loss;
`warn_if_few_pairs` says so loudly when pairs average below one per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging

from semsafe_jax.data.batches import few_pairs_message


def _finite(x: Any) -> bool:
  return x is not None and math.isfinite(float(x))


def consistency_summary(history: Sequence[Mapping[str, float]], lam: float | None = None
                        ) -> dict[str, float | int | None]:
  """{"pairs_valid_mean", "consistency_share_mean", "steps"} over the steps of `history`.

  history: per-step metric dicts (what `fit` returns). Reads "pairs_valid" and, for the
  share, "l_consistency_weighted" (lam * L_consistency) and "l_total"; without the
  weighted metric, `lam` * "l_consistency" stands in. The share is lam * L_consistency /
  L_total averaged over the steps where both are finite and L_total > 0. A value is
  None when no step carries its metrics (a toy loss, lam = 0, or no step run).
  """
  pairs = [float(m["pairs_valid"]) for m in history if _finite(m.get("pairs_valid"))]
  shares = []
  for m in history:
    weighted = m.get("l_consistency_weighted")
    if weighted is None and lam is not None and "l_consistency" in m:
      weighted = lam * float(m["l_consistency"])
    total = m.get("l_total")
    if _finite(weighted) and _finite(total) and float(total) > 0:
      shares.append(float(weighted) / float(total))
  return {"pairs_valid_mean": sum(pairs) / len(pairs) if pairs else None,
          "consistency_share_mean": sum(shares) / len(shares) if shares else None,
          "steps": len(pairs)}


def warn_if_few_pairs(pairs_valid_mean: float | None, where: str = "training") -> str | None:
  """Logs `few_pairs_message` as a warning (and returns it) when it applies."""
  msg = few_pairs_message(pairs_valid_mean, where)
  if msg:
    logging.warning("%s", msg)
  return msg


def log_summary(summary: Mapping[str, Any]) -> None:
  """One info line for a run's summary, plus the few-pairs warning when it applies."""
  if summary.get("pairs_valid_mean") is None:
    return
  share = summary.get("consistency_share_mean")
  logging.info("Consistency over %d steps: %.2f valid pairs per step, %s of the loss.",
               summary["steps"], summary["pairs_valid_mean"],
               "unknown share" if share is None else f"{100 * share:.3g}%")
  warn_if_few_pairs(summary["pairs_valid_mean"])
