"""probes/gate.py and experiments/probe_gate.py: the share of each split a training-side probe would gate in;
the command run as the README says, from the repository root with a relative workdir."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from semsafe_jax.probes import gate as probe_gate

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_threshold_keeps_the_recall_and_the_layer_is_chosen_on_val_lookalike():
  cal = np.array([[0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.6, 0.7, 0.8, 0.9]])  # [L=2, N=5]
  probs = {probe_gate.CALIBRATION: cal,
           "val_lookalike": np.array([[0.35, 0.05], [0.55, 0.95]]),
           "heldout_intent": np.array([[0.9, 0.1, 0.25], [0.9, 0.4, 0.85]])}
  out = probe_gate.gate_table(probs, recall=0.75)
  # A score of each layer's calibration set that keeps 4 of 5 (at least 75%) at or above it.
  np.testing.assert_allclose(out["threshold"], [0.2, 0.6])
  assert out["flagged"][probe_gate.CALIBRATION] == [0.8, 0.8]
  assert out["flagged"]["val_lookalike"] == [0.5, 0.5]  # a tie: the earliest layer
  np.testing.assert_allclose(out["flagged"]["heldout_intent"], [2 / 3, 2 / 3])
  assert out["chosen_layer"] == 0
  probs["val_lookalike"] = np.array([[0.35, 0.25], [0.55, 0.95]])  # layer 1 flags fewer
  assert probe_gate.gate_table(probs, recall=0.75)["chosen_layer"] == 1
  assert out["n"] == {probe_gate.CALIBRATION: 5, "val_lookalike": 2, "heldout_intent": 3}
  with pytest.raises(ValueError, match="recall=0"):
    probe_gate.gate_table(probs, recall=0.0)
  table = probe_gate.markdown(out).splitlines()
  assert len(table) == 2 + 2 and table[2].startswith("| 0 (chosen) | 0.200 | 80.0% |")


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "semsafe_jax.experiments.probe_gate", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                        check=False)


def test_command_on_the_tiny_config(tmp_path):
  workdir = os.path.relpath(tmp_path / "gate", REPO)
  out = _run("--config=configs/tiny.py", f"--workdir={workdir}", "--max_per_split=8")
  assert out.returncode == 0, out.stderr[-4000:]
  r = json.loads((tmp_path / "gate" / "probe_gate.json").read_text())
  n_layers = len(r["threshold"])
  assert n_layers == 3  # tiny-random: embeddings + 2 layers
  assert probe_gate.CALIBRATION in r["flagged"] and "heldout_intent" in r["flagged"]
  for name, shares in r["flagged"].items():
    assert len(shares) == n_layers and all(0.0 <= s <= 1.0 for s in shares), name
    assert 0 < r["n"][name] <= 8 or name == probe_gate.CALIBRATION
  assert min(r["flagged"][probe_gate.CALIBRATION]) >= 0.97 - 1e-9
  assert r["n_fit_harmful"] > 0 and r["n_fit_safe"] > 0
  assert "| layer | threshold |" in out.stdout


def test_bad_recall_is_a_one_line_error(tmp_path):
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path}", "--recall=1.5")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == "probe_gate: --recall=1.5: must be in (0, 1]"
  assert not (tmp_path / "probe_gate.json").exists()
  (tmp_path / "a_file").write_text("")  # the main job's workdir check, not a copy of it
  out = _run("--config=configs/tiny.py", f"--workdir={tmp_path / 'a_file'}")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith("probe_gate: --workdir=")
  assert "is a file" in out.stderr.strip().splitlines()[-1]
