"""Static-shape training batches with consistency pairs over the whole global batch.

Every step has the same shapes, so one jitted step serves the whole run:

  harmful_idx  int32 [B_h]    harmful prompt rows of the global batch
  benign_idx   int32 [B_b]    benign/borderline prompt rows (capability / over-refusal); with
                              `borderline_share`, round(share * B_b) of them are borderline
  pair_index   int32 [P, 2]   positions in harmful_idx (the global batch, any device's rows)
  pair_weight  float32 [P]    SBERT cosine of the pair (0 for padding)
  pair_valid   bool [P]       False for padding (which points at position 0)

The harmful block is filled with groups: a random training anchor plus up to
`neighbors_per_anchor` of its mined training neighbours (cosine > tau); the pairs
are every mined neighbour pair in the block, P of them drawn at random when there are
more. With probability `pairable_anchor_frac` an anchor is drawn among prompts that
have a training neighbour (so batches carry pairs even when few prompts do), else among
all. A batch is a pure function of (seed, step): a resumed run sees exactly the batches
it would have, and the device count never changes it. Split over D devices, a pair's two
prompts usually sit on different devices; the loss indexes the global per-prompt
representation ([B_h], [B_h, D] or [B_h, V]) and XLA gathers it across devices.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np
from absl import logging

from semsafe_jax.data.neighbors import Neighbors
from semsafe_jax.data.schema import DataError

_ANCHOR_TRIES = 16  # random draws before accepting a prompt already in the batch
# The knobs that decide how many valid pairs a batch carries (c.data in configs/default.py).
PAIR_FIELDS = ("data.pairs_per_step", "data.harmful_per_step", "data.neighbors_per_anchor",
               "data.pairable_anchor_frac", "data.tau")
MIN_PAIRS_PER_STEP = 1.0  # below this mean, consistency is as good as off


def check_block_sizes(harmful_per_step: int, benign_per_step: int, num_shards: int) -> None:
  """DataError unless both prompt blocks split evenly over `num_shards` batch shards.

  Cheap: callers may run it as soon as the mesh is known, before any model work.
  """
  d = num_shards
  if d < 1:
    raise DataError(f"num_shards={d} must be >= 1")
  # An uneven block would be replicated: every device would compute all of it.
  for name, size in [("harmful_per_step", harmful_per_step),
                     ("benign_per_step", benign_per_step)]:
    if size < 0 or size % d:
      raise DataError(f"config.data.{name}={size} must be a non-negative multiple of the "
                      f"number of batch shards ({d} = train.mesh data x fsdp), so that every "
                      "device gets an equal block")
  if harmful_per_step < d:
    raise DataError(f"config.data.harmful_per_step={harmful_per_step} must be >= the number "
                    f"of batch shards ({d})")


@dataclasses.dataclass(frozen=True)
class PairBatch:
  step: int
  harmful_idx: np.ndarray  # int32 [B_h]
  benign_idx: np.ndarray  # int32 [B_b]
  pair_index: np.ndarray  # int32 [P, 2], positions within harmful_idx (global)
  pair_weight: np.ndarray  # float32 [P]
  pair_valid: np.ndarray  # bool [P]


class PairBatcher:
  """Builds `PairBatch`es from training rows and mined neighbours.

  num_shards: devices the batch dimension is split over (data x fsdp). It only checks
  that the harmful and benign blocks split evenly; the batches do not depend on it.
  """

  def __init__(self, harmful_idx: Sequence[int], benign_idx: Sequence[int], neighbors: Neighbors,
               tau: float, *, harmful_per_step: int, benign_per_step: int, pairs_per_step: int,
               num_shards: int = 1, neighbors_per_anchor: int = 3,
               pairable_anchor_frac: float = 0.5, seed: int = 0,
               borderline_idx: Sequence[int] = (), borderline_share: float | None = None):
    d = num_shards
    check_block_sizes(harmful_per_step, benign_per_step, d)
    if pairs_per_step < 0:
      raise DataError(f"config.data.pairs_per_step={pairs_per_step} must be >= 0")
    self.harmful_rows = np.unique(np.asarray(harmful_idx, np.int64))
    self.benign_rows = np.unique(np.asarray(benign_idx, np.int64))
    # Borderline prompts (XSTest-like homonyms: "kill a process") are the over-refusal
    # risk, so a fixed share of the benign block may be reserved for them.
    self.borderline_rows = np.unique(np.asarray(borderline_idx, np.int64))
    self.n_borderline = 0
    if borderline_share is not None and borderline_share >= 0:
      if borderline_share > 1:
        raise DataError(f"borderline_share={borderline_share} must be in [0, 1]")
      self.n_borderline = int(round(borderline_share * benign_per_step))
      if self.n_borderline and self.borderline_rows.size == 0:
        raise DataError("borderline_share > 0 but there are no training borderline prompts")
      self.benign_rows = np.setdiff1d(self.benign_rows, self.borderline_rows)
      if benign_per_step - self.n_borderline and self.benign_rows.size == 0:
        raise DataError("borderline_share < 1 but there are no training benign prompts")
    else:
      self.benign_rows = np.union1d(self.benign_rows, self.borderline_rows)
      if benign_per_step and self.benign_rows.size == 0:
        raise DataError("benign_per_step > 0 but there are no training benign/borderline prompts")
    if self.harmful_rows.size == 0:
      raise DataError("No training harmful prompts to batch")
    self.b_h, self.b_b, self.p = harmful_per_step, benign_per_step, pairs_per_step
    if not 0.0 <= pairable_anchor_frac <= 1.0:
      raise DataError(f"pairable_anchor_frac={pairable_anchor_frac} must be in [0, 1]")
    self.tau, self.seed, self.neighbors_per_anchor = tau, seed, neighbors_per_anchor
    self.pairable_anchor_frac = pairable_anchor_frac
    self._adj, self._pair_sim = _train_graph(self.harmful_rows, neighbors, tau)
    self._pairable = np.asarray(sorted(self._adj), np.int64)
    if not self._pair_sim:
      logging.warning("No training pairs with cosine > %.2f: batches carry no valid pairs", tau)
    logging.info("PairBatcher: %d harmful (%d with a neighbour), %d benign, %d pairs; "
                 "B_h=%d B_b=%d P=%d (over %d batch shards)", self.harmful_rows.size,
                 len(self._adj), self.benign_rows.size, len(self._pair_sim), self.b_h, self.b_b,
                 self.p, d)

  @property
  def num_train_pairs(self) -> int:
    return len(self._pair_sim)

  def batch(self, step: int) -> PairBatch:
    """The batch of `step`: depends only on (seed, step) and the constructor inputs."""
    rng = np.random.default_rng([self.seed, step])
    harmful = self._fill(self.b_h, rng)
    cand = self._pairs_in(harmful)
    if len(cand) > self.p:
      cand = [cand[i] for i in np.sort(rng.choice(len(cand), self.p, replace=False))]
    pad = self.p - len(cand)
    n_bord = self.n_borderline
    benign = np.concatenate([_draw(rng, self.borderline_rows, n_bord),
                             _draw(rng, self.benign_rows, self.b_b - n_bord)])
    return PairBatch(step=step,
                     harmful_idx=np.asarray(harmful, np.int32),
                     benign_idx=np.asarray(benign, np.int32),
                     pair_index=np.asarray([(a, b) for a, b, _ in cand] + [(0, 0)] * pad,
                                           np.int32).reshape(self.p, 2),
                     pair_weight=np.asarray([w for _, _, w in cand] + [0.0] * pad, np.float32),
                     pair_valid=np.asarray([True] * len(cand) + [False] * pad, bool))

  def pair_stats(self, steps: int = 50) -> dict[str, float | int]:
    """Valid pairs per batch over the first `steps` batches (data only: no model)."""
    n_P = np.asarray([self.batch(s).pair_valid.sum() for s in range(steps)], np.float64)
    return {"pairs_valid_mean": float(n_P.mean()) if steps else 0.0,
            "steps_without_pairs": int((n_P == 0).sum()), "pairs_per_step": self.p}

  def batches(self, start_step: int = 0) -> Iterator[PairBatch]:
    step = start_step
    while True:
      yield self.batch(step)
      step += 1

  def _fill(self, size: int, rng: np.random.Generator) -> list[int]:
    """`size` harmful rows: anchors, each followed by up to neighbors_per_anchor neighbours."""
    rows: list[int] = []
    used: set[int] = set()
    while len(rows) < size:
      anchor = self._draw_anchor(used, rng)
      group = [anchor]
      room = min(self.neighbors_per_anchor, size - len(rows) - 1)
      nbrs = self._adj.get(anchor)
      if room > 0 and nbrs is not None:
        fresh = [int(x) for x in rng.permutation(nbrs) if int(x) not in used]
        group += fresh[:room]
      used.update(group)
      rows += group
    return rows

  def _pairs_in(self, rows: list[int]) -> list[tuple[int, int, float]]:
    """(position a, position b > a, cosine) of every mined pair among `rows`, sorted."""
    pos_of: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
      pos_of.setdefault(r, []).append(i)
    cand = []
    for a, r in enumerate(rows):  # O(B_h x neighbours), not O(B_h^2)
      for n in self._adj.get(r, ()):
        key = (min(r, int(n)), max(r, int(n)))
        cand += [(a, b, self._pair_sim[key]) for b in pos_of.get(int(n), ()) if b > a]
    return sorted(cand)

  def _draw_anchor(self, used: set[int], rng: np.random.Generator) -> int:
    """A random training prompt, avoiding ones already in the batch if possible."""
    pool = self.harmful_rows
    if self._pairable.size and rng.random() < self.pairable_anchor_frac:
      pool = self._pairable
    for _ in range(_ANCHOR_TRIES):
      row = int(pool[rng.integers(pool.size)])
      if row not in used:
        return row
    return row  # tiny pools: a repeat beats an error


def _draw(rng: np.random.Generator, rows: np.ndarray, n: int) -> np.ndarray:
  """n rows, without repeats while the pool allows."""
  if not n:
    return np.zeros(0, np.int64)
  return rng.choice(rows, n, replace=rows.size < n)


def _train_graph(train_rows: np.ndarray, nb: Neighbors, tau: float
                 ) -> tuple[dict[int, np.ndarray], dict[tuple[int, int], float]]:
  """Symmetric neighbour lists and pair cosines restricted to training prompts, > tau."""
  is_train_N = np.zeros(nb.neighbors_NxK.shape[0], bool)
  is_train_N[train_rows] = True
  nbrs_TxK, sims_TxK = nb.neighbors_NxK[train_rows], nb.sims_NxK[train_rows]
  keep_TxK = (nb.valid_NxK[train_rows] & (sims_TxK > tau) & (nbrs_TxK >= 0)
              & is_train_N[np.maximum(nbrs_TxK, 0)] & (nbrs_TxK != train_rows[:, None]))
  a_M = np.broadcast_to(train_rows[:, None], nbrs_TxK.shape)[keep_TxK]
  b_M = nbrs_TxK[keep_TxK].astype(np.int64)
  pair_sim: dict[tuple[int, int], float] = {}
  for a, b, s in zip(np.minimum(a_M, b_M).tolist(), np.maximum(a_M, b_M).tolist(),
                     sims_TxK[keep_TxK].tolist()):
    pair_sim[(a, b)] = max(pair_sim.get((a, b), -1.0), s)  # both directions may be mined
  adj: dict[int, list[int]] = {}
  for a, b in pair_sim:
    adj.setdefault(a, []).append(b)
    adj.setdefault(b, []).append(a)
  return {a: np.asarray(sorted(v), np.int64) for a, v in adj.items()}, pair_sim


def few_pairs_message(pairs_valid_mean: float | None, where: str = "training") -> str | None:
  """The warning for a run whose batches average < 1 valid pair; None when fine or unknown."""
  if pairs_valid_mean is None or pairs_valid_mean >= MIN_PAIRS_PER_STEP:
    return None
  return (f"Consistency is (almost) off: {where} averages {pairs_valid_mean:.2f} valid pairs "
          f"per step (< {MIN_PAIRS_PER_STEP:g}), so L_consistency barely trains. Raise "
          f"{', '.join('config.' + f for f in PAIR_FIELDS[:4])} or lower config.{PAIR_FIELDS[4]} "
          "(more mined neighbour pairs), or check the data has paraphrases.")
