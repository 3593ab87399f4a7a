"""Deterministic, leak-free train / evaluation splits.

Harmful prompts (grouped by `intent_id`):
  train             phrasings the model is trained on
  heldout_phrasing  other phrasings of intents seen in training (~heldout_phrasing_frac
                    of each intent's phrasings; at least one always stays in train)
  heldout_intent    whole intents never trained on, and with NO train prompt at cosine
                    >= tau to any of their prompts. Enforced by treating intents that have
                    a cross pair at cosine >= tau as one linked group, held out or kept
                    together; the report lists which intents moved with which.
Benign and borderline prompts: train_* / eval_* (eval_frac of each label to eval).
Benign look-alikes (benign or borderline prompts with a `topic`: the intent_id of the
  harmful intent whose topic they share) are held out BY TOPIC, with that intent:
  eval_lookalike       look-alikes whose topic intent is a heldout_intent (final report only)
  val_lookalike        look-alikes of ~lookalike_val_frac of the training topics: for
                       decisions (thresholds, model selection), never trained on
  train_lookalike      the rest; trained on as benign
  A topic that names no loaded harmful intent is held out by a seeded draw at
  heldout_intent_frac. Would-be benign training prompts (train_benign, train_borderline,
  train_lookalike) at cosine >= tau to a val/eval look-alike go to
  excluded_near_heldout_lookalike, so the held-out topics stay unseen in meaning too.
Eval-only sources (XSTest, ...): eval_only_{harmful,benign,borderline}; never train.
Unlabeled prompts: train_unlabeled, training-only and never evaluated (no label to score
  against); trained on without targets (consistency with labelled neighbours) or, with
  probe.use="flag_unlabeled", as harmful when the safety probe flags them. None may come
  within tau of an evaluation prompt: ones at cosine >= tau to a heldout_intent prompt go
  to excluded_near_heldout_intent, to an eval-only one to excluded_near_eval_only, and to
  any other evaluation prompt (heldout_phrasing, eval_benign, eval_borderline,
  val_lookalike, eval_lookalike) to excluded_near_eval.
All choices depend only on (seed, the prompts' ids and texts), not on load order.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Sequence

import numpy as np
from absl import logging

from semsafe_jax.data.schema import (
  UNLABELED,
  DataError,
  Prompt,
  check_trainable,
  eval_only_sources,
)

TRAIN_SPLITS = ("train", "train_benign", "train_borderline", "train_lookalike")  # labelled
UNLABELED_SPLIT = "train_unlabeled"
TRAINABLE_SPLITS = (*TRAIN_SPLITS, UNLABELED_SPLIT)  # everything that may reach a trainer
LOOKALIKE_SPLITS = ("train_lookalike", "val_lookalike", "eval_lookalike")
# Every split a model is scored on (never trained on, and no unlabeled prompt within tau).
EVAL_SPLITS = ("heldout_phrasing", "heldout_intent", "eval_benign", "eval_borderline",
               "val_lookalike", "eval_lookalike", "eval_only_harmful", "eval_only_benign",
               "eval_only_borderline")
SPLIT_NAMES = ("train", "heldout_phrasing", "heldout_intent", "train_benign", "eval_benign",
               "train_borderline", "eval_borderline", *LOOKALIKE_SPLITS,
               "excluded_near_heldout_lookalike", "eval_only_harmful", "eval_only_benign",
               "eval_only_borderline", "excluded_near_eval_only", UNLABELED_SPLIT,
               "excluded_near_heldout_intent", "excluded_near_eval")
# Separate random streams, so changing one fraction does not reshuffle the others.
_INTENT_STREAM, _PHRASING_STREAM, _BENIGN_STREAM, _LOOKALIKE_STREAM = 1, 2, 3, 4
_MAX_REPORTED_LINKS = 200


def similar_pairs(emb_NxD: np.ndarray, tau: float) -> np.ndarray:
  """All pairs (i < j) with cosine >= tau, exactly (FAISS range search): int64 [M, 2]."""
  import faiss  # pylint: disable=g-import-not-at-top
  emb_NxD = np.ascontiguousarray(emb_NxD, dtype=np.float32)
  if len(emb_NxD) < 2:
    return np.zeros((0, 2), np.int64)
  index = faiss.IndexFlatIP(emb_NxD.shape[1])
  index.add(emb_NxD)
  lims, _, ids = index.range_search(emb_NxD, float(np.nextafter(np.float32(tau), -1)))
  rows = np.repeat(np.arange(len(emb_NxD)), np.diff(lims).astype(np.int64))
  ids = ids.astype(np.int64)
  keep = rows < ids
  return np.stack([rows[keep], ids[keep]], axis=1)


class _UnionFind:

  def __init__(self, n: int):
    self.parent = list(range(n))

  def find(self, a: int) -> int:
    while self.parent[a] != a:
      self.parent[a] = self.parent[self.parent[a]]
      a = self.parent[a]
    return a

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[max(ra, rb)] = min(ra, rb)


def max_cross_cosine(emb_NxD: np.ndarray, rows_a: Sequence[int], rows_b: Sequence[int]) -> float:
  """Largest cosine between any row of `rows_a` and any of `rows_b` (-1 if either empty)."""
  if len(rows_a) == 0 or len(rows_b) == 0:
    return -1.0
  best = -1.0
  b_MxD = emb_NxD[np.asarray(rows_b)]
  for start in range(0, len(rows_a), 4096):  # blocks bound memory for large sets
    a_BxD = emb_NxD[np.asarray(rows_a[start:start + 4096])]
    best = max(best, float((a_BxD @ b_MxD.T).max()))
  return best


def _max_cosines(emb_NxD: np.ndarray, rows: Sequence[int], others: Sequence[int]) -> np.ndarray:
  """For each of `rows`, its largest cosine to any of `others` (exact, FAISS)."""
  return _nearest(emb_NxD, rows, others)[0]


def _near_examples(prompts: Sequence[Prompt], emb_NxD: np.ndarray, rows: np.ndarray,
                   others: Sequence[int], limit: int = 20) -> list[list[Any]]:
  out = []
  for r in rows[:limit]:
    sims = emb_NxD[np.asarray(others)] @ emb_NxD[r]
    j = int(np.argmax(sims))
    out.append([prompts[r].id, prompts[others[j]].id, round(float(sims[j]), 4)])
  return out


def is_lookalike(p: Prompt) -> bool:
  """A benign look-alike: a benign or borderline prompt that names a harmful topic."""
  return bool(p.topic) and p.label in ("benign", "borderline")


def _nearest(emb_NxD: np.ndarray, rows: Sequence[int],
             others: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """For each of `rows`, its largest cosine to any of `others` and that other row."""
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(emb_NxD.shape[1])
  others = np.asarray(others, np.int64)
  index.add(np.ascontiguousarray(emb_NxD[others], dtype=np.float32))
  sims, idx = index.search(np.ascontiguousarray(emb_NxD[np.asarray(rows)], dtype=np.float32), 1)
  return sims[:, 0], others[idx[:, 0]]


def _stochastic_round(x: float, rng: np.random.Generator) -> int:
  """floor(x) or ceil(x), unbiased: small intents hold out ~frac on average."""
  whole = int(np.floor(x))
  return whole + int(rng.random() < x - whole)


def _link_groups(harmful: list[int], intents: list[str], intent_of: dict[int, int],
                 emb_NxD: np.ndarray, tau: float
                 ) -> tuple[list[list[int]], list[tuple[int, int, float]]]:
  """Intents joined by a cross-intent pair at cosine >= tau, as groups of intent indices."""
  uf = _UnionFind(len(intents))
  links: dict[tuple[int, int], float] = {}
  rows = np.asarray(harmful, dtype=np.int64)
  for a, b in similar_pairs(emb_NxD[rows], tau):
    ia, ib = intent_of[rows[a]], intent_of[rows[b]]
    if ia != ib:
      uf.union(ia, ib)
      key = (min(ia, ib), max(ia, ib))
      links[key] = max(links.get(key, -1.0), float(emb_NxD[rows[a]] @ emb_NxD[rows[b]]))
  groups = collections.defaultdict(list)
  for i in range(len(intents)):
    groups[uf.find(i)].append(i)
  return sorted(groups.values()), [(a, b, c) for (a, b), c in sorted(links.items())]


def make_splits(prompts: Sequence[Prompt], emb_NxD: np.ndarray, *, tau: float, seed: int,
                heldout_intent_frac: float, heldout_phrasing_frac: float, eval_frac: float = 0.5,
                extra_eval_only: Iterable[str] = (), exclude_near_eval_only: bool = True,
                lookalike_val_frac: float = 0.25
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Splits prompt row indices; returns {split: sorted int64 rows} and a report.

  With `exclude_near_eval_only`, would-be training prompts at cosine >= tau to an
  eval-only prompt (e.g. a built-in near copy of an XSTest prompt) go to
  `excluded_near_eval_only` instead, so the eval-only sets stay unseen in meaning too.
  lookalike_val_frac: share of the training topics whose look-alikes form val_lookalike.
  """
  for name, frac in [("heldout_intent_frac", heldout_intent_frac),
                     ("heldout_phrasing_frac", heldout_phrasing_frac), ("eval_frac", eval_frac),
                     ("lookalike_val_frac", lookalike_val_frac)]:
    if not 0.0 <= frac < 1.0:
      raise DataError(f"{name}={frac} must be in [0, 1)")
  if len(prompts) != len(emb_NxD):
    raise DataError(f"{len(prompts)} prompts but {len(emb_NxD)} embeddings")
  banned = eval_only_sources(extra_eval_only)
  by_id = sorted(range(len(prompts)), key=lambda i: prompts[i].id)  # load-order independent
  splits: dict[str, list[int]] = {name: [] for name in SPLIT_NAMES}
  unusable = [prompts[i].id for i in by_id
              if prompts[i].source in banned and prompts[i].label == UNLABELED]
  if unusable:
    raise DataError(f"{len(unusable)} unlabeled prompt(s) from eval-only sources, e.g. "
                    f"{unusable[:3]}: they can be neither evaluated (no label) nor trained on")
  for i in by_id:
    if prompts[i].source in banned:
      splits[f"eval_only_{prompts[i].label}"].append(i)
  harmful = [i for i in by_id if prompts[i].label == "harmful" and prompts[i].source not in banned]
  eval_only = [i for i in by_id if prompts[i].source in banned]
  trainable = [i for i in by_id if prompts[i].source not in banned]
  near: set[int] = set()
  if exclude_near_eval_only and eval_only and trainable:
    near = set(np.asarray(trainable)[_max_cosines(emb_NxD, trainable, eval_only) >= tau].tolist())
  excluded = splits["excluded_near_eval_only"]

  # Held-out intents: whole linked groups, chosen in seeded random order.
  intents = sorted({prompts[i].intent_id for i in harmful})
  intent_index = {name: n for n, name in enumerate(intents)}
  intent_of = {i: intent_index[prompts[i].intent_id] for i in harmful}
  groups, links = _link_groups(harmful, intents, intent_of, emb_NxD, tau)
  target = int(round(heldout_intent_frac * len(intents)))
  if heldout_intent_frac > 0 and len(intents) > 1:
    target = min(max(target, 1), len(intents) - 1)
  rng = np.random.default_rng([seed, _INTENT_STREAM])
  heldout_intents: set[int] = set()
  too_big = []
  for g in rng.permutation(len(groups)):
    group = groups[g]
    if len(heldout_intents) >= target:
      break
    if len(heldout_intents) + len(group) <= target:
      heldout_intents.update(group)
    else:
      too_big.append(group)
  if len(heldout_intents) < target:
    logging.warning("Held out %d intents, fewer than the %d asked for: the remaining linked "
                    "groups are larger than the budget (see split_report.json)",
                    len(heldout_intents), target)

  # Held-out phrasings of each training intent; at least one phrasing stays in train.
  members = collections.defaultdict(list)
  for i in harmful:
    members[intent_of[i]].append(i)
  rng = np.random.default_rng([seed, _PHRASING_STREAM])
  for intent in range(len(intents)):
    rows = members[intent]
    if intent in heldout_intents:
      splits["heldout_intent"].extend(rows)
      continue
    order = rng.permutation(len(rows))
    n_hold = min(_stochastic_round(heldout_phrasing_frac * len(rows), rng), len(rows) - 1)
    hold, train = [rows[j] for j in order[:n_hold]], [rows[j] for j in order[n_hold:]]
    kept = [r for r in train if r not in near]
    excluded.extend(r for r in train if r in near)
    if not kept:  # a clean phrasing must stay in train, or the intent is not "seen"
      clean = [r for r in hold if r not in near]
      if clean:
        kept, hold = clean[:1], [r for r in hold if r != clean[0]]
      else:
        excluded.extend(hold)
        hold = []
    splits["heldout_phrasing"].extend(hold)
    splits["train"].extend(kept)

  rng = np.random.default_rng([seed, _BENIGN_STREAM])
  for label in ("benign", "borderline"):
    rows = [i for i in by_id if prompts[i].label == label and prompts[i].source not in banned
            and not is_lookalike(prompts[i])]
    order = rng.permutation(len(rows))
    n_eval = int(round(eval_frac * len(rows)))
    splits[f"eval_{label}"].extend(rows[j] for j in order[:n_eval])
    splits[f"train_{label}"].extend(rows[j] for j in order[n_eval:] if rows[j] not in near)
    excluded.extend(rows[j] for j in order[n_eval:] if rows[j] in near)

  lookalike_info = _split_lookalikes(
      prompts, emb_NxD, by_id, banned, near, splits,
      heldout_topics={intents[i] for i in heldout_intents},
      train_topics={intents[i] for i in range(len(intents)) if i not in heldout_intents},
      tau=tau, seed=seed, heldout_intent_frac=heldout_intent_frac,
      lookalike_val_frac=lookalike_val_frac)

  # Unlabeled prompts draw no random numbers: adding them leaves the labelled splits as they were.
  unlabeled = [i for i in by_id if prompts[i].label == UNLABELED and i not in near]
  excluded.extend(i for i in by_id if prompts[i].label == UNLABELED and i in near)
  # exclude_near_eval_only=False lets training come near eval-only sets: unlabeled too.
  unlabeled_evals = tuple(n for n in EVAL_SPLITS if n != "heldout_intent" and
                          (exclude_near_eval_only or not n.startswith("eval_only_")))
  for name, evals in [("excluded_near_heldout_intent", ("heldout_intent",)),
                      ("excluded_near_eval", unlabeled_evals)]:
    others = sorted(r for n in evals for r in splits[n])
    if unlabeled and others:
      cos = _max_cosines(emb_NxD, unlabeled, others)
      splits[name].extend(r for r, c in zip(unlabeled, cos) if c >= tau)
      unlabeled = [r for r, c in zip(unlabeled, cos) if c < tau]
  splits[UNLABELED_SPLIT].extend(unlabeled)

  out = {name: np.asarray(sorted(rows), dtype=np.int64) for name, rows in splits.items()}
  for name in TRAINABLE_SPLITS:
    check_trainable(prompts, out[name], extra_eval_only)

  # The leakage rules, verified directly rather than trusted from the construction.
  seen = np.concatenate([out["train"], out["heldout_phrasing"], out[UNLABELED_SPLIT]])
  max_cos = max_cross_cosine(emb_NxD, seen, out["heldout_intent"])
  if max_cos >= tau:
    raise DataError(f"Leak: a train prompt has cosine {max_cos:.3f} >= tau={tau} "
                    "to a held-out intent")
  eval_rows = np.concatenate([out[n] for n in ("heldout_intent", *unlabeled_evals)])
  max_cos_unlabeled = max_cross_cosine(emb_NxD, out[UNLABELED_SPLIT], eval_rows)
  if max_cos_unlabeled >= tau:
    raise DataError(f"Leak: an unlabeled training prompt has cosine {max_cos_unlabeled:.3f} "
                    f">= tau={tau} to an evaluation prompt")
  benign_train = np.concatenate([out["train_benign"], out["train_borderline"],
                                 out["train_lookalike"]])
  heldout_look = np.concatenate([out["val_lookalike"], out["eval_lookalike"]])
  max_cos_look = max_cross_cosine(emb_NxD, benign_train, heldout_look)
  if max_cos_look >= tau:
    raise DataError(f"Leak: a benign training prompt has cosine {max_cos_look:.3f} >= "
                    f"tau={tau} to a held-out look-alike")
  topic_of = lambda rows: {prompts[i].topic for i in rows}
  if topic_of(out["eval_lookalike"]) & (topic_of(out["train_lookalike"]) |
                                        {prompts[i].intent_id for i in out["train"]}):
    raise DataError("Leak: an eval_lookalike topic is also a training topic")

  moved = [{"intents": [intents[i] for i in g]} for g in groups
           if len(g) > 1 and g[0] in heldout_intents]
  for entry in moved:
    members_g = {intent_index[x] for x in entry["intents"]}
    entry["links"] = [[intents[a], intents[b], round(c, 4)] for a, b, c in links if a in members_g]
  report = {
      "seed": seed, "tau": tau,
      "counts": {name: int(len(rows)) for name, rows in out.items()},
      "intents": {"total": len(intents), "heldout_target": target,
                  "heldout": len(heldout_intents), "train": len(intents) - len(heldout_intents)},
      "rule": ("intents with a cross-intent prompt pair at cosine >= tau form one linked group; "
               "a group is held out whole or kept in train whole, so no train (or "
               "heldout_phrasing) prompt is within tau of a heldout_intent prompt; "
               "unlabeled prompts within tau of one are excluded"),
      "linked_groups": {
          "count": len(groups),
          "multi_intent": sum(len(g) > 1 for g in groups),
          "largest": max((len(g) for g in groups), default=0),
          "cross_intent_links": len(links),
      },
      "moved_into_heldout_with_their_group": sum(len(m["intents"]) - 1 for m in moved),
      "heldout_linked_groups": moved[:_MAX_REPORTED_LINKS],
      "kept_in_train_groups_too_big": [[intents[i] for i in g] for g in too_big[:20]],
      "max_cos_train_vs_heldout_intent": round(max_cos, 4),
      "max_cos_train_vs_eval_only": round(max_cross_cosine(
          emb_NxD, np.concatenate([out[name] for name in TRAINABLE_SPLITS]), eval_only), 4),
      "eval_only_sources": sorted(banned),
      "excluded_near_eval_only": {
          "count": len(out["excluded_near_eval_only"]),
          "why": "would-be training prompts at cosine >= tau to an eval-only prompt",
          "examples": _near_examples(prompts, emb_NxD, out["excluded_near_eval_only"], eval_only),
      },
      "excluded_near_heldout_intent": {
          "count": len(out["excluded_near_heldout_intent"]),
          "why": "unlabeled prompts at cosine >= tau to a heldout_intent prompt",
          "examples": _near_examples(prompts, emb_NxD, out["excluded_near_heldout_intent"],
                                     out["heldout_intent"]),
      },
      "excluded_near_eval": {
          "count": len(out["excluded_near_eval"]),
          "why": ("unlabeled prompts at cosine >= tau to an evaluation prompt other than "
                  "heldout_intent and eval-only ones"),
          "examples": _near_examples(prompts, emb_NxD, out["excluded_near_eval"], eval_rows),
      },
      "max_cos_unlabeled_vs_eval": round(max_cos_unlabeled, 4),
      "lookalikes": {
          **lookalike_info,
          "max_cos_benign_train_vs_heldout_lookalike": round(max_cos_look, 4),
          "excluded_near_heldout_lookalike": {
              "count": len(out["excluded_near_heldout_lookalike"]),
              "why": ("would-be benign training prompts (train_benign, train_borderline, "
                      "train_lookalike) at cosine >= tau to a val_lookalike or eval_lookalike "
                      "prompt"),
              "examples": _near_examples(prompts, emb_NxD,
                                         out["excluded_near_heldout_lookalike"], heldout_look),
          },
      },
      "unlabeled": _unlabeled_coverage(prompts, emb_NxD, out, tau),
  }
  return out, report


