"""benchmarks/bench_accelerator.py: runs green at toy shapes on the CPU; its real shapes,
FLOP counts and pod settings match the models and configs they name."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_accelerator.py"


def _load(path: pathlib.Path, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


bench = _load(SCRIPT, "bench_accelerator")


def _cfg(name: str):
  from semsafe_jax.models.config import from_hf_dict  # pylint: disable=g-import-not-at-top
  return from_hf_dict(bench.SHAPES[name], dtype="bfloat16", param_dtype="bfloat16")


@pytest.mark.parametrize("name, total", [("llama3-8b", 8_030_261_248),
                                         ("llama3.2-1b", 1_235_814_400)])
def test_real_shapes_have_the_real_parameter_counts(name, total):
  from semsafe_jax.models import transformer  # pylint: disable=g-import-not-at-top
  cfg = _cfg(name)
  specs = transformer.param_specs(cfg)
  n = sum(math.prod(s) for s, _ in specs.values())
  assert n == total  # the published sizes: Llama-3-8B and Llama-3.2-1B
  embeddings = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  norms = sum(math.prod(s) for p, (s, _) in specs.items() if "norm" in p)
  assert bench.non_embedding_params(cfg) == total - embeddings - norms


def test_flop_counts():
  cfg = _cfg("llama3-8b")
  n, seq = bench.non_embedding_params(cfg), 512
  # Without attention and LM head, the train count is 6N per adapted + 2N per frozen token.
  flops = bench.train_flops(cfg, 8, 8, seq)
  blocks = 6 * n * 16 * seq + 2 * n * 8 * seq
  attn = (12 * 16 * seq + 4 * 8 * seq) * cfg.num_layers * seq * cfg.num_heads * cfg.head_dim
  head = 2 * cfg.hidden_size * cfg.vocab_size * (3 * (8 * 49 + 8 * 48) + 8 * 48)
  assert flops == blocks + attn + head
  assert bench.train_flops(cfg, 8, 8, seq, per_adapted_token=4) == flops - 2 * n * 16 * seq
  # Decoding an untied model reads every weight but the input embedding table.
  assert bench.decode_weight_bytes(cfg) == 2 * (8_030_261_248 - cfg.vocab_size * cfg.hidden_size)


def test_pod_settings_match_the_configs():
  pod = _load(REPO / "configs" / "llama3_8b_pod.py", "pod_config").get_config()
  for k in ("harmful_per_step", "benign_per_step", "pairs_per_step", "max_response_tokens"):
    assert bench.POD[k] == pod.data[k], k
  for k in ("dtype", "param_dtype", "remat"):
    assert bench.POD[k] == pod.model[k], k
  for k, v in bench.ADAPTERS.items():
    assert (tuple(v) if isinstance(v, tuple) else v) == (
        tuple(pod.adapters[k]) if isinstance(v, tuple) else pod.adapters[k]), k
  for k, v in bench.LOSS.items():
    assert v == pod.loss[k], k
  for k, v in bench.TRAIN.items():
    assert v == pod.train[k], k


def test_toy_run_prints_every_row(tmp_path):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  rows_json = tmp_path / "rows.json"
  out = subprocess.run([sys.executable, str(SCRIPT), "--toy", "--json", str(rows_json)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                       check=False)
  assert out.returncode == 0, out.stderr[-4000:]
  print(out.stdout)
  rows = [r for r in json.loads(rows_json.read_text()) if r["row"] != "device"]
  assert sorted((r["model"], r["row"]) for r in rows) == sorted(
      (m, k) for m in ("toy-untied", "toy-tied") for k in ("train", "forward", "generate"))
  for r in rows:
    assert "error" not in r, r
    assert r["tokens_s"] > 0 and r["step_ms"] > 0, r
    if r["row"] in ("train", "forward"):
      assert 0 < r["mfu"], r
    if r["row"] == "train":
      assert np.isfinite(r["loss"]) and r["loss"] > 0, r
      assert r["trainable_dtypes"] == ["float32"], r  # adapters and optimizer state
      assert r["useful"] == pytest.approx(r["mfu"] * r["tflop_useful"] / r["tflop"]), r
    if r["row"] == "generate":
      assert r["decode_steps"] == 8 and r["bound_tokens_s"] > 0, r  # no early stop
  table = [l for l in out.stdout.splitlines() if l.startswith("toy-")]
  assert len(table) == 6 and all("bandwidth bound" in l for l in table if " generate " in l)
