"""The probe gate: the safety adapters only for prompts a probe on the frozen model flags.

A prompt the gate lets through gets the frozen base model's answer, so a benign look-alike
of a harmful request is not refused for its topic alone. The probe is the safety probe's
(probes/safety.py: per-layer, class-balanced logistic regression on mean-pooled prompt
states), fit on the training side only: the harmful training prompts less a held-back share,
against the benign, borderline and look-alike training prompts. Each layer's threshold keeps
`recall` of the held-back harmful prompts flagged, and the layer is the one that flags the
fewest `val_lookalike` prompts (the split a setting may be chosen on). No evaluation prompt
chooses anything.

`fit` builds the gate (the main job with `gate.use=True`); `measure` also scores every
evaluation split, which `python -m semsafe_jax.experiments.probe_gate` prints. Both are kept
free of command-line flags so they can be imported.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from semsafe_jax import files
from semsafe_jax.probes import safety as probe_lib

CALIBRATION = "train (held back)"
SELECT_ON = "val_lookalike"
GATE_FILE = "gate.json"  # in the workdir; the exported adapters carry a copy
# For a reader of gate.json outside this library (a PyTorch deployment).
ABOUT = ("The adapters answer a prompt when sigmoid(((h - mu) / sd) . w + b) >= threshold, "
         "where h is the mean over the chat-formatted prompt's tokens (the last max_len, the "
         "generation prompt included) of hidden_states[layer] of the base model with the "
         "adapters off (transformers' output_hidden_states: 0 = embeddings, last = after the "
         "final norm); otherwise the base model answers.")


@dataclasses.dataclass(frozen=True)
class Gate:
  """One layer's probe and its threshold: `flags` says which prompts get the adapters."""
  probe: dict[str, np.ndarray]  # probes/safety.layer_probe format: w, b, mu, sd, layer
  threshold: float
  max_len: int  # prompt tokens kept (the end), as in training
  info: dict[str, Any] = dataclasses.field(default_factory=dict)  # how it was chosen

  @property
  def layer(self) -> int:
    return int(self.probe["layer"])

  def unsafe_probs(self, params: Any, cfg: Any, tokenizer: Any, prompts: Sequence[str], *,
                   batch_size: int = 16) -> np.ndarray:
    """[N] the probe's unsafe probability of each prompt, on the frozen model's states."""
    if not len(prompts):
      return np.zeros(0, np.float32)
    ids, mask = probe_lib.encode_prompts(tokenizer, list(prompts), self.max_len)
    return probe_lib.score_prompts(params, cfg, self.probe, ids, mask, batch_size=batch_size)

  def flags(self, params: Any, cfg: Any, tokenizer: Any, prompts: Sequence[str], *,
            batch_size: int = 16) -> np.ndarray:
    """[N] bool: True where the adapters answer."""
    return self.unsafe_probs(params, cfg, tokenizer, prompts,
                             batch_size=batch_size) >= self.threshold

  def to_json(self) -> dict[str, Any]:
    return {"about": ABOUT, "layer": self.layer, "threshold": float(self.threshold), "max_len": int(self.max_len),
            "probe": {k: np.asarray(v).tolist() for k, v in self.probe.items() if k != "layer"},
            "info": self.info}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "Gate":
    probe = {k: np.asarray(v, np.float32) for k, v in d["probe"].items()}
    probe["layer"] = np.int32(d["layer"])
    return cls(probe, float(d["threshold"]), int(d["max_len"]), dict(d.get("info", {})))


def save(path: str, gate: Gate) -> None:
  files.write_text(path, json.dumps(gate.to_json()))


def load(path: str) -> Gate:
  return Gate.from_json(files.read_json(path))


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


def _probe_probs(ctx, *, held_back: float, max_per_split: int, splits: Sequence[str]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, int]]:
  """Fits the per-layer probes on the training side of `ctx.data` and scores CALIBRATION
  and `splits` (each a seeded sample of at most max_per_split; empty ones left out).

  Returns (probes, {split: [L, N] unsafe probabilities}, fit counts).
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top

  config, data = ctx.config, ctx.data
  if not 0.0 < held_back < 1.0:
    raise ValueError(f"held_back={held_back}: must be in (0, 1)")
  rng = np.random.default_rng(int(config.seed))
  take = lambda rows: np.sort(rng.choice(rows, min(max_per_split, len(rows)), replace=False))

  harmful = rng.permutation(data.splits["train"])
  k = max(1, int(round(held_back * len(harmful))))
  if len(harmful) - k < 1:
    raise ValueError(f"held_back={held_back}: leaves no harmful training prompt to fit on")
  safe = np.concatenate([data.splits.get(n, np.zeros(0, np.int64)) for n in (
      "train_benign", "train_borderline", "train_lookalike")]).astype(np.int64)
  fit_h, fit_s = take(harmful[k:]), take(safe)
  rows = {CALIBRATION: np.sort(harmful[:k])}
  rows.update({name: take(data.splits[name]) for name in splits
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
  return probes, probs, {"n_fit_harmful": int(len(fit_h)), "n_fit_safe": int(len(fit_s))}


def measure(ctx, *, recall: float, held_back: float, max_per_split: int) -> dict[str, Any]:
  """Every layer's threshold and the share of every evaluation split it flags."""
  from semsafe_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top

  _, probs, counts = _probe_probs(ctx, held_back=held_back, max_per_split=max_per_split,
                                  splits=splits_lib.EVAL_SPLITS)
  out = gate_table(probs, recall)
  out.update(counts, held_back=float(held_back))
  return out


def fit(ctx, *, recall: float, held_back: float, max_per_split: int) -> Gate:
  """The gate at the chosen layer. Needs look-alike prompts in the data (SELECT_ON)."""
  from semsafe_jax.data.schema import DataError  # pylint: disable=g-import-not-at-top

  if not len(ctx.data.splits.get(SELECT_ON, ())):
    raise DataError(f"gate.use=True: the data has no {SELECT_ON} prompts to choose the "
                    "gate's layer on; add a source with look-alikes (e.g. builtin)")
  probes, probs, counts = _probe_probs(ctx, held_back=held_back, max_per_split=max_per_split,
                                       splits=(SELECT_ON,))
  table = gate_table(probs, recall)
  layer = int(table["chosen_layer"])
  info = {"recall": float(recall), "held_back": float(held_back), **counts,
          "n": table["n"], "flagged": {k: v[layer] for k, v in table["flagged"].items()}}
  return Gate(probe_lib.layer_probe(probes, layer), float(table["threshold"][layer]),
              int(ctx.config.data.max_len), info)


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
