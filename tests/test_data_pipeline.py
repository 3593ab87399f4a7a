"""prepare_data and `--config.mode=mine` end to end on the built-in data (+ XSTest)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from semsafe_jax.data import embed, loaders, pipeline, splits
from semsafe_jax.data.schema import LABELS

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
XSTEST = SHARED / "xstest" / "xstest_prompts.csv"
OUTPUTS = ("prompts.jsonl", "pairs.npz", "splits.json", "split_report.json", "mining_stats.json",
           "mining_stats.png")

def sources():
  return ("builtin",) + ((f"xstest:{XSTEST}",) if XSTEST.is_file() else ())


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  """The session's SBERT cache, shared with the other data tests (filled here if need be)."""
  cache = tmp_path_factory.getbasetemp() / "sbert_cache"
  prompts, _ = loaders.load_sources(list(sources()))
  embed.embed_texts([p.text for p in prompts], cache_dir=cache)
  return cache


def default_config():
  spec = importlib.util.spec_from_file_location("default_config", REPO / "configs" / "default.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def check_outputs(workdir: pathlib.Path):
  for name in OUTPUTS:
    assert (workdir / name).is_file(), name
  rows = [json.loads(line) for line in (workdir / "prompts.jsonl").read_text().splitlines()]
  assert {"id", "text", "label", "intent_id", "category", "style", "source"} <= set(rows[0])
  assert {r["label"] for r in rows} <= set(LABELS)
  with np.load(workdir / "pairs.npz") as z:
    nbrs, sims, valid = z["neighbors"], z["sims"], z["valid"]
  assert nbrs.shape == sims.shape == valid.shape == (len(rows), 8)
  assert nbrs.dtype == np.int32 and sims.dtype == np.float32 and valid.dtype == bool
  assert (sims[valid] > 0.7).all() and (nbrs[~valid] == -1).all()
  # Same-label mining, rows in prompts.jsonl order.
  labels = np.array([r["label"] for r in rows])
  r, c = np.nonzero(valid)
  assert (labels[r] == labels[nbrs[r, c]]).all()
  split_ids = json.loads((workdir / "splits.json").read_text())
  assert set(splits.SPLIT_NAMES) == set(split_ids)
  source_of = {r["id"]: r["source"] for r in rows}
  for name in splits.TRAIN_SPLITS:
    assert split_ids[name] and all(source_of[i] != "xstest" for i in split_ids[name]), name
  stats = json.loads((workdir / "mining_stats.json").read_text())
  assert len(stats["tau_sweep"]) == 10 and sum(stats["pairs_per_prompt_hist"]) == len(rows)
  report = json.loads((workdir / "split_report.json").read_text())
  assert report["max_cos_train_vs_heldout_intent"] < 0.7
  return rows, split_ids


def test_prepare_data_writes_everything_and_feeds_a_batcher(tmp_path, cache_dir):
  config = default_config()
  config.data.sources = sources()
  config.data.cache_dir = str(cache_dir)
  data = pipeline.prepare_data(config, tmp_path)
  rows, split_ids = check_outputs(tmp_path)
  assert [p.id for p in data.prompts] == [r["id"] for r in rows]
  assert data.emb_NxD.shape == (len(rows), 384) and data.emb_NxD.dtype == np.float32
  assert {k: [data.prompts[i].id for i in v] for k, v in data.splits.items()} == split_ids
  assert len(data.refusals) >= 10 and all(isinstance(r, str) for r in data.refusals)
  if XSTEST.is_file():
    assert len(split_ids["eval_only_harmful"]) == 200

  batcher = pipeline.make_batcher(data, config)
  batch = batcher.batch(0)
  train = set(data.splits["train"])
  assert set(batch.harmful_idx) <= train
  train_other = (set(data.splits["train_benign"]) | set(data.splits["train_borderline"])
                 | set(data.splits["train_lookalike"]))
  assert set(batch.benign_idx) <= train_other
  assert batch.pair_index.shape == (config.data.pairs_per_step, 2)
  assert sum(batcher.batch(s).pair_valid.sum() for s in range(20)) > 0


def test_mine_mode_end_to_end_offline(tmp_path, cache_dir):
  workdir = tmp_path / "W"
  cmd = [sys.executable, "-m", "semsafe_jax.main", "--config=configs/default.py",
         f"--workdir={workdir}", "--config.mode=mine", f"--config.data.cache_dir={cache_dir}"]
  cmd += [f"--config.data.sources={s}" for s in sources()]
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  assert "Prepared" in out.stdout and "tau  frac>=1" in out.stdout
  check_outputs(workdir)


def test_mine_job_does_not_import_model_code():
  code = ("import sys, semsafe_jax.jobs.mine;"
          "heavy = ('semsafe_jax.models', 'semsafe_jax.train', 'semsafe_jax.adapters',"
          " 'semsafe_jax.losses', 'jax');"
          "bad = sorted(m for m in sys.modules if m in heavy or m.startswith(heavy[:4]));"
          "print(bad); sys.exit(bool(bad))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stdout + out.stderr[-2000:]
