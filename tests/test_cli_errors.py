"""The command line on bad input: one line on stderr, exit code 2, nothing of the user's lost.

--debug (or SEMSAFE_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from semsafe_jax.train import inputs

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def cli(*flags, cwd, config=TINY, env=None, timeout=600) -> subprocess.CompletedProcess:
  full_env = {k: v for k, v in os.environ.items() if k != "SEMSAFE_DEBUG"}
  full_env.update({"HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu", **(env or {})})
  cmd = [sys.executable, "-m", "semsafe_jax.main", f"--config={config}", *flags]
  return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True,
                        timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
  """The one error line; asserts exit code 2 and no traceback."""
  assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-4000:]
  return lines[0]


# The values that used to run with exit code 0, or fail late after writing W/config.json.
BAD = [
    ("--config.train.steps=-5", "config.train.steps=-5"),
    ("--config.train.lr=-1", "config.train.lr=-1.0"),
    ("--config.adapters.lora_rank=0", "config.adapters.lora_rank=0"),
    ("--config.data.tau=1.5", "config.data.tau=1.5"),
    ("--config.data.k=0", "config.data.k=0"),
    ("--config.model.name_or_path=smollm3-tiny", "config.model.name_or_path='smollm3-tiny'"),
    ("--config.loss.scorer=first_tokens", "config.loss.scorer='first_tokens'"),
    ("--config.loss.consistency_repr=logits", "config.loss.consistency_repr='logits'"),
    ("--config.adapters.lora_targets=q_proj,vproj", "config.adapters.lora_targets='vproj'"),
]


@pytest.mark.parametrize("flag,start", BAD, ids=[f for f, _ in BAD])
def test_bad_value_fails_before_any_work(tmp_path, flag, start):
  line = error_line(cli("--workdir=run", flag, cwd=tmp_path))
  assert line.startswith(f"error: {start}: expected"), line
  # Checked before the job: no workdir, so no config.json that would refuse the fixed rerun.
  assert not (tmp_path / "run").exists()


def test_empty_workdir_is_an_error(tmp_path):
  line = error_line(cli("--workdir=", cwd=tmp_path))
  assert "--workdir is empty" in line
  assert os.listdir(tmp_path) == []  # nothing written into the current folder


def test_workdir_that_is_a_file(tmp_path):
  (tmp_path / "notes").write_text("mine")
  line = error_line(cli("--workdir=notes", cwd=tmp_path))
  assert "is a file" in line and (tmp_path / "notes").read_text() == "mine"


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, how):
  flags = ["--workdir=run", "--config.data.k=0"] + (["--debug"] if how == "flag" else [])
  proc = cli(*flags, cwd=tmp_path, env={"SEMSAFE_DEBUG": "1"} if how == "env" else None)
  assert proc.returncode not in (0, 2)
  assert "Traceback" in proc.stderr and "ConfigError: config.data.k=0" in proc.stderr


def test_non_utf8_prompts_file(tmp_path):
  (tmp_path / "prompts.txt").write_bytes("Comment ça va ?\n".encode("latin-1"))
  line = error_line(cli("--workdir=run", "--config.mode=generate",
                        "--config.generate.prompts_file=prompts.txt", cwd=tmp_path))
  assert "prompts.txt" in line and "UTF-8" in line, line


def test_encode_rows_of_no_prompts_is_empty():
  class _Tok:  # never called: there is nothing to encode
    pad_token_id = 0

  rows = inputs.encode_rows(_Tok(), [], [], max_len=128, max_response=32)
  assert rows.ids.shape == (0, 16) and rows.mask.shape == (0, 16) and rows.truncated == 0
  assert rows.take(np.zeros((0,), np.int64))["ids"].shape == (0, 16)


def test_harmful_only_data_fails_with_one_line(tmp_path):
  """A source with harmful prompts only: the train job stops with a one-line data error."""
  builtin = ROOT / "semsafe_jax" / "data" / "builtin" / "prompts.jsonl"
  rows = [json.loads(line) for line in builtin.read_text(encoding="utf-8").splitlines() if line]
  harmful = [r for r in rows if r["label"] == "harmful"]
  intents = sorted({r["intent_id"] for r in harmful})[:20]
  src = tmp_path / "harmful.jsonl"
  src.write_text("".join(json.dumps(r) + "\n" for r in harmful if r["intent_id"] in intents))
  line = error_line(cli("--workdir=run", "--config.data.sources=jsonl:harmful.jsonl",
                        "--config.train.progress=False", "--config.probe.train=False",
                        "--config.eval.max_per_split=1", cwd=tmp_path))
  assert "benign" in line or "borderline" in line, line
