"""Representation rerouting (circuit breakers, Zou et al., 2024): pure maths on hidden states.

Shapes: K target layers (optional leading axis), B rows, L tokens, D width. `mask` is
[B, L], bool or float weights; it broadcasts over the layer axis, so each (layer, token)
counts once in the means.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsafe_jax.losses.common import safe_div

_EPS = 1e-6


def _weights(mask_BxL: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """[..., B, L] float weights: the mask broadcast over any leading (layer) axes."""
  return jnp.broadcast_to(mask_BxL.astype(jnp.float32), shape)


def _safe_norm(x: jax.Array) -> jax.Array:
  """L2 norm over the last axis, with a zero (not NaN) gradient at x == 0: the adapted
  and frozen states are identical at the first step, when LoRA's B is zero."""
  sq = jnp.sum(jnp.square(x), axis=-1)
  ok = sq > 0
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)


def cosine(a_xD: jax.Array, b_xD: jax.Array) -> jax.Array:
  """Cosine similarity over the last axis, in float32."""
  a, b = a_xD.astype(jnp.float32), b_xD.astype(jnp.float32)
  dot = jnp.sum(a * b, axis=-1)
  return dot / (jnp.maximum(_safe_norm(a), _EPS) * jnp.maximum(_safe_norm(b), _EPS))


def rerouting_loss(h_adapted_xBxLxD: jax.Array, h_frozen_xBxLxD: jax.Array,
                   mask_BxL: jax.Array) -> jax.Array:
  """Weighted mean of ReLU(cos(h_adapted, h_frozen)) over layers and masked tokens.

  Zero once every adapted state is orthogonal to (or points away from) the frozen one:
  the representation that produced the harmful text no longer reaches the later layers.
  """
  cos = cosine(h_adapted_xBxLxD, h_frozen_xBxLxD)
  w = _weights(mask_BxL, cos.shape)
  return safe_div(jnp.sum(jax.nn.relu(cos) * w), jnp.sum(w))


def retain_loss(h_adapted_xBxLxD: jax.Array, h_frozen_xBxLxD: jax.Array,
                mask_BxL: jax.Array) -> jax.Array:
  """Weighted mean of ||h_adapted - h_frozen||_2 over layers and masked tokens."""
  diff = h_adapted_xBxLxD.astype(jnp.float32) - h_frozen_xBxLxD.astype(jnp.float32)
  dist = _safe_norm(diff)
  w = _weights(mask_BxL, dist.shape)
  return safe_div(jnp.sum(dist * w), jnp.sum(w))


def schedule(step: jax.Array | int, total: int, alpha: float
             ) -> tuple[jax.Array, jax.Array]:
  """(c_rerouting, c_retain) at `step` of `total`: alpha (1 - t/2T) and alpha t/2T.

  Rerouting dominates early and retain grows; at the last step they are equal
  (alpha/2 each), as in the reference code (progress = step / 300 for 150 steps).
  """
  progress = jnp.asarray(step, jnp.float32) / (2.0 * max(int(total), 1))
  return alpha * (1.0 - progress), alpha * progress
