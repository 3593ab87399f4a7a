"""Cross-label neighbours: a harmful training prompt and a safe one that look alike.

SBERT similarity is topic similarity: "how do I pick a lock to break into my neighbour's
house" and "how do lock-picking hobbyists practise on their own locks" sit close together.
Consistency pairs drop such pairs (same label only); these contrast pairs use them the
other way round, so that the model separates intent from topic (a margin between the two
refusal scores, see methods/semsafe.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from semsafe_jax.data import neighbors

# Safe training splits a harmful prompt may be contrasted with.
SAFE_SPLITS = ("train_benign", "train_borderline", "train_lookalike")


@dataclasses.dataclass(frozen=True)
class ContrastPairs:
  harmful_rows: np.ndarray  # int64 [C]
  safe_rows: np.ndarray  # int64 [C]
  weight: np.ndarray  # float32 [C], SBERT cosine

  def __len__(self) -> int:
    return len(self.harmful_rows)


def mine(emb_NxD: np.ndarray, splits: dict[str, np.ndarray], *, tau: float, k: int,
         opts: neighbors.IndexOptions = neighbors.IndexOptions()
         ) -> tuple[ContrastPairs, dict[str, Any]]:
  """Each harmful training prompt with up to k safe training prompts above cosine tau."""
  harm = np.asarray(splits.get("train", []), np.int64)
  safe = np.concatenate([np.asarray(splits.get(s, []), np.int64) for s in SAFE_SPLITS])
  topk = neighbors.search_against(emb_NxD[harm], emb_NxD[safe], k, opts)
  ok_HxK = (topk.ids_NxK >= 0) & (topk.sims_NxK > tau)
  h_C, j_C = np.nonzero(ok_HxK)
  pairs = ContrastPairs(harmful_rows=harm[h_C], safe_rows=safe[topk.ids_NxK[h_C, j_C]],
                        weight=topk.sims_NxK[h_C, j_C].astype(np.float32))
  stats = {"tau": float(tau), "k": int(k), "pairs": int(len(h_C)),
           "harmful_with_safe_neighbour": int(ok_HxK.any(1).sum()), "harmful": int(len(harm))}
  return pairs, stats


def sample(pairs: ContrastPairs, n: int, seed: int, step: int) -> tuple[np.ndarray, np.ndarray]:
  """(pair indices [n], valid [n]) for one step, a pure function of (seed, step)."""
  rng = np.random.default_rng([seed, step, 0xc0])
  take = rng.choice(len(pairs), min(n, len(pairs)), replace=False)
  pad = n - len(take)
  return (np.concatenate([take, np.zeros(pad, np.int64)]).astype(np.int64),
          np.asarray([True] * len(take) + [False] * pad))
