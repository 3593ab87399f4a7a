"""JSON-lines files: the one reader and the one atomic writer every stage uses."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: str | os.PathLike[str], rows: Sequence[dict[str, Any]]) -> None:
  """One JSON object per line, written atomically: readers never see half a file."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  os.replace(tmp, path)
