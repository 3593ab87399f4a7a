"""Small shared pieces of the losses: target gathering and masked reductions.

Shape suffixes: B batch, L sequence, N gathered positions, V vocab, D width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_positions(ids_BxL: jax.Array, target_mask_BxL: jax.Array, n: int
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The first n target tokens of each row and the positions that predict them.

  Token t is predicted by the logits at t - 1. Returns pos_BxN (int32, where to
  read hidden states), targets_BxN (token ids) and mask_BxN (False past a row's
  last target). n is static, so the LM head runs on [B, n] instead of [B, L].
  """
  L = ids_BxL.shape[1]
  n = max(1, min(n, L - 1))
  pred_BxL1 = target_mask_BxL[:, 1:].astype(bool)
  col = jnp.arange(L - 1, dtype=jnp.int32)
  # Stable order: predicting positions first, in sequence order.
  order_BxL1 = jnp.argsort(jnp.where(pred_BxL1, col, col + L), axis=1).astype(jnp.int32)
  pos_BxN = order_BxL1[:, :n]
  mask_BxN = jnp.take_along_axis(pred_BxL1, pos_BxN, axis=1)
  targets_BxN = jnp.take_along_axis(ids_BxL, pos_BxN + 1, axis=1)
  return pos_BxN, targets_BxN, mask_BxN


def gather_positions(x_BxLxD: jax.Array, pos_BxN: jax.Array) -> jax.Array:
  return jnp.take_along_axis(x_BxLxD, pos_BxN[..., None], axis=1)


def prompt_mask(mask_BxL: jax.Array, prompt_end_B: jax.Array) -> jax.Array:
  """True at the real prompt tokens (index <= prompt_end)."""
  col = jnp.arange(mask_BxL.shape[1])
  return mask_BxL.astype(bool) & (col[None, :] <= prompt_end_B[:, None])


def safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, or 0 where den == 0 (no NaN in the value or the gradient)."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)
