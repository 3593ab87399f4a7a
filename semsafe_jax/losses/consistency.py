"""L_consistency: paraphrase pairs of harmful prompts should look alike to the model.

The pair arrays are static ([P]); `pair_valid` masks padding pairs and
`pair_weight` (similarity, optionally x the probe's unsafe probability) weighs
the rest. The loss is the weighted mean distance, 0 when no pair is valid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsafe_jax.losses.common import safe_div

DIVERGENCES = ("js", "sym_kl")


def hidden_distance(a_PxD: jax.Array, b_PxD: jax.Array, normalize: bool = True) -> jax.Array:
  """[P] squared L2; with normalize, of unit vectors (= 2 - 2 cos)."""
  a, b = a_PxD.astype(jnp.float32), b_PxD.astype(jnp.float32)
  if normalize:
    # rsqrt(|x|^2 + eps): finite gradient even for a zero vector.
    a = a * jax.lax.rsqrt((a * a).sum(-1, keepdims=True) + 1e-12)
    b = b * jax.lax.rsqrt((b * b).sum(-1, keepdims=True) + 1e-12)
  return jnp.square(a - b).sum(-1)


def prob_distance(p_P: jax.Array, q_P: jax.Array) -> jax.Array:
  """[P] squared difference of refusal probabilities."""
  return jnp.square(p_P.astype(jnp.float32) - q_P.astype(jnp.float32))


def _kl(logp: jax.Array, logq: jax.Array) -> jax.Array:
  return (jnp.exp(logp) * (logp - logq)).sum(-1)


def divergence(logp_PxV: jax.Array, logq_PxV: jax.Array, kind: str = "js") -> jax.Array:
  """[P] symmetric divergence between two next-token distributions (log-probs in)."""
  logp, logq = logp_PxV.astype(jnp.float32), logq_PxV.astype(jnp.float32)
  if kind == "sym_kl":
    return 0.5 * (_kl(logp, logq) + _kl(logq, logp))
  if kind == "js":
    logm = jnp.logaddexp(logp, logq) - jnp.log(2.0)
    return 0.5 * (_kl(logp, logm) + _kl(logq, logm))
  raise ValueError(f"Unknown divergence {kind!r}; expected one of {DIVERGENCES}")


def weighted_pair_mean(dist_P: jax.Array, pair_weight_P: jax.Array,
                       pair_valid_P: jax.Array) -> jax.Array:
  """sum(w * valid * d) / sum(w * valid); 0 when no pair carries weight."""
  w = pair_weight_P.astype(jnp.float32) * pair_valid_P.astype(jnp.float32)
  return safe_div(jnp.where(w > 0, w * dist_P, 0.0).sum(), w.sum())


def consistency_loss(repr_B: jax.Array, pair_index_Px2: jax.Array, pair_weight_P: jax.Array,
                     pair_valid_P: jax.Array, *, kind: str, normalize: bool = True,
                     div: str = "js") -> jax.Array:
  """Weighted pair distance of per-prompt representations of the harmful block.

  kind: "hidden" (repr [B, D]), "refusal_prob" (repr [B]), "next_token"
  (repr = first-response-token log-probs [B, V]).
  """
  live_P = (pair_weight_P * pair_valid_P) > 0
  # Zero the members of dead pairs before the distance: NaN/inf there would
  # otherwise leak into the gradient (0 * NaN) even though the value ignores it.
  live = live_P.reshape((-1,) + (1,) * (repr_B.ndim - 1))
  a = jnp.where(live, repr_B[pair_index_Px2[:, 0]], 0.0)
  b = jnp.where(live, repr_B[pair_index_Px2[:, 1]], 0.0)
  if kind == "hidden":
    d = hidden_distance(a, b, normalize)
  elif kind == "refusal_prob":
    d = prob_distance(a, b)
  elif kind == "next_token":
    d = divergence(a, b, div)
  else:
    raise ValueError(f"Unknown consistency_repr {kind!r}; expected hidden | refusal_prob | "
                     "next_token")
  return weighted_pair_mean(d, pair_weight_P, pair_valid_P)
