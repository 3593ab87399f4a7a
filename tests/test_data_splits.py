"""Splits: deterministic by seed, leak-free held-out intents, XSTest never in training,
look-alikes held out by topic, unlabeled prompts never within tau of an evaluation prompt."""

import dataclasses

import numpy as np
import pytest

from conftest import XSTEST
from semsafe_jax.data import builtin, embed, loaders, splits
from semsafe_jax.data.schema import DataError, Prompt, check_trainable

TAU = 0.7


def unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(num_intents=40, phrasings=5, d=64, seed=0):
  """Harmful intents of `phrasings` close paraphrases; intent 1 nearly copies intent 0
  (a cross-intent link above tau), plus benign, borderline and XSTest rows."""
  rng = np.random.default_rng(seed)
  centres = unit(rng.standard_normal((num_intents, d)))
  centres[1] = unit(centres[:1] + 0.1 * unit(rng.standard_normal((1, d))))[0]
  prompts, vecs = [], []
  for i in range(num_intents):
    for j in range(phrasings):
      prompts.append(Prompt(id=f"h{i:03d}{'abcdefg'[j]}", text=f"harmful {i} {j}", label="harmful",
                            intent_id=f"intent{i:03d}", source="builtin"))
      vecs.append(centres[i] + 0.35 * unit(rng.standard_normal((1, d)))[0])
  for label, n in [("benign", 30), ("borderline", 20)]:
    for j in range(n):
      prompts.append(Prompt(id=f"{label}{j:03d}", text=f"{label} {j}", label=label,
                            source="builtin"))
      vecs.append(rng.standard_normal(d))
  for j, label in enumerate(["harmful", "borderline", "harmful"]):
    # XSTest rows that copy a builtin harmful prompt: still never trainable.
    prompts.append(Prompt(id=f"xstest:{j}", text=f"xstest {j}", label=label, source="xstest"))
    vecs.append(vecs[5 * j])
  prompts = [p if p.intent_id else Prompt(**{**p.to_dict(), "intent_id": p.id}) for p in prompts]
  return prompts, unit(np.stack(vecs))


def with_lookalikes(prompts, emb, per_topic=2, unresolved=0, seed=1):
  """Adds `per_topic` benign look-alikes (random directions) per harmful intent, plus
  look-alikes of `unresolved` topics that name no loaded intent."""
  rng = np.random.default_rng(seed)
  topics = sorted({p.intent_id for p in prompts if p.label == "harmful" and p.source != "xstest"})
  topics += [f"elsewhere{k:02d}" for k in range(unresolved)]
  extra = [Prompt(id=f"look-{t}-{j}", text=f"look-alike {t} {j}", label="benign",
                  intent_id=f"look-{t}-{j}", source="builtin", topic=t)
           for t in topics for j in range(per_topic)]
  vecs = unit(rng.standard_normal((len(extra), emb.shape[1])))
  return prompts + extra, np.concatenate([emb, vecs])


def near_copy(emb, row, rng, eps=0.05):
  return unit(emb[row][None] + eps * unit(rng.standard_normal((1, emb.shape[1]))))[0]


def split(prompts, emb, seed=0, **kw):
  args = dict(tau=TAU, seed=seed, heldout_intent_frac=0.25, heldout_phrasing_frac=0.25)
  return splits.make_splits(prompts, emb, **{**args, **kw})


def ids(prompts, rows):
  return {prompts[i].id for i in rows}


