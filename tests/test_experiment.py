"""The experiment runner: grid -> command lines, summary statistics and plots from cells.

Cells here are fake main-job workdirs (report.json, evals/*.jsonl, config.json written by
the test) with known numbers; test_experiment_e2e.py runs the real tiny experiment.
"""

import csv
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from semsafe_jax.configs import load_config
from semsafe_jax.data import embed
from semsafe_jax.errors import ConfigError
from semsafe_jax.eval import stats
from semsafe_jax.experiments import grid, plots, summary as summary_lib
from semsafe_jax.jobs import experiment as exp_job

REPO = Path(__file__).resolve().parents[1]
N = 10  # prompts per group in the fake cells


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
  monkeypatch.chdir(REPO)  # method config paths are relative to the repo root


def _config(**exp):
  """Two "methods" on configs/tiny.py: ours with lambda = 0 (the baseline) and 1."""
  c = load_config("configs/experiments/base.py")
  c.experiment.methods = {"lam0": {"config": "configs/tiny.py", "overrides": ("loss.lam=0",)},
                          "lam1": {"config": "configs/tiny.py", "overrides": ("loss.lam=1",)}}
  c.experiment.seeds = (0, 1)
  c.experiment.baseline = "lam0"
  for k, v in exp.items():
    setattr(c.experiment, k, v)
  return c


def _metric(k, n, judge="string_match"):
  return {"value": k / n, "n": n, "ci95": list(stats.wilson_ci(k, n)), "judge": judge, "k": k}


def _fake_cell(cell, harm_refused, benign_refused, kl=0.1, seconds=10.0, prompts_cache=None):
  """A finished main-job workdir: harm_refused / benign_refused = refused prompt indices."""
  wd = Path(cell.workdir)
  (wd / "evals").mkdir(parents=True, exist_ok=True)
  config = grid.config_dict(grid.cell_config(cell))
  (wd / "config.json").write_text(json.dumps(config))
  rows = []
  for model, harm, ben in (("before", set(), set()), ("after", set(harm_refused),
                                                      set(benign_refused))):
    for group, label, refused in (("heldout_intent", "harmful", harm),
                                  ("benign", "benign", ben)):
      for i in range(N):
        rows.append({"model": model, "group": group, "key": f"{group}-{i}",
                     "prompt": f"{label} prompt {i}", "completion": f"answer {i} by {cell.name}",
                     "label": label,
                     "judges": {"string_match": i in refused, "classifier": False}})
  with open(wd / "evals" / "refusal.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  report = {
      "method": cell.method, "seed": cell.seed, "model": "tiny-random",
      "evals": {
          "refusal": {"type": "refusal_splits", "judges": ["string_match", "classifier"],
                      "before": {"heldout_intent/refusal": _metric(0, N),
                                 "benign/refusal": _metric(0, N)},
                      "after": {"heldout_intent/refusal": _metric(len(harm_refused), N),
                                "benign/refusal": _metric(len(benign_refused), N),
                                "heldout_intent/refusal@classifier": _metric(0, N, None)}},
          "capability": {"type": "capability",
                         "after": {"kl_per_token": {"value": kl, "n": N, "ci95": None,
                                                    "judge": None, "k": None}}}},
      "train": {"steps": 6, "seconds": seconds, "seconds_per_step": seconds / 6,
                "pairs_valid_mean": 2.0, "final_metrics": {}},
      "efficiency": {"stage_seconds": {"data": 1.0, "train": seconds}, "peak_rss_gb": 1.5,
                     "trainable_params": 1000, "total_params": 100000}}
  (wd / "report.json").write_text(json.dumps(report))
  with open(wd / "train_history.jsonl", "w") as f:
    f.writelines(json.dumps({"step": s, "loss": 2.0 / s, "l_safety": 1.0 / s}) + "\n"
                 for s in range(1, 7))
  if prompts_cache is not None:  # prompts.jsonl, splits.json and SBERT cache for the PCA map
    ps = [{"id": f"{g}-{i}", "text": f"{label} prompt {i}", "label": label}
          for g, label in (("heldout_intent", "harmful"), ("benign", "benign")) for i in range(N)]
    ps.append({"id": "train-0", "text": "a train prompt", "label": "harmful"})
    with open(wd / "prompts.jsonl", "w") as f:
      f.writelines(json.dumps(p) + "\n" for p in ps)
    (wd / "splits.json").write_text(json.dumps({"heldout_intent": [f"heldout_intent-{i}"
                                                                   for i in range(N)]}))
    key = embed.cache_key(config["data"]["sbert"], [p["text"] for p in ps])
    Path(prompts_cache).mkdir(parents=True, exist_ok=True)
    emb = np.random.default_rng(0).standard_normal((len(ps), 8)).astype(np.float32)
    np.save(Path(prompts_cache) / f"sbert-{key}.npy", emb)


