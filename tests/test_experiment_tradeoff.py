"""The trade-off figure across experiments, read from their summary.csv files."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from semsafe_jax.experiments import tradeoff
from semsafe_jax.experiments.summary import BASE_ARM

REPO = Path(__file__).resolve().parents[1]
SAFETY, LOOK = "refusal:heldout_intent/refusal", "refusal:lookalike/refusal"


def _row(arm, stage, metric, seeds, mean, lo="", hi="", judge="string_match", eval_="refusal"):
  return {"arm": arm, "method": arm, "override_set": "", "stage": stage, "eval": eval_,
          "metric": metric, "judge": judge, "seeds": seeds, "mean": str(mean), "lo": str(lo),
          "hi": str(hi)}


def _arm(arm, seeds, safety, look):
  return [_row(arm, "before", "heldout_intent/refusal", "0", 0.0, 0.0, 0.09),
          _row(arm, "before", "lookalike/refusal", "0", 0.0, 0.0, 0.09),
          _row(arm, "after", "heldout_intent/refusal", seeds, safety, safety - 0.1, 1.0),
          _row(arm, "after", "lookalike/refusal", seeds, look, look - 0.05, look + 0.05),
          # Another judge's numbers must not leak into the string-match points.
          _row(arm, "after", "lookalike/refusal", seeds, 0.99, judge="classifier")]


def _write(folder: Path, rows):
  folder.mkdir(parents=True)
  with open(folder / "summary.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def test_points_one_per_arm_and_numbers_base_first():
  exp_a = [_r for a in (("ours", "0 1 2", 0.93, 0.175), ("lam0", "0 1 2", 0.91, 0.16))
           for _r in _arm(*a)]
  # The same lam0 seeds with the same numbers in a second experiment is one point; other
  # numbers (a re-run on other seeds) are a second one.
  exp_b = _arm("lam0", "0 1 2", 0.91, 0.16) + _arm("lam0", "0", 0.85, 0.175)
  pts = tradeoff.points({"a": exp_a, "b": exp_b}, SAFETY, LOOK, "string_match")
  assert [p.label for p in pts] == [BASE_ARM, "a: ours (seeds 0 1 2)", "a: lam0 (seeds 0 1 2)",
                                    "b: lam0 (seed 0)"]
  assert pts[1].safety == tradeoff.Rate(0.93, 0.93 - 0.1, 1.0)
  assert pts[1].overrefusal.mean == 0.175 and pts[3].overrefusal.mean == 0.175
  assert tradeoff.points({"a": exp_a}, SAFETY, "refusal:missing/refusal", "string_match") == []


def test_command_line_with_relative_paths(tmp_path):
  _write(tmp_path / "runs" / "exp_a", _arm("ours", "0 1", 0.9, 0.2) + _arm("lam0", "0 1", 0.8, 0.1))
  _write(tmp_path / "runs" / "exp_b", _arm("contrast", "0", 0.95, 0.3))
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  cmd = [sys.executable, "-m", "semsafe_jax.experiments.tradeoff", "--out=plots/t.png",
         f"--overrefusal={LOOK}", "runs/exp_a", "runs/exp_b/summary.csv"]
  out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
  assert "| exp_a: ours (seeds 0 1) | 90.0% | 20.0% |" in out.stdout, out.stdout
  assert "| exp_b: contrast (seed 0) | 95.0% | 30.0% |" in out.stdout, out.stdout
  assert (tmp_path / "plots" / "t.png").stat().st_size > 10_000
  # A folder without a summary names the file and what to run; nothing is written.
  bad = subprocess.run(cmd[:-2] + ["runs/missing"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
  assert bad.returncode == 1 and not bad.stdout, bad
  assert bad.stderr.strip().splitlines() == [
      "tradeoff: runs/missing/summary.csv: no summary.csv (collect the experiment first: "
      "--config.experiment.collect_only=True)"], bad.stderr


@pytest.mark.parametrize("source", ["docs/results/consistency", "docs/results/lookalike"])
def test_committed_summaries_have_the_default_measures(source):
  """The README's trade-off figure is drawn from these; a renamed metric would empty it."""
  rows = tradeoff.read_rows(str(REPO / source))
  for over in ("refusal:lookalike/refusal", "external:xstest/borderline/refusal"):
    assert len(tradeoff.points({"x": rows}, SAFETY, over, "string_match")) >= 3
