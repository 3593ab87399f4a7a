"""The experiment's figures (matplotlib, Agg), written to W/plots/ and shown in summary.md.

  bars_<eval>.png           grouped bars per metric: base model + every arm, 95% intervals
  safety_vs_overrefusal.png one point per arm, the Pareto front (more refusal of harmful
                            prompts, less of benign ones) marked
  sweep_<field>.png         safety and over-refusal against a numeric field the override
                            sets sweep (data.tau, loss.lam, loss.hidden_layer, ...)
  embedding_map.png         2-D PCA of the SBERT embeddings of the prompts, coloured by refusal
                            before (base model) and after (each arm), held-out intents marked
  training_curves.png       the loss terms per step, every seed of every arm
  efficiency.png            seconds per step, training time, peak memory, trainable parameters

Each function returns the file name it wrote, or None when the cells hold nothing to plot.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from semsafe_jax import files
from semsafe_jax.experiments import summary as summary_lib
from semsafe_jax.experiments.summary import Summary

PLOTS_DIR = "plots"
CURVE_KEYS = ("loss", "l_total", "l_safety", "l_consistency", "l_capability", "pairs_valid")


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, workdir: str, name: str, layout: bool = True) -> str:
  if layout:
    fig.tight_layout()
  files.save_figure(fig, os.path.join(workdir, PLOTS_DIR, name), dpi=110)
  _plt().close(fig)
  return f"{PLOTS_DIR}/{name}"


def _err(rows: Sequence[dict[str, Any] | None]) -> np.ndarray:
  """2xN yerr for matplotlib from rows with mean/lo/hi (0 where there is no interval)."""
  lo = [r["mean"] - r["lo"] if r and r["lo"] is not None else 0.0 for r in rows]
  hi = [r["hi"] - r["mean"] if r and r["hi"] is not None else 0.0 for r in rows]
  return np.maximum(np.array([lo, hi], np.float64), 0.0)


def _arms(s: Summary) -> list[str]:
  return [a for a in s.arms if s.results.get(a)]


def _ref_arm(s: Summary) -> str | None:
  arms = _arms(s)
  return next((a for a in arms if s.results[a][0].cell.method == s.baseline),
              arms[0] if arms else None)


def _safe_name(text: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in text)


def bars(s: Summary, workdir: str, eval_name: str) -> str | None:
  arms, ref = _arms(s), _ref_arm(s)
  names = [m for m in s.metrics.get(eval_name, []) if "@" not in m
           and any(s.row(a, eval_name, m) for a in arms)]
  if not names:
    return None
  rates = [m for m in names if summary_lib.rate_like(m)]
  others = [m for m in names if m not in rates]
  panels = ([rates] if rates else []) + [[m] for m in others]
  series = [(s.before_label, ref, "before")] + [(a, a, "after") for a in arms]
  widths = [max(3.0, 0.5 * len(p) * len(series) / 2) for p in panels]
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1, 3.8), squeeze=False,
                           gridspec_kw={"width_ratios": widths})
  w = 0.8 / len(series)
  for ax, metrics in zip(axes[0], panels):
    x = np.arange(len(metrics))
    for i, (label, arm, stage) in enumerate(series):
      rows = [s.row(arm, eval_name, m, stage) if arm else None for m in metrics]
      vals = [r["mean"] if r else np.nan for r in rows]
      ax.bar(x + (i - (len(series) - 1) / 2) * w, vals, w, yerr=_err(rows), capsize=2,
             label=label, hatch="//" if stage == "before" else None,
             color="lightgrey" if stage == "before" else None)
    ax.set_xticks(x, metrics, rotation=30, ha="right", fontsize=8)
    if metrics is rates:
      ax.set_ylim(0, 1.05)
      ax.set_ylabel("rate")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"{eval_name}: mean over seeds, 95% interval", fontsize=10)
  return _save(fig, workdir, f"bars_{_safe_name(eval_name)}.png")


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
  """Arms no other arm beats on both axes: (over-refusal, safety) = (lower, higher) is better."""
  front = []
  for a, (xa, ya) in points.items():
    dominated = any(xb <= xa and yb >= ya and (xb < xa or yb > ya)
                    for b, (xb, yb) in points.items() if b != a)
    if not dominated:
      front.append(a)
  return sorted(front, key=lambda a: points[a][0])


def scatter(s: Summary, workdir: str, safety: str, overrefusal: str) -> str | None:
  ys, xs = s.find(safety), s.find(overrefusal)
  if ys is None or xs is None:
    return None
  pts, rows = {}, {}
  for a in _arms(s):
    ry, rx = s.row(a, *ys), s.row(a, *xs)
    if ry and rx:
      pts[a], rows[a] = (rx["mean"], ry["mean"]), (rx, ry)
  if not pts:
    return None
  front = pareto_front(pts)
  plt = _plt()
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  for a, ((x, y), (rx, ry)) in {a: (pts[a], rows[a]) for a in pts}.items():
    ax.errorbar([x], [y], xerr=_err([rx]), yerr=_err([ry]), fmt="o", capsize=2,
                color="C3" if a in front else "C0")
    ax.annotate(a, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
  ref = _ref_arm(s)
  by, bx = s.row(ref, *ys, "before"), s.row(ref, *xs, "before")
  if by and bx:
    ax.plot([bx["mean"]], [by["mean"]], "s", color="grey")
    ax.annotate(s.before_label, (bx["mean"], by["mean"]), textcoords="offset points",
                xytext=(4, -10), fontsize=8, color="grey")
  fx, fy = zip(*[pts[a] for a in front])
  ax.step(fx, fy, where="post", color="C3", lw=1, alpha=0.7, label="Pareto front")
  ax.set_xlabel(f"over-refusal: {xs[0]}:{xs[1]}")
  ax.set_ylabel(f"safety: {ys[0]}:{ys[1]}")
  ax.set_xlim(-0.02, 1.02)
  ax.set_ylim(-0.02, 1.02)
  ax.legend(fontsize=8, loc="lower right")
  return _save(fig, workdir, "safety_vs_overrefusal.png")


def _set_values(cell) -> dict[str, str]:
  """The override set's fields -> value, as on the cell's command line."""
  out = {}
  for flag in cell.flags:
    key, _, value = flag.removeprefix("--config.").partition("=")
    if key in cell.set_fields:
      out[key] = value  # the last one wins, as on the command line
  return out


def _number(v: Any) -> float | None:
  if isinstance(v, bool):
    return None
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def _lookup(config: dict[str, Any], field: str) -> Any:
  for part in field.split("."):
    if not isinstance(config, dict) or part not in config:
      return None
    config = config[part]
  return config


def sweep_series(s: Summary) -> dict[str, dict[str, list[tuple[float, str]]]]:
  """field -> curve label -> [(value, arm)], for numeric fields >= 2 override sets vary."""
  out: dict[str, dict[str, list[tuple[float, str]]]] = collections.defaultdict(
      lambda: collections.defaultdict(list))
  plain = []  # arms with no override set: a point on every curve of their method
  for a in _arms(s):
    cell = s.results[a][0].cell
    values = _set_values(cell)
    if not values:
      plain.append(a)
    for field, v in values.items():
      x = _number(v)
      if x is None:
        continue
      rest = ", ".join(f"{k}={w}" for k, w in sorted(values.items()) if k != field)
      out[field][cell.method + (f" ({rest})" if rest else "")].append((x, a))
  for a in plain:
    res = s.results[a][0]
    for field, curves in out.items():
      x = _number(_lookup(res.config, field))
      if x is not None and res.cell.method in curves:
        curves[res.cell.method].append((x, a))
  return {f: {k: sorted(v) for k, v in curves.items() if len({x for x, _ in v}) >= 2}
          for f, curves in out.items()
          if any(len({x for x, _ in v}) >= 2 for v in curves.values())}


def sweeps(s: Summary, workdir: str, safety: str, overrefusal: str) -> list[str]:
  specs = [(t, s.find(m)) for t, m in (("safety", safety), ("over-refusal", overrefusal))]
  specs = [(t, m) for t, m in specs if m is not None]
  if not specs:
    return []
  plt = _plt()
  out = []
  for field, curves in sweep_series(s).items():
    fig, axes = plt.subplots(1, len(specs), figsize=(5 * len(specs), 3.8), squeeze=False)
    for ax, (title, (e, metric)) in zip(axes[0], specs):
      for label, pts in curves.items():
        rows = [s.row(a, e, metric) for _, a in pts]
        keep = [(x, r) for (x, _), r in zip(pts, rows) if r]
        if keep:
          ax.errorbar([x for x, _ in keep], [r["mean"] for _, r in keep],
                      yerr=_err([r for _, r in keep]), marker="o", capsize=2, label=label)
      ax.set_xlabel(field)
      ax.set_ylabel(f"{e}:{metric}")
      ax.set_title(title, fontsize=10)
      ax.set_ylim(-0.02, 1.02)
    axes[0][0].legend(fontsize=7)
    out.append(_save(fig, workdir, f"sweep_{_safe_name(field)}.png"))
  return out


def _embeddings(res) -> tuple[list[dict[str, Any]], np.ndarray, set[str]] | None:
  """(prompts.jsonl rows, their SBERT embeddings from the cell's cache, held-out intent
  prompt ids) of one cell, or None when the cell lacks them."""
  from semsafe_jax.data import embed  # pylint: disable=g-import-not-at-top
  wd = res.cell.workdir
  path = os.path.join(wd, "prompts.jsonl")
  if not files.is_file(path):
    return None
  prompts = summary_lib.read_jsonl(path)
  data_cfg = res.config.get("data", {})
  cache = data_cfg.get("cache_dir") or os.path.join(wd, "cache")
  model = data_cfg.get("sbert", embed.DEFAULT_MODEL)
  f = os.path.join(cache, f"sbert-{embed.cache_key(model, [p['text'] for p in prompts])}.npy")
  if not files.is_file(f):
    return None
  emb = files.load_npy(f)
  if emb.shape[0] != len(prompts):
    return None
  heldout = set()
  split_path = os.path.join(wd, "splits.json")
  if files.is_file(split_path):
    heldout = set(files.read_json(split_path).get("heldout_intent", []))
  return prompts, emb, heldout


def _text_decisions(res, evals: Sequence[str], model: str) -> dict[str, bool]:
  """prompt text -> refused, from the evaluation whose rows cover the most prompt texts
  verbatim (attack wrappers change the text; the plain splits do not)."""
  best: dict[str, bool] = {}
  for e in evals:
    got: dict[str, bool] = {}
    for r in res.rows(e):
      judges = r.get("judges") or {}
      if r.get("model") != model or not judges or r.get("prompt") in got:
        continue
      got[r["prompt"]] = bool(judges.get(res.primary_judge(e), next(iter(judges.values()))))
    if len(got) > len(best):
      best = got
  return best


def embedding_map(s: Summary, workdir: str) -> str | None:
  ref = _ref_arm(s)
  if ref is None:
    return None
  loaded = _embeddings(s.results[ref][0])
  if loaded is None:
    return None
  emb = loaded[1]
  mean = emb.mean(0)
  _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
  basis = vt[:2].T  # PCA: the top two right singular vectors

  panels = [(f"{s.before_label} (before)", s.results[ref][0], "before")]
  panels += [(f"{a} (after, seed {s.results[a][0].cell.seed})", s.results[a][0], "after")
             for a in _arms(s)]
  cols = min(3, len(panels))
  rows_n = -(-len(panels) // cols)
  plt = _plt()
  fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.8 * rows_n), squeeze=False)
  for ax in axes.flat[len(panels):]:
    ax.axis("off")
  handles = {}
  for ax, (title, res, model) in zip(axes.flat, panels):
    # A cell's own prompts (an override set may change the data), on the reference's axes.
    ps, e, heldout = (loaded if res is s.results[ref][0] else _embeddings(res) or loaded)
    xy = (e - mean) @ basis
    dec = _text_decisions(res, list(s.evals), model)
    state = [dec.get(p["text"]) for p in ps]
    is_ho = np.array([p["id"] in heldout for p in ps])
    unseen = np.array([d is None for d in state])
    handles["not evaluated"] = ax.scatter(*xy[unseen].T, s=4, c="lightgrey")
    for val, colour, label in ((True, "C3", "refused"), (False, "C0", "answered")):
      for ho, marker, size in ((False, "o", 12), (True, "^", 30)):
        m = np.array([d is val for d in state]) & (is_ho == ho)
        if m.any():
          handles[label + (", held-out intent" if ho else "")] = ax.scatter(
              *xy[m].T, s=size, c=colour, marker=marker, edgecolors="k" if ho else "none",
              linewidths=0.5)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.legend(list(handles.values()), list(handles), fontsize=7, loc="lower center",
             ncol=len(handles), frameon=False)
  fig.suptitle("SBERT embeddings (PCA): refused vs answered", fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  return _save(fig, workdir, "embedding_map.png", layout=False)


def training_curves(s: Summary, workdir: str) -> str | None:
  hist = {a: [(r.cell.seed, summary_lib.read_history(r.cell.workdir)) for r in s.results[a]]
          for a in _arms(s)}
  present = {k for runs in hist.values() for _, h in runs for m in h for k in m}
  keys = [k for k in CURVE_KEYS if k in present]
  if "loss" in keys and "l_total" in keys:  # the same number under two names
    keys.remove("l_total")
  if not keys:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for i, (arm, runs) in enumerate(hist.items()):
      for j, (_, h) in enumerate(runs):
        pts = [(m["step"], m[key]) for m in h if key in m]
        if pts:
          ax.plot(*zip(*pts), color=f"C{i % 10}", lw=1, alpha=0.8, label=arm if j == 0 else None)
    ax.set_title(key, fontsize=10)
    ax.set_xlabel("step")
  axes[0][0].legend(fontsize=7)
  return _save(fig, workdir, "training_curves.png")


def efficiency(s: Summary, workdir: str) -> str | None:
  eff = summary_lib.efficiency(s)
  keys = [("seconds_per_step", "seconds / step"), ("train_seconds", "training s"),
          ("total_seconds", "all stages s"), ("peak_rss_gb", "peak host memory GB"),
          ("trainable_params", "trainable params")]
  keys = [(k, t) for k, t in keys if any(v.get(k) is not None for v in eff.values())]
  if not keys:
    return None
  plt = _plt()
  arms = list(eff)
  fig, axes = plt.subplots(1, len(keys), figsize=(2.8 * len(keys) + 0.4 * len(arms), 3.4),
                           squeeze=False)
  for ax, (k, title) in zip(axes[0], keys):
    vals = [eff[a].get(k) if eff[a].get(k) is not None else np.nan for a in arms]
    ax.bar(np.arange(len(arms)), vals, color=[f"C{i % 10}" for i in range(len(arms))])
    ax.set_xticks(np.arange(len(arms)), arms, rotation=30, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
  return _save(fig, workdir, "efficiency.png")


def make_all(s: Summary, workdir: str, safety: str, overrefusal: str,
             warn: Callable[[str], None] = print) -> tuple[list[str], list[str]]:
  """Every plot that the finished cells can feed: (file names, failures as text)."""
  jobs = [(f"bars {e}", lambda e=e: bars(s, workdir, e)) for e in s.evals]
  jobs += [("scatter", lambda: scatter(s, workdir, safety, overrefusal)),
           ("sweeps", lambda: sweeps(s, workdir, safety, overrefusal)),
           ("embedding map", lambda: embedding_map(s, workdir)),
           ("training curves", lambda: training_curves(s, workdir)),
           ("efficiency", lambda: efficiency(s, workdir))]
  names, failed = [], []
  for title, fn in jobs:
    try:
      out = fn()
    except Exception as e:  # pylint: disable=broad-except
      # A figure must not cost the table; the failure is listed in summary.md.
      failed.append(f"{title}: {type(e).__name__}: {e}")
      warn(f"Plot {title} failed: {type(e).__name__}: {e}")
      continue
    names += out if isinstance(out, list) else [out] if out else []
  return names, failed
