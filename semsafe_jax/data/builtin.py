"""The built-in prompts and refusals shipped in semsafe_jax/data/builtin/.

Read through importlib.resources so they work from a wheel or an editable install.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib

from absl import logging

from semsafe_jax.data.loaders import LoadResult, read_prompt_table
from semsafe_jax.data.schema import DataError, Prompt

PROMPTS_FILE = "prompts.jsonl"
REFUSALS_FILE = "refusals.jsonl"


@dataclasses.dataclass(frozen=True)
class Refusal:
  id: str
  text: str
  category: str = ""


def _read_package_file(name: str) -> bytes:
  resource = importlib.resources.files("semsafe_jax.data").joinpath("builtin", name)
  try:
    return resource.read_bytes()
  except (FileNotFoundError, NotADirectoryError):
    raise DataError(f"Built-in data file semsafe_jax/data/builtin/{name} is missing; "
                    "reinstall semsafe_jax (pip install -e .)") from None


def builtin_available() -> bool:
  """Whether the package ships its prompts file (tests skip cleanly without it)."""
  return importlib.resources.files("semsafe_jax.data").joinpath("builtin", PROMPTS_FILE).is_file()


def load_builtin(on_bad_rows: str = "error") -> LoadResult:
  """The built-in prompts with their load summary (kept / skipped counts)."""
  return read_prompt_table(_read_package_file(PROMPTS_FILE), f"builtin/{PROMPTS_FILE}",
                           source="builtin", on_bad_rows=on_bad_rows)


def load_builtin_prompts(on_bad_rows: str = "error") -> list[Prompt]:
  """All built-in prompts (harmful, benign, borderline) with source 'builtin'."""
  return load_builtin(on_bad_rows).prompts


def parse_refusals(data: bytes, where: str) -> list[Refusal]:
  """Refusals from JSONL (id, text, category) or, for a .txt file, one per line."""
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: undecodable bytes (not UTF-8) at byte {e.start}") from None
  refusals = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    if where.endswith(".txt"):
      refusals.append(Refusal(id=f"{pathlib.Path(where).stem}:{n}", text=line.strip()))
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}, line {n}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict) or not str(obj.get("text", "")).strip():
      raise DataError(f"{where}, line {n}: expected an object with a non-empty 'text'")
    refusals.append(Refusal(id=str(obj.get("id") or n), text=str(obj["text"]).strip(),
                            category=str(obj.get("category") or "")))
  if not refusals:
    raise DataError(f"{where}: no refusals")
  logging.info("%s: %d refusals", where, len(refusals))
  return refusals


def load_refusals(path: str = "builtin") -> list[Refusal]:
  """The built-in refusal texts, or those of a user .jsonl/.txt file."""
  if path == "builtin":
    return parse_refusals(_read_package_file(REFUSALS_FILE), f"builtin/{REFUSALS_FILE}")
  p = pathlib.Path(path).expanduser()
  try:
    return parse_refusals(p.read_bytes(), str(p))
  except OSError as e:
    raise DataError(f"Cannot read refusals file {p}: {e.strerror or e}") from None
