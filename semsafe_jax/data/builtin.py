"""The built-in data files shipped in semsafe_jax/data/builtin/, and the refusals.

Read through importlib.resources so they work from a wheel or an editable install.
This module only reads files; `loaders.load_builtin` turns the prompt files into
`Prompt`s (so loaders imports this module, never the other way round).

  prompts.jsonl             harmful, borderline and benign prompts
  lookalikes.jsonl          benign look-alikes of the harmful intents (`topic` = intent_id)
  unlabeled.jsonl           the unlabelled pool (id, text): rule-based rewrites, no labels
  unlabeled_labels.jsonl    the pool's hidden labels, for evaluation only
  refusals.jsonl            refusal texts used as training targets
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
from typing import Any

from absl import logging

from semsafe_jax.data.schema import LABELS, UNLABELED, DataError

PROMPTS_FILE = "prompts.jsonl"
LOOKALIKES_FILE = "lookalikes.jsonl"
UNLABELED_FILE = "unlabeled.jsonl"
UNLABELED_LABELS_FILE = "unlabeled_labels.jsonl"
REFUSALS_FILE = "refusals.jsonl"
# Source spec "builtin[:PART]" -> files. Plain "builtin" is the labelled data; the
# unlabelled pool is a separate source, so adding it is an explicit choice.
PARTS = {
    "": (PROMPTS_FILE, LOOKALIKES_FILE),
    "prompts": (PROMPTS_FILE,),
    "lookalikes": (LOOKALIKES_FILE,),
    "unlabeled": (UNLABELED_FILE,),
}
HIDDEN_LABEL_FIELDS = ("id", "label", "category", "intent_id", "topic", "style", "source_id")


@dataclasses.dataclass(frozen=True)
class Refusal:
  id: str
  text: str
  category: str = ""


def read_package_file(name: str) -> bytes:
  """The bytes of semsafe_jax/data/builtin/<name>; a one-line error when it is missing."""
  resource = importlib.resources.files("semsafe_jax.data").joinpath("builtin", name)
  try:
    return resource.read_bytes()
  except (FileNotFoundError, NotADirectoryError):
    raise DataError(f"Built-in data file semsafe_jax/data/builtin/{name} is missing; "
                    "reinstall semsafe_jax (pip install -e .)") from None


def builtin_available(name: str = PROMPTS_FILE) -> bool:
  """Whether the package ships data file `name` (tests skip cleanly without it)."""
  return importlib.resources.files("semsafe_jax.data").joinpath("builtin", name).is_file()


def _jsonl_objects(data: bytes, where: str) -> list[tuple[int, dict[str, Any]]]:
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: undecodable bytes (not UTF-8) at byte {e.start}") from None
  out = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}, line {n}: invalid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{where}, line {n}: expected a JSON object")
    out.append((n, obj))
  return out


def load_unlabeled_labels() -> dict[str, dict[str, str]]:
  """The unlabelled pool's hidden labels, by prompt id: for evaluation code only.

  Each record has `HIDDEN_LABEL_FIELDS`: label (harmful | benign | borderline), category,
  intent_id and topic of the built-in prompt it was rewritten from, the rewrite style,
  and that prompt's id (source_id). Training code must never read this file.
  """
  where = f"builtin/{UNLABELED_LABELS_FILE}"
  labels: dict[str, dict[str, str]] = {}
  for n, obj in _jsonl_objects(read_package_file(UNLABELED_LABELS_FILE), where):
    rec = {f: str(obj.get(f) or "") for f in HIDDEN_LABEL_FIELDS}
    if not rec["id"]:
      raise DataError(f"{where}, line {n}: empty id")
    if rec["label"] not in LABELS or rec["label"] == UNLABELED:
      raise DataError(f"{where}, line {n}: label {rec['label']!r}; expected harmful, benign "
                      "or borderline")
    if rec["id"] in labels:
      raise DataError(f"{where}, line {n}: duplicate id {rec['id']!r}")
    labels[rec["id"]] = rec
  return labels


def parse_refusals(data: bytes, where: str) -> list[Refusal]:
  """Refusals from JSONL (id, text, category) or, for a .txt file, one per line."""
  if where.endswith(".txt"):
    try:
      text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
      raise DataError(f"{where}: undecodable bytes (not UTF-8) at byte {e.start}") from None
    refusals = [Refusal(id=f"{pathlib.Path(where).stem}:{n}", text=line.strip())
                for n, line in enumerate(text.splitlines(), 1) if line.strip()]
  else:
    refusals = []
    for n, obj in _jsonl_objects(data, where):
      if not str(obj.get("text", "")).strip():
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
    return parse_refusals(read_package_file(REFUSALS_FILE), f"builtin/{REFUSALS_FILE}")
  p = pathlib.Path(path).expanduser()
  try:
    return parse_refusals(p.read_bytes(), str(p))
  except OSError as e:
    raise DataError(f"Cannot read refusals file {p}: {e.strerror or e}") from None
