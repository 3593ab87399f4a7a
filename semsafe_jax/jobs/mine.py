"""mode=mine: prepare the data (load, embed, mine, split) and print a summary.

  python -m semsafe_jax.main --config=configs/default.py --workdir=W --config.mode=mine

Imports only the data pipeline (no model code), so it runs without JAX models.
"""

from __future__ import annotations

import collections
from typing import Any

from semsafe_jax.data import neighbors
from semsafe_jax.data.pipeline import prepare_data


def summary(data: Any) -> str:
  by = collections.Counter((p.source, p.label) for p in data.prompts)
  lines = [f"Prepared {len(data.prompts)} prompts in {data.workdir}"]
  lines += [f"  {source:<14} {label:<10} {n:6d}" for (source, label), n in sorted(by.items())]
  lines.append("Splits:")
  lines += [f"  {name:<20} {len(rows):6d}" for name, rows in data.splits.items()]
  rep = data.split_report
  lines.append(f"Held-out intents: {rep['intents']['heldout']}/{rep['intents']['total']} "
               f"(target {rep['intents']['heldout_target']}; "
               f"{rep['moved_into_heldout_with_their_group']} moved with a linked intent); "
               f"max train->heldout_intent cosine {rep['max_cos_train_vs_heldout_intent']:.3f} "
               f"< tau {rep['tau']}")
  lines.append("Mining: " + neighbors.format_stats(data.mining_stats))
  lines.append(f"Refusals: {len(data.refusals)}")
  lines.append("Files: prompts.jsonl pairs.npz splits.json split_report.json "
               "mining_stats.json mining_stats.png")
  return "\n".join(lines)


def run(config: Any, workdir: str) -> None:
  print(summary(prepare_data(config, workdir)), flush=True)
