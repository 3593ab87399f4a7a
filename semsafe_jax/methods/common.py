"""Model-running pieces several methods share (the pure maths lives in semsafe_jax/losses)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.adapters import adapted_embed_fn, apply_adapters
from semsafe_jax.losses.common import gather_positions, target_positions
from semsafe_jax.losses.safety import token_cross_entropy
from semsafe_jax.methods.base import Tokens
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

Params = Any


def target_window(config: Any) -> int:
  """How many target positions per row the LM head reads: loss.max_target_tokens (0 = no
  cap), and never more than data.max_response_tokens, where every response is cut when it is
  tokenised (train/inputs.py): positions past it would only be masked out."""
  return min(int(config.loss.max_target_tokens) or 1 << 30, int(config.data.max_response_tokens))


def map_rows(fn: Callable[[Tokens], jax.Array], rows: Any, which: np.ndarray,
             batch_size: int, desc: str | None = None) -> np.ndarray:
  """float32 [len(which), ...]: fn over rows[which] (rows: ids, mask, target_mask, prompt_end),
  in fixed-size batches, the last one padded by repeating a row, so one compile serves them
  all. For what a frozen model gives once before training. desc: a progress bar's label."""
  which = np.asarray(which, np.int64)
  starts = range(0, len(which), batch_size)
  if desc is not None:
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    starts = tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True)
  out = []
  for i in starts:
    part = which[i:i + batch_size]
    padded = np.concatenate([part, np.full(batch_size - len(part), part[0])])
    out.append(np.asarray(jax.device_get(fn(Tokens.take(rows, padded))), np.float32)[:len(part)])
  return np.concatenate(out) if out else np.zeros((0,), np.float32)


def adapted(trainable: Params, base_params: Params, adapter_cfg: Any,
            rng: jax.Array | None) -> tuple[Params, Callable]:
  """(params to differentiate, embed_fn): LoRA unmerged, full weights if trained."""
  params = apply_adapters(base_params, trainable, adapter_cfg, rng=rng, merge=False)
  return params, adapted_embed_fn(trainable)


def response_logits(params: Params, cfg: ModelConfig, embed_fn: Callable, t: Tokens,
                    n_max: int, **forward_kw
                    ) -> tuple[jax.Array, jax.Array, jax.Array, transformer.ModelOutput]:
  """(logits [B, n, V], targets [B, n], mask [B, n], forward output) at the first n_max
  response tokens of each row. The LM head runs on those positions only."""
  out = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, t.ids),
                            attention_mask_BxS=t.mask, compute_logits=False, **forward_kw)
  pos, targets, mask = target_positions(t.ids, t.target_mask, n_max)
  return transformer.lm_head(params, cfg, gather_positions(out.hidden, pos)), targets, mask, out


def response_logprob(logits_BxNxV: jax.Array, targets_BxN: jax.Array,
                     mask_BxN: jax.Array) -> jax.Array:
  """[B] summed log-probability of each row's response tokens."""
  return -(token_cross_entropy(logits_BxNxV, targets_BxN) * mask_BxN).sum(-1)


def token_ce_sums(logits_BxNxV: jax.Array, targets_BxN: jax.Array, mask_BxN: jax.Array,
                  weight_B: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(weighted sum of token cross-entropies, weighted token count): pool several blocks
  into one token mean, as plain SFT over a mixed dataset does."""
  m = mask_BxN.astype(jnp.float32) * weight_B.astype(jnp.float32)[:, None]
  return (token_cross_entropy(logits_BxNxV, targets_BxN) * m).sum(), m.sum()
