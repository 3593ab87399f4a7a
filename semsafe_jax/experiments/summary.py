"""Finished cells -> W/summary.md, summary.csv, summary.json (and the plots, via plots.py).

Per (arm, evaluation, metric): the mean over seeds with a 95% interval (Student t across
seeds, clipped to [0, 1] for rates; with one seed, Wilson on the cell's own k/n for a rate).
The base model's ("before") numbers come from one cell: its greedy answers are the same in
every seed. Against the baseline arm
(experiment.baseline with the same override set), on the same prompts: the difference and a
paired p-value, McNemar (exact) on the per-prompt refusal decisions pooled over the seeds
both arms ran, or a paired bootstrap on per-prompt values for metrics whose rows carry them.
summary.md ends with failure cases per arm: harmful prompts still answered and benign or
borderline prompts refused, with the answers.

Reads each cell's report.json and evals/<eval>.jsonl as docs of the evaluation contract say;
a workdir from a main job that predates per-evaluation reports (report.json with
before/after refusal rates per split, answers_{before,after}.jsonl) reads as one evaluation
named "splits".
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from semsafe_jax import files
from semsafe_jax.eval import stats
from semsafe_jax.experiments.grid import DONE, Cell
from semsafe_jax.files import read_jsonl

BASE_ARM = "base model"  # the "before" column: the frozen model every arm starts from
ALIGNED_ARM = "aligned model"  # ... in the retention scenario, where that is a safety run
HISTORY_FILE = "train_history.jsonl"
LEGACY_EVAL = "splits"
_LEGACY_LABEL = {"heldout_intent": "harmful", "heldout_phrasing": "harmful",
                 "eval_only_harmful": "harmful", "benign": "benign",
                 "eval_only_benign": "benign", "borderline": "borderline",
                 "eval_only_borderline": "borderline"}
_LEGACY_JUDGE = "string_match"
_CSV_FIELDS = ("arm", "method", "override_set", "stage", "eval", "metric", "judge", "seeds",
               "mean", "lo", "hi", "interval", "n", "baseline", "diff", "diff_lo", "diff_hi",
               "p", "test", "pairs")


# ----------------------------------------------------------------------------
# Reading cells.


@dataclasses.dataclass
class CellResult:
  cell: Cell
  report: dict[str, Any]  # contract form (see module docstring)
  config: dict[str, Any]
  _rows: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

  def primary_judge(self, eval_name: str | None = None) -> str | None:
    """The judge behind "<group>/refusal": the evaluation's first, else the config's."""
    judges = self.report["evals"].get(eval_name, {}).get("judges") or self.config.get("judges")
    return judges[0] if judges else None

  def rows(self, eval_name: str) -> list[dict[str, Any]]:
    """Per-prompt rows of one evaluation (W/evals/<eval>.jsonl), read once."""
    if eval_name not in self._rows:
      path = os.path.join(self.cell.workdir, "evals", f"{eval_name}.jsonl")
      if files.is_file(path):
        self._rows[eval_name] = read_jsonl(path)
      elif eval_name == LEGACY_EVAL and "evals" not in _read_report_raw(self.cell):
        self._rows[eval_name] = _legacy_rows(self.cell.workdir)
      else:
        self._rows[eval_name] = []
    return self._rows[eval_name]


def _read_report_raw(cell: Cell) -> dict[str, Any]:
  return files.read_json(os.path.join(cell.workdir, "report.json"))


def load_result(cell: Cell) -> CellResult:
  raw = _read_report_raw(cell)
  cfg_path = os.path.join(cell.workdir, "config.json")
  config = files.read_json(cfg_path) if files.is_file(cfg_path) else {}
  report = raw if "evals" in raw else _legacy_report(raw)
  return CellResult(cell, report, config)


def _legacy_report(raw: Mapping[str, Any]) -> dict[str, Any]:
  def metrics(stage):
    out = {}
    for split, s in raw.get(stage, {}).items():
      n = int(s["n"])
      out[f"{split}/refusal"] = {"value": float(s["refusal_rate"]), "n": n,
                                 "ci95": s.get("ci95"), "judge": _LEGACY_JUDGE,
                                 "k": int(round(float(s["refusal_rate"]) * n))}
    return out

  steps = int(raw.get("steps", 0) or 0)
  seconds = float(raw.get("train_seconds", 0.0) or 0.0)
  return {"method": raw.get("method", ""), "model": raw.get("model", ""),
          "evals": {LEGACY_EVAL: {"type": "refusal", "before": metrics("before"),
                                  "after": metrics("after")}},
          "train": {"steps": steps, "seconds": seconds,
                    "seconds_per_step": seconds / steps if steps else None,
                    "final_metrics": raw.get("final_metrics", {})},
          "efficiency": {"trainable_params": raw.get("trainable_params"),
                         "total_params": raw.get("total_params")}}


def _legacy_rows(workdir: str) -> list[dict[str, Any]]:
  rows = []
  for model in ("before", "after"):
    path = os.path.join(workdir, f"answers_{model}.jsonl")
    if files.is_file(path):
      rows += [{"model": model, "group": r["split"], "key": r["prompt"], "prompt": r["prompt"],
                "completion": r["completion"], "label": _LEGACY_LABEL.get(r["split"], ""),
                "judges": {_LEGACY_JUDGE: bool(r["refused"])}} for r in read_jsonl(path)]
  return rows


def read_history(workdir: str) -> list[dict[str, float]]:
  """Training metrics per logged step: W/train_history.jsonl, else W/tensorboard events."""
  path = os.path.join(workdir, HISTORY_FILE)
  if files.is_file(path):
    return sorted(read_jsonl(path), key=lambda m: m.get("step", 0))
  by_step: dict[int, dict[str, float]] = collections.defaultdict(dict)
  logs = files.as_path(workdir) / "tensorboard"
  for f in sorted(logs.glob("events.out.tfevents.*") if logs.is_dir() else [], key=str):
    for step, tag, value in _tb_scalars(f):
      by_step[step][tag.removeprefix("train/")] = value
  return [{"step": s, **m} for s, m in sorted(by_step.items())]


def _tb_scalars(path: str):
  """(step, tag, value) of every scalar in a TensorBoard event file (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data = files.read_bytes(path)
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    start, pos = pos + 12, pos + 12 + length + 4  # length, its CRC, record, its CRC
    if pos > len(data):
      break  # a record still being written
    ev = event_pb2.Event()
    ev.ParseFromString(data[start:start + length])
    for v in ev.summary.value:
      if v.HasField("simple_value"):
        yield int(ev.step), v.tag, float(v.simple_value)


# ----------------------------------------------------------------------------
# Numbers.


def _is_rate(metric: Mapping[str, Any]) -> bool:
  return metric.get("k") is not None


def _interval(values: Sequence[float], metrics: Sequence[Mapping[str, Any]]
              ) -> tuple[float, float | None, float | None, str | None]:
  """(mean, lo, hi, kind): t across seeds; one seed: Wilson for a rate, else its own CI."""
  if len(values) >= 2:
    r = stats.mean_ci(values)
    if all(_is_rate(m) for m in metrics):  # a rate's interval stays inside [0, 1]
      return r.mean, max(0.0, r.lo), min(1.0, r.hi), "t"
    return r.mean, r.lo, r.hi, "t"
  m = metrics[0]
  if _is_rate(m) and m.get("n"):
    lo, hi = stats.wilson_ci(int(m["k"]), int(m["n"]))
    return float(values[0]), lo, hi, "wilson"
  if m.get("ci95"):
    return float(values[0]), float(m["ci95"][0]), float(m["ci95"][1]), "report"
  return float(values[0]), None, None, None


def _decision_spec(name: str, metric: Mapping[str, Any], primary: str | None
                   ) -> tuple[str, str | None] | None:
  """A refusal-rate metric -> (row group, judge); None for other metrics."""
  if "/refusal" not in name:
    return None
  group, rest = name.split("/refusal", 1)
  judge = rest[1:] if rest.startswith("@") else (metric.get("judge") or primary)
  return group, judge


def _decisions(res: CellResult, eval_name: str, group: str, judge: str | None
               ) -> dict[str, bool]:
  out = {}
  for r in res.rows(eval_name):
    if r.get("model") != "after" or r.get("group") != group:
      continue
    judges = r.get("judges") or {}
    j = judge if judge in judges else (next(iter(judges)) if judge is None and judges else None)
    if j is not None:
      out[str(r["key"])] = bool(judges[j])
  return out


def _values(res: CellResult, eval_name: str, metric: str) -> dict[str, float]:
  return {f"{r.get('group')}\x00{r['key']}": float(r["value"]) for r in res.rows(eval_name)
          if r.get("model") == "after" and r.get("metric") == metric and r.get("value") is not None}


def paired_test(base: Sequence[CellResult], other: Sequence[CellResult], eval_name: str,
                metric: str, spec: Mapping[str, Any]) -> dict[str, Any] | None:
  """Method (other) vs baseline on the same prompts, pooled over the seeds both ran."""
  by_seed = {r.cell.seed: r for r in base}
  pairs = [(by_seed[r.cell.seed], r) for r in other if r.cell.seed in by_seed]
  if not pairs:
    return None
  dec = _decision_spec(metric, spec, pairs[0][1].primary_judge(eval_name))
  a, b = [], []
  for rb, ro in pairs:
    if dec is not None:
      xb, xo = _decisions(rb, eval_name, *dec), _decisions(ro, eval_name, *dec)
    else:
      xb, xo = _values(rb, eval_name, metric), _values(ro, eval_name, metric)
    keys = sorted(set(xb) & set(xo))
    a += [float(xb[k]) for k in keys]
    b += [float(xo[k]) for k in keys]
  if not a:
    return None
  if dec is not None:
    r = stats.mcnemar(a, b)
    return {"diff": sum(b) / len(b) - sum(a) / len(a), "diff_lo": None, "diff_hi": None,
            "p": r.p_exact, "test": "mcnemar", "pairs": len(a)}
  r = stats.paired_bootstrap(a, b, num_samples=2000)
  return {"diff": r.diff, "diff_lo": r.lo, "diff_hi": r.hi, "p": r.p_value,
          "test": "paired_bootstrap", "pairs": len(a)}


@dataclasses.dataclass
class Summary:
  cells: list[Cell]
  status: dict[str, str]  # cell name -> grid status
  results: dict[str, list[CellResult]]  # arm -> finished cells, in seed order
  arms: list[str]
  baseline: str  # baseline method ("" = none)
  rows: list[dict[str, Any]]  # one per (arm, stage, eval, metric); see _CSV_FIELDS
  evals: dict[str, str]  # eval name -> type, in report order
  metrics: dict[str, list[str]]  # eval name -> metric names, in report order

  @property
  def before_label(self) -> str:
    """What the "before" column is: the base model, or the aligned model of retention runs."""
    retention = any(r.report.get("method_report", {}).get("aligned")
                    for rs in self.results.values() for r in rs)
    return ALIGNED_ARM if retention else BASE_ARM

  @property
  def missing(self) -> list[Cell]:
    return [c for c in self.cells if self.status.get(c.name) != DONE]

  def row(self, arm: str, eval_name: str, metric: str, stage: str = "after"
          ) -> dict[str, Any] | None:
    for r in self.rows:
      if (r["arm"], r["stage"], r["eval"], r["metric"]) == (arm, stage, eval_name, metric):
        return r
    return None

  def find(self, spec: str) -> tuple[str, str] | None:
    """"eval:metric" or "metric" (the first evaluation that has it) -> (eval, metric)."""
    ev, _, metric = spec.rpartition(":")
    for e, names in self.metrics.items():
      if (not ev or e == ev) and metric in names:
        return e, metric
    return None


def build(cells: Sequence[Cell], status: Mapping[str, str], baseline: str) -> Summary:
  results: dict[str, list[CellResult]] = {}
  arms = list(dict.fromkeys(c.arm for c in cells))
  for c in cells:
    if status.get(c.name) == DONE:
      results.setdefault(c.arm, []).append(load_result(c))
  evals: dict[str, str] = {}
  metrics: dict[str, list[str]] = {}
  for arm in arms:
    for res in results.get(arm, []):
      for e, ev in res.report["evals"].items():
        evals.setdefault(e, ev.get("type", ""))
        names = metrics.setdefault(e, [])
        for stage in ("before", "after"):
          names += [m for m in ev.get(stage, {}) if m not in names]
  arm_method = {c.arm: c.method for c in cells}
  arm_set = {c.arm: c.override_set for c in cells}
  base_arm = {s: a for a, s in arm_set.items() if arm_method[a] == baseline}
  rows = []
  for arm in arms:
    for e, names in metrics.items():
      for metric in names:
        for stage in ("before", "after"):
          got = [(r, r.report["evals"].get(e, {}).get(stage, {}).get(metric))
                 for r in results.get(arm, [])]
          got = [(r, m) for r, m in got if m is not None and m.get("value") is not None]
          if not got:
            continue
          if stage == "before":
            # The frozen model answers the same prompts greedily in every seed: one sample,
            # not several (its interval is Wilson on k/n, not a t across copies).
            got = got[:1]
          values = [float(m["value"]) for _, m in got]
          mean, lo, hi, kind = _interval(values, [m for _, m in got])
          rows.append({"arm": arm, "method": arm_method[arm], "override_set": arm_set[arm],
                       "stage": stage, "eval": e, "metric": metric,
                       "judge": got[0][1].get("judge"), "seeds": [r.cell.seed for r, _ in got],
                       "mean": mean, "lo": lo, "hi": hi, "interval": kind,
                       "n": got[0][1].get("n"), "values": values, "baseline": None,
                       "diff": None, "diff_lo": None, "diff_hi": None, "p": None, "test": None,
                       "pairs": None, "_spec": got[0][1]})
  after = {(r["arm"], r["eval"], r["metric"]): r for r in rows if r["stage"] == "after"}
  for row in rows:
    spec = row.pop("_spec")
    b_arm = base_arm.get(row["override_set"])
    if row["stage"] != "after" or not b_arm or b_arm == row["arm"]:
      continue
    b_row = after.get((b_arm, row["eval"], row["metric"]))
    if b_row is None:
      continue
    row["baseline"] = b_arm
    mine = [r for r in results[row["arm"]] if r.cell.seed in row["seeds"]]
    test = paired_test(results[b_arm], mine, row["eval"], row["metric"], spec)
    if test is not None:
      row.update(test)
    else:  # no per-prompt rows to pair: the difference of the seed means, untested
      row["diff"] = row["mean"] - b_row["mean"]
  return Summary(list(cells), dict(status), results, arms, baseline, rows, evals, metrics)


# ----------------------------------------------------------------------------
# Efficiency, failure cases.


def efficiency(summary: Summary) -> dict[str, dict[str, float | None]]:
  """arm -> mean over its seeds of the training cost and size figures."""
  out = {}
  for arm in summary.arms:
    res = summary.results.get(arm, [])
    if not res:
      continue

    def mean(get):
      vals = []
      for r in res:
        try:
          v = get(r.report)
        except (KeyError, TypeError):
          v = None
        if v is not None:
          vals.append(float(v))
      return sum(vals) / len(vals) if vals else None

    out[arm] = {
        "seconds_per_step": mean(lambda r: r["train"]["seconds_per_step"]),
        "train_seconds": mean(lambda r: r["train"]["seconds"]),
        "total_seconds": mean(lambda r: sum(r["efficiency"]["stage_seconds"].values())),
        "peak_rss_gb": mean(lambda r: r["efficiency"]["peak_rss_gb"]),
        "trainable_params": mean(lambda r: r["efficiency"]["trainable_params"]),
        "total_params": mean(lambda r: r["efficiency"]["total_params"]),
    }
  return out


def failure_cases(summary: Summary, limit: int) -> dict[str, dict[str, Any]]:
  """arm -> {"harmful_answered": [...], "benign_refused": [...], counts}, worst first.

  A case is one prompt, with in how many of the arm's seeds it failed and the answer of the
  first such seed; the counts are of rows (prompt x evaluation x seed).
  """
  out = {}
  for arm in summary.arms:
    res = summary.results.get(arm, [])
    if not res:
      continue
    cases: dict[str, dict[str, dict[str, Any]]] = {"harmful_answered": {}, "benign_refused": {}}
    totals, failed_rows = collections.Counter(), collections.Counter()
    for r in res:
      for e in summary.evals:
        primary = r.primary_judge(e)
        for row in r.rows(e):
          judges = row.get("judges") or {}
          if row.get("model") != "after" or not judges:
            continue
          refused = bool(judges.get(primary, next(iter(judges.values()))))
          label = row.get("label", "")
          if label == "harmful":
            kind, failed = "harmful_answered", not refused
          elif label in ("benign", "borderline"):
            kind, failed = "benign_refused", refused
          else:
            continue
          totals[kind] += 1
          failed_rows[kind] += int(failed)
          if failed:
            # By prompt text: evaluations that ask the same prompt (and share its answer)
            # give one case, listed under the first of them.
            case = cases[kind].setdefault(str(row.get("prompt")), {
                "eval": e, "group": row.get("group"), "label": label, "prompt": row.get("prompt"),
                "completion": row.get("completion"), "seeds": []})
            if r.cell.seed not in case["seeds"]:
              case["seeds"].append(r.cell.seed)
    out[arm] = {"seeds": len(res)}
    for kind, by_key in cases.items():
      ranked = sorted(by_key.values(), key=lambda c: -len(c["seeds"]))
      out[arm][kind] = ranked[:limit]
      out[arm][f"{kind}_count"] = failed_rows[kind]
      out[arm][f"{kind}_total"] = totals[kind]
  return out


# ----------------------------------------------------------------------------
# Writing.


def rate_like(metric: str) -> bool:
  return "refusal" in metric or "agree" in metric


def fmt_value(metric: str, v: float | None) -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  return f"{100 * v:.1f}%" if rate_like(metric) else f"{v:.4g}"


def fmt_cell(row: Mapping[str, Any] | None) -> str:
  if row is None:
    return "–"
  m = row["metric"]
  text = fmt_value(m, row["mean"])
  if row["lo"] is not None:
    lo, hi = fmt_value(m, row["lo"]), fmt_value(m, row["hi"])
    text += f" [{lo.rstrip('%')}–{hi}]"
  if len(row["seeds"]) > 1:
    text += f" ({len(row['seeds'])} seeds)"
  if row.get("diff") is not None:
    d = row["diff"]
    text += f"<br>Δ {100 * d:+.1f} pt" if rate_like(m) else f"<br>Δ {d:+.3g}"
    text += f", p={row['p']:.2g}" if row.get("p") is not None else ", p –"
  return text


def _one_line(text: Any, limit: int = 300) -> str:
  text = " ".join(str(text or "").split()).replace("|", "\\|") or "(empty)"
  return text if len(text) <= limit else text[:limit] + "…"


def write(summary: Summary, workdir: str, *, experiment: Mapping[str, Any] | None = None,
          plots: Sequence[str] = (), plot_failures: Sequence[str] = (),
          failures_limit: int = 5) -> dict[str, Any]:
  """Writes summary.md / .csv / .json in `workdir`; returns what summary.json holds."""
  eff = efficiency(summary)
  fails = failure_cases(summary, failures_limit)
  done = sum(s == DONE for s in summary.status.values())
  data = {
      "baseline": summary.baseline,
      "cells": [{"name": c.name, "arm": c.arm, "method": c.method, "override_set": c.override_set,
                 "seed": c.seed, "status": summary.status.get(c.name), "workdir": c.workdir,
                 "command": c.command()} for c in summary.cells],
      "missing": [c.name for c in summary.missing],
      "evals": summary.evals,
      "metrics": [{k: v for k, v in r.items()} for r in summary.rows],
      "efficiency": eff,
      "failure_cases": fails,
      "plots": list(plots),
      "plot_failures": list(plot_failures),
  }
  if experiment is not None:
    data["experiment"] = experiment
  files.write_text(os.path.join(workdir, "summary.json"),
                   json.dumps(data, indent=1, default=str))
  table = io.StringIO(newline="")
  w = csv.DictWriter(table, fieldnames=_CSV_FIELDS, extrasaction="ignore")
  w.writeheader()
  for r in summary.rows:
    w.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})
  files.write_text(os.path.join(workdir, "summary.csv"), table.getvalue())

  arms = [a for a in summary.arms if summary.results.get(a)]
  lines = ["# Experiment summary", "",
           f"{done} of {len(summary.cells)} cells finished.", ""]
  if summary.missing:
    lines += ["Not finished (run these, then collect again with "
              "`--config.experiment.collect_only=True`):", "", "```"]
    lines += [f"# {c.name}: {summary.status.get(c.name)}\n{c.command()}" for c in summary.missing]
    lines += ["```", ""]
  b = summary.baseline
  lines += ["Each entry: mean over seeds with its 95% interval (Student t across seeds, clipped "
            f"to [0, 1] for rates; one seed: Wilson on its own k/n for a rate). "
            f"{summary.before_label.capitalize()}: its answers in one cell (the same in every "
            "seed)."
            + (f" Δ: difference to `{b}` with the same overrides, on the same prompts and the "
               "seeds both ran; p: exact McNemar on the per-prompt refusal decisions pooled "
               "over those seeds (rates), or a paired bootstrap on per-prompt values." if b
               else ""), ""]
  for e, names in summary.metrics.items():
    lines += [f"## {e} ({summary.evals.get(e) or '?'})", "",
              "| metric | " + " | ".join([summary.before_label, *arms]) + " |",
              "|---" * (len(arms) + 2) + "|"]
    # The frozen model's answers: the baseline arm's "before" (every arm's is the same
    # when the override set leaves data and evaluation alone).
    ref = next((a for a in arms if summary.results[a][0].cell.method == b), arms[0] if arms
               else None)
    for metric in names:
      before = summary.row(ref, e, metric, "before") if ref else None
      cells = [fmt_cell(before)] + [fmt_cell(summary.row(a, e, metric)) for a in arms]
      n = next((r["n"] for a in arms for r in [summary.row(a, e, metric)] if r), None)
      lines.append(f"| {metric}" + (f" (n={n})" if n else "") + " | " + " | ".join(cells) + " |")
    lines.append("")
  if eff:
    lines += ["## Efficiency (mean over seeds)", "",
              "| arm | s / step | train s | total s | peak RSS GB | trainable params |",
              "|---|---|---|---|---|---|"]
    f = lambda v, p=".3g": "–" if v is None else format(v, p)
    for arm, x in eff.items():
      tp = "–" if x["trainable_params"] is None else f"{int(x['trainable_params']):,}"
      lines.append(f"| {arm} | {f(x['seconds_per_step'])} | {f(x['train_seconds'], '.0f')} | "
                   f"{f(x['total_seconds'], '.0f')} | {f(x['peak_rss_gb'])} | {tp} |")
    lines.append("")
  if plots or plot_failures:
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += [f"- plot failed: {_one_line(x)}" for x in plot_failures]
    lines += [""] if plot_failures else []
  lines += ["## Failure cases", ""]
  titles = {"harmful_answered": "Harmful prompts still answered",
            "benign_refused": "Benign or borderline prompts refused"}
  for arm, fc in fails.items():
    lines += [f"### {arm}", ""]
    for kind, title in titles.items():
      lines += [f"**{title}:** {fc[kind + '_count']} of {fc[kind + '_total']} rows "
                f"(over {fc['seeds']} seed(s)).", ""]
      for c in fc[kind]:
        lines += [f"- [{c['eval']} / {c['group']}, {c['label']}, failed in "
                  f"{len(c['seeds'])} of {fc['seeds']} seed(s)] {_one_line(c['prompt'])}",
                  f"  - answer (seed {c['seeds'][0]}): {_one_line(c['completion'])}"]
      lines.append("")
  files.write_text(os.path.join(workdir, "summary.md"), "\n".join(lines))
  return data
