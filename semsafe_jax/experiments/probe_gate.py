"""Could a probe gate the safety adapters? Harmful requests against their benign look-alikes,
layer by layer, in the frozen model's prompt states.

  python -m semsafe_jax.experiments.probe_gate --config=configs/default.py \
      --workdir=runs/probe_gate [--recall=0.97] [--config.FIELD=VALUE ...]

A gate would apply the adapters only to prompts that a probe on the frozen model flags; a
prompt it lets through gets the base model's answer. Whether that can cut over-refusal on
look-alikes without losing refusals depends on how well the probe tells the two apart,
which this measures before anything is built or trained.

The probe is the safety probe's (probes/safety.py: per-layer, class-balanced logistic
regression on mean-pooled prompt states), trained on the training side only: the harmful
training prompts less a held-back share (--held_back), against the benign, borderline and
look-alike training prompts. Each layer's threshold keeps --recall of the held-back harmful
prompts flagged; the layer is chosen by the fewest `val_lookalike` prompts flagged (the
split a setting may be chosen on). No evaluation prompt chooses anything. For every
evaluation split the table gives the share flagged: on a harmful split that bounds the gated
model's refusal from above, on a benign one the share its adapters would still see. Writes
W/probe_gate.json and prints the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

CALIBRATION = "train (held back)"
SELECT_ON = "val_lookalike"

_CONFIG = config_flags.DEFINE_config_file("config", None, "Main-job config file (data, model).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the data caches and the result go.")
_RECALL = flags.DEFINE_float("recall", 0.97, "share of held-back harmful prompts kept flagged")
_HELD_BACK = flags.DEFINE_float("held_back", 0.2, "share of harmful training prompts held back")
_MAX_PER_SPLIT = flags.DEFINE_integer("max_per_split", 400,
                                      "prompts per split and side (a seeded sample)")
flags.mark_flags_as_required(["config", "workdir"])


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
  from semsafe_jax.probes import safety as probe_lib  # pylint: disable=g-import-not-at-top
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


def main(argv):
  del argv
  from semsafe_jax import files  # pylint: disable=g-import-not-at-top
  from semsafe_jax.jobs import train as train_job  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import sharding  # pylint: disable=g-import-not-at-top

  # One line each, before any model work.
  if not 0.0 < _HELD_BACK.value < 1.0:
    raise SystemExit(f"probe_gate: --held_back={_HELD_BACK.value}: must be in (0, 1)")
  if not 0.0 < _RECALL.value <= 1.0:
    raise SystemExit(f"probe_gate: --recall={_RECALL.value}: must be in (0, 1]")
  config = _CONFIG.value
  workdir = _WORKDIR.value.rstrip("/")
  if not files.is_remote(workdir):  # the stages below need no particular cwd
    workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = sharding.make_mesh(dict(config.train.get("mesh", {}) or {}))
  ctx = train_job.method_context(config, workdir, mesh)
  result = measure(ctx, recall=_RECALL.value, held_back=_HELD_BACK.value,
                   max_per_split=_MAX_PER_SPLIT.value)
  files.dump_json(os.path.join(workdir, "probe_gate.json"), result, indent=1)
  print(f"Share of each split flagged at the threshold that keeps {_RECALL.value:.0%} of "
        f"{result['n'][CALIBRATION]} held-back harmful training prompts flagged "
        f"(probe fit on {result['n_fit_harmful']} harmful and {result['n_fit_safe']} benign, "
        f"borderline and look-alike training prompts):\n")
  print(markdown(result))


if __name__ == "__main__":
  app.run(main)
