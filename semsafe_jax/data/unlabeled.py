"""Unlabelled partners of labelled training prompts: what only the consistency term can teach.

A partner is a prompt with no label and no target (from `data.unlabeled_sources`, or a
variant generated from a training prompt) paired with a labelled training prompt, its
anchor, within cosine tau. The loss pulls the partner's behaviour towards its anchor's,
so a refusal learned on the anchor carries over to phrasings nobody labelled, and a
benign anchor's helpfulness carries over to its look-alikes.

Mining rule: an unlabelled prompt pairs with each labelled training prompt above tau
(up to `data.unlabeled_k`), unless those neighbours disagree, harmful against safe: such
a prompt sits between a harmful request and a benign one ("kill a Python process" near
"kill a person") and nothing says which it is, so it is left out and counted.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from semsafe_jax.data import neighbors
from semsafe_jax.data.splits import UNLABELED_SPLIT

# Training splits whose prompts may anchor a partner, and whether they are harmful.
ANCHOR_SPLITS = {"train": True, "train_benign": False, "train_borderline": False,
                 "train_lookalike": False}


@dataclasses.dataclass(frozen=True)
class Partners:
  """M (partner, anchor) entries."""
  texts: list[str]  # partner prompt texts [M]
  anchor_rows: np.ndarray  # int64 [M], prompt rows of the labelled anchors
  anchor_harmful: np.ndarray  # bool [M]
  weight: np.ndarray  # float32 [M], SBERT cosine of the pair
  kind: np.ndarray  # str [M]: "pool" (mined) | "generated" (a variant of its anchor)

  def __len__(self) -> int:
    return len(self.texts)

  @classmethod
  def empty(cls) -> "Partners":
    return cls([], np.zeros(0, np.int64), np.zeros(0, bool), np.zeros(0, np.float32),
               np.zeros(0, "<U9"))

  def concat(self, other: "Partners") -> "Partners":
    return Partners(self.texts + other.texts,
                    np.concatenate([self.anchor_rows, other.anchor_rows]),
                    np.concatenate([self.anchor_harmful, other.anchor_harmful]),
                    np.concatenate([self.weight, other.weight]),
                    np.concatenate([self.kind, other.kind]))


def anchor_rows(splits: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(rows, harmful flags) of every labelled training prompt that may anchor a partner."""
  rows, harmful = [], []
  for name, is_harmful in ANCHOR_SPLITS.items():
    r = np.asarray(splits.get(name, []), np.int64)
    rows.append(r)
    harmful.append(np.full(len(r), is_harmful))
  return np.concatenate(rows), np.concatenate(harmful)


def mine_pool(texts: Sequence[str], emb_NxD: np.ndarray, splits: dict[str, np.ndarray], *,
              tau: float, k: int, opts: neighbors.IndexOptions = neighbors.IndexOptions()
              ) -> tuple[Partners, dict[str, Any]]:
  """Partners from the train_unlabeled split, and the coverage statistics.

  texts / emb_NxD: every prompt, rows as in the splits.
  """
  pool = np.asarray(splits.get(UNLABELED_SPLIT, []), np.int64)
  a_rows, a_harm = anchor_rows(splits)
  topk = neighbors.search_against(emb_NxD[pool], emb_NxD[a_rows], k, opts)
  ok_UxK = (topk.ids_NxK >= 0) & (topk.sims_NxK > tau)
  harm_UxK = a_harm[np.maximum(topk.ids_NxK, 0)]
  n_ok = ok_UxK.sum(1)
  n_harm = (ok_UxK & harm_UxK).sum(1)
  mixed_U = (n_harm > 0) & (n_harm < n_ok)
  keep_UxK = ok_UxK & ~mixed_U[:, None]
  u_M, j_M = np.nonzero(keep_UxK)
  partners = Partners(texts=[texts[int(pool[u])] for u in u_M],
                      anchor_rows=a_rows[topk.ids_NxK[u_M, j_M]],
                      anchor_harmful=harm_UxK[u_M, j_M],
                      weight=topk.sims_NxK[u_M, j_M].astype(np.float32),
                      kind=np.full(len(u_M), "pool"))
  covered = n_ok > 0
  stats = {
      "pool": int(len(pool)), "tau": float(tau), "k": int(k),
      "with_labelled_neighbour": int(covered.sum()),
      "coverage": float(covered.mean()) if len(pool) else 0.0,
      "harmful_anchored": int(((n_harm > 0) & ~mixed_U).sum()),
      "safe_anchored": int(((n_harm == 0) & covered).sum()),
      "ambiguous_dropped": int(mixed_U.sum()),
      "pairs": int(len(u_M)),
  }
  return partners, stats


def variants(source_rows: Sequence[int], texts: Sequence[str], cos: Sequence[float],
             harmful_rows: set[int]) -> Partners:
  """Generated variants (paraphrases, style rewrites) as unlabelled partners of their source."""
  rows = np.asarray(source_rows, np.int64)
  return Partners(texts=list(texts), anchor_rows=rows,
                  anchor_harmful=np.asarray([int(r) in harmful_rows for r in rows], bool),
                  weight=np.asarray(cos, np.float32), kind=np.full(len(rows), "generated"))


def sample(partners: Partners, n: int, harmful_share: float, seed: int, step: int
           ) -> tuple[np.ndarray, np.ndarray]:
  """(entry indices [n], valid [n]) for one step, a pure function of (seed, step).

  round(harmful_share * n) entries anchored on harmful prompts, the rest on safe ones;
  padding (valid False) where a side has too few.
  """
  rng = np.random.default_rng([seed, step, 0x5e5])
  n_h = int(round(harmful_share * n))
  idx, valid = [], []
  for want, side in ((n_h, True), (n - n_h, False)):
    pool = np.flatnonzero(partners.anchor_harmful == side)
    take = rng.choice(pool, min(want, len(pool)), replace=False) if len(pool) else pool
    idx += take.tolist() + [0] * (want - len(take))
    valid += [True] * len(take) + [False] * (want - len(take))
  return np.asarray(idx, np.int64), np.asarray(valid, bool)
