"""Adapters as a standalone Orbax checkpoint (params only), for JAX users.

The directory restores with `orbax.checkpoint.StandardCheckpointer().restore`
(or `load_orbax`); `adapter_config.json` beside the arrays records the
hyperparameters needed to apply them (LoRA alpha, the base model).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from semsafe_jax import files
from semsafe_jax.export import staging

Adapters = dict[str, Any]
CONFIG_FILE = "adapter_config.json"


def save_orbax(out_dir: str, adapters: Adapters, *, adapter_config: dict[str, Any]) -> str:
  """Writes `adapters` plus their config JSON; returns out_dir (absolute).

  Written afresh and renamed into place: an existing `out_dir` is replaced only if
  an earlier export wrote it (see `staging.write_export`).
  """
  return staging.write_export(out_dir, {"format": "orbax"},
                              lambda path: write_orbax(path, adapters,
                                                       adapter_config=adapter_config))


def write_orbax(out_dir: str, adapters: Adapters, *, adapter_config: dict[str, Any]) -> str:
  """`save_orbax`'s files at `out_dir`, which must not exist yet (orbax creates it)."""
  out_dir = os.path.abspath(out_dir)
  tree = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)  # host copy, one dtype
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out_dir, tree)
  ckptr.wait_until_finished()
  with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
    json.dump(adapter_config, f, indent=2, sort_keys=True)
  return out_dir


def load_orbax(path: str) -> tuple[Adapters, dict[str, Any]]:
  """(adapters, adapter_config) from a `save_orbax` directory."""
  path = path if files.is_remote(path) else os.path.abspath(path)
  adapters = ocp.StandardCheckpointer().restore(path)
  return adapters, files.read_json(os.path.join(path, CONFIG_FILE))
