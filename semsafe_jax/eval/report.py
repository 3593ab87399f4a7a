"""Refusal rates with confidence intervals, and the run report (JSON + Markdown)."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from semsafe_jax import files
from semsafe_jax.eval.stats import wilson_ci  # re-exported: report.wilson_ci


def refusal_summary(answers: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """answers: rows with `split` and `refused` -> {split: {refusal_rate, n, ci95}}."""
  out: dict[str, dict[str, Any]] = {}
  for split in sorted({a["split"] for a in answers}):
    rows = [a for a in answers if a["split"] == split]
    k = sum(bool(a["refused"]) for a in rows)
    lo, hi = wilson_ci(k, len(rows))
    out[split] = {"refusal_rate": k / len(rows), "n": len(rows), "ci95": [lo, hi]}
  return out


def _fmt(s: dict[str, Any]) -> str:
  lo, hi = s["ci95"]
  return f"{100 * s['refusal_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] (n={s['n']})"


def write_report(workdir: str, report: dict[str, Any], answers_before: Sequence[dict[str, Any]],
                 answers_after: Sequence[dict[str, Any]], examples_per_split: int = 3) -> None:
  """Writes report.json and a human-readable report.md."""
  files.write_text(os.path.join(workdir, "report.json"), json.dumps(report, indent=2))
  models = summary_models(report)
  lines = ["# semsafe_jax run report", "",
           f"Model: `{report.get('model', '?')}`  ",
           f"Trainable params: {report['trainable_params']:,} of {report['total_params']:,} "
           f"({100 * report['trainable_params'] / max(report['total_params'], 1):.2f}%)  ",
           f"Training time: {report['train_seconds']:.0f} s", "",
           "## Refusal rate by split (string-match judge, 95% Wilson CI)", "",
           "| split | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
  for split in report["after"]:
    cells = [report[m].get(split) for m in models]
    lines.append(f"| {split} | " + " | ".join(_fmt(c) if c else "-" for c in cells) + " |")
  lines += ["", "Harmful splits should go up; `borderline` and `benign` should stay low.", ""]
  if "gate" in report:
    g = report["gate"]
    lines += [f"`gated`: the adapters answer only the prompts that the probe gate flags (layer "
              f"{g['layer']}, threshold {g['threshold']:.3f}, fit on the training side); the "
              "base model answers the rest. Share flagged: " + ", ".join(
                  f"{k} {100 * v:.1f}%" for k, v in g["flagged"].items()) + ".", ""]
  if report.get("plots"):
    lines += [f"![{p}]({p})" for p in report["plots"]] + [""]
  if report.get("evals"):
    lines += evals_markdown(report["evals"])
  lines += ["## Example answers", ""]
  after_by_prompt = {(a["split"], a["prompt"]): a for a in answers_after}
  for split in report["after"]:
    rows = [a for a in answers_before if a["split"] == split][:examples_per_split]
    lines.append(f"### {split}")
    for b in rows:
      a = after_by_prompt.get((split, b["prompt"]))
      lines += ["", f"**Prompt:** {b['prompt']}", "",
                f"- before ({'refused' if b['refused'] else 'answered'}): {_one_line(b['completion'])}"]
      if a:
        lines.append(f"- after ({'refused' if a['refused'] else 'answered'}): {_one_line(a['completion'])}")
    lines.append("")
  files.write_text(os.path.join(workdir, "report.md"), "\n".join(lines))


def summary_models(report: dict[str, Any]) -> list[str]:
  """The models of the refusal summary: before, after and, with the probe gate, gated."""
  return [m for m in ("before", "after", "gated") if m in report]


def _metric_cell(name: str, m: dict[str, Any] | None) -> str:
  if not m:
    return "-"
  rate = m.get("k") is not None
  fmt = (lambda v: f"{100 * v:.1f}%") if rate else (lambda v: f"{v:.4g}")
  ci = m.get("ci95")
  return fmt(m["value"]) + (f" [{fmt(ci[0])}, {fmt(ci[1])}]" if ci else "")


def evals_markdown(section: dict[str, Any], max_examples: int = 5) -> list[str]:
  """Markdown for report["evals"] (see eval/base.run_evals): per evaluation a metric table
  (before / after, n, judge, 95% interval: Wilson for rates, t over prompts or groups for
  means), judge agreement with disagreements, and notes."""
  lines = ["## Evaluations", ""]
  for name, e in section.items():
    models = [k for k, v in e.items() if isinstance(v, dict) and k not in (
        "judge_agreement", "group_labels", "seconds")]
    judges = e.get("judges") or []
    lines += [f"### {name} (`{e.get('type', '?')}`)", ""]
    judged = any(m.get("judge") for k in models for m in e[k].values())
    if judges and judged:
      lines += [f"Judges: {judges[0]} (primary)" + "".join(f", {j}" for j in judges[1:]) +
                "; `metric@judge` is a secondary judge's.", ""]
    metrics = list(dict.fromkeys(m for k in models for m in e[k]))
    lines += ["| metric | n | " + " | ".join(models) + " |",
              "|---|---|" + "---|" * len(models)]
    for m in metrics:
      n = next((e[k][m]["n"] for k in models if m in e[k]), "")
      lines.append(f"| {m} | {n} | " + " | ".join(_metric_cell(m, e[k].get(m)) for k in models)
                   + " |")
    lines.append("")
    for model, pairs in (e.get("judge_agreement") or {}).items():
      for pair, a in pairs.items():
        kappa = "undefined" if a["kappa"] is None else f"{a['kappa']:.3f}"
        lines.append(f"- {model}, {pair.replace('|', ' vs ')}: Cohen's kappa {kappa}, "
                     f"agreement {100 * a['agreement']:.1f}% (n={a['n']}, "
                     f"{a['disagreements']} disagreements)")
        for ex in a["examples"][:max_examples]:
          verdicts = ", ".join(f"{j}: {'refused' if v else 'answered'}"
                               for j, v in ex["judges"].items())
          lines.append(f"  - [{ex['group']}] {_one_line(ex['prompt'], 120)} -> "
                       f"{_one_line(ex['completion'], 160)} ({verdicts})")
    for note in e.get("notes") or []:
      lines.append(f"- Note: {note}")
    lines.append("")
  return lines


def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit] + "…"


def plot_refusal_rates(workdir: str, report: dict[str, Any], name: str = "refusal_rates.png") -> str:
  """Before/after (and gated) bar chart with CI whiskers; returns the file name."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  splits = list(report["after"])
  x = np.arange(len(splits))
  models = summary_models(report)
  width = 0.8 / len(models)
  fig, ax = plt.subplots(figsize=(7, 3.5))
  for j, key in enumerate(models):
    off = (j - (len(models) - 1) / 2) * width
    rates = [report[key].get(s, {}).get("refusal_rate", np.nan) for s in splits]
    ci = [report[key].get(s, {}).get("ci95", [np.nan, np.nan]) for s in splits]
    err = np.array([[r - c[0] for r, c in zip(rates, ci)], [c[1] - r for r, c in zip(rates, ci)]])
    ax.bar(x + off, rates, width=width, yerr=err, capsize=3, label=key)
  ax.set_xticks(x, splits)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("refusal rate")
  ax.legend()
  fig.tight_layout()
  files.save_figure(fig, os.path.join(workdir, name), dpi=120)
  plt.close(fig)
  return name