def _split_lookalikes(prompts: Sequence[Prompt], emb_NxD: np.ndarray, by_id: Sequence[int],
                      banned: frozenset[str], near: set[int], splits: dict[str, list[int]], *,
                      heldout_topics: set[str], train_topics: set[str], tau: float, seed: int,
                      heldout_intent_frac: float, lookalike_val_frac: float) -> dict[str, Any]:
  """Fills the look-alike splits (and excludes near copies of held-out ones); a report."""
  rows = [i for i in by_id if is_lookalike(prompts[i]) and prompts[i].source not in banned]
  topics = sorted({prompts[i].topic for i in rows})
  unresolved = [t for t in topics if t not in heldout_topics and t not in train_topics]
  rng = np.random.default_rng([seed, _LOOKALIKE_STREAM])
  # Topics naming no loaded harmful intent: held out by their own seeded draw.
  n_hold = int(round(heldout_intent_frac * len(unresolved)))
  held = set(heldout_topics) | {unresolved[j] for j in rng.permutation(len(unresolved))[:n_hold]}
  training = [t for t in topics if t not in held]
  n_val = int(round(lookalike_val_frac * len(training)))
  val = {training[j] for j in rng.permutation(len(training))[:n_val]}
  excluded = splits["excluded_near_eval_only"]
  for i in rows:
    topic = prompts[i].topic
    if topic in held:
      splits["eval_lookalike"].append(i)
    elif topic in val:
      splits["val_lookalike"].append(i)
    elif i in near:
      excluded.append(i)
    else:
      splits["train_lookalike"].append(i)

  # Benign training prompts that nearly copy a held-out look-alike would teach its answer.
  heldout_look = sorted(splits["val_lookalike"] + splits["eval_lookalike"])
  for name in ("train_benign", "train_borderline", "train_lookalike"):
    if splits[name] and heldout_look:
      cos = _max_cosines(emb_NxD, splits[name], heldout_look)
      splits["excluded_near_heldout_lookalike"].extend(
          r for r, c in zip(splits[name], cos) if c >= tau)
      splits[name] = [r for r, c in zip(splits[name], cos) if c < tau]
  topic_count = lambda name: len({prompts[i].topic for i in splits[name]})
  return {"topics": {"total": len(topics), "train": topic_count("train_lookalike"),
                     "val": len(val), "eval": len({t for t in topics if t in held})},
          "unresolved_topics": len(unresolved),
          "rule": ("look-alikes are held out by topic: eval_lookalike = topics of "
                   "heldout_intent intents; val_lookalike = lookalike_val_frac of the "
                   "training topics; train_lookalike = the rest")}


