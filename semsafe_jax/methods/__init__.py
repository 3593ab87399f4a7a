"""Training methods as plug-ins: one module per method, looked up by `config.method.name`.

Each module exposes `prepare(ctx: context.Context) -> base.Prepared` (see base.py). The
main job is the same for every method: data -> model -> method.prepare -> fit -> evaluate.
The smallest example to copy is `lora_sft.py`.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType

# Modules of this package that are not methods.
_NOT_METHODS = frozenset({"base", "common", "context", "paraphrase"})


def names() -> list[str]:
  """Every registered method (the modules of this package)."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__)
                if m.name not in _NOT_METHODS and not m.name.startswith("_"))


def get(name: str) -> ModuleType:
  """The method module for `config.method.name`; a one-line error for an unknown name."""
  if name not in names():
    raise ValueError(f"method.name={name!r}; expected one of {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}")