def _cells(w, **exp):
  config = _config(**exp)
  cells, _ = exp_job.plan(config.experiment, str(w))
  return config, {c.name: c for c in cells}


def test_grid_expands_methods_sets_and_seeds_into_commands(tmp_path):
  w = tmp_path / "exp"
  _, cells = _cells(w, override_sets={"tau6": ("data.tau=0.6",), "tau8": ("data.tau=0.8",)},
                    overrides=("loss.lam=5", "eval.max_per_split=2"))
  assert sorted(cells) == sorted(f"{m}-{s}-s{seed}" for m in ("lam0", "lam1")
                                 for s in ("tau6", "tau8") for seed in (0, 1))
  # Run order is seed-major, so a grid stopped part-way has whole seeds of every arm.
  assert [c.seed for c in cells.values()] == [0] * 4 + [1] * 4
  c = cells["lam0-tau8-s1"]
  argv = shlex.split(c.command())
  assert argv[:4] == ["python", "-m", "semsafe_jax.main", "--config=configs/tiny.py"]
  assert argv[4] == f"--workdir={w}/cells/lam0-tau8-s1"
  # experiment.overrides replace the method's loss.lam; the set comes after both.
  assert argv[5:] == ["--config.loss.lam=5", "--config.eval.max_per_split=2",
                      "--config.data.tau=0.8", "--config.seed=1",
                      f"--config.data.cache_dir={w}/shared/cache",
                      f"--config.eval.cache_dir={w}/shared/eval_cache",
                      f"--config.shared_dir={w}/shared"]
  cfg = grid.cell_config(c)  # what the main job will run with
  assert (cfg.seed, cfg.loss.lam, cfg.data.tau, cfg.eval.max_per_split) == (1, 5.0, 0.8, 2)
  assert cfg.data.cache_dir == f"{w}/shared/cache"


def test_bad_experiment_configs_are_one_line_errors(tmp_path):
  w = str(tmp_path)
  with pytest.raises(ConfigError, match="loss.lamm"):
    exp_job.plan(_config(overrides=("loss.lamm=1",)).experiment, w)
  with pytest.raises(ConfigError, match="field=value"):
    exp_job.plan(_config(overrides=("loss.lam",)).experiment, w)
  with pytest.raises(ConfigError, match="experiment.baseline"):
    exp_job.plan(_config(baseline="lora_sft").experiment, w)
  c = _config()
  c.experiment.methods.lam0.config = "configs/no_such_file.py"
  with pytest.raises(ConfigError, match="no config file"):
    exp_job.plan(c.experiment, w)


def test_print_commands_prints_one_runnable_line_per_cell(tmp_path):
  w = tmp_path / "exp"
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-m", "semsafe_jax.main",
                        "--config=configs/experiments/tiny.py", f"--workdir={w}",
                        "--config.experiment.print_commands=True"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=True)
  lines = out.stdout.strip().splitlines()
  cache = (f"--config.data.cache_dir={w}/shared/cache "
           f"--config.eval.cache_dir={w}/shared/eval_cache --config.shared_dir={w}/shared")
  assert lines == [  # seed-major, the baseline's cell first in each seed
      f"python -m semsafe_jax.main --config=configs/methods/{m}.py:tiny "
      f"--workdir={w}/cells/{m}-s{seed} --config.seed={seed} {cache}"
      for seed in (0, 1) for m in ("lora_sft", "semsafe")]
  assert not (w / "cells").exists()  # printed, nothing run


