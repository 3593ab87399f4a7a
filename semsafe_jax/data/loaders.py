"""Readers for public safety data sets and generic files, all into `Prompt`s.

A source is a spec string from `config.data.sources`:

  builtin                 the package's own labelled prompts (semsafe_jax/data/builtin/):
                          prompts.jsonl and the benign look-alikes of lookalikes.jsonl
  builtin:prompts         prompts.jsonl only (harmful, borderline, benign)
  builtin:lookalikes      lookalikes.jsonl only
  builtin:unlabeled       the built-in unlabelled pool (labels hidden, label "unlabeled")
  advbench:PATH           AdvBench harmful_behaviors.csv (goal, target)
  harmbench:PATH          HarmBench behaviours CSV (Behavior, BehaviorID, ...)
  xstest:PATH             XSTest prompts CSV (prompt, type, label safe|unsafe); eval-only
  jbb:PATH                JailbreakBench behaviours CSV (Goal, Target, Behavior, Category, Source)
  strongreject:PATH       StrongREJECT CSV (category, source, forbidden_prompt)
  csv:PATH | jsonl:PATH | json:PATH   generic files, columns from config.data.columns
  hf:ID                   a Hugging Face `datasets` id (needs `datasets` and a network)

Any spec may end in URL-style options, e.g. "jbb:benign-behaviors.csv?label=benign",
"csv:mine.csv?text_col=prompt&source=redteam", "hf:org/name?split=train&config=x&format=jbb".

Every source, builtin included, takes ?frac=F (0 < F <= 1): keep only the intents whose
sha256(intent_id), read as a number in [0, 1), is below F, so about that share of the
source. Whole intents are kept or dropped together (the heldout-intent and
heldout-phrasing splits still work), a look-alike goes with its topic's intent (its
`topic` is hashed instead), the choice depends on nothing but the intent ids
(not load order, seeds or other sources), and a smaller F keeps a subset of a larger
one. configs/tiny.py runs on "builtin?frac=..." to exercise the whole path on a slice.

Labels are harmful | benign | borderline | unlabeled. "unlabeled" (e.g.
"jsonl:scraped.jsonl?label=unlabeled", or a label column / config.data.default_label
saying so) marks prompts of unknown harm: they go to the training-only split
train_unlabeled, are never evaluated, and are trained on only with
probe.use="flag_unlabeled", as harmful, when the safety probe flags them. The
built-in labelled data is "builtin"; "builtin:unlabeled" adds its unlabelled pool, whose
hidden labels only evaluation code reads (`builtin.load_unlabeled_labels`).

A `topic` column (generic files; "builtin" has it) marks benign look-alikes: benign or
borderline prompts on the topic of the harmful intent it names (see splits.py).

Every row problem (missing text, duplicate, bad bytes, unknown label, ...) is a
`DataError` naming the file and row, unless on_bad_rows="warn", in which case it is
counted, logged and skipped. Every load logs how many rows were kept and skipped.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import urllib.parse
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging

from semsafe_jax.data import builtin
from semsafe_jax.data.schema import (
  UNLABELED,
  DataError,
  Prompt,
  RowIssues,
  text_key,
  validate_prompt,
)

FILE_KINDS = ("advbench", "harmbench", "xstest", "jbb", "strongreject", "csv", "jsonl", "json")
KINDS = ("builtin", *FILE_KINDS, "hf")
FIELDS = ("id", "text", "label", "category", "intent_id", "style", "source", "topic")
DEFAULT_COLUMNS = {f: f for f in FIELDS}
_OPTIONS = {"label", "source", "split", "config", "format", "frac",
            *(f"{f}_col" for f in FIELDS)}


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  kind: str
  target: str  # file path or HF dataset id; "" for builtin
  options: Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class LoadResult:
  prompts: list[Prompt]
  summary: dict[str, Any]  # where, kept, skipped, skipped_by_reason


def parse_source(spec: str) -> SourceSpec:
  """'kind:target?opt=v&...' (or 'builtin?frac=F') -> SourceSpec; a clear error for
  anything malformed."""
  head, _, query = spec.strip().partition("?")
  kind, _, target = head.partition(":")
  kind = kind.lower()
  if kind not in KINDS:
    raise DataError(f"Unknown data source {spec!r}: kind must be one of {', '.join(KINDS)}")
  try:
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True,
                                          strict_parsing=bool(query)))
  except ValueError as e:
    raise DataError(f"Data source {spec!r}: bad options {query!r} ({e})") from None
  unknown = sorted(set(options) - _OPTIONS)
  if unknown:
    raise DataError(f"Data source {spec!r}: unknown option(s) {unknown}; known: {sorted(_OPTIONS)}")
  # The pool may say what it is (?label=unlabeled), as data.unlabeled_sources entries do.
  pool_label = target == "unlabeled" and options.get("label", UNLABELED) == UNLABELED
  if kind == "builtin" and (target not in builtin.PARTS or
                            set(options) - {"frac", *(("label",) if pool_label else ())}):
    parts = ", ".join(f"builtin:{p}" for p in builtin.PARTS if p)
    raise DataError(f"Data source {spec!r}: 'builtin' takes no path (only a part: {parts}) "
                    "and no option but frac")
  if kind != "builtin" and not target:
    raise DataError(f"Data source {spec!r}: expected {kind}:{'ID' if kind == 'hf' else 'PATH'}")
  if kind == "xstest" and "source" in options:
    raise DataError(f"Data source {spec!r}: XSTest is always source 'xstest' (evaluation only)")
  _frac(spec, options)  # a bad value fails here, before anything is read
  return SourceSpec(kind, target, options)


def _frac(spec: str, options: Mapping[str, str]) -> float | None:
  """The ?frac= option as a float in (0, 1], or None when absent."""
  raw = options.get("frac")
  if raw is None:
    return None
  try:
    frac = float(raw)
  except ValueError:
    frac = float("nan")
  if not 0.0 < frac <= 1.0:  # also catches nan
    raise DataError(f"Data source {spec!r}: frac={raw!r}; expected a number with 0 < frac <= 1")
  return frac


def intent_draw(intent_id: str) -> float:
  """A fixed number in [0, 1) per intent id (sha256): no RNG state, no load order."""
  digest = hashlib.sha256(intent_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def sample_intents(prompts: Sequence[Prompt], frac: float) -> list[Prompt]:
  """The prompts whose intent's `intent_draw` is below `frac`, in their order; a look-alike
  is drawn by its topic, so it stays with the harmful intent it resembles."""
  return [p for p in prompts if intent_draw(p.topic or p.intent_id or p.id) < frac]


# ----------------------------------------------------------------------------- raw rows


@dataclasses.dataclass(frozen=True)
class _Row:
  loc: str  # "row 3 (line 4)", "line 7", ...
  values: Mapping[str, Any]
  problem: str = ""  # set when the row cannot be read at all


@dataclasses.dataclass(frozen=True)
class _Table:
  columns: Sequence[str]
  rows: Iterator[_Row]


def _decode(data: bytes, issues: RowIssues) -> tuple[str, set[int]]:
  """UTF-8 text and the 1-based numbers of lines holding undecodable bytes."""
  try:
    return data.decode("utf-8-sig"), set()
  except UnicodeDecodeError:
    pass
  bad_lines = set()
  for n, line in enumerate(data.split(b"\n"), 1):
    try:
      line.decode("utf-8")
    except UnicodeDecodeError as e:
      bad_lines.add(n)
      if issues.policy == "error":
        issues.bad_row(f"line {n}", f"undecodable bytes (not UTF-8) at byte {e.start} of the line")
  return data.decode("utf-8-sig", errors="replace"), bad_lines


def _read_csv(data: bytes, issues: RowIssues) -> _Table:
  text, bad_lines = _decode(data, issues)
  reader = csv.DictReader(io.StringIO(text, newline=""))
  if not reader.fieldnames:
    raise DataError(f"{issues.where}: empty file (no CSV header)")
  header = [c.strip() for c in reader.fieldnames]
  reader.fieldnames = header

  def rows() -> Iterator[_Row]:
    n, start = 0, reader.line_num + 1
    while True:
      try:
        values = next(reader)
      except StopIteration:
        return
      except csv.Error as e:  # e.g. a field over csv.field_size_limit: no way to resync
        raise DataError(f"{issues.where}, line {reader.line_num}: malformed CSV ({e})") from None
      n += 1
      end = reader.line_num
      loc = f"row {n} (line {start})"
      problem = ""
      if bad_lines.intersection(range(start, end + 1)):
        problem = "undecodable bytes (not UTF-8)"
      elif None in values or None in values.values():
        problem = f"wrong number of fields (header has {len(header)})"
      yield _Row(loc, values, problem)
      start = end + 1

  return _Table(header, rows())


def _read_jsonl(data: bytes, issues: RowIssues) -> _Table:
  text, bad_lines = _decode(data, issues)
  rows = []
  for n, line in enumerate(text.split("\n"), 1):
    if not line.strip():
      continue
    loc = f"line {n}"
    if n in bad_lines:
      rows.append(_Row(loc, {}, "undecodable bytes (not UTF-8)"))
      continue
    try:
      values = json.loads(line)
    except json.JSONDecodeError as e:
      rows.append(_Row(loc, {}, f"invalid JSON ({e.msg})"))
      continue
    rows.append(_Row(loc, values, "" if isinstance(values, dict) else "not a JSON object"))
  # JSONL has no header: a column is present if any row has it.
  columns = sorted({k for r in rows for k in r.values})
  return _Table(columns, iter(rows))


def _read_json(data: bytes, issues: RowIssues) -> _Table:
  text, bad_lines = _decode(data, issues)
  if bad_lines:  # only reached in warn mode; one bad byte spoils the whole document
    raise DataError(f"{issues.where}: undecodable bytes (not UTF-8) on line {min(bad_lines)}")
  try:
    items = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{issues.where}: invalid JSON at line {e.lineno} ({e.msg})") from None
  if not isinstance(items, list):
    raise DataError(f"{issues.where}: expected a JSON list of objects")
  rows = [_Row(f"item {n}", v, "") if isinstance(v, dict) else
          _Row(f"item {n}", {}, "not a JSON object") for n, v in enumerate(items, 1)]
  columns = sorted({k for r in rows for k in r.values})
  return _Table(columns, iter(rows))


def _read_hf(spec: SourceSpec) -> _Table:
  """A Hugging Face dataset split as rows; a one-line error when it cannot be had."""
  try:
    import datasets  # pylint: disable=g-import-not-at-top; optional and heavy.
  except ImportError:
    raise DataError(f"Source hf:{spec.target} needs the `datasets` package: "
                    "pip install datasets") from None
  split = spec.options.get("split", "train")
  try:
    ds = datasets.load_dataset(spec.target, spec.options.get("config") or None, split=split)
  except Exception as e:  # pylint: disable=broad-except; network, auth, missing id ...
    first = (str(e).strip().splitlines() or [""])[0][:200]
    offline = " (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if _offline() else ""
    raise DataError(f"Could not load Hugging Face dataset {spec.target!r} split {split!r}"
                    f"{offline}: {type(e).__name__}: {first}") from None
  rows = (_Row(f"row {n}", dict(v)) for n, v in enumerate(ds, 1))
  return _Table(list(ds.column_names), rows)


def _offline() -> bool:
  return any(os.environ.get(v, "").lower() in ("1", "true", "yes")
             for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


# ----------------------------------------------------------------------------- formats


@dataclasses.dataclass(frozen=True)
class _Ctx:
  """What a format needs besides the row: naming, options and the column mapping."""

  kind: str
  prefix: str  # id prefix, e.g. "advbench:harmful_behaviors:"
  options: Mapping[str, str]
  columns: Mapping[str, str]
  default_label: str

  def label(self, fallback: str) -> str:
    return (self.options.get("label") or fallback).strip().lower()


def _s(v: Any) -> str:
  return "" if v is None else str(v).strip()


def _advbench(r: Mapping[str, Any], n: int, c: _Ctx) -> Prompt:
  return Prompt(id=f"{c.prefix}{n}", text=_s(r["goal"]), label=c.label("harmful"),
                source=c.options.get("source", "advbench"))


def _harmbench(r: Mapping[str, Any], n: int, c: _Ctx) -> Prompt:
  text, context = _s(r["Behavior"]), _s(r.get("ContextString"))
  if text and context:  # contextual behaviours: HarmBench's own prompt layout
    text = f"{context}\n\n---\n\n{text}"
  bid = _s(r["BehaviorID"]) or str(n)
  return Prompt(id=f"{c.prefix}{bid}", text=text, label=c.label("harmful"),
                category=_s(r.get("SemanticCategory")), intent_id=f"harmbench:{bid}",
                style=_s(r.get("FunctionalCategory")), source=c.options.get("source", "harmbench"))


_XSTEST_LABELS = {"safe": "borderline", "unsafe": "harmful"}


def _xstest(r: Mapping[str, Any], n: int, c: _Ctx) -> Prompt:
  raw = _s(r["label"]).lower()
  if raw not in _XSTEST_LABELS:
    raise DataError(f"unknown label {raw!r} (XSTest labels are safe|unsafe)")
  rid = _s(r.get("id")) or str(n)
  return Prompt(id=f"{c.prefix}{rid}", text=_s(r["prompt"]), label=_XSTEST_LABELS[raw],
                category=_s(r.get("note")) or _s(r["type"]), style=_s(r["type"]), source="xstest")


def _jbb(r: Mapping[str, Any], n: int, c: _Ctx) -> Prompt:
  rid = _s(r.get("Index")) or str(n)
  return Prompt(id=f"{c.prefix}{rid}", text=_s(r["Goal"]), label=c.label("harmful"),
                category=_s(r.get("Category")), source=c.options.get("source", "jbb"))


def _strongreject(r: Mapping[str, Any], n: int, c: _Ctx) -> Prompt:
  return Prompt(id=f"{c.prefix}{n}", text=_s(r["forbidden_prompt"]), label=c.label("harmful"),
                category=_s(r.get("category")), source=c.options.get("source", "strongreject"))


def _generic(r: Mapping[str, Any], n: int, c: _Ctx) -> Prompt:
  def get(field: str) -> str:
    return _s(r.get(c.columns[field]))

  label = (c.options.get("label") or get("label") or c.default_label).lower()
  rid = get("id") or str(n)
  # A source column wins so that re-loading our own prompts.jsonl keeps eval-only
  # sources (xstest) eval-only.
  return Prompt(id=f"{c.prefix}{rid}", text=get("text"), label=label, category=get("category"),
                intent_id=get("intent_id"), style=get("style"),
                source=get("source") or c.options.get("source", c.kind), topic=get("topic"))


@dataclasses.dataclass(frozen=True)
class _Format:
  required: tuple[str, ...]  # column names; "<text>"/"<label>" are resolved via the mapping
  make: Callable[[Mapping[str, Any], int, _Ctx], Prompt]


_FORMATS = {
    "advbench": _Format(("goal",), _advbench),
    "harmbench": _Format(("Behavior", "BehaviorID"), _harmbench),
    "xstest": _Format(("prompt", "type", "label"), _xstest),
    "jbb": _Format(("Goal",), _jbb),
    "strongreject": _Format(("forbidden_prompt",), _strongreject),
    "generic": _Format(("<text>", "<label>"), _generic),
}


def _columns(spec: SourceSpec, columns: Mapping[str, str] | None) -> dict[str, str]:
  cols = dict(DEFAULT_COLUMNS)
  cols.update({k: v for k, v in (columns or {}).items() if v})
  cols.update({k[: -len("_col")]: v for k, v in spec.options.items() if k.endswith("_col")})
  return cols


def _required(fmt: _Format, ctx: _Ctx) -> list[str]:
  out = []
  for col in fmt.required:
    if col == "<text>":
      out.append(ctx.columns["text"])
    elif col == "<label>":
      if not (ctx.options.get("label") or ctx.default_label):
        out.append(ctx.columns["label"])
    else:
      out.append(col)
  return out


def _to_prompts(table: _Table, fmt: _Format, ctx: _Ctx, issues: RowIssues) -> list[Prompt]:
  missing = [c for c in _required(fmt, ctx) if c not in table.columns]
  if missing:
    raise DataError(f"{issues.where}: missing column(s) {missing} for format {ctx.kind!r} "
                    f"(found: {list(table.columns)})")
  prompts: list[Prompt] = []
  seen_text: dict[str, str] = {}
  seen_id: dict[str, str] = {}
  for n, row in enumerate(table.rows, 1):
    if row.problem:
      issues.bad_row(row.loc, row.problem)
      continue
    try:
      p = validate_prompt(fmt.make(row.values, n, ctx))
    except DataError as e:
      issues.bad_row(row.loc, str(e))
      continue
    key = text_key(p.text)
    if key in seen_text:
      issues.bad_row(row.loc, f"duplicate text (same as {seen_text[key]})")
      continue
    if p.id in seen_id:
      issues.bad_row(row.loc, f"duplicate id {p.id!r} (same as {seen_id[p.id]})")
      continue
    seen_text[key], seen_id[p.id] = row.loc, row.loc
    prompts.append(p)
  return prompts


def _read_file(path: pathlib.Path, kind: str, issues: RowIssues) -> _Table:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DataError(f"Cannot read data file {path}: {e.strerror or e}") from None
  reader = {"jsonl": _read_jsonl, "json": _read_json}.get(kind, _read_csv)
  return reader(data, issues)


def read_prompt_table(data: bytes, where: str, *, kind: str = "jsonl", source: str,
                      id_prefix: str = "", on_bad_rows: str = "error",
                      label: str = "") -> LoadResult:
  """Reads our own schema (id, text, label, ...) from bytes; used for built-in data.

  label: given, every row gets it (e.g. "unlabeled" for a file without labels).
  """
  issues = RowIssues(where, on_bad_rows)
  reader = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv}[kind]
  options = {"source": source, **({"label": label} if label else {})}
  ctx = _Ctx(kind, id_prefix, options, dict(DEFAULT_COLUMNS), "")
  prompts = _to_prompts(reader(data, issues), _FORMATS["generic"], ctx, issues)
  issues.log_summary(len(prompts))
  return LoadResult(prompts, issues.summary(len(prompts)))


def load_builtin(part: str = "", on_bad_rows: str = "error") -> LoadResult:
  """The built-in prompts of `part` ("" = prompts + look-alikes, "prompts", "lookalikes",
  "unlabeled"), with source "builtin" and unique ids and texts across their files."""
  if part not in builtin.PARTS:
    raise DataError(f"builtin part {part!r}; expected one of {sorted(builtin.PARTS)}")
  results = [read_prompt_table(builtin.read_package_file(name), f"builtin/{name}",
                               source="builtin", on_bad_rows=on_bad_rows,
                               label=UNLABELED if part == "unlabeled" else "")
             for name in builtin.PARTS[part]]
  if len(results) == 1:
    return results[0]
  where = "builtin/" + "+".join(builtin.PARTS[part])
  prompts, issues = _unique_across([p for r in results for p in r.prompts], where, on_bad_rows)
  skipped = sum(r.summary["skipped"] for r in results) + issues.num_skipped
  reasons: dict[str, int] = {}
  for summary in [r.summary for r in results] + [issues.summary(len(prompts))]:
    for k, n in summary["skipped_by_reason"].items():
      reasons[k] = reasons.get(k, 0) + n
  return LoadResult(prompts, {"where": where, "kept": len(prompts), "skipped": skipped,
                              "skipped_by_reason": reasons})


def _unique_across(prompts: Sequence[Prompt], where: str,
                   on_bad_rows: str) -> tuple[list[Prompt], RowIssues]:
  """`prompts` minus repeated ids or texts (a `DataError`, or skipped in warn mode)."""
  issues = RowIssues(where, on_bad_rows)
  kept: list[Prompt] = []
  seen_text: dict[str, str] = {}
  seen_id: set[str] = set()
  for p in prompts:
    key = text_key(p.text)
    if p.id in seen_id:
      issues.bad_row(f"prompt {p.id!r}", "duplicate id (given by two sources)")
    elif key in seen_text:
      issues.bad_row(f"prompt {p.id!r}", f"duplicate text (same as {seen_text[key]!r})")
    else:
      seen_text[key] = p.id
      seen_id.add(p.id)
      kept.append(p)
  issues.log_summary(len(kept))
  return kept, issues


def load_source(spec: str | SourceSpec, *, on_bad_rows: str = "error",
                columns: Mapping[str, str] | None = None, default_label: str = "") -> LoadResult:
  """Loads one source spec into validated prompts (unique ids and texts within it)."""
  spec = parse_source(spec) if isinstance(spec, str) else spec
  result = _load_all(spec, on_bad_rows=on_bad_rows, columns=columns, default_label=default_label)
  frac = _frac(f"{spec.kind}:{spec.target}", spec.options)
  if frac is None:
    return result
  kept = sample_intents(result.prompts, frac)
  intents = lambda ps: len({p.intent_id for p in ps})
  logging.info("%s: frac=%g keeps %d of %d prompts (%d of %d intents)", result.summary["where"],
               frac, len(kept), len(result.prompts), intents(kept), intents(result.prompts))
  summary = {**result.summary, "kept": len(kept), "frac": frac,
             "sampled_out": len(result.prompts) - len(kept)}
  return LoadResult(kept, summary)


def _load_all(spec: SourceSpec, *, on_bad_rows: str, columns: Mapping[str, str] | None,
              default_label: str) -> LoadResult:
  """Every valid prompt of the source, before ?frac= sampling."""
  if spec.kind == "builtin":
    return load_builtin(spec.target, on_bad_rows=on_bad_rows)
  default_label = default_label.strip().lower()
  if spec.kind == "hf":
    where = f"hf:{spec.target}[{spec.options.get('split', 'train')}]"
    issues = RowIssues(where, on_bad_rows)
    table = _read_hf(spec)
    fmt_name = spec.options.get("format", "generic")
    prefix = f"hf:{spec.target}:{spec.options.get('split', 'train')}:"
  else:
    path = pathlib.Path(spec.target).expanduser()
    where = str(path)
    if spec.kind == "jbb" and "label" not in spec.options and "benign" in path.stem.lower():
      # JailbreakBench ships benign-behaviors.csv in the harmful file's format;
      # labelling it harmful would train refusals of benign requests.
      logging.info("%s: JailbreakBench benign file, labelling rows benign (?label= overrides)",
                   path)
      spec = dataclasses.replace(spec, options={**spec.options, "label": "benign"})
    issues = RowIssues(where, on_bad_rows)
    table = _read_file(path, spec.kind, issues)
    fmt_name = "generic" if spec.kind in ("csv", "jsonl", "json") else spec.kind
    prefix = f"{spec.kind}:{path.stem}:"
  if fmt_name not in _FORMATS:
    raise DataError(f"Data source {spec.kind}:{spec.target}: unknown format {fmt_name!r}; "
                    f"known: {sorted(_FORMATS)}")
  kind = spec.kind if spec.kind != "hf" or fmt_name == "generic" else fmt_name
  ctx = _Ctx(kind, prefix, spec.options, _columns(spec, columns), default_label)
  prompts = _to_prompts(table, _FORMATS[fmt_name], ctx, issues)
  issues.log_summary(len(prompts))
  return LoadResult(prompts, issues.summary(len(prompts)))


def load_sources(specs: Sequence[str], *, on_bad_rows: str = "error",
                 columns: Mapping[str, str] | None = None,
                 default_label: str = "") -> tuple[list[Prompt], list[dict[str, Any]]]:
  """Loads and concatenates sources; ids and texts must be unique across all of them.

  Returns:
    The prompts and one load summary per source plus one for the cross-source check.
  """
  if isinstance(specs, str):
    specs = [specs]
  if not specs:
    raise DataError("config.data.sources is empty")
  prompts: list[Prompt] = []
  summaries = []
  for spec in specs:
    result = load_source(spec, on_bad_rows=on_bad_rows, columns=columns,
                         default_label=default_label)
    prompts.extend(result.prompts)
    summaries.append({"source": spec, **result.summary})
  kept, issues = _unique_across(prompts, "across sources", on_bad_rows)
  summaries.append(issues.summary(len(kept)))
  return kept, summaries
