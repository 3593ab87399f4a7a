"""Differentiable refusal scorers: how strongly a model state signals "refuse".

All scorers are pure, jit-able and deterministic, and map to a probability-like
score in [0, 1] per prompt (used by the "refusal_prob" consistency term):

  first_token   sum of softmax(first response logits) over refusal opener tokens
  soft_pattern  teacher-forced likelihood of refusal phrases after the prompt
  classifier    MLP on expected token embeddings (softmax(logits) @ E) at response positions
  probe         logistic probe on pooled hidden states (see probes/safety.py)

Tokenizer-side helpers (numpy, run once) build the arrays the scorers read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.probes.heads import classifier_logit, masked_mean_pool, probe_logit

Params = dict[str, Any]

# Openers of refusals. Their first tokens form the first-token refusal set.
REFUSAL_OPENERS = (
    "I'm sorry", "I am sorry", "Sorry", "I can't", "I cannot", "I won't", "I will not",
    "I'm unable", "I am unable", "I'm not able", "I apologize", "My apologies",
    "Unfortunately", "As an AI", "I must decline", "No, I",
)
# Openers of ordinary helpful answers. A refusal token that also starts one of
# these ("I" starts "I'm sorry" and "I'd be happy to help") is ambiguous.
COMPLIANT_OPENERS = (
    "Sure", "Certainly", "Of course", "Absolutely", "Yes", "Here", "Here's", "I'd be happy",
    "I can help", "I'll", "I think", "As requested", "As you", "The", "To", "Great", "No problem",
)
# Teacher-forced refusal continuations for the soft-pattern scorer.
REFUSAL_PHRASES = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "Sorry, I can't assist with that.",
    "I won't help with this.",
    "I'm not able to help with that.",
)


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer.encode(text, add_special_tokens=False))


# ----------------------------------------------------------------------------
# (a) First-token refusal probability.


def refusal_first_tokens(tokenizer: Any, openers: Sequence[str] = REFUSAL_OPENERS,
                         compliant: Sequence[str] = COMPLIANT_OPENERS,
                         ambiguous_weight: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """(ids_R int32, weights_R float32): first tokens of refusal openers.

  Tradeoff: in BPE vocabularies most refusals start with the token "I", which
  also starts many helpful answers. Dropping it loses most of the refusal mass;
  keeping it at full weight rewards any "I ..." answer. Tokens that also open
  a `compliant` answer therefore count with `ambiguous_weight` (0 drops them).
  Both the bare and the space-prefixed spelling are included, since the first
  response token follows a newline in some templates and a space in others.
  """
  def firsts(texts):
    out = set()
    for t in texts:
      for variant in (t, " " + t):
        ids = _encode(tokenizer, variant)
        if ids:
          out.add(int(ids[0]))
    return out

  refusal, helpful = firsts(openers), firsts(compliant)
  ids = np.array(sorted(refusal), np.int32)
  weights = np.array([ambiguous_weight if i in helpful else 1.0 for i in ids], np.float32)
  keep = weights > 0
  return ids[keep], weights[keep]


def refusal_first_token_ids(tokenizer: Any, openers: Sequence[str] = REFUSAL_OPENERS) -> np.ndarray:
  """Token ids that start a refusal (ambiguous ones included; see refusal_first_tokens)."""
  return refusal_first_tokens(tokenizer, openers, compliant=(), ambiguous_weight=1.0)[0]


def first_token_refusal_prob(logits_BxV: jax.Array, token_ids_R: jax.Array,
                             token_weights_R: jax.Array | None = None) -> jax.Array:
  """[B] weighted probability mass on refusal opener tokens (ids must be unique)."""
  logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
  p_BxR = jnp.exp(jnp.take(logp_BxV, token_ids_R, axis=-1))
  if token_weights_R is not None:
    p_BxR = p_BxR * token_weights_R
  return jnp.clip(p_BxR.sum(-1), 0.0, 1.0)


# ----------------------------------------------------------------------------
# (b) Soft pattern: likelihood of refusal phrases after the prompt.


def tokenize_phrases(tokenizer: Any, phrases: Sequence[str] = REFUSAL_PHRASES,
                     max_len: int | None = None, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(ids_RxP int32, mask_RxP bool), right-padded (P = longest or max_len)."""
  toks = [_encode(tokenizer, p) for p in phrases]
  P = max_len or max(len(t) for t in toks)
  ids = np.full((len(toks), P), pad_id, np.int32)
  mask = np.zeros((len(toks), P), bool)
  for r, t in enumerate(toks):
    t = t[:P]
    ids[r, :len(t)] = t
    mask[r, :len(t)] = True
  return ids, mask


