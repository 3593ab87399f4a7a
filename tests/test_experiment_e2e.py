"""The tiny experiment end to end through the real command line: 2 methods (lora_sft, ours)
x 2 seeds of the tiny main job, killed in the middle of its second cell and run again.

Four tiny main jobs (about a minute each on two cores) plus the resumed one.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CELLS = ("lora_sft-s0", "semsafe-s0", "lora_sft-s1", "semsafe-s1")  # run order: seed-major


def _cmd(workdir):
  return [sys.executable, "-m", "semsafe_jax.main", "--config=configs/experiments/tiny.py",
          f"--workdir={workdir}"]


def test_tiny_experiment_resumes_after_a_kill_and_summarises(tmp_path):
  w = tmp_path / "exp"
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  second = w / "cells" / CELLS[1]
  with open(tmp_path / "first.log", "wb") as log:
    # Its own process group: the kill takes the runner and the cell it is running.
    proc = subprocess.Popen(_cmd(w), cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
      deadline = time.time() + 1200
      while not (second / "checkpoints").exists():  # the second cell is training
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
        assert time.time() < deadline, "the second cell never started training"
        time.sleep(0.2)
    finally:
      if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  first = w / "cells" / CELLS[0]
  assert (first / "report.json").is_file() and not (second / "report.json").exists()
  first_report = (first / "report.json").stat().st_mtime_ns
  first_log = (w / "logs" / f"{CELLS[0]}.log").stat().st_size

  out = subprocess.run(_cmd(w), cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-6000:]
  assert f"Resuming cell 1/3 {CELLS[1]}" in text  # the killed cell, in its own workdir
  assert "3 to run" in text and f"cell 1/3 {CELLS[0]}" not in text
  assert (first / "report.json").stat().st_mtime_ns == first_report  # not rerun
  assert (w / "logs" / f"{CELLS[0]}.log").stat().st_size == first_log
  assert "4 of 4 cells finished" in out.stdout
  for c in CELLS:
    assert (w / "cells" / c / "report.json").is_file()
  assert (w / "shared" / "cache").is_dir() and any((w / "shared" / "cache").iterdir())

  data = json.loads((w / "summary.json").read_text())
  assert data["missing"] == [] and len(data["cells"]) == 4
  with open(w / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == len(data["metrics"]) > 0
  after = [r for r in rows if r["stage"] == "after"]
  by_arm = {arm: sorted((r["eval"], r["metric"]) for r in after if r["arm"] == arm)
            for arm in ("lora_sft", "semsafe")}
  assert by_arm["lora_sft"] == by_arm["semsafe"] and by_arm["semsafe"]  # the same metrics per arm
  assert all(r["seeds"] == "0 1" for r in after)  # both seeds in every mean
  refusal = [r for r in after if r["arm"] == "semsafe" and r["metric"].endswith("/refusal")]
  assert refusal and all(r["test"] == "mcnemar" and r["p"] != "" for r in refusal)
  for name in ("safety_vs_overrefusal.png", "embedding_map.png", "training_curves.png",
               "efficiency.png"):
    assert f"plots/{name}" in data["plots"], (name, data["plot_failures"])
  assert any(p.startswith("plots/bars_") for p in data["plots"])
  assert data["plot_failures"] == []
  md = (w / "summary.md").read_text()
  assert "4 of 4 cells finished." in md and "## Failure cases" in md
