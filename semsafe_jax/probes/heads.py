"""The small heads that read model states: pooling, the safety probe, the refusal classifier.

Pure functions shared by the probes (which fit them) and the loss scorers (which
differentiate through them).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]


def masked_mean_pool(x_BxLxD: jax.Array, mask_BxL: jax.Array) -> jax.Array:
  """Mean over the masked positions (zeros for an all-masked row)."""
  m = mask_BxL.astype(jnp.float32)[..., None]
  return (x_BxLxD.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def probe_logit(probe: Params, pooled_BxD: jax.Array) -> jax.Array:
  return ((pooled_BxD - probe["mu"]) / probe["sd"]) @ probe["w"] + probe["b"]


def classifier_logit(clf: Params, feats_BxD: jax.Array) -> jax.Array:
  x = (feats_BxD - clf["mu"]) / clf["sd"]
  return jax.nn.relu(x @ clf["w1"] + clf["b1"]) @ clf["w2"] + clf["b2"]