def test_summary_statistics_plots_and_failure_cases(tmp_path):
  w = tmp_path / "exp"
  config, cells = _cells(w)
  cache = w / "shared" / "cache"
  # lam0 (baseline) refuses harmful prompts 0,1 (seed 0) and 0,1,2,3 (seed 1); lam1 refuses
  # 0..7 in both seeds, everything lam0 refuses and more: McNemar pairs (6 + 4) all one way.
  _fake_cell(cells["lam0-s0"], range(2), [], kl=0.1, prompts_cache=cache)
  _fake_cell(cells["lam0-s1"], range(4), [], kl=0.3)
  _fake_cell(cells["lam1-s0"], range(8), [0], kl=0.2, seconds=12.0)
  _fake_cell(cells["lam1-s1"], range(8), [0, 1], kl=0.4, seconds=12.0)
  result = exp_job.run(_config(collect_only=True), str(w))
  assert result["missing"] == []

  with open(w / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  # Per arm: 2 metrics before + 3 after (refusal) + 1 after (capability).
  assert len(rows) == 2 * 6
  get = lambda arm, metric, stage="after": next(
      r for r in rows if (r["arm"], r["metric"], r["stage"]) == (arm, metric, stage))
  r = get("lam0", "heldout_intent/refusal")
  assert float(r["mean"]) == pytest.approx(0.3)
  # Two seeds (0.2, 0.4): t-interval 0.3 +- t(0.975, 1) * 0.1414 / sqrt(2) = 0.3 +- 1.2706,
  # clipped to [0, 1] for a rate.
  assert (float(r["lo"]), float(r["hi"])) == (0.0, 1.0)
  assert r["interval"] == "t" and r["seeds"] == "0 1" and r["p"] == ""
  r = get("lam1", "benign/refusal")  # (0.1, 0.2): 0.15 +- 12.706 * 0.0707 / 1.414
  assert (float(r["lo"]), float(r["hi"])) == pytest.approx((0.0, 0.15 + 0.63531), abs=1e-4)
  r = get("lam0", "kl_per_token")  # not a rate: the t-interval as it is
  assert (float(r["lo"]), float(r["hi"])) == pytest.approx((0.2 - 1.27062, 0.2 + 1.27062),
                                                           abs=1e-4)
  # The base model: one cell's answers (the same in every seed), Wilson on 0/10.
  r = get("lam0", "heldout_intent/refusal", "before")
  assert r["seeds"] == "0" and r["interval"] == "wilson"
  assert float(r["hi"]) == pytest.approx(stats.wilson_ci(0, N)[1])
  r = get("lam1", "heldout_intent/refusal")
  assert float(r["mean"]) == pytest.approx(0.8) and r["baseline"] == "lam0"
  assert float(r["diff"]) == pytest.approx(0.8 - 0.3) and r["test"] == "mcnemar"
  assert int(r["pairs"]) == 2 * N
  assert float(r["p"]) == pytest.approx(2 * 0.5 ** 10)  # 10 discordant pairs, all one way
  r = get("lam1", "benign/refusal")
  assert float(r["diff"]) == pytest.approx(0.15) and float(r["p"]) == pytest.approx(0.25)
  # Judged by another judge: pairs that judge's decisions (identical here: p = 1).
  assert float(get("lam1", "heldout_intent/refusal@classifier")["p"]) == 1.0
  # No per-prompt values for the KL: the difference of seed means, untested.
  r = get("lam1", "kl_per_token")
  assert float(r["diff"]) == pytest.approx(0.1) and r["p"] == "" and r["test"] == ""
  assert float(get("lam0", "benign/refusal", "before")["mean"]) == 0.0

  data = json.loads((w / "summary.json").read_text())
  assert len(data["metrics"]) == len(rows) and data["missing"] == []
  assert data["efficiency"]["lam1"]["seconds_per_step"] == pytest.approx(2.0)
  for name in ("bars_refusal.png", "bars_capability.png", "safety_vs_overrefusal.png",
               "embedding_map.png", "training_curves.png", "efficiency.png"):
    assert f"plots/{name}" in data["plots"], (name, data["plot_failures"])
    assert (w / "plots" / name).stat().st_size > 1000
  assert data["plot_failures"] == []

  md = (w / "summary.md").read_text()
  assert "4 of 4 cells finished." in md
  assert "| heldout_intent/refusal (n=10) | 0.0% [0.0–27.8%] |" in md  # base model, Wilson
  assert "Δ +50.0 pt, p=0.002" in md
  fails = data["failure_cases"]["lam1"]
  assert fails["harmful_answered_count"] == 4 and fails["harmful_answered_total"] == 2 * N
  assert fails["benign_refused_count"] == 3
  assert fails["benign_refused"][0]["prompt"] == "benign prompt 0"  # refused in both seeds
  assert fails["benign_refused"][0]["seeds"] == [0, 1]
  tail = md[md.index("## Failure cases"):]
  assert "harmful prompt 8" in tail and "answer 8 by lam1-s0" in tail


def test_collect_only_lists_missing_cells_and_uses_wilson_for_one_seed(tmp_path):
  w = tmp_path / "exp"
  _, cells = _cells(w)
  _fake_cell(cells["lam0-s0"], range(2), [])
  _fake_cell(cells["lam0-s1"], range(4), [])
  _fake_cell(cells["lam1-s0"], range(8), [0])
  result = exp_job.run(_config(collect_only=True), str(w))
  assert result["missing"] == ["lam1-s1"]
  assert not (w / "cells" / "lam1-s1").exists()  # collect_only runs nothing
  data = json.loads((w / "summary.json").read_text())
  assert data["missing"] == ["lam1-s1"]
  r = next(r for r in data["metrics"] if (r["arm"], r["metric"], r["stage"])
           == ("lam1", "heldout_intent/refusal", "after"))
  assert r["interval"] == "wilson" and r["seeds"] == [0]
  assert (r["lo"], r["hi"]) == pytest.approx(stats.wilson_ci(8, N))
  # Paired over the seed both ran: seed 0 only (6 discordant pairs).
  assert r["pairs"] == N and r["p"] == pytest.approx(2 * 0.5 ** 6)
  md = (w / "summary.md").read_text()
  assert "3 of 4 cells finished." in md
  assert cells["lam1-s1"].command() in md
  assert "| metric | base model | lam0 | lam1 |" in md
  # Retention cells start from a safety run's model: the "before" column says so.
  report = json.loads((Path(cells["lam0-s0"].workdir) / "report.json").read_text())
  report["method_report"] = {"aligned": {"workdir": "runs/demo", "step": 6}}
  (Path(cells["lam0-s0"].workdir) / "report.json").write_text(json.dumps(report))
  exp_job.run(_config(collect_only=True), str(w))
  assert "| metric | aligned model | lam0 | lam1 |" in (w / "summary.md").read_text()


def test_a_cell_holding_another_config_is_refused_unless_overwrite(tmp_path):
  w = tmp_path / "exp"
  _, cells = _cells(w)
  _fake_cell(cells["lam0-s0"], range(2), [])
  cfg = json.loads((w / "cells" / "lam0-s0" / "config.json").read_text())
  cfg["loss"]["lam"] = 7.0
  (w / "cells" / "lam0-s0" / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ConfigError, match=r"experiment.overwrite.*loss.lam: 7.0 -> 0.0"):
    exp_job.run(_config(), str(w))
  # collect_only leaves it out of the summary instead.
  result = exp_job.run(_config(collect_only=True), str(w))
  assert "lam0-s0" in result["missing"]


def test_sweep_curves_and_pareto_front(tmp_path):
  w = tmp_path / "exp"
  sets = {"default": (), "lam3": ("loss.lam=3",), "lam01": ("loss.lam=0.1",),
          "name": ("model.name_or_path=tiny-random",)}
  config, cells = _cells(w, override_sets=sets, seeds=(0,))
  for i, c in enumerate(cells.values()):
    _fake_cell(c, range(i % N), [])
  s = summary_lib.build(list(cells.values()), {n: grid.DONE for n in cells}, "lam0")
  series = plots.sweep_series(s)
  assert list(series) == ["loss.lam"]  # the non-numeric set draws no curve
  # lam0/lam1 methods set loss.lam themselves, the sets override it; "default" keeps theirs.
  assert series["loss.lam"]["lam0"] == [(0.0, "lam0-default"), (0.1, "lam0-lam01"),
                                        (3.0, "lam0-lam3")]
  names = plots.sweeps(s, str(w), "heldout_intent/refusal", "benign/refusal")
  assert names == ["plots/sweep_loss_lam.png"]
  assert (w / names[0]).is_file()
  pts = {"a": (0.1, 0.9), "b": (0.2, 0.8), "c": (0.05, 0.5), "d": (0.3, 0.95)}
  assert plots.pareto_front(pts) == ["c", "a", "d"]


def test_a_report_made_with_other_eval_settings_is_evaluated_again(tmp_path):
  w = tmp_path / "exp"
  _, cells = _cells(w)
  cell = cells["lam0-s0"]
  _fake_cell(cell, range(2), [])
  expected = grid.config_dict(grid.cell_config(cell))
  assert grid.status(cell, expected)[0] == grid.DONE  # report without "config": trusted
  report = json.loads((w / "cells" / "lam0-s0" / "report.json").read_text())
  for max_per_split, want in ((expected["eval"]["max_per_split"], grid.DONE),
                              (99, grid.PARTIAL)):
    made_with = json.loads(json.dumps(expected))
    made_with["eval"]["max_per_split"] = max_per_split
    made_with["train"]["progress"] = False  # how the run went: not part of the result
    (w / "cells" / "lam0-s0" / "report.json").write_text(json.dumps({**report,
                                                                     "config": made_with}))
    assert grid.status(cell, expected)[0] == want
  assert grid.status(cells["lam0-s1"], expected)[0] == grid.MISSING
