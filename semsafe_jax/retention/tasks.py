"""The benign task of the retention scenario: (prompt, response) pairs, split by hash.

`config.retention.task_sources` is a tuple of specs:

  builtin:tasks             the shipped task set (data/builtin/tasks.jsonl, make_tasks.py)
  jsonl:PATH, json:PATH     a JSON-lines file, or a JSON list of objects
  PATH                      the same, by extension (.jsonl / .json)

each optionally `?prompt_col=...&response_col=...&id_col=...` (defaults prompt, response,
id), e.g. AlpacaEval's reference outputs: `json:PATH?prompt_col=instruction&response_col=output`.
A row without an id gets `<source>-<row>`. A task is held out when the hash of its id falls
below `retention.heldout_frac`: the same split whatever else is loaded, in every run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np

from semsafe_jax import files
from semsafe_jax.data import builtin
from semsafe_jax.data.schema import DataError

BUILTIN = "builtin:tasks"
TASKS_FILE = "tasks.jsonl"
KINDS = ("builtin", "jsonl", "json")
_OPTIONS = ("prompt_col", "response_col", "id_col")


@dataclasses.dataclass(frozen=True)
class Task:
  id: str
  prompt: str
  response: str
  category: str = ""


@dataclasses.dataclass(frozen=True)
class TaskSplit:
  train: list[Task]
  heldout: list[Task]


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
  """'kind:path?opt=v' (or a bare path) -> (kind, path, options); one-line errors."""
  head, _, query = str(spec).strip().partition("?")
  kind, sep, target = head.partition(":")
  if sep and kind not in KINDS and re.fullmatch(r"[a-z][a-z0-9_]+", kind):
    raise DataError(f"retention.task_sources entry {spec!r}: unknown kind {kind!r}; expected "
                    f"{BUILTIN}, jsonl:PATH, json:PATH or a .jsonl / .json path")
  if not sep or kind not in KINDS:  # a bare path
    kind, target = os.path.splitext(head)[1].lstrip(".").lower(), head
    if kind not in ("jsonl", "json"):
      raise DataError(f"retention.task_sources entry {spec!r}: expected {BUILTIN}, "
                      "jsonl:PATH, json:PATH or a .jsonl / .json path")
  try:
    options = dict(urllib.parse.parse_qsl(query, strict_parsing=bool(query)))
  except ValueError as e:
    raise DataError(f"retention.task_sources entry {spec!r}: bad options {query!r} ({e})"
                    ) from None
  unknown = sorted(set(options) - set(_OPTIONS))
  if unknown:
    raise DataError(f"retention.task_sources entry {spec!r}: unknown option(s) {unknown}; "
                    f"known: {list(_OPTIONS)}")
  if kind == "builtin" and (target != "tasks" or options):
    raise DataError(f"retention.task_sources entry {spec!r}: the built-in set is "
                    f"{BUILTIN!r} (no options)")
  if kind != "builtin" and not target:
    raise DataError(f"retention.task_sources entry {spec!r}: expected {kind}:PATH")
  return kind, target, options


def _objects(data: bytes, kind: str, where: str) -> list[dict[str, Any]]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{where}: not UTF-8 ({e})") from None
  try:
    if kind == "json":
      rows = json.loads(text)
      if not isinstance(rows, list):
        raise DataError(f"{where}: expected a JSON list of objects")
      return rows
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  except json.JSONDecodeError as e:
    raise DataError(f"{where}: not valid {kind.upper()} ({e})") from None


def load_source(spec: str) -> list[Task]:
  """The tasks of one spec, in file order; a bad row is a one-line error naming it."""
  kind, target, options = parse_spec(spec)
  if kind == "builtin":
    where, data, kind = f"semsafe_jax/data/builtin/{TASKS_FILE}", builtin.read_package_file(
        TASKS_FILE), "jsonl"
  else:
    where = os.path.expanduser(target)
    if not files.is_file(where):
      raise DataError(f"retention.task_sources entry {spec!r}: no file at {where}")
    data = files.read_bytes(where)
  cols = {k: options.get(f"{k}_col", k) for k in ("prompt", "response", "id")}
  stem = os.path.splitext(os.path.basename(where))[0]
  out = []
  for i, r in enumerate(_objects(data, kind, where), 1):
    if not isinstance(r, dict):
      raise DataError(f"{where}: row {i} is not an object")
    prompt, response = r.get(cols["prompt"]), r.get(cols["response"])
    if not (isinstance(prompt, str) and prompt.strip() and isinstance(response, str)
            and response.strip()):
      raise DataError(f"{where}: row {i} needs non-empty strings {cols['prompt']!r} and "
                      f"{cols['response']!r}")
    out.append(Task(str(r.get(cols["id"]) or f"{stem}-{i}"), prompt, response,
                    str(r.get("category", "") or "")))
  return out


def load_tasks(specs: Sequence[str]) -> list[Task]:
  """Every source's tasks; ids and prompts must be unique across them."""
  tasks, ids, prompts = [], set(), set()
  for spec in ([specs] if isinstance(specs, str) else list(specs)):
    for t in load_source(spec):
      if t.id in ids or t.prompt in prompts:
        raise DataError(f"retention.task_sources: task {t.id!r} repeats an id or a prompt")
      ids.add(t.id)
      prompts.add(t.prompt)
      tasks.append(t)
  if not tasks:
    raise DataError("retention.task_sources: no tasks loaded")
  return tasks


def heldout_draw(task_id: str) -> float:
  """A fixed number in [0, 1) per task id: the split needs no RNG and no load order."""
  digest = hashlib.sha256(f"task-split:{task_id}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split(tasks: Sequence[Task], heldout_frac: float) -> TaskSplit:
  held = [heldout_draw(t.id) < heldout_frac for t in tasks]
  train = [t for t, h in zip(tasks, held) if not h]
  heldout = [t for t, h in zip(tasks, held) if h]
  if not train or not heldout:
    raise DataError(f"retention.heldout_frac={heldout_frac}: {len(train)} training and "
                    f"{len(heldout)} held-out tasks; both must be non-empty")
  return TaskSplit(train, heldout)


def from_config(config: Any) -> TaskSplit:
  rc = config.retention
  return split(load_tasks(tuple(rc.task_sources)), float(rc.heldout_frac))


def batch_rows(n: int, per_step: int, seed: int, step: int) -> np.ndarray:
  """Row indices of a step's task batch: epochs of seeded permutations, read in order,
  so every task is seen once per epoch; a pure function of (seed, step)."""
  start = step * per_step
  out = []
  while len(out) < per_step:
    epoch, pos = divmod(start + len(out), n)
    perm = np.random.default_rng([seed, 7331, epoch]).permutation(n)
    out.extend(perm[pos:pos + per_step - len(out)].tolist())
  return np.asarray(out, np.int64)
