"""The training objective: w_s·L_safety + lambda·L_consistency + w_c·L_capability.

Cost per step: one adapted forward over the harmful block (serves L_safety and
L_consistency), one adapted forward over the benign block and one base forward
(no gradient, "kl" only) for L_capability; the soft-pattern scorer adds one
forward over prompt + phrase rows. Forwards skip the LM head: hidden states
are gathered where a loss reads logits ([B, n] target positions, the first
response position) and only those go through `transformer.lm_head`.

`aux` holds the non-trainable arrays the configured scorer needs (build it with
`build_aux`): refusal_token_ids [R] + refusal_token_weights [R] (first_token),
refusal_phrase_ids [Rp, P] + refusal_phrase_mask [Rp, P] (soft_pattern),
classifier (dict, classifier), probe (dict with "layer", probe).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.adapters import adapted_embed_fn, apply_adapters
from semsafe_jax.losses import scorers
from semsafe_jax.losses.capability import capability_loss
from semsafe_jax.losses.common import (cfg_get, gather_positions, masked_mean_pool, prompt_mask,
                                       target_positions)
from semsafe_jax.losses.consistency import consistency_loss
from semsafe_jax.losses.safety import safety_loss
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]
CONSISTENCY_REPRS = ("hidden", "refusal_prob", "next_token")
SCORERS = ("first_token", "soft_pattern", "classifier", "probe")


def build_aux(loss_cfg: Any, tokenizer: Any = None, *, classifier: Params | None = None,
              probe: Params | None = None) -> Params:
  """The aux dict for `total_loss` (numpy arrays; what the configured scorer needs)."""
  aux: Params = {}
  repr_kind = cfg_get(loss_cfg, "consistency_repr", "refusal_prob")
  scorer = cfg_get(loss_cfg, "scorer", "first_token")
  if scorer not in SCORERS:
    raise ValueError(f"Unknown loss.scorer {scorer!r}; expected one of {SCORERS}")
  if tokenizer is not None:
    ids, w = scorers.refusal_first_tokens(
        tokenizer, ambiguous_weight=float(cfg_get(loss_cfg, "ambiguous_token_weight", 0.5)))
    aux["refusal_token_ids"], aux["refusal_token_weights"] = ids, w
    phrases = list(cfg_get(loss_cfg, "refusal_phrases", None) or scorers.REFUSAL_PHRASES)
    aux["refusal_phrase_ids"], aux["refusal_phrase_mask"] = scorers.tokenize_phrases(
        tokenizer, phrases)
  if classifier is not None:
    aux["classifier"] = {k: np.asarray(v) for k, v in classifier.items()}
  if probe is not None:
    aux["probe"] = {k: np.asarray(v) for k, v in probe.items()}
  if repr_kind == "refusal_prob":
    need = {"first_token": "refusal_token_ids", "soft_pattern": "refusal_phrase_ids",
            "classifier": "classifier", "probe": "probe"}[scorer]
    if need not in aux:
      raise ValueError(f"loss.scorer={scorer!r} needs aux[{need!r}]: pass "
                       f"{'a tokenizer' if 'refusal' in need else need + '='} to build_aux")
  return aux


def _first_token_logits(params: Params, cfg: ModelConfig, hidden_BxLxD: jax.Array,
                        prompt_end_B: jax.Array) -> jax.Array:
  """[B, V] logits at the last prompt token: the first response token's distribution."""
  h_Bx1xD = gather_positions(hidden_BxLxD, prompt_end_B[:, None])
  return transformer.lm_head(params, cfg, h_Bx1xD)[:, 0]


def _refusal_prob(scorer: str, *, params: Params, cfg: ModelConfig, aux: Params,
                  batch: dict[str, jax.Array], out: transformer.ModelOutput, embed_fn,
                  first_logits, resp_logits, resp_mask, probe_pool: str) -> jax.Array:
  """[B] refusal score of each harmful-block prompt under the chosen scorer."""
  if scorer == "first_token":
    return scorers.first_token_refusal_prob(first_logits, aux["refusal_token_ids"],
                                            aux.get("refusal_token_weights"))
  if scorer == "soft_pattern":
    return scorers.soft_pattern_refusal_prob(
        params, cfg, batch["harm_ids"], batch["harm_prompt_end"], aux["refusal_phrase_ids"],
        aux["refusal_phrase_mask"], embed_fn=embed_fn)
  if scorer == "classifier":
    return scorers.classifier_score(aux["classifier"], resp_logits, resp_mask,
                                    params["embed"]["embedding"])
  if scorer == "probe":
    probe = aux["probe"]
    pool = (batch["harm_target_mask"] if probe_pool == "response"
            else prompt_mask(batch["harm_mask"], batch["harm_prompt_end"]))
    return scorers.probe_score(probe, out.hidden_states[probe["layer"]], pool)
  raise ValueError(f"Unknown loss.scorer {scorer!r}; expected one of {SCORERS}")


def _count(mask: jax.Array) -> jax.Array:
  return mask.astype(jnp.float32).sum()


