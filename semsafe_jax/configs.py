"""Config files build on each other: one loader instead of a copy in every file.

  from semsafe_jax.configs import load_sibling
  def get_config():
    c = load_sibling(__file__, "default.py")   # or "../default.py" from configs/methods/
    c.train.steps = 50
    return c
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def load_config(path: str, arg: str | None = None) -> Any:
  """`get_config()` (or `get_config(arg)`) of the config file at `path`."""
  name = "semsafe_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"No config file at {path}")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config() if arg is None else mod.get_config(arg)


def load_sibling(this_file: str, relpath: str, arg: str | None = None) -> Any:
  """The config at `relpath`, relative to the folder of the calling config file."""
  return load_config(os.path.join(os.path.dirname(os.path.abspath(this_file)), relpath), arg)


def cfg_get(cfg: Any, name: str, default: Any = None) -> Any:
  """A field of a ConfigDict, a dict (a run's saved config) or a dataclass alike."""
  if cfg is None:
    return default
  if hasattr(cfg, "get"):
    return cfg.get(name, default)
  return getattr(cfg, name, default)
