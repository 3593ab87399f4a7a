"""Packed rows: several short sequences share one row, each attending only to itself.

A block of right-padded rows [U, L] (prompts, or prompts with their targets) pays for every
padding column three times over in a train step (forward, the forward recomputed under
remat, backward). Packed first-fit-decreasing into [R, W] rows, the same sequences cost
about their real tokens. R and W are fixed for a run (`plan`), so the step still compiles
once.

`transformer.forward(segment_ids_BxT=...)` keeps attention inside each sequence and the
positions restart at 0 per sequence, so every one gets the hidden states its own row would
give; `unpack` gathers them back into the [U, L] layout the losses and scorers read.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import flax
import jax
import numpy as np
from absl import logging


@flax.struct.dataclass
class Packed:
  """U right-padded prompts [U, L] laid out in R rows of W tokens."""
  ids: Any  # int32 [R, W]
  mask: Any  # bool [R, W], real tokens
  segment_ids: Any  # int32 [R, W]: 1, 2, ... per prompt within its row; 0 = padding
  positions: Any  # int32 [R, W], a token's position within its own prompt
  unpack: Any  # int32 [U, L], flat index r * W + c of prompt u's token l (0 at padding)


def first_fit_decreasing(lengths: Iterable[int], width: int) -> list[list[int]]:
  """Rows of item indices whose lengths sum to <= width; longest items placed first."""
  lengths = np.asarray(list(lengths), np.int64)
  if lengths.size and lengths.max() > width:
    raise ValueError(f"a prompt of {lengths.max()} tokens does not fit a packed row of {width}")
  rows: list[list[int]] = []
  room: list[int] = []
  for i in np.argsort(-lengths, kind="stable").tolist():
    n = int(lengths[i])
    r = next((r for r, free in enumerate(room) if free >= n), None)
    if r is None:
      r = len(rows)
      rows.append([])
      room.append(width)
    rows[r].append(i)
    room[r] -= n
  return rows


def rows_for_run(lengths_of_step: Callable[[int], np.ndarray], steps: int, width: int) -> int:
  """The most packed rows any of the run's `steps` steps needs (its batches are known)."""
  return max((len(first_fit_decreasing(lengths_of_step(s), width)) for s in range(steps)),
             default=1)


@dataclasses.dataclass(frozen=True)
class Plan:
  """A block's packed shape for a whole run."""
  rows: int
  width: int


def plan(lengths_of_step: Callable[[int], np.ndarray], steps: int, width: int,
         plain_tokens: int, shards: int = 1, what: str = "rows") -> Plan | None:
  """How to pack a block whose step `s` draws rows of real lengths `lengths_of_step(s)`:
  rows of `width` tokens (widened to the run's longest row), as many as the run's fullest
  step needs, rounded up to a multiple of `shards` (the batch shards, so that the packed
  rows split over the devices instead of every device computing all of them). None (leave
  it unpacked) when `width` or `steps` is 0, or when even the fullest step would compute
  `plain_tokens` or more."""
  if width <= 0 or steps <= 0:
    return None
  per_step = [np.asarray(lengths_of_step(s)) for s in range(steps)]
  width = max(int(width), max(int(x.max(initial=1)) for x in per_step))
  rows = rows_for_run(lambda s: per_step[s], steps, width)
  rows = -(-rows // shards) * shards
  if rows * width >= plain_tokens:
    return None
  logging.info("Packing %s: %d per step in %d rows of %d tokens (%d instead of %d).",
               what, len(per_step[0]), rows, width, rows * width, plain_tokens)
  return Plan(rows=rows, width=width)


def pack(ids_UxL: np.ndarray, mask_UxL: np.ndarray, rows: int, width: int,
         pad_id: int = 0) -> Packed:
  """Packs right-padded prompts (mask a prefix of each row) into `rows` x `width`."""
  U, L = mask_UxL.shape
  lengths = mask_UxL.sum(1)
  layout = first_fit_decreasing(lengths, width)
  if len(layout) > rows:
    raise ValueError(f"{U} prompts need {len(layout)} packed rows of {width}, more than the "
                     f"{rows} planned for the run (was this step beyond train.steps?)")
  ids = np.full((rows, width), pad_id, np.int32)
  seg = np.zeros((rows, width), np.int32)
  pos = np.zeros((rows, width), np.int32)
  unpack = np.zeros((U, L), np.int32)
  for r, members in enumerate(layout):
    c = 0
    for k, u in enumerate(members, start=1):
      n = int(lengths[u])
      ids[r, c:c + n] = ids_UxL[u, :n]
      seg[r, c:c + n] = k
      pos[r, c:c + n] = np.arange(n)
      unpack[u, :n] = r * width + c + np.arange(n)
      c += n
  return Packed(ids=ids, mask=seg > 0, segment_ids=seg, positions=pos, unpack=unpack)


def unpack(x_RxWxD: jax.Array, index_UxL: jax.Array) -> jax.Array:
  """[R, W, ...] packed activations -> [U, L, ...] in the prompts' own rows."""
  R, W = x_RxWxD.shape[:2]
  return x_RxWxD.reshape(R * W, *x_RxWxD.shape[2:])[index_UxL]
