"""The main job end to end on configs/tiny.py, through the real command line.

What the README claims about a run, read from what the run itself records: report.json's
`train.start_step` / `steps_run` / `step_traces` (where this invocation started, how many
steps it trained, how often the train step compiled) and `efficiency.decode_traces` /
`decode_keys` (compilations of the decoder and how many distinct shape buckets they were for).
"""

import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from semsafe_jax.train import checkpoint as ckpt_lib

REPO = Path(__file__).resolve().parents[1]
SPLITS = ("heldout_intent", "heldout_phrasing", "borderline", "benign", "lookalike")
STEPS = 6  # configs/tiny.py: train.steps, with a checkpoint every 3 steps


def _main(workdir, *flags, config="configs/tiny.py", check=True):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  cmd = [sys.executable, "-m", "semsafe_jax.main", f"--config={config}", f"--workdir={workdir}",
         *flags]
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  if check and out.returncode != 0:
    raise AssertionError(f"{' '.join(cmd)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
  return out


def _rows(path):
  return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _finished_steps(workdir) -> list[int]:
  d = Path(workdir) / ckpt_lib.CHECKPOINT_DIR
  # Orbax writes into a temporary name and renames when done: digits = finalised.
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _adapters(workdir) -> dict[str, np.ndarray]:
  params, _ = ckpt_lib.load_latest_adapters(workdir)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  w = tmp_path_factory.mktemp("tiny_run") / "w"
  _main(w)
  # Later tests re-run the job in w, which rewrites report.json: keep the first run's.
  (w.parent / "first_report.json").write_bytes((w / "report.json").read_bytes())
  return w


def test_report_has_the_documented_shape(trained):
  rep = json.loads((trained.parent / "first_report.json").read_text())
  for key in ("before", "after"):
    for split in SPLITS:
      s = rep[key][split]
      assert 0.0 <= s["refusal_rate"] <= 1.0 and s["n"] > 0
      lo, hi = s["ci95"]
      assert 0.0 <= lo <= s["refusal_rate"] <= hi <= 1.0
  assert 0 < rep["trainable_params"] < rep["total_params"]
  assert rep["train_seconds"] > 0
  for name in ("answers_before.jsonl", "answers_after.jsonl"):
    rows = _rows(trained / name)
    assert {r["split"] for r in rows} == set(SPLITS)
    assert all({"split", "prompt", "completion", "refused"} <= r.keys() for r in rows)
  assert (trained / "report.md").read_text().startswith("# semsafe_jax run report")
  for name in ("prompts.jsonl", "pairs.npz", "splits.json", "mining_stats.json", "probe",
               "base_answers.jsonl", "refusal_rates.png", "tensorboard"):
    assert (trained / name).exists(), name


def test_train_step_compiles_once_and_decoding_once_per_bucket(trained):
  """Counted on the real train step (trainer.fit's TrainStep) and the real decoder
  (models/generate.py's jit) in the evaluation stage: every evaluation on both models
  (the job drops compiled programs between stages, so earlier stages' do not carry over)."""
  rep = json.loads((trained.parent / "first_report.json").read_text())
  assert rep["train"]["start_step"] == 0 and rep["train"]["steps_run"] == STEPS
  assert rep["train"]["step_traces"] == 1
  eff = rep["efficiency"]
  # Several buckets (two models, evaluation lengths, prefills), none compiled twice.
  assert eff["decode_traces"] == eff["decode_keys"] >= 4, eff
  # Peak host memory when each stage ended: a running maximum, the last not above the total.
  peaks = list(eff["stage_peak_rss_gb"].values())
  assert list(eff["stage_peak_rss_gb"]) == list(eff["stage_seconds"])
  assert 0 < peaks[0] and peaks == sorted(peaks) and peaks[-1] <= eff["peak_rss_gb"], eff


def test_rerun_resumes_instead_of_retraining(trained):
  before = (trained / "answers_after.jsonl").read_text()
  history = (trained / "train_history.jsonl").read_text()
  out = _main(trained)
  train = json.loads((trained / "report.json").read_text())["train"]
  # Started from the last checkpoint; no step ran, so the step was never even traced.
  assert train["start_step"] == STEPS, train
  assert train["steps_run"] == 0 and train["step_traces"] == 0, train
  assert _finished_steps(trained)[-1] == STEPS
  assert (trained / "train_history.jsonl").read_text() == history
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
  """Generate mode in the workdir answers as the trained model did in its own evaluation
  (answers_after.jsonl), and with adapters=False as the base model did (answers_before)."""
  saved = json.loads((trained / "config.json").read_text())
  after = {r["prompt"]: r["completion"] for r in _rows(trained / "answers_after.jsonl")}
  before = {r["prompt"]: r["completion"] for r in _rows(trained / "answers_before.jsonl")}
  prompts = list(after)  # the evaluation's prompts, once each, in its order: the same batches
  f = tmp_path / "prompts.jsonl"
  f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
  flags = ("--config.mode=generate", f"--config.generate.prompts_file={f}",
           f"--config.generate.max_new_tokens={saved['eval']['max_new_tokens']}",
           f"--config.generate.batch_size={saved['eval']['batch_size']}")
  _main(trained, *flags)
  with_adapters = _rows(trained / "generations.jsonl")
  _main(trained, *flags, "--config.generate.adapters=False")
  base = _rows(trained / "generations.jsonl")
  assert [r["prompt"] for r in with_adapters] == [r["prompt"] for r in base] == prompts
  assert all(r["adapters"] for r in with_adapters) and not any(r["adapters"] for r in base)
  assert [r["completion"] for r in with_adapters] == [after[p] for p in prompts]
  assert [r["completion"] for r in base] == [before[p] for p in prompts]
  changed = sum(a["completion"] != b["completion"] for a, b in zip(with_adapters, base))
  assert changed > 0, "the trained adapters answer every prompt as the base model does"


def test_export_peft_from_the_run(trained):
  _main(trained, "--config.mode=export", "--config.export.format=peft")
  peft_dir = trained / "export" / "peft"
  assert (peft_dir / "adapter_config.json").exists()
  assert (peft_dir / "adapter_model.safetensors").exists()


# --- SIGKILL mid-training, then the same command again. ------------------------------------

# The probe weights the pairs and the refusal classifier scores them, so both stages feed
# the loss (the classifier reads a response, which unlabelled partners lack).
KILL_FLAGS = ("--config.probe.use=weight_pairs", "--config.loss.scorer=classifier",
              "--config.data.unlabeled_per_step=0")
KILL_AT = 4  # 0-based step about to run: steps 1-4 trained, step 3 checkpointed
# Computed again on a rerun (cheap, deterministic), so they must come out the same ...
RECOMPUTED = ("prompts.jsonl", "splits.json", "pairs.npz", "probe/safety_probe.npz",
              "refusal_classifier.npz")
# ... and generated once, then reused.
REUSED = ("answers_before.jsonl", "base_answers.jsonl")


def _content(path: Path):
  if path.suffix == ".npz":  # zip entries carry their write time: compare the arrays
    with np.load(path) as z:
      return {k: z[k].tolist() for k in z.files}
  return path.read_text()


def _kill_mid_training(workdir: Path, flags, log: Path) -> None:
  """Runs the job until it is about to train step KILL_AT + 1 with step 3's checkpoint
  on disk, then SIGKILLs it (tests/pause_main_job.py holds it there)."""
  marker = workdir.parent / "paused"
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEMSAFE_TEST_PAUSE": f"{KILL_AT}:{marker}"}
  cmd = [sys.executable, str(REPO / "tests" / "pause_main_job.py"), "--config=configs/tiny.py",
         f"--workdir={workdir}", *flags]
  with open(log, "w") as out:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
  deadline = time.time() + 900
  try:
    while not (marker.exists() and 3 in _finished_steps(workdir)):
      assert proc.poll() is None, f"the job exited early:\n{log.read_text()[-6000:]}"
      assert time.time() < deadline, f"the job never paused:\n{log.read_text()[-6000:]}"
      time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_sigkill_mid_training_then_rerun_ends_with_the_uninterrupted_adapters(tmp_path):
  flags = (*KILL_FLAGS, f"--config.data.cache_dir={tmp_path / 'sbert'}")  # shared embeddings
  straight = tmp_path / "straight"
  _main(straight, *flags)

  w = tmp_path / "killed"
  _kill_mid_training(w, flags, tmp_path / "killed.log")
  assert not (w / "report.json").exists()
  assert _finished_steps(w)[-1] == 3
  stages = {name: _content(w / name) for name in RECOMPUTED}
  reused = {name: (w / name).stat().st_mtime_ns for name in REUSED}
  sbert = {p: p.stat().st_mtime_ns for p in (tmp_path / "sbert").iterdir()}

  _main(w, *flags)
  train = json.loads((w / "report.json").read_text())["train"]
  assert (train["start_step"], train["steps_run"], train["step_traces"]) == (3, STEPS - 3, 1)
  for name in RECOMPUTED:
    assert _content(w / name) == stages[name] == _content(straight / name), name
  assert {name: (w / name).stat().st_mtime_ns for name in REUSED} == reused
  assert {p: p.stat().st_mtime_ns for p in (tmp_path / "sbert").iterdir()} == sbert

  got, want = _adapters(w), _adapters(straight)
  assert got.keys() == want.keys()
  for k in want:
    np.testing.assert_allclose(got[k], want[k], atol=1e-6, rtol=0, err_msg=k)
  # The resumed steps saw the same batches (sampler state) and gave the same losses.
  resumed = _rows(w / "train_history.jsonl")
  ref = {r["step"]: r["loss"] for r in _rows(straight / "train_history.jsonl")}
  assert [r["step"] for r in resumed] == [4, 5, 6]
  for r in resumed:
    np.testing.assert_allclose(r["loss"], ref[r["step"]], rtol=1e-6)
  assert (w / "answers_after.jsonl").read_text() == (straight / "answers_after.jsonl").read_text()
