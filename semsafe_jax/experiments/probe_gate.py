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

from absl import app
from absl import flags
from ml_collections import config_flags

from semsafe_jax.probes import gate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Main-job config file (data, model).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the data caches and the result go.")
_RECALL = flags.DEFINE_float("recall", 0.97, "share of held-back harmful prompts kept flagged")
_HELD_BACK = flags.DEFINE_float("held_back", 0.2, "share of harmful training prompts held back")
_MAX_PER_SPLIT = flags.DEFINE_integer("max_per_split", 400,
                                      "prompts per split and side (a seeded sample)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from semsafe_jax import errors  # pylint: disable=g-import-not-at-top
  from semsafe_jax import files  # pylint: disable=g-import-not-at-top
  from semsafe_jax.jobs import train as train_job  # pylint: disable=g-import-not-at-top
  from semsafe_jax.train import sharding  # pylint: disable=g-import-not-at-top

  # One line each, before any model work.
  if not 0.0 < _HELD_BACK.value < 1.0:
    raise SystemExit(f"probe_gate: --held_back={_HELD_BACK.value}: must be in (0, 1)")
  if not 0.0 < _RECALL.value <= 1.0:
    raise SystemExit(f"probe_gate: --recall={_RECALL.value}: must be in (0, 1]")
  config = _CONFIG.value
  try:
    workdir = files.resolve_workdir(_WORKDIR.value)  # as the main job resolves it
  except errors.WorkdirError as e:
    raise SystemExit(f"probe_gate: {e}") from None
  mesh = sharding.make_mesh(dict(config.train.get("mesh", {}) or {}))
  ctx = train_job.method_context(config, workdir, mesh)
  result = gate.measure(ctx, recall=_RECALL.value, held_back=_HELD_BACK.value,
                        max_per_split=_MAX_PER_SPLIT.value)
  files.dump_json(os.path.join(workdir, "probe_gate.json"), result, indent=1)
  print(f"Share of each split flagged at the threshold that keeps {_RECALL.value:.0%} of "
        f"{result['n'][gate.CALIBRATION]} held-back harmful training prompts flagged "
        f"(probe fit on {result['n_fit_harmful']} harmful and {result['n_fit_safe']} benign, "
        f"borderline and look-alike training prompts):\n")
  print(gate.markdown(result))


if __name__ == "__main__":
  app.run(main)
