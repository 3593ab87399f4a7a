"""benchmarks/bench_step_ab.py: two arms of one method, their steps alternated in one process;
run as the README says, from the repository root with a relative workdir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_step_ab  # pylint: disable=g-import-not-at-top,wrong-import-position


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "benchmarks/bench_step_ab.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900, check=False)


def test_alternates_two_arms_and_pairs_their_steps(tmp_path):
  workdir = os.path.relpath(tmp_path / "ab", REPO)
  out = _run(f"--workdir={workdir}", "--method=lora_sft", "--base=tiny", "--pairs=3",
             "--a=--config.model.remat=off", "--b=--config.model.remat=full",
             f"--json={tmp_path / 'r.json'}", "--", "--config.adapters.lora_rank=4")
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads((tmp_path / "r.json").read_text())
  assert set(r["arms"]) == {"A", "B"}
  # Each arm's own flags, then the ones after "--" that both share.
  assert r["arms"]["A"]["flags"] == ["--config.model.remat=off", "--config.adapters.lora_rank=4"]
  assert r["arms"]["B"]["flags"] == ["--config.model.remat=full", "--config.adapters.lora_rank=4"]
  for arm in r["arms"].values():
    assert len(arm["wall"]) == len(arm["cpu"]) == 3  # warm-up steps dropped
    assert all(t > 0 for t in arm["wall"])
  med, lo, hi = r["ratio_wall"]
  assert 0 < lo <= med <= hi
  assert "B / A, wall time:" in out.stdout
  # Each arm has its own workdir under the given one, the host stages one shared cache.
  assert {p.name for p in (tmp_path / "ab").iterdir()} >= {"A", "B", "shared"}


def test_ratio_interval_is_the_median_paired_ratio():
  a = [2.0, 2.0, 4.0, 1.0, 3.0]
  b = [2.2, 2.0, 4.8, 1.1, 3.3]  # ratios 1.1, 1.0, 1.2, 1.1, 1.1
  med, lo, hi = bench_step_ab.ratio_interval(a, b)
  assert abs(med - 1.1) < 1e-12
  assert 1.0 <= lo <= med <= hi <= 1.2
  # Pairing cancels a drift that scales both arms alike.
  drift = [1.0, 1.5, 0.8, 1.2, 1.1]
  assert bench_step_ab.ratio_interval([x * d for x, d in zip(a, drift)],
                                      [y * d for y, d in zip(b, drift)])[0] == med


def test_bad_arguments_are_one_line_errors(tmp_path):
  out = _run(f"--workdir={tmp_path}", "--method=nope", "--a=")
  assert out.returncode == 2
  assert "'nope' is not a method" in out.stderr.strip().splitlines()[-1]
  out = _run(f"--workdir={tmp_path}", "--a=", "--pairs=1")
  assert out.returncode == 2
  assert "--pairs=1: must be >= 2" in out.stderr.strip().splitlines()[-1]
