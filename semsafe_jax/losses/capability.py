"""L_capability: keep benign/borderline answers as the base model gave them.

The targets are the base model's own greedy answers, so "kl" matches the full
next-token distributions there and "ce" only the chosen tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from semsafe_jax.losses.common import safe_div
from semsafe_jax.losses.safety import token_cross_entropy

KINDS = ("kl", "ce")
DIRECTIONS = ("forward", "reverse")  # forward = KL(base || adapted)


def token_kl(logits_p_BxNxV: jax.Array, logits_q_BxNxV: jax.Array) -> jax.Array:
  """[B, N] KL(p || q) per position."""
  logp = jax.nn.log_softmax(logits_p_BxNxV.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(logits_q_BxNxV.astype(jnp.float32), axis=-1)
  return (jnp.exp(logp) * (logp - logq)).sum(-1)


def capability_loss(adapted_logits_BxNxV: jax.Array, mask_BxN: jax.Array, *,
                    base_logits_BxNxV: jax.Array | None = None,
                    targets_BxN: jax.Array | None = None, kind: str = "kl",
                    direction: str = "forward", first_token_weight: float = 1.0) -> jax.Array:
  """Weighted mean over the masked response tokens of KL or cross-entropy.

  Column 0 is each row's first response token. That token decides between
  answering and refusing, so `first_token_weight` > 1 guards it against
  over-refusal more than a plain mean over ~50 tokens would.
  """
  m = mask_BxN.astype(jnp.float32)
  m = m.at[:, 0].multiply(first_token_weight)
  if kind == "kl":
    base = jax.lax.stop_gradient(base_logits_BxNxV)
    if direction == "forward":
      per_tok = token_kl(base, adapted_logits_BxNxV)
    elif direction == "reverse":
      per_tok = token_kl(adapted_logits_BxNxV, base)
    else:
      raise ValueError(f"Unknown kl direction {direction!r}; expected one of {DIRECTIONS}")
  elif kind == "ce":
    per_tok = token_cross_entropy(adapted_logits_BxNxV, targets_BxN)
  else:
    raise ValueError(f"Unknown capability loss {kind!r}; expected one of {KINDS}")
  return safe_div((per_tok * m).sum(), m.sum())