def test_deterministic_by_seed_and_independent_of_load_order():
  prompts, emb = synthetic()
  a, report = split(prompts, emb, seed=3)
  b, _ = split(prompts, emb, seed=3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  c, _ = split(prompts, emb, seed=4)
  assert ids(prompts, a["heldout_intent"]) != ids(prompts, c["heldout_intent"])
  perm = np.random.default_rng(0).permutation(len(prompts))
  shuffled, emb_s = [prompts[i] for i in perm], emb[perm]
  d, _ = split(shuffled, emb_s, seed=3)
  for name in a:
    assert ids(prompts, a[name]) == ids(shuffled, d[name]), name
  assert report["counts"]["train"] == len(a["train"])


@pytest.mark.parametrize("seed", range(6))
def test_structure_and_no_leak(seed):
  prompts, emb = synthetic()
  s, report = split(prompts, emb, seed=seed)
  intent = np.array([p.intent_id for p in prompts])
  train_intents = set(intent[s["train"]])
  assert not train_intents & set(intent[s["heldout_intent"]])
  assert set(intent[s["heldout_phrasing"]]) <= train_intents  # other phrasings of seen intents
  assert 0.1 < len(s["heldout_phrasing"]) / (len(s["train"]) + len(s["heldout_phrasing"])) < 0.4
  assert report["intents"]["heldout"] == report["intents"]["heldout_target"] == 10
  # Every prompt lands in exactly one split.
  all_rows = np.concatenate(list(s.values()))
  assert sorted(all_rows) == list(range(len(prompts)))
  # The leakage rule, measured directly.
  seen = np.concatenate([s["train"], s["heldout_phrasing"]])
  assert (emb[seen] @ emb[s["heldout_intent"]].T).max() < TAU
  assert report["max_cos_train_vs_heldout_intent"] < TAU
  # Intents 0 and 1 are linked: held out together or trained together.
  assert ("intent000" in train_intents) == ("intent001" in train_intents)


def test_linked_intents_move_together_and_are_reported():
  prompts, emb = synthetic()
  for seed in range(20):
    s, report = split(prompts, emb, seed=seed)
    if "intent000" in {prompts[i].intent_id for i in s["heldout_intent"]}:
      break
  else:
    pytest.fail("intent000 never held out in 20 seeds")
  group = next(g for g in report["heldout_linked_groups"] if "intent000" in g["intents"])
  assert set(group["intents"]) == {"intent000", "intent001"}
  assert group["links"][0][:2] == ["intent000", "intent001"] and group["links"][0][2] >= TAU
  assert report["moved_into_heldout_with_their_group"] >= 1


def test_at_least_one_phrasing_stays_in_train():
  prompts, emb = synthetic(phrasings=2)
  s, _ = split(prompts, emb, heldout_phrasing_frac=0.9, exclude_near_eval_only=False)
  intent = np.array([p.intent_id for p in prompts])
  train = set(intent[s["train"]])
  assert all(i in train for i in intent[s["heldout_phrasing"]])
  held_out_intents = set(intent[s["heldout_intent"]])
  harmful_intents = {p.intent_id for p in prompts if p.label == "harmful" and p.source != "xstest"}
  assert train | held_out_intents == harmful_intents


def test_benign_and_borderline_split_half_and_half():
  prompts, emb = synthetic()
  s, _ = split(prompts, emb)
  assert (len(s["train_benign"]), len(s["eval_benign"])) == (15, 15)
  assert (len(s["train_borderline"]), len(s["eval_borderline"])) == (10, 10)
  assert not set(s["train_benign"]) & set(s["eval_benign"])


def test_xstest_never_enters_training():
  prompts, emb = synthetic()
  s, report = split(prompts, emb)
  xs = {i for i, p in enumerate(prompts) if p.source == "xstest"}
  for name in splits.TRAIN_SPLITS:
    assert not xs & set(s[name]), name
  assert xs == set(s["eval_only_harmful"]) | set(s["eval_only_borderline"])
  # The XSTest rows copy three builtin prompts: those leave training too.
  assert report["max_cos_train_vs_eval_only"] < TAU
  excluded = s["excluded_near_eval_only"]
  assert len(excluded) > 0
  intent = np.array([p.intent_id for p in prompts])
  assert set(intent[s["heldout_phrasing"]]) <= set(intent[s["train"]])  # still "seen" intents
  assert ((emb[excluded] @ emb[sorted(xs)].T).max(1) >= TAU).all()  # only near ones
  assert report["excluded_near_eval_only"]["count"] == len(excluded)
  s_off, report_off = split(prompts, emb, exclude_near_eval_only=False)
  assert report_off["max_cos_train_vs_eval_only"] > 0.99
  assert not len(s_off["excluded_near_eval_only"])
  # The enforced rule: a training split holding XSTest rows is an error.
  with pytest.raises(DataError, match="eval-only.*xstest"):
    check_trainable(prompts, list(s["train"]) + [min(xs)])
  # Extra eval-only sources from config join xstest.
  s2, _ = split(prompts, emb, extra_eval_only=["builtin"])
  assert all(len(s2[name]) == 0 for name in splits.TRAIN_SPLITS)


def test_bad_arguments():
  prompts, emb = synthetic()
  with pytest.raises(DataError, match="heldout_intent_frac"):
    split(prompts, emb, heldout_intent_frac=1.0)
  with pytest.raises(DataError, match="embeddings"):
    split(prompts, emb[:-1])


def test_split_ids_round_trip():
  prompts, emb = synthetic()
  s, _ = split(prompts, emb)
  back = splits.split_rows(prompts, splits.split_ids(prompts, s))
  assert all(np.array_equal(s[k], back[k]) for k in s)


def topics(prompts, rows):
  return {prompts[i].topic for i in rows}


@pytest.mark.parametrize("seed", range(4))
def test_lookalikes_are_held_out_by_topic(seed):
  base_p, base_e = synthetic()
  prompts, emb = with_lookalikes(base_p, base_e)
  s, report = split(prompts, emb, seed=seed)
  base, _ = split(base_p, base_e, seed=seed)
  heldout = {prompts[i].intent_id for i in s["heldout_intent"]}
  # Not held out = a training intent (some have every phrasing excluded near XSTest).
  trained = {p.intent_id for p in base_p if p.label == "harmful" and p.source != "xstest"}
  trained -= heldout
  assert {prompts[i].intent_id for i in s["train"]} <= trained
  assert topics(prompts, s["eval_lookalike"]) == heldout
  assert topics(prompts, s["val_lookalike"]) | topics(prompts, s["train_lookalike"]) == trained
  assert not topics(prompts, s["val_lookalike"]) & topics(prompts, s["train_lookalike"])
  assert len(topics(prompts, s["val_lookalike"])) == round(0.25 * len(trained))
  assert report["lookalikes"]["topics"] == {
      "total": 40, "eval": len(heldout), "val": round(0.25 * len(trained)),
      "train": len(trained) - round(0.25 * len(trained))}
  # Look-alikes leave the harmful and plain benign splits exactly as they were.
  for name in base:
    if name not in splits.LOOKALIKE_SPLITS:
      assert ids(base_p, base[name]) == ids(prompts, s[name]), name
  assert sorted(np.concatenate(list(s.values()))) == list(range(len(prompts)))
  assert "train_lookalike" in splits.TRAIN_SPLITS
  assert not {"val_lookalike", "eval_lookalike"} & set(splits.TRAINABLE_SPLITS)
  assert {"val_lookalike", "eval_lookalike"} <= set(splits.EVAL_SPLITS)
  again, _ = split(prompts, emb, seed=seed)
  assert all(np.array_equal(s[k], again[k]) for k in s)


def test_unresolved_topics_are_held_out_by_their_own_draw():
  prompts, emb = with_lookalikes(*synthetic(), unresolved=12)
  s, report = split(prompts, emb, lookalike_val_frac=0.5)
  elsewhere = lambda name: {t for t in topics(prompts, s[name]) if t.startswith("elsewhere")}
  assert len(elsewhere("eval_lookalike")) == 3  # round(0.25 * 12)
  assert report["lookalikes"]["unresolved_topics"] == 12
  assert len(elsewhere("val_lookalike")) + len(elsewhere("train_lookalike")) == 9
  with pytest.raises(DataError, match="lookalike_val_frac"):
    split(prompts, emb, lookalike_val_frac=1.0)


def test_near_copies_of_heldout_lookalikes_leave_benign_training():
  prompts, emb = with_lookalikes(*synthetic())
  s, _ = split(prompts, emb)
  rng = np.random.default_rng(5)
  eval_row, val_row = int(s["eval_lookalike"][0]), int(s["val_lookalike"][0])
  train_topic = prompts[int(s["train_lookalike"][0])].topic
  extra = [Prompt(id="benign-near-eval", text="b1", label="benign", intent_id="benign-near-eval",
                  source="builtin"),
           Prompt(id="look-near-val", text="b2", label="benign", intent_id="look-near-val",
                  source="builtin", topic=train_topic)]
  prompts2 = prompts + extra
  emb2 = np.concatenate([emb, np.stack([near_copy(emb, eval_row, rng),
                                        near_copy(emb, val_row, rng)])])
  s2, report = split(prompts2, emb2)
  excluded = ids(prompts2, s2["excluded_near_heldout_lookalike"])
  assert "look-near-val" in excluded
  # The benign one is excluded unless the benign draw put it in eval_benign.
  assert "benign-near-eval" in excluded | ids(prompts2, s2["eval_benign"])
  info = report["lookalikes"]
  assert info["max_cos_benign_train_vs_heldout_lookalike"] < TAU
  assert info["excluded_near_heldout_lookalike"]["count"] == len(excluded)


def test_unlabeled_prompts_near_any_evaluation_prompt_are_excluded():
  prompts, emb = with_lookalikes(*synthetic())
  s, _ = split(prompts, emb)
  rng = np.random.default_rng(7)
  targets = {"heldout_intent": "excluded_near_heldout_intent",
             "heldout_phrasing": "excluded_near_eval", "eval_benign": "excluded_near_eval",
             "eval_borderline": "excluded_near_eval", "eval_lookalike": "excluded_near_eval",
             "val_lookalike": "excluded_near_eval", "eval_only_harmful": "excluded_near_eval_only",
             # (a harmful training phrasing here is near its held-out phrasings)
             "train_benign": "train_unlabeled", "train_lookalike": "train_unlabeled"}
  extra, vecs = [], []
  for name in targets:
    extra.append(Prompt(id=f"u-{name}", text=f"unlabeled copy of {name}", label="unlabeled",
                        intent_id=f"u-{name}", source="scraped"))
    vecs.append(near_copy(emb, int(s[name][-1]), rng))
  extra.append(Prompt(id="u-far", text="unlabeled far", label="unlabeled", intent_id="u-far",
                      source="scraped"))
  vecs.append(unit(rng.standard_normal((1, emb.shape[1])))[0])
  prompts2, emb2 = prompts + extra, np.concatenate([emb, np.stack(vecs)])
  s2, report = split(prompts2, emb2)
  where = {prompts2[i].id: name for name, rows in s2.items() for i in rows}
  for name, expected in targets.items():
    assert where[f"u-{name}"] == expected, name
  assert where["u-far"] == "train_unlabeled"
  eval_rows = np.concatenate([s2[n] for n in splits.EVAL_SPLITS])
  assert (emb2[s2["train_unlabeled"]] @ emb2[eval_rows].T).max() < TAU
  assert report["max_cos_unlabeled_vs_eval"] < TAU
  assert report["excluded_near_eval"]["count"] == 5
  # Coverage: the two near copies of training prompts have a labelled neighbour at tau.
  cov = report["unlabeled"]
  assert (cov["count"], cov["with_labelled_neighbour"]) == (3, 2)
  assert cov["by_neighbour_label"] == {"benign": 2}
  # The labelled splits do not move when unlabeled prompts are added.
  for name in s:
    if not name.startswith("excluded") and name != "train_unlabeled":
      assert ids(prompts, s[name]) == ids(prompts2, s2[name]), name


# `real_data` (built-in prompts + SBERT embeddings) is a fixture from conftest.py.


@pytest.mark.parametrize("seed", [0, 1])
def test_real_data_split_is_leak_free(real_data, seed):
  prompts, emb = real_data
  s, report = splits.make_splits(prompts, emb, tau=TAU, seed=seed, heldout_intent_frac=0.2,
                                 heldout_phrasing_frac=0.25)
  seen = np.concatenate([s["train"], s["heldout_phrasing"]])
  assert (emb[seen] @ emb[s["heldout_intent"]].T).max() < TAU
  assert report["intents"]["heldout"] >= 0.9 * report["intents"]["heldout_target"] > 0
  for name in splits.TRAIN_SPLITS:
    assert not any(prompts[i].source == "xstest" for i in s[name])
  if XSTEST.is_file():
    assert len(s["eval_only_harmful"]) == 200 and len(s["eval_only_borderline"]) == 250
  # Look-alikes: held out with their topic's intent, no benign training prompt near them.
  heldout = {prompts[i].intent_id for i in s["heldout_intent"]}
  assert topics(prompts, s["eval_lookalike"]) == heldout
  assert not topics(prompts, s["train_lookalike"]) & heldout
  assert len(s["eval_lookalike"]) >= 80 and len(s["val_lookalike"]) >= 80
  assert len(s["train_lookalike"]) >= 250
  benign_train = np.concatenate([s["train_benign"], s["train_borderline"], s["train_lookalike"]])
  heldout_look = np.concatenate([s["val_lookalike"], s["eval_lookalike"]])
  assert (emb[benign_train] @ emb[heldout_look].T).max() < TAU


@pytest.fixture(scope="module")
def pool_sample(real_data, tmp_path_factory):
  """Every 8th prompt of the built-in unlabelled pool, with SBERT embeddings."""
  pool = loaders.load_source("builtin:unlabeled").prompts[::8]
  emb = embed.embed_texts([p.text for p in pool],
                          cache_dir=tmp_path_factory.getbasetemp() / "sbert_cache")
  return pool, emb


def test_real_unlabeled_pool_never_reaches_an_evaluation_prompt(real_data, pool_sample):
  labelled, emb_l = real_data
  pool, emb_u = pool_sample
  prompts, emb = labelled + pool, np.concatenate([emb_l, emb_u])
  s, report = splits.make_splits(prompts, emb, tau=TAU, seed=0, heldout_intent_frac=0.2,
                                 heldout_phrasing_frac=0.25)
  kept = s["train_unlabeled"]
  assert 0.35 * len(pool) < len(kept) < 0.8 * len(pool)
  eval_rows = np.concatenate([s[n] for n in splits.EVAL_SPLITS])
  assert (emb[kept] @ emb[eval_rows].T).max() < TAU
  assert report["unlabeled"]["coverage"] > 0.9
  # Lineage, from the hidden labels: no kept pool prompt is a rewrite of an evaluation
  # prompt or of any phrasing of a held-out intent.
  hidden = builtin.load_unlabeled_labels()
  split_of = {prompts[i].id: name for name, rows in s.items() for i in rows}
  heldout = {prompts[i].intent_id for i in s["heldout_intent"]}
  for i in kept:
    h = hidden[prompts[i].id]
    assert split_of[h["source_id"]] not in splits.EVAL_SPLITS, h
    assert h["intent_id"] not in heldout and h["topic"] not in heldout, h
  # Labelled splits are those of the labelled data alone.
  alone, _ = splits.make_splits(labelled, emb_l, tau=TAU, seed=0, heldout_intent_frac=0.2,
                                heldout_phrasing_frac=0.25)
  for name in ("train", "heldout_intent", "eval_lookalike", "train_lookalike"):
    assert np.array_equal(alone[name], s[name]), name
  assert not dataclasses.asdict(pool[0])["topic"]
