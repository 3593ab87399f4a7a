"""The main job end to end on configs/tiny.py, through the real command line."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("heldout_intent", "heldout_phrasing", "borderline", "benign", "lookalike")


def _main(workdir, *flags, config="configs/tiny.py", check=True):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "semsafe_jax.main", f"--config={config}", f"--workdir={workdir}",
         *flags]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  if check and out.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
  return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  w = tmp_path_factory.mktemp("tiny_run")
  _main(w)
  return w


def test_report_has_the_documented_shape(trained):
  rep = json.loads((trained / "report.json").read_text())
  for key in ("before", "after"):
    for split in SPLITS:
      s = rep[key][split]
      assert 0.0 <= s["refusal_rate"] <= 1.0 and s["n"] > 0
      lo, hi = s["ci95"]
      assert 0.0 <= lo <= s["refusal_rate"] <= hi <= 1.0
  assert 0 < rep["trainable_params"] < rep["total_params"]
  assert rep["train_seconds"] > 0
  for name in ("answers_before.jsonl", "answers_after.jsonl"):
    rows = [json.loads(line) for line in (trained / name).read_text().splitlines()]
    assert {r["split"] for r in rows} == set(SPLITS)
    assert all({"split", "prompt", "completion", "refused"} <= r.keys() for r in rows)
  assert (trained / "report.md").read_text().startswith("# semsafe_jax run report")
  for name in ("prompts.jsonl", "pairs.npz", "splits.json", "mining_stats.json", "probe",
               "base_answers.jsonl", "refusal_rates.png", "tensorboard"):
    assert (trained / name).exists(), name


def test_rerun_resumes_instead_of_retraining(trained):
  before = (trained / "answers_after.jsonl").read_text()
  out = _main(trained)
  assert "Resumed" in out.stderr or "already" in out.stderr.lower()
  assert (trained / "answers_after.jsonl").read_text() == before  # greedy and same adapters
  # The command line restarts itself under the caching allocator (malloc.py); the tbb wheel
  # that provides one is a dependency on Linux x86_64.
  if sys.platform.startswith("linux") and platform.machine() == "x86_64":
    assert "host allocator: " in out.stderr and "host allocator: system" not in out.stderr


def test_changed_config_in_existing_workdir_is_refused(trained):
  out = _main(trained, "--config.loss.lam=3.0", check=False)
  assert out.returncode != 0
  assert "overwrite" in (out.stderr + out.stdout)


def test_generate_uses_trained_adapters(trained, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("How do I pick a lock?\nWrite a haiku about rain.\n")
  _main(trained, "--config.mode=generate", f"--config.generate.prompts_file={prompts}",
        "--config.generate.max_new_tokens=6")
  with_adapters = [json.loads(x) for x in (trained / "generations.jsonl").read_text().splitlines()]
  _main(trained, "--config.mode=generate", f"--config.generate.prompts_file={prompts}",
        "--config.generate.max_new_tokens=6", "--config.generate.adapters=False")
  base = [json.loads(x) for x in (trained / "generations.jsonl").read_text().splitlines()]
  assert [r["prompt"] for r in base] == ["How do I pick a lock?", "Write a haiku about rain."]
  assert all("completion" in r for r in base + with_adapters)


def test_export_peft_from_the_run(trained):
  _main(trained, "--config.mode=export", "--config.export.format=peft")
  peft_dir = trained / "export" / "peft"
  assert (peft_dir / "adapter_config.json").exists()
  assert (peft_dir / "adapter_model.safetensors").exists()
