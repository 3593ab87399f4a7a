"""How well a probe on the frozen model's prompt states tells harmful requests from benign
look-alikes, per layer: the pure part of `python -m semsafe_jax.experiments.probe_gate`
(which documents the method), kept free of command-line flags so it can be imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from semsafe_jax.probes import safety as probe_lib

CALIBRATION = "train (held back)"
SELECT_ON = "val_lookalike"


def gate_table(probs: Mapping[str, np.ndarray], recall: float) -> dict[str, Any]:
  """Per layer: the threshold keeping `recall` of CALIBRATION flagged, and every split's
  flagged share; the chosen layer flags the fewest SELECT_ON prompts (ties: earliest).

  probs: split -> [L, N] unsafe probabilities; must hold CALIBRATION.
  """
  if not 0.0 < recall <= 1.0:
    raise ValueError(f"recall={recall}: must be in (0, 1]")
  cal = probs[CALIBRATION]
  # "lower": an actual score, so at least `recall` of CALIBRATION is flagged at any n.
  thresholds = np.quantile(cal, 1.0 - recall, axis=1, method="lower")  # [L]
  flagged = {name: (p >= thresholds[:, None]).mean(axis=1) for name, p in probs.items()}
  chosen = int(np.argmin(flagged[SELECT_ON])) if SELECT_ON in flagged else None
  return {"recall": float(recall), "threshold": thresholds.tolist(),
          "flagged": {k: v.tolist() for k, v in flagged.items()},
          "n": {k: int(p.shape[1]) for k, p in probs.items()}, "chosen_layer": chosen}


def measure(ctx, *, recall: float, held_back: float, max_per_split: int) -> dict[str, Any]:
  """Trains the probe on the training side of `ctx.data` and scores every split."""
  from semsafe_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  config, data = ctx.config, ctx.data
  rng = np.random.default_rng(int(config.seed))
  take = lambda rows: np.sort(rng.choice(rows, min(max_per_split, len(rows)), replace=False))

  harmful = rng.permutation(data.splits["train"])
  k = max(1, int(round(held_back * len(harmful))))
  if len(harmful) - k < 1:
    raise ValueError(f"held_back={held_back}: leaves no harmful training prompt to fit on")
  safe = np.concatenate([data.splits[n] for n in ("train_benign", "train_borderline",
                                                  "train_lookalike")])
  fit_h, fit_s = take(harmful[k:]), take(safe)
  rows = {CALIBRATION: np.sort(harmful[:k])}
  rows.update({name: take(data.splits[name]) for name in splits_lib.EVAL_SPLITS
               if len(data.splits.get(name, ()))})
  bar = tqdm(total=2 + len(rows), desc="prompt states", unit="set", dynamic_ncols=True)

  def feats(r: np.ndarray) -> np.ndarray:  # [L+1, N, D]
    ids, mask = probe_lib.encode_prompts(ctx.tokenizer, data.texts(r), config.data.max_len)
    out = probe_lib.pooled_hidden_states(ctx.params, ctx.model_cfg, ids, mask,
                                         batch_size=int(config.probe.batch_size))
    bar.update()
    return out

  x = np.concatenate([feats(fit_h), feats(fit_s)], axis=1)
  y = np.r_[np.ones(len(fit_h)), np.zeros(len(fit_s))].astype(np.float32)
  probes = probe_lib.train_layer_probes(x, y, steps=int(config.probe.steps),
                                        lr=float(config.probe.lr), l2=float(config.probe.l2))
  probs = {name: probe_lib.probe_probs(probes, feats(r)) for name, r in rows.items()}
  bar.close()
  out = gate_table(probs, recall)
  out.update(n_fit_harmful=int(len(fit_h)), n_fit_safe=int(len(fit_s)),
             held_back=float(held_back))
  return out


def markdown(result: Mapping[str, Any]) -> str:
  """One row per layer (hidden_states index), one column per split: the share flagged."""
  names = list(result["flagged"])
  head = ["layer", "threshold", *[f"{n} ({result['n'][n]})" for n in names]]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for layer, t in enumerate(result["threshold"]):
    mark = " (chosen)" if layer == result["chosen_layer"] else ""
    cells = [f"{layer}{mark}", f"{t:.3f}",
             *[f"{result['flagged'][n][layer]:.1%}" for n in names]]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
