"""benchmarks/bench_methods.py: every method through its own prepare and the shared fit, timed;
run as the README says, from the repository root with a relative workdir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "benchmarks/bench_methods.py", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900, check=False)


def test_times_each_method_in_its_own_process(tmp_path):
  workdir = os.path.relpath(tmp_path / "bench", REPO)
  out = _run(f"--workdir={workdir}", "--methods=lora_sft,dpo", "--reps=2", "--base=tiny",
             f"--json={tmp_path / 'r.json'}")
  assert out.returncode == 0, out.stderr[-4000:]
  rows = json.loads((tmp_path / "r.json").read_text())
  assert [r["method"] for r in rows] == ["lora_sft", "dpo"]
  for r in rows:
    # 2 timed steps each (the first two intervals, the compiles, are dropped).
    assert len(r["wall"]) == len(r["cpu"]) == 2, r
    assert all(t > 0 for t in r["wall"]), r
    assert r["peak_rss_gb"] > 0 and r["prepare_s"] > 0, r
  assert rows[0]["trainable"] == rows[1]["trainable"] > 0  # the same LoRA
  table = [ln for ln in out.stdout.splitlines() if ln.startswith("| lora_sft ")
           or ln.startswith("| dpo ")]
  assert len(table) == 2 and table[0].split("|")[3].strip() == "1.00", out.stdout
  # The shared host stages were cached where the docstring says.
  assert (tmp_path / "bench" / "shared").is_dir()


def test_unknown_method_is_a_one_line_error(tmp_path):
  out = _run(f"--workdir={tmp_path}", "--methods=lora_sft,nope")
  assert out.returncode == 2
  assert "'nope' is not a method" in out.stderr.strip().splitlines()[-1]