def total_loss(adapters: Params, base_params: Params, batch: dict[str, jax.Array], *,
               model_cfg: ModelConfig, adapter_cfg: Any, loss_cfg: Any, aux: Params,
               rng: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics). Differentiate w.r.t. `adapters` only; see the module doc."""
  cfg = model_cfg
  w_s = float(cfg_get(loss_cfg, "w_safety", 1.0))
  lam = float(cfg_get(loss_cfg, "lam", 1.0))
  w_c = float(cfg_get(loss_cfg, "w_capability", 1.0))
  n_max = int(cfg_get(loss_cfg, "max_target_tokens", 48)) or 1 << 30
  repr_kind = cfg_get(loss_cfg, "consistency_repr", "refusal_prob")
  scorer = cfg_get(loss_cfg, "scorer", "first_token")
  layer = int(cfg_get(loss_cfg, "hidden_layer", -1))
  if repr_kind not in CONSISTENCY_REPRS:
    raise ValueError(f"Unknown loss.consistency_repr {repr_kind!r}; expected {CONSISTENCY_REPRS}")

  params = apply_adapters(base_params, adapters, adapter_cfg, rng=rng, merge=False)
  embed_fn = adapted_embed_fn(adapters)
  zero = jnp.zeros((), jnp.float32)
  metrics: dict[str, jax.Array] = {}

  # --- Harmful block: one forward serves L_safety and L_consistency.
  ids, mask = batch["harm_ids"], batch["harm_mask"]
  use_cons = lam != 0.0
  need_states = use_cons and (
      (repr_kind == "hidden" and layer % (cfg.num_layers + 1) != cfg.num_layers)
      or (repr_kind == "refusal_prob" and scorer == "probe"))
  out = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, ids),
                            attention_mask_BxS=mask, output_hidden_states=need_states,
                            compute_logits=False)
  pos, targets, tmask = target_positions(ids, batch["harm_target_mask"], n_max)
  score_refusal = use_cons and repr_kind == "refusal_prob"
  resp_logits = first_logits = None
  if w_s != 0.0 or (score_refusal and scorer == "classifier"):
    # [B, n, V] at the positions predicting the refusal target.
    resp_logits = transformer.lm_head(params, cfg, gather_positions(out.hidden, pos))
  if use_cons and (repr_kind == "next_token" or (score_refusal and scorer == "first_token")):
    first_logits = _first_token_logits(params, cfg, out.hidden, batch["harm_prompt_end"])

  l_safety = (safety_loss(resp_logits, targets, tmask, batch.get("harm_weight"),
                          float(cfg_get(loss_cfg, "safety_first_token_weight", 1.0)))
              if w_s != 0.0 else zero)
  dropped = _count(batch["harm_target_mask"][:, 1:]) - _count(tmask)

  l_cons = zero
  if use_cons:
    if repr_kind == "hidden":
      h = out.hidden_states[layer] if need_states else out.hidden
      if cfg_get(loss_cfg, "hidden_pool", "mean") == "last":
        r = gather_positions(h, batch["harm_prompt_end"][:, None])[:, 0].astype(jnp.float32)
      else:
        r = masked_mean_pool(h, prompt_mask(mask, batch["harm_prompt_end"]))
    elif repr_kind == "next_token":
      r = jax.nn.log_softmax(first_logits, axis=-1)
    else:
      r = _refusal_prob(scorer, params=params, cfg=cfg, aux=aux, batch=batch, out=out,
                        embed_fn=embed_fn, first_logits=first_logits, resp_logits=resp_logits,
                        resp_mask=tmask, probe_pool=cfg_get(loss_cfg, "probe_pool", "prompt"))
      metrics["refusal_prob"] = r.mean()
    l_cons = consistency_loss(r, batch["pair_index"], batch["pair_weight"], batch["pair_valid"],
                              kind=repr_kind,
                              normalize=bool(cfg_get(loss_cfg, "normalize_hidden", True)),
                              div=cfg_get(loss_cfg, "divergence", "js"))
    metrics["pairs_valid"] = batch["pair_valid"].astype(jnp.float32).sum()

  # --- Benign block: adapted forward, and the frozen base forward for "kl".
  l_cap = zero
  if w_c != 0.0 and "benign_ids" in batch and batch["benign_ids"].shape[0] > 0:
    b_ids, b_mask = batch["benign_ids"], batch["benign_mask"]
    b_pos, b_targets, b_tmask = target_positions(b_ids, batch["benign_target_mask"], n_max)
    out_b = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, b_ids),
                                attention_mask_BxS=b_mask, compute_logits=False)
    logits_b = transformer.lm_head(params, cfg, gather_positions(out_b.hidden, b_pos))
    kind = cfg_get(loss_cfg, "capability", "kl")
    base_logits = None
    if kind == "kl":
      bp = jax.lax.stop_gradient(base_params)
      out_base = transformer.forward(bp, cfg, b_ids, attention_mask_BxS=b_mask,
                                     compute_logits=False)
      base_logits = transformer.lm_head(bp, cfg, gather_positions(out_base.hidden, b_pos))
    l_cap = capability_loss(logits_b, b_tmask, base_logits_BxNxV=base_logits,
                            targets_BxN=b_targets, kind=kind,
                            direction=cfg_get(loss_cfg, "kl_direction", "forward"),
                            first_token_weight=float(
                                cfg_get(loss_cfg, "capability_first_token_weight", 1.0)))
    dropped += _count(batch["benign_target_mask"][:, 1:]) - _count(b_tmask)

  loss = w_s * l_safety + lam * l_cons + w_c * l_cap
  # Target tokens past loss.max_target_tokens (should stay 0).
  metrics["targets_dropped"] = dropped
  metrics.update(l_safety=l_safety, l_consistency=l_cons, l_capability=l_cap, l_total=loss)
  return loss, metrics
