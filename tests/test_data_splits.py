"""Splits: deterministic by seed, leak-free held-out intents, XSTest never in training."""

import numpy as np
import pytest

from conftest import XSTEST
from semsafe_jax.data import splits
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
