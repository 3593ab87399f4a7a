"""The fields every experiment config has, with their defaults (mode=experiment).

An experiment file loads this and fills in `experiment.methods`:

  from semsafe_jax.configs import load_sibling
  def get_config():
    c = load_sibling(__file__, "base.py")
    c.experiment.methods = {"semsafe": "configs/methods/semsafe.py", ...}
    return c

Paths (method configs) are relative to the directory the command runs in, as --config is.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.mode = "experiment"
  c.experiment = e = ml_collections.ConfigDict()
  # name -> a main-job config file ("path" or "path:arg"), or
  # {"config": ..., "overrides": ("field=value", ...), "seeds": (...)}.
  e.methods = ml_collections.ConfigDict()
  e.seeds = (0,)  # for methods that do not list their own
  # name -> ("field=value", ...): every method runs once per set; empty = once, as configured.
  e.override_sets = ml_collections.ConfigDict()
  e.overrides = ()  # "field=value" for every cell (e.g. smaller evaluations)
  e.baseline = "lora_sft"  # Δ and paired p-values against this method ("" = none)
  e.safety_metric = "heldout_intent/refusal"  # "[eval:]metric": the scatter's and sweeps' y
  e.overrefusal_metric = "benign/refusal"  # ... and over-refusal, the scatter's x
  e.failure_cases = 5  # per arm and kind in summary.md
  e.shared_dir = ""  # "" = WORKDIR/shared (SBERT cache, and the main job's shared stages)
  e.print_commands = False  # print one command line per cell and exit
  e.collect_only = False  # only build the summary from the finished cells
  e.keep_going = True  # a failed cell does not stop the others (the run fails at the end)
  e.overwrite = False  # rerun cells whose workdir holds another config, from scratch
  e.python = ""  # interpreter that runs the cells; "" = this one
  return c
