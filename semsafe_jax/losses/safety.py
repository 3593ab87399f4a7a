"""L_safety: cross-entropy on the refusal targets of harmful prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsafe_jax.losses.common import safe_div


def token_cross_entropy(logits_BxNxV: jax.Array, targets_BxN: jax.Array) -> jax.Array:
  """[B, N] -log p(target) (float32)."""
  logp = jax.nn.log_softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxN[..., None], axis=-1)[..., 0]


def safety_loss(logits_BxNxV: jax.Array, targets_BxN: jax.Array, mask_BxN: jax.Array,
                weight_B: jax.Array | None = None, first_token_weight: float = 1.0) -> jax.Array:
  """Weighted mean token cross-entropy over the refusal-target tokens.

  Each prompt's tokens count with its harm_weight, normalised by the weighted
  token count: weights set relative emphasis, and weight-0 rows (padding,
  unflagged prompts) drop out entirely. 0 when nothing is weighted. Column 0
  is the first refusal token, the one that decides refusing over answering;
  `first_token_weight` > 1 gives that decision more say than the wording after it.
  """
  m = mask_BxN.astype(jnp.float32)
  m = m.at[:, 0].multiply(first_token_weight)
  if weight_B is not None:
    m = m * weight_B.astype(jnp.float32)[:, None]
  return safe_div((token_cross_entropy(logits_BxNxV, targets_BxN) * m).sum(), m.sum())