def _unlabeled_coverage(prompts: Sequence[Prompt], emb_NxD: np.ndarray,
                        out: dict[str, np.ndarray], tau: float) -> dict[str, Any]:
  """train_unlabeled rows with a labelled training neighbour at cosine >= tau, by its label."""
  rows = out[UNLABELED_SPLIT]
  labelled = np.concatenate([out[n] for n in TRAIN_SPLITS])
  if not len(rows) or not len(labelled):
    return {"count": int(len(rows)), "with_labelled_neighbour": 0, "coverage": 0.0,
            "by_neighbour_label": {}}
  sims, nearest = _nearest(emb_NxD, rows, labelled)
  hit = sims >= tau
  by_label = collections.Counter(prompts[j].label for j in nearest[hit])
  return {"count": int(len(rows)), "with_labelled_neighbour": int(hit.sum()),
          "coverage": round(float(hit.mean()), 4), "by_neighbour_label": dict(sorted(
              by_label.items())),
          "why": "unlabeled prompts with a labelled training prompt at cosine >= tau"}


def split_ids(prompts: Sequence[Prompt], splits: dict[str, np.ndarray]) -> dict[str, list[str]]:
  return {name: [prompts[i].id for i in rows] for name, rows in splits.items()}


def split_rows(prompts: Sequence[Prompt],
               ids_by_split: dict[str, list[str]]) -> dict[str, np.ndarray]:
  """Inverse of `split_ids`: row indices from a splits.json mapping."""
  row_of = {p.id: i for i, p in enumerate(prompts)}
  try:
    return {name: np.asarray([row_of[x] for x in ids], np.int64)
            for name, ids in ids_by_split.items()}
  except KeyError as e:
    raise DataError(f"splits refer to unknown prompt id {e.args[0]!r}") from None
