"""InfoNCE over a batch of representations: positive pairs pulled together, the rest apart.

For a positive pair (a, b) the anchor a scores every other valid row k of the batch,
s_ak = cos(z_a, z_k) / temperature, and

  l(a -> b) = -log( exp(s_ab) / sum_{k != a} exp(s_ak) )

(the positive sits in the denominator too, as in SimCLR). Pairs count in both directions,
l(a -> b) and l(b -> a), and the loss is their weighted mean over the valid pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsafe_jax.losses.common import safe_div

_NEG = -1e9  # logit of an excluded row: exp() underflows to 0, and no inf - inf NaN


def info_nce(z_NxD: jax.Array, index_Px2: jax.Array, valid_P: jax.Array, temperature: float,
             *, weight_P: jax.Array | None = None, row_valid_N: jax.Array | None = None,
             normalize: bool = True) -> jax.Array:
  """Weighted mean InfoNCE over the valid pairs (0 when none is valid).

  z_NxD: one representation per row; index_Px2: positive pairs (rows of z); valid_P:
  False for padding pairs; weight_P: per-pair weight (default 1); row_valid_N: False for
  padding rows, which are never negatives; normalize: unit-normalise z first (cosine).
  """
  z = z_NxD.astype(jnp.float32)
  if normalize:
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  n = z.shape[0]
  logits_NxN = (z @ z.T) / temperature
  keep_NxN = ~jnp.eye(n, dtype=bool)
  if row_valid_N is not None:
    keep_NxN = keep_NxN & row_valid_N.astype(bool)[None, :]
  lse_N = jax.nn.logsumexp(jnp.where(keep_NxN, logits_NxN, _NEG), axis=-1)
  a, b = index_Px2[:, 0], index_Px2[:, 1]
  pos_P = logits_NxN[a, b]
  nll_P = 0.5 * ((lse_N[a] - pos_P) + (lse_N[b] - pos_P))
  w = valid_P.astype(jnp.float32)
  if weight_P is not None:
    w = w * weight_P.astype(jnp.float32)
  if row_valid_N is not None:
    ok = row_valid_N.astype(bool)
    w = w * (ok[a] & ok[b]).astype(jnp.float32)
  # Padding pairs may point at anything (the batcher pads with (0, 0)): zero weight.
  nll_P = jnp.where(w > 0, nll_P, 0.0)
  return safe_div((w * nll_P).sum(), w.sum())
