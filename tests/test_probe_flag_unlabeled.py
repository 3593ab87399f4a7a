"""probe.use="flag_unlabeled": loading unlabeled prompts, their split, flagging, batching."""

import importlib.util
import json
import logging
import pathlib

import ml_collections
import numpy as np
import pytest

from semsafe_jax.data import loaders, neighbors, pipeline, splits
from semsafe_jax.data.schema import LABELS, DataError, Prompt
from semsafe_jax import validate
from semsafe_jax.jobs import train as train_job
from semsafe_jax.methods import context as context_lib
from semsafe_jax.probes import safety as probe_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TAU = 0.7


def unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def tiny_config():
  spec = importlib.util.spec_from_file_location("tiny_config", REPO / "configs" / "tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ----------------------------------------------------------------------------- loading


def test_label_unlabeled_loads_from_generic_sources(tmp_path):
  assert "unlabeled" in LABELS
  jsonl = tmp_path / "scraped.jsonl"
  # ?label= wins over a label column, as for the other labels.
  jsonl.write_text('{"text": "how do I do X"}\n{"text": "tell me Y", "label": "harmful"}\n')
  got = loaders.load_source(f"jsonl:{jsonl}?label=unlabeled").prompts
  assert [(p.text, p.label) for p in got] == [("how do I do X", "unlabeled"),
                                              ("tell me Y", "unlabeled")]
  csv = tmp_path / "forum.csv"
  csv.write_text("prompt\nfirst question\nsecond question\n")
  got = loaders.load_source(f"csv:{csv}?text_col=prompt&label=Unlabeled").prompts
  assert {p.label for p in got} == {"unlabeled"} and len(got) == 2
  # A label column or config.data.default_label may say so too.
  col = tmp_path / "mixed.jsonl"
  col.write_text('{"text": "a", "label": "unlabeled"}\n{"text": "b", "label": "benign"}\n')
  assert [p.label for p in loaders.load_source(f"jsonl:{col}").prompts] == ["unlabeled", "benign"]
  nolabel = tmp_path / "nolabel.jsonl"
  nolabel.write_text('{"text": "c"}\n')
  got = loaders.load_source(f"jsonl:{nolabel}", default_label="unlabeled").prompts
  assert got[0].label == "unlabeled"


# ----------------------------------------------------------------------------- splits


def synthetic(num_intents=20, phrasings=4, d=48, seed=0):
  """Harmful intents of close paraphrases, benign, borderline and two XSTest rows."""
  rng = np.random.default_rng(seed)
  centres = unit(rng.standard_normal((num_intents, d)))
  prompts, vecs = [], []
  for i in range(num_intents):
    for j in range(phrasings):
      prompts.append(Prompt(id=f"h{i:03d}{'abcd'[j]}", text=f"harmful {i} {j}", label="harmful",
                            intent_id=f"intent{i:03d}", source="builtin"))
      vecs.append(centres[i] + 0.3 * unit(rng.standard_normal((1, d)))[0])
  for label, n in [("benign", 12), ("borderline", 8)]:
    for j in range(n):
      prompts.append(Prompt(id=f"{label}{j:03d}", text=f"{label} {j}", label=label,
                            intent_id=f"{label}{j:03d}", source="builtin"))
      vecs.append(rng.standard_normal(d))
  for j in range(2):
    prompts.append(Prompt(id=f"xstest:{j}", text=f"xstest {j}", label="borderline",
                          intent_id=f"xstest:{j}", source="xstest"))
    vecs.append(rng.standard_normal(d))
  return prompts, unit(np.stack(vecs)), rng


def with_unlabeled(prompts, emb, rng, near_rows=(), n=10):
  """Adds n random unlabeled prompts (u...) and one near copy of each of near_rows (v...)."""
  d = emb.shape[1]
  extra = [Prompt(id=f"u{j:03d}", text=f"unlabeled {j}", label="unlabeled", intent_id=f"u{j:03d}",
                  source="scraped") for j in range(n)]
  vecs = list(rng.standard_normal((n, d)))
  for j, r in enumerate(near_rows):
    extra.append(Prompt(id=f"v{j:03d}", text=f"near copy {j}", label="unlabeled",
                        intent_id=f"v{j:03d}", source="scraped"))
    vecs.append(emb[r] + 0.05 * unit(rng.standard_normal((1, d)))[0])
  return prompts + extra, np.concatenate([emb, unit(np.stack(vecs))])


def split(prompts, emb, **kw):
  args = dict(tau=TAU, seed=0, heldout_intent_frac=0.25, heldout_phrasing_frac=0.25)
  return splits.make_splits(prompts, emb, **{**args, **kw})


def ids(prompts, rows):
  return sorted(prompts[i].id for i in rows)


def test_unlabeled_go_to_train_unlabeled_only_and_leave_labelled_splits_alone():
  prompts, emb, rng = synthetic()
  base, base_report = split(prompts, emb)
  heldout_row = int(base["heldout_intent"][0])
  xstest_row = next(i for i, p in enumerate(prompts) if p.source == "xstest")
  all_p, all_emb = with_unlabeled(prompts, emb, rng, near_rows=(heldout_row, xstest_row))
  s, report = split(all_p, all_emb)

  # Labelled splits: the same prompts as without any unlabeled data.
  unlabeled_splits = ("train_unlabeled", "excluded_near_heldout_intent")
  for name in splits.SPLIT_NAMES:
    if name not in ("excluded_near_eval_only", *unlabeled_splits):
      assert ids(prompts, base[name]) == ids(all_p, s[name]), name
      assert report["counts"][name] == base_report["counts"][name], name
  assert all(base_report["counts"][name] == 0 for name in unlabeled_splits)
  # Unlabeled: train_unlabeled, except near copies of a held-out intent / eval-only prompt.
  unl = {i for i, p in enumerate(all_p) if p.label == "unlabeled"}
  assert ids(all_p, s["train_unlabeled"]) == [f"u{j:03d}" for j in range(10)]
  assert ids(all_p, s["excluded_near_heldout_intent"]) == ["v000"]
  assert ids(all_p, s["excluded_near_eval_only"]) == sorted(
      ids(prompts, base["excluded_near_eval_only"]) + ["v001"])
  assert report["excluded_near_heldout_intent"]["count"] == 1
  assert report["excluded_near_heldout_intent"]["examples"][0][:2] == [
      "v000", all_p[heldout_row].id]
  for name in splits.SPLIT_NAMES:
    if name not in ("excluded_near_eval_only", *unlabeled_splits):
      assert not unl & set(s[name]), name
  assert set(splits.TRAIN_SPLITS).isdisjoint({"train_unlabeled"})
  # Every prompt in exactly one split; the leak check covers train_unlabeled.
  assert sorted(np.concatenate(list(s.values()))) == list(range(len(all_p)))
  seen = np.concatenate([s["train"], s["heldout_phrasing"], s["train_unlabeled"]])
  assert (all_emb[seen] @ all_emb[s["heldout_intent"]].T).max() < TAU
  assert report["max_cos_train_vs_heldout_intent"] < TAU
  assert report["max_cos_train_vs_eval_only"] < TAU
  # Round trip through splits.json.
  back = splits.split_rows(all_p, splits.split_ids(all_p, s))
  assert all(np.array_equal(s[k], back[k]) for k in s)


def test_unlabeled_from_an_eval_only_source_is_an_error():
  prompts, emb, rng = synthetic()
  all_p, all_emb = with_unlabeled(prompts, emb, rng, n=2)
  with pytest.raises(DataError, match="unlabeled prompt.*eval-only"):
    split(all_p, all_emb, extra_eval_only=["scraped"])


def test_same_label_mining_pairs_unlabeled_only_among_themselves():
  prompts, emb, rng = synthetic()
  # Near copies of harmful prompts: still no cross-label neighbours.
  all_p, all_emb = with_unlabeled(prompts, emb, rng, near_rows=(0, 1, 2))
  labels = np.array([p.label for p in all_p])
  nb, _ = neighbors.mine_neighbors(all_emb, 4, TAU, labels=list(labels))
  r, c = np.nonzero(nb.valid_NxK)
  assert (labels[r] == labels[nb.neighbors_NxK[r, c]]).all()
  assert (labels[r] == "unlabeled").any()  # v000..v002 pair among themselves


# ----------------------------------------------------------------------------- batcher


def prepared(prompts, emb, tmp_path):
  labels = [p.label for p in prompts]
  nb, _ = neighbors.mine_neighbors(emb, 4, TAU, labels=labels)
  s, report = split(prompts, emb)
  return pipeline.PreparedData(prompts=prompts, emb_NxD=emb, neighbors=nb, splits=s,
                               refusals=[], refusal_records=[], mining_stats={},
                               split_report=report, workdir=tmp_path)


def batcher_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict(dict(tau=TAU, harmful_per_step=8, benign_per_step=4,
                                          pairs_per_step=8))
  return c


def test_make_batcher_adds_flagged_rows_to_the_harmful_pool(tmp_path):
  prompts, emb, rng = synthetic()
  all_p, all_emb = with_unlabeled(prompts, emb, rng, n=10)
  data = prepared(all_p, all_emb, tmp_path)
  config = batcher_config()
  plain = pipeline.make_batcher(data, config)
  same = pipeline.make_batcher(data, config, extra_harmful=[])
  for step in range(5):  # no extras: exactly the batches of before
    a, b = plain.batch(step), same.batch(step)
    assert np.array_equal(a.harmful_idx, b.harmful_idx)
    assert np.array_equal(a.benign_idx, b.benign_idx)
  flagged = data.splits["train_unlabeled"][:4]
  batcher = pipeline.make_batcher(data, config, extra_harmful=flagged)
  drawn = set(np.concatenate([batcher.batch(s).harmful_idx for s in range(40)]).tolist())
  assert drawn <= set(data.splits["train"]) | set(flagged.tolist())
  assert set(flagged.tolist()) & drawn
  assert not drawn & (set(data.splits["train_unlabeled"]) - set(flagged.tolist()))
  # Only train_unlabeled rows may be added: anything else could be an evaluation prompt.
  with pytest.raises(DataError, match="not in train_unlabeled"):
    pipeline.make_batcher(data, config, extra_harmful=data.splits["heldout_intent"][:1])


# ----------------------------------------------------------------------------- flagging


def test_flag_unlabeled_rows_keeps_those_at_or_over_the_threshold():
  prompts = [Prompt(id=f"p{i}", text=f"t{i}", label="unlabeled") for i in range(6)]
  rows = np.array([1, 3, 4, 5])
  prob = np.array([0.9, 0.5, 0.49, 0.7], np.float32)
  got, weight, record = context_lib.flag_unlabeled_rows(prompts, rows, prob, 0.5)
  np.testing.assert_array_equal(got, [1, 3, 5])
  np.testing.assert_allclose(weight, [0.9, 0.5, 0.7], rtol=1e-6)
  assert weight.dtype == np.float32
  assert record["num_unlabeled"] == 4 and record["num_flagged"] == 3
  assert [r["id"] for r in record["flagged"]] == ["p1", "p3", "p5"]
  assert record["flagged"][0]["unsafe_prob"] == pytest.approx(0.9)
  got, weight, record = context_lib.flag_unlabeled_rows(prompts, rows, prob, 0.95)
  assert got.size == weight.size == record["num_flagged"] == 0


def stage_config(use="flag_unlabeled", threshold=0.5):
  c = tiny_config()
  c.probe.use = use
  c.probe.threshold = threshold
  return c


def flag_stage(config, workdir, data, probe):
  """Context.flagged with a given probe (no model: the probe's scores are faked)."""
  ctx = context_lib.Context(config, str(workdir), data, None, None, None, None)
  ctx.__dict__["probe"] = probe  # the cached stage, as if trained
  return ctx.flagged


def test_flag_stage_scores_train_unlabeled_and_writes_the_flagged(tmp_path, monkeypatch, caplog):
  prompts, emb, rng = synthetic()
  all_p, all_emb = with_unlabeled(prompts, emb, rng, n=6)
  data = prepared(all_p, all_emb, tmp_path)
  rows = data.splits["train_unlabeled"]
  seen = {}

  def fake_encode(tok, texts, max_len):
    seen["texts"] = list(texts)
    return np.zeros((len(texts), max_len), np.int32), np.ones((len(texts), max_len), bool)

  def fake_score(params, cfg, probe, ids, mask, batch_size=16):
    seen["layer"] = int(probe["layer"])
    return np.linspace(0.0, 1.0, len(ids)).astype(np.float32)  # 0, .2, .4, .6, .8, 1

  monkeypatch.setattr(probe_lib, "encode_prompts", fake_encode)
  monkeypatch.setattr(probe_lib, "score_prompts", fake_score)
  probe = {"probe": {"layer": np.int32(2)}, "best_layer": 2}
  caplog.set_level(logging.INFO)
  flagged, weight = flag_stage(stage_config(), tmp_path, data, probe)
  assert seen["texts"] == data.texts(rows) and seen["layer"] == 2
  np.testing.assert_array_equal(flagged, rows[3:])
  np.testing.assert_allclose(weight, [0.6, 0.8, 1.0], rtol=1e-6)
  assert "flagged 3 of 6 unlabeled prompts" in caplog.text
  record = json.loads((tmp_path / "probe" / "flagged_unlabeled.json").read_text())
  assert [r["id"] for r in record["flagged"]] == [all_p[i].id for i in rows[3:]]
  assert record["num_unlabeled"] == 6 and record["threshold"] == 0.5

  # Other uses, and no unlabeled prompts at all: nothing added (the latter with a warning).
  for use in ("off", "weight_pairs"):
    flagged, _ = flag_stage(stage_config(use), tmp_path, data, probe)
    assert flagged.size == 0
  labelled = prepared(prompts, emb, tmp_path)
  caplog.clear()
  flagged, weight = flag_stage(stage_config(), tmp_path, labelled, probe)
  assert flagged.size == weight.size == 0
  assert "no unlabeled prompts" in caplog.text and "probe.use='off'" in caplog.text


def test_flag_unlabeled_needs_probe_train_and_fails_before_any_work(tmp_path):
  config = stage_config()
  config.probe.train = False
  with pytest.raises(ValueError, match="probe.train"):
    validate.validate(config)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match="probe.train"):
    train_job.run(config, str(workdir))
  assert not workdir.exists()  # refused before the data or model stages
  config.probe.train = True
  for use in ("off", "weight_pairs", "flag_unlabeled"):
    config.probe.use = use
    validate.validate(config)
  config.probe.use = "sometimes"
  with pytest.raises(ValueError, match="probe.use"):
    validate.validate(config)