def phrase_continuation_inputs(ids_BxL: jax.Array, prompt_end_B: jax.Array,
                               phrase_ids_RxP: jax.Array, phrase_mask_RxP: jax.Array, *,
                               prompt_len: int | None = None, pad_id: int = 0
                               ) -> dict[str, jax.Array]:
  """Batched prompt + phrase inputs, static shapes: [B*R, Lp + P], row b*R + r.

  Each prompt (ids[:prompt_end + 1]; any right padding or response after it is
  dropped) is left-padded to end at column Lp - 1 (Lp = prompt_len or L; longer
  prompts keep their last Lp tokens), then phrase r follows. The logits at
  columns Lp - 1 .. Lp + P - 2 predict the phrase tokens.
  Returns ids, mask (attention), targets [B*R, P] and target_mask [B*R, P].
  """
  B, L = ids_BxL.shape
  R, P = phrase_ids_RxP.shape
  Lp = prompt_len or L
  src_BxLp = prompt_end_B[:, None] - (Lp - 1) + jnp.arange(Lp)[None, :]
  valid_BxLp = (src_BxLp >= 0) & (src_BxLp < L)
  prompt_BxLp = jnp.where(valid_BxLp, jnp.take_along_axis(ids_BxL, jnp.clip(src_BxLp, 0, L - 1),
                                                          axis=1), pad_id)
  rep = lambda x: jnp.repeat(x, R, axis=0)  # row b*R + r
  tile = lambda x: jnp.tile(x, (B, 1))
  ids = jnp.concatenate([rep(prompt_BxLp), tile(phrase_ids_RxP)], axis=1).astype(jnp.int32)
  mask = jnp.concatenate([rep(valid_BxLp), tile(phrase_mask_RxP.astype(bool))], axis=1)
  return {"ids": ids, "mask": mask, "targets": tile(phrase_ids_RxP),
          "target_mask": tile(phrase_mask_RxP.astype(bool))}


def soft_pattern_logscore(logits_BRxPxV: jax.Array, targets_BRxP: jax.Array,
                          target_mask_BRxP: jax.Array, num_phrases: int) -> jax.Array:
  """[B] log-sum-exp over phrases of the length-normalised phrase log-likelihood."""
  logp = jax.nn.log_softmax(logits_BRxPxV.astype(jnp.float32), axis=-1)
  tok_BRxP = jnp.take_along_axis(logp, targets_BRxP[..., None], axis=-1)[..., 0]
  m = target_mask_BRxP.astype(jnp.float32)
  per_phrase = (tok_BRxP * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)
  return jax.nn.logsumexp(per_phrase.reshape(-1, num_phrases), axis=-1)


def soft_pattern_prob(logits_BRxPxV: jax.Array, targets_BRxP: jax.Array,
                      target_mask_BRxP: jax.Array, num_phrases: int) -> jax.Array:
  """[B] in [0, 1]: mean over phrases of the per-token geometric-mean probability."""
  score = soft_pattern_logscore(logits_BRxPxV, targets_BRxP, target_mask_BRxP, num_phrases)
  return jnp.exp(score - jnp.log(float(num_phrases)))


def soft_pattern_refusal_prob(params: Params, cfg: ModelConfig, ids_BxL: jax.Array,
                              prompt_end_B: jax.Array, phrase_ids_RxP: jax.Array,
                              phrase_mask_RxP: jax.Array, *,
                              embed_fn: Callable | None = None,
                              prompt_len: int | None = None) -> jax.Array:
  """Runs the model on every prompt + phrase and scores it ([B] in [0, 1]).

  Only the P phrase-predicting positions go through the LM head.
  """
  inp = phrase_continuation_inputs(ids_BxL, prompt_end_B, phrase_ids_RxP, phrase_mask_RxP,
                                   prompt_len=prompt_len)
  embed_fn = embed_fn or transformer.embed
  out = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, inp["ids"]),
                            attention_mask_BxS=inp["mask"], compute_logits=False)
  Lp, P = prompt_len or ids_BxL.shape[1], phrase_ids_RxP.shape[1]
  logits = transformer.lm_head(params, cfg, out.hidden[:, Lp - 1:Lp - 1 + P])
  return soft_pattern_prob(logits, inp["targets"], inp["target_mask"], phrase_ids_RxP.shape[0])


# ----------------------------------------------------------------------------
# (c) Refusal classifier on expected token embeddings.
# Params: {"mu": [D], "sd": [D], "w1": [D, H], "b1": [H], "w2": [H], "b2": []};
# trained by probes/refusal.py:train_refusal_classifier.


def expected_embeddings(logits_BxNxV: jax.Array, embedding_VxD: jax.Array) -> jax.Array:
  """softmax(logits) @ E: the model's predicted token, as a differentiable embedding."""
  probs = jax.nn.softmax(logits_BxNxV.astype(jnp.float32), axis=-1)
  return probs @ embedding_VxD.astype(jnp.float32)


def classifier_score(clf: Params, logits_BxNxV: jax.Array, mask_BxN: jax.Array,
                     embedding_VxD: jax.Array) -> jax.Array:
  """[B] refusal probability of the responses predicted at the masked positions."""
  feats_BxD = masked_mean_pool(expected_embeddings(logits_BxNxV, embedding_VxD), mask_BxN)
  return jax.nn.sigmoid(classifier_logit(clf, feats_BxD))


# ----------------------------------------------------------------------------
# (d) Hidden-state probe. Params: {"w": [D], "b": [], "mu": [D], "sd": [D],
# "layer": int}; trained by probes/safety.py (harmful vs benign prompts, or
# refused vs complied responses with probes/refusal.py:train_refusal_probe).


def probe_score(probe: Params, hidden_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
  """[B] probe probability on hidden states mean-pooled over the masked tokens."""
  return jax.nn.sigmoid(probe_logit(probe, masked_mean_pool(hidden_BxTxD, mask_BxT)))
