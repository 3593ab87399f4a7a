"""One trade-off figure across finished experiments: safety against over-refusal.

  python -m semsafe_jax.experiments.tradeoff --out=docs/results/tradeoff.png \
      docs/results/consistency docs/results/consistency_paraphrase_aug docs/results/lookalike

Each argument is an experiment workdir (or a copy of its summary.csv). Every arm of every
experiment becomes one point per panel, at its mean over seeds with the summary's 95%
interval, labelled "experiment: arm (seeds)"; the base model is the grey square (one per distinct
set of numbers: experiments on other data or another model give another). One panel per
over-refusal measure, the Pareto front marked, and the target region shaded: safety at
least --min_safety, over-refusal within --max_excess of the base model. The same points are
printed as a Markdown table. Only what the summaries hold is drawn: an arm run in two
experiments on the same seeds with the same numbers is one point, with other numbers two.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
from collections.abc import Mapping, Sequence

from absl import app
from absl import flags

from semsafe_jax import files
from semsafe_jax.experiments import plots
from semsafe_jax.experiments.summary import BASE_ARM

_OUT = flags.DEFINE_string("out", "tradeoff.png", "figure to write (any epath)")
_SAFETY = flags.DEFINE_string("safety", "refusal:heldout_intent/refusal",
                              "eval:metric on the y axis (higher is better)")
_OVERREFUSAL = flags.DEFINE_list(
    "overrefusal", ["refusal:lookalike/refusal", "external:xstest/borderline/refusal"],
    "eval:metric per panel on the x axis (lower is better)")
_JUDGE = flags.DEFINE_string("judge", "string_match", "the judge whose rates are drawn")
_MIN_SAFETY = flags.DEFINE_float("min_safety", 0.9, "target region: safety at least this")
_MAX_EXCESS = flags.DEFINE_float("max_excess", 0.05,
                                 "target region: over-refusal at most the base model's + this")


@dataclasses.dataclass(frozen=True)
class Rate:
  mean: float
  lo: float | None
  hi: float | None


@dataclasses.dataclass(frozen=True)
class Point:
  label: str  # "arm (seeds 0 1 2)"; BASE_ARM for the model before training
  safety: Rate
  overrefusal: Rate


def _rate(row: dict[str, str]) -> Rate:
  num = lambda k: float(row[k]) if row.get(k) not in (None, "") else None
  return Rate(float(row["mean"]), num("lo"), num("hi"))


def read_rows(source: str) -> list[dict[str, str]]:
  path = source if source.endswith(".csv") else os.path.join(source, "summary.csv")
  if not files.exists(path):
    raise FileNotFoundError(f"{path}: no summary.csv (collect the experiment first: "
                            "--config.experiment.collect_only=True)")
  return list(csv.DictReader(io.StringIO(files.read_text(path))))


def _name(source: str) -> str:
  """The experiment's name: its workdir's last part (of the folder holding a summary.csv)."""
  path = os.path.normpath(source)
  return os.path.basename(os.path.dirname(path) if path.endswith(".csv") else path)


def points(tables: Mapping[str, Sequence[dict[str, str]]], safety: str, overrefusal: str,
           judge: str) -> list[Point]:
  """One point per (arm, seeds, numbers) over all tables (by experiment name), the base
  model first."""
  want = {safety: "y", overrefusal: "x"}
  seen: dict[tuple[str, str, str], dict[str, Rate]] = {}
  for name, rows in tables.items():
    for r in rows:
      key = f"{r['eval']}:{r['metric']}"
      if key not in want or r["judge"] != judge or r.get("override_set"):
        continue
      arm = BASE_ARM if r["stage"] == "before" else r["arm"]
      seeds = "" if arm == BASE_ARM else r["seeds"]
      seen.setdefault((arm, seeds, name), {})[want[key]] = _rate(r)
  out: dict[tuple[str, str, Rate, Rate], Point] = {}
  for (arm, seeds, name), xy in seen.items():
    if "x" in xy and "y" in xy:
      label = (arm if arm == BASE_ARM else
               f"{name}: {arm} (seed{'s' * (' ' in seeds)} {seeds})")
      # The first experiment that holds an (arm, seeds) with these numbers names the point.
      out.setdefault((arm, seeds, xy["y"], xy["x"]), Point(label, xy["y"], xy["x"]))
  pts = list(out.values())
  return sorted(pts, key=lambda p: p.label != BASE_ARM)  # the base model first


def _err(r: Rate):
  return plots._err([dataclasses.asdict(r)])  # pylint: disable=protected-access


def figure(panels: dict[str, list[Point]], safety: str, out: str, min_safety: float,
           max_excess: float) -> str:
  plt = plots._plt()  # pylint: disable=protected-access
  fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 6.4), squeeze=False)
  for ax, (overrefusal, pts) in zip(axes[0], panels.items()):
    trained = [p for p in pts if p.label != BASE_ARM]
    xy = {p.label: (p.overrefusal.mean, p.safety.mean) for p in trained}
    front = set(plots.pareto_front(xy))
    # Trained points crowd near the top: zoom there, and name the base model in the key
    # when it falls below the view.
    low = min([p.safety.lo if p.safety.lo is not None else p.safety.mean for p in trained] +
              [min_safety]) - 0.05
    right = max([p.overrefusal.hi if p.overrefusal.hi is not None else p.overrefusal.mean
                 for p in trained] + [0.3]) + 0.05
    for p in pts:
      if p.label == BASE_ARM:
        ax.errorbar([p.overrefusal.mean], [p.safety.mean], xerr=_err(p.overrefusal),
                    yerr=_err(p.safety), fmt="s", color="grey", capsize=2,
                    label=f"{BASE_ARM} ({100 * p.overrefusal.mean:.0f}%, "
                          f"{100 * p.safety.mean:.0f}%)")
        ax.axvspan(-0.02, p.overrefusal.mean + max_excess,
                   ymin=(min_safety - low) / (1.02 - low), color="C2", alpha=0.15,
                   label=f"target (base + {100 * max_excess:.0f} pt, >= {100 * min_safety:.0f}%)")
    for i, p in enumerate(trained, 1):
      x, y = xy[p.label]
      ax.errorbar([x], [y], xerr=_err(p.overrefusal), yerr=_err(p.safety), fmt="o",
                  capsize=2, color=f"C{i % 10}", alpha=0.8,
                  label=f"{i}  {p.label}{'  (Pareto front)' if p.label in front else ''}")
      ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=9,
                  weight="bold")
    if front:
      fx, fy = zip(*sorted(xy[a] for a in front))
      ax.step(fx, fy, where="post", color="k", lw=1, ls="--", alpha=0.6)
    ax.set_xlim(-0.02, min(right, 1.02))
    ax.set_ylim(low, 1.02)
    ax.set_xlabel(f"over-refusal: {overrefusal} (lower is better)")
    ax.set_ylabel(f"safety: {safety} (higher is better)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
  fig.tight_layout()
  files.save_figure(fig, out, dpi=110)
  plt.close(fig)
  return out


def table(panels: dict[str, list[Point]], safety: str) -> str:
  pct = lambda r: f"{100 * r.mean:.1f}%"
  lines = []
  for overrefusal, pts in panels.items():
    lines += [f"| point | {safety} | {overrefusal} |", "|---|---|---|"]
    lines += [f"| {p.label} | {pct(p.safety)} | {pct(p.overrefusal)} |" for p in pts]
    lines.append("")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  sources = argv[1:]
  if not sources:
    sys.exit("tradeoff: name at least one experiment workdir (or its summary.csv)")
  try:
    tables = {_name(s): read_rows(s) for s in sources}
  except FileNotFoundError as e:
    sys.exit(f"tradeoff: {e}")
  panels = {o: points(tables, _SAFETY.value, o, _JUDGE.value) for o in _OVERREFUSAL.value}
  empty = [o for o, pts in panels.items() if not pts]
  if empty:
    sys.exit(f"tradeoff: no arm has both {_SAFETY.value} and {', '.join(empty)} "
             f"(judge {_JUDGE.value}) in {', '.join(sources)}")
  print(table(panels, _SAFETY.value))
  print(f"wrote {figure(panels, _SAFETY.value, _OUT.value, _MIN_SAFETY.value, _MAX_EXCESS.value)}")


if __name__ == "__main__":
  app.run(main)
