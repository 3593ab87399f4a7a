"""Preference losses on summed response log-probabilities: DPO and SafeDPO's safety transform.

DPO (Rafailov et al., 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", arXiv 2305.18290): with d = (log pi(y_w) - log pi_ref(y_w))
- (log pi(y_l) - log pi_ref(y_l)), the loss is -log sigmoid(beta * d).

SafeDPO (Kim et al., 2025, arXiv 2505.20065) keeps that loss on a transformed dataset
T(D) and subtracts a safety margin: -log sigmoid(beta * d - (h_l - h_w) * Delta), where
h_w, h_l are the unsafe indicators (1 = unsafe) of the preferred and dispreferred
response after the transform. `safedpo_transform` is T(D) plus that margin.

Every array argument is [P], one entry per preference pair.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.losses.common import safe_div


def dpo_logits(policy_chosen_logp: jax.Array, policy_rejected_logp: jax.Array,
               ref_chosen_logp: jax.Array, ref_rejected_logp: jax.Array, beta: float,
               margin: jax.Array | None = None) -> jax.Array:
  """[P] beta * d - margin: what the sigmoid reads."""
  d = ((policy_chosen_logp - ref_chosen_logp)
       - (policy_rejected_logp - ref_rejected_logp)).astype(jnp.float32)
  z = beta * d
  return z if margin is None else z - jnp.asarray(margin, jnp.float32)


def dpo_loss(policy_chosen_logp: jax.Array, policy_rejected_logp: jax.Array,
             ref_chosen_logp: jax.Array, ref_rejected_logp: jax.Array, beta: float,
             weight: jax.Array | None = None, margin: jax.Array | None = None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted mean of -log sigmoid(beta * d - margin), metrics).

  weight: per-pair weight (None = 1); weight-0 pairs (dropped, padding) count nowhere,
  the loss is 0 when every weight is 0. margin: subtracted inside the sigmoid (None = 0).
  Metrics (weighted means, no gradient): the implicit rewards beta * (log pi - log pi_ref)
  of each side, their difference, and the share of pairs whose reward ranks the chosen
  response strictly higher.
  """
  z = dpo_logits(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp,
                 ref_rejected_logp, beta, margin)
  w = (jnp.ones_like(z) if weight is None else jnp.asarray(weight, jnp.float32))
  loss = safe_div((-jax.nn.log_sigmoid(z) * w).sum(), w.sum())
  sg = jax.lax.stop_gradient
  r_c = sg(beta * (policy_chosen_logp - ref_chosen_logp).astype(jnp.float32))
  r_r = sg(beta * (policy_rejected_logp - ref_rejected_logp).astype(jnp.float32))
  mean = lambda x: safe_div((x * w).sum(), w.sum())
  return loss, {"reward_chosen": mean(r_c), "reward_rejected": mean(r_r),
                "reward_margin": mean(r_c - r_r),
                "reward_accuracy": mean((r_c > r_r).astype(jnp.float32))}


class SafePairs(NamedTuple):
  """T(D) of SafeDPO on a table of pairs (numpy, host side)."""
  swap: np.ndarray  # bool [P]: the rejected response becomes the chosen one
  weight: np.ndarray  # float32 [P]: 1 kept or swapped, 0 dropped (both unsafe)
  margin: np.ndarray  # float32 [P]: (h_l - h_w) * Delta after the transform; 0 when dropped
  chosen_unsafe: np.ndarray  # bool [P] after the transform
  rejected_unsafe: np.ndarray  # bool [P] after the transform


def safedpo_transform(chosen_unsafe, rejected_unsafe, delta: float) -> SafePairs:
  """SafeDPO's safety-aware reordering of preference pairs, and its margin.

  Keep a pair whose preferred response is safe; swap one whose preferred response is
  unsafe and dispreferred one safe; drop (weight 0) a pair of two unsafe responses.
  After that no kept pair prefers an unsafe response, so the margin (h_l - h_w) * Delta
  is Delta on safe-vs-unsafe pairs and 0 on safe-vs-safe ones.
  """
  if delta < 0:
    raise ValueError(f"method.delta={delta}; expected >= 0 (SafeDPO's margin is non-negative)")
  hw = np.asarray(chosen_unsafe, bool)
  hl = np.asarray(rejected_unsafe, bool)
  if hw.shape != hl.shape:
    raise ValueError(f"chosen labels {hw.shape} and rejected labels {hl.shape} differ")
  swap = hw & ~hl
  keep = ~(hw & hl)
  new_w = np.where(swap, hl, hw)
  new_l = np.where(swap, hw, hl)
  margin = (new_l.astype(np.float32) - new_w.astype(np.float32)) * np.float32(delta)
  return SafePairs(swap=swap, weight=keep.astype(np.float32),
                   margin=np.where(keep, margin, np.float32(0)).astype(np.float32),
                   chosen_unsafe=new_w, rejected_unsafe=new_l)
