"""semsafe (ours): w_s·L_safety + lambda·L_consistency + w_c·L_capability, LoRA + embedding MLP.

Cost per step: one adapted forward over the harmful block (serves L_safety and
L_consistency), one adapted forward over the benign block for L_capability, whose "kl"
also reads the frozen base at the benign targets (a table computed before training,
`base_target_states`, or a base forward in the step); the soft-pattern scorer adds one
forward over prompt + phrase rows. Forwards skip the LM head: hidden states
are gathered where a loss reads logits ([B, n] target positions, n as
`common.target_window`, and the first response position) and only those go through
`transformer.lm_head`.

L_consistency has two parts, both on one representation per prompt (`REPRS` maps
`loss.consistency_repr` to how it is computed, `SCORERS` maps `loss.scorer` to the
refusal score of "refusal_prob"):
- pairs among the harmful block (mined neighbours, both labelled);
- labelled anchors and their unlabelled partners (data/unlabeled.py: a pool mined
  against the training prompts, and generated variants). The partner has no target, so
  only this term tells the model what to do there: its representation is pulled towards
  its anchor's (stop-gradient on the anchor with `loss.anchor_stop_gradient`). Harmful
  anchors carry their refusal over; benign and borderline anchors, which L_capability
  keeps at the base model's behaviour, carry their helpfulness over. Costs one forward
  over each of the two prompt-only blocks ([U, L]).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax.adapters import adapted_embed_fn, apply_adapters
from semsafe_jax.data import contrast as contrast_lib
from semsafe_jax.data import unlabeled as unlabeled_lib
from semsafe_jax.data.neighbors import IndexOptions
from semsafe_jax.losses import scorers
from semsafe_jax.losses.capability import capability_loss
from semsafe_jax.losses.common import gather_positions, prompt_mask, target_positions
from semsafe_jax.losses.consistency import consistency_loss
from semsafe_jax.losses.safety import safety_loss
from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods import paraphrase as paraphrase_lib
from semsafe_jax.methods.base import Prepared, SafetyBatch, Tokens
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.probes import safety as probe_lib
from semsafe_jax.probes.heads import masked_mean_pool
from semsafe_jax.train import packing, sharding

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """The static settings of the loss (hashable: part of the jitted function).

  Built from `config.loss` by `LossSpec.from_config`; its defaults are only for tests,
  the configs carry the real ones.
  """
  w_safety: float = 1.0
  lam: float = 1.0
  w_capability: float = 1.0
  max_target_tokens: int = 48
  consistency_repr: str = "refusal_prob"
  scorer: str = "first_token"
  hidden_layer: int = -1
  hidden_pool: str = "mean"
  normalize_hidden: bool = True
  divergence: str = "js"
  capability: str = "kl"
  kl_direction: str = "forward"
  capability_first_token_weight: float = 1.0
  safety_first_token_weight: float = 1.0
  probe_pool: str = "prompt"
  anchor_stop_gradient: bool = True
  w_contrast: float = 0.0
  contrast_margin: float = 0.5

  @classmethod
  def from_config(cls, loss_cfg: Any) -> "LossSpec":
    # Each field takes the type of its default (config values may be ints for floats).
    spec = cls(**{f.name: type(f.default)(loss_cfg[f.name])
                  for f in dataclasses.fields(cls) if f.name in loss_cfg})
    spec.check()
    return spec

  def check(self) -> None:
    if self.consistency_repr not in REPRS:
      raise ValueError(f"loss.consistency_repr={self.consistency_repr!r}; expected one of "
                       f"{', '.join(REPRS)}")
    if self.scorer not in SCORERS:
      raise ValueError(f"loss.scorer={self.scorer!r}; expected one of {', '.join(SCORERS)}")

  @property
  def uses_consistency(self) -> bool:
    return self.lam != 0.0


# --- What the consistency term compares, per harmful prompt.


@dataclasses.dataclass(frozen=True)
class _Harm:
  """The harmful block's forward, as the representation and scorer functions read it."""
  params: Params
  cfg: ModelConfig
  aux: Params
  tokens: Any  # batch.harm
  hidden: jax.Array  # [B, L, D] after the final norm
  states: Any  # [L+1, B, L, D] every layer's hidden states, or None when not computed
  embed_fn: Callable
  first_logits: Any  # [B, V] at the last prompt token, or None
  resp_logits: Any  # [B, n, V] at the target positions, or None
  resp_mask: Any  # [B, n]


def _first_token_score(h: _Harm, spec: LossSpec) -> jax.Array:
  del spec
  return scorers.first_token_refusal_prob(h.first_logits, h.aux["refusal_token_ids"],
                                          h.aux.get("refusal_token_weights"))


def _soft_pattern_score(h: _Harm, spec: LossSpec) -> jax.Array:
  del spec
  return scorers.soft_pattern_refusal_prob(
      h.params, h.cfg, h.tokens.ids, h.tokens.prompt_end, h.aux["refusal_phrase_ids"],
      h.aux["refusal_phrase_mask"], embed_fn=h.embed_fn)


def _classifier_score(h: _Harm, spec: LossSpec) -> jax.Array:
  del spec
  return scorers.classifier_score(h.aux["classifier"], h.resp_logits, h.resp_mask,
                                  h.params["embed"]["embedding"])


def _probe_score(h: _Harm, spec: LossSpec) -> jax.Array:
  t, probe = h.tokens, h.aux["probe"]
  pool = t.target_mask if spec.probe_pool == "response" else prompt_mask(t.mask, t.prompt_end)
  return scorers.probe_score(probe, h.states[probe["layer"]], pool)


# loss.scorer -> [B] differentiable refusal score of each harmful prompt.
SCORERS: dict[str, Callable[[_Harm, LossSpec], jax.Array]] = {
    "first_token": _first_token_score, "soft_pattern": _soft_pattern_score,
    "classifier": _classifier_score, "probe": _probe_score}


def _hidden_repr(h: _Harm, spec: LossSpec) -> jax.Array:
  """[B, D] pooled hidden state at loss.hidden_layer."""
  x = h.states[spec.hidden_layer] if h.states is not None else h.hidden
  t = h.tokens
  if spec.hidden_pool == "last":
    return gather_positions(x, t.prompt_end[:, None])[:, 0].astype(jnp.float32)
  return masked_mean_pool(x, prompt_mask(t.mask, t.prompt_end))


def _next_token_repr(h: _Harm, spec: LossSpec) -> jax.Array:
  """[B, V] log-probs of the first response token."""
  del spec
  return jax.nn.log_softmax(h.first_logits, axis=-1)


def _refusal_prob_repr(h: _Harm, spec: LossSpec) -> jax.Array:
  """[B] refusal score under loss.scorer."""
  return SCORERS[spec.scorer](h, spec)


# loss.consistency_repr -> the per-prompt representation the pairs compare.
REPRS: dict[str, Callable[[_Harm, LossSpec], jax.Array]] = {
    "hidden": _hidden_repr, "refusal_prob": _refusal_prob_repr, "next_token": _next_token_repr}


@flax.struct.dataclass
class Unlabeled:
  """U (anchor, partner) prompt-only rows: a labelled training prompt and its unlabelled
  partner (see data/unlabeled.py)."""
  anchor: Tokens  # [U, La]
  partner: Tokens  # [U, Lp]
  weight: Any  # float32 [U], SBERT cosine
  valid: Any  # bool [U]


@flax.struct.dataclass
class Contrast:
  """C (harmful, safe) prompt-only rows that SBERT puts close (data/contrast.py)."""
  harmful: Tokens  # [C, Lh]
  safe: Tokens  # [C, Ls]
  weight: Any  # float32 [C], SBERT cosine
  valid: Any  # bool [C]


@flax.struct.dataclass
class SemsafeBatch:
  safety: SafetyBatch
  unlabeled: Unlabeled | None = None
  contrast: Contrast | None = None
  # float32 [Bb, n, D]: the frozen base's final hidden states where the benign rows' targets
  # are predicted (`base_target_states`), read by L_capability "kl" instead of running the
  # base forward in the step. None: the step runs it.
  base_states: Any = None


def _needs_states(spec: LossSpec, cfg: ModelConfig) -> bool:
  """Whether the consistency term reads a hidden state other than the final one."""
  if not spec.uses_consistency:
    return False
  if spec.consistency_repr == "hidden":
    return spec.hidden_layer % (cfg.num_layers + 1) != cfg.num_layers
  return spec.consistency_repr == "refusal_prob" and spec.scorer == "probe"


def _needs_first_logits(spec: LossSpec) -> bool:
  return spec.uses_consistency and (
      spec.consistency_repr == "next_token"
      or (spec.consistency_repr == "refusal_prob" and spec.scorer == "first_token"))


def _count(mask: jax.Array) -> jax.Array:
  return mask.astype(jnp.float32).sum()


def loss(trainable: Params, frozen: Params, sbatch: SemsafeBatch, rng: jax.Array | None, *,
         spec: LossSpec, model_cfg: ModelConfig, adapter_cfg: Any
         ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics). Differentiate w.r.t. `trainable` only.

  frozen = {"base": base params, "aux": what the scorer needs (see `build_aux`)}.
  """
  cfg, base_params, aux = model_cfg, frozen["base"], frozen["aux"]
  batch = sbatch.safety
  n_max = int(spec.max_target_tokens) or 1 << 30
  params = apply_adapters(base_params, trainable, adapter_cfg, rng=rng, merge=False)
  embed_fn = adapted_embed_fn(trainable)
  zero = jnp.zeros((), jnp.float32)
  metrics: dict[str, jax.Array] = {}

  # --- Harmful block: one forward serves L_safety and L_consistency.
  t = batch.harm
  need_states = _needs_states(spec, cfg)
  hidden, states = rows_forward(params, cfg, t, embed_fn, need_states)
  pos, targets, tmask = target_positions(t.ids, t.target_mask, n_max)
  resp_logits = first_logits = None
  score_refusal = spec.uses_consistency and spec.consistency_repr == "refusal_prob"
  if spec.w_safety != 0.0 or (score_refusal and spec.scorer == "classifier"):
    # [B, n, V] at the positions predicting the refusal target.
    resp_logits = transformer.lm_head(params, cfg, gather_positions(hidden, pos))
  if _needs_first_logits(spec):
    h_Bx1xD = gather_positions(hidden, t.prompt_end[:, None])
    first_logits = transformer.lm_head(params, cfg, h_Bx1xD)[:, 0]

  l_safety = (safety_loss(resp_logits, targets, tmask, t.weight, spec.safety_first_token_weight)
              if spec.w_safety != 0.0 else zero)
  dropped = _count(t.target_mask[:, 1:]) - _count(tmask)

  l_cons = zero
  if spec.uses_consistency:
    h = _Harm(params=params, cfg=cfg, aux=aux, tokens=t, hidden=hidden,
              states=states if need_states else None, embed_fn=embed_fn,
              first_logits=first_logits, resp_logits=resp_logits, resp_mask=tmask)
    r = REPRS[spec.consistency_repr](h, spec)
    if spec.consistency_repr == "refusal_prob":
      metrics["refusal_prob"] = r.mean()
    p = batch.pairs
    l_cons = consistency_loss(r, p.index, p.weight, p.valid, kind=spec.consistency_repr,
                              normalize=spec.normalize_hidden, div=spec.divergence)
    metrics["pairs_valid"] = p.valid.astype(jnp.float32).sum()
    if sbatch.unlabeled is not None:
      l_unl = _unlabeled_consistency(params, cfg, aux, embed_fn, sbatch.unlabeled, spec)
      metrics.update(l_consistency_pairs=l_cons, l_consistency_unlabeled=l_unl,
                     unlabeled_valid=sbatch.unlabeled.valid.astype(jnp.float32).sum())
      l_cons = l_cons + l_unl

  # --- Benign block: adapted forward, and the frozen base forward for "kl".
  l_cap = zero
  bt = batch.benign
  if spec.w_capability != 0.0 and bt.ids.shape[0] > 0:
    l_cap, b_tmask = capability_term(params, base_params, cfg, embed_fn, bt, spec.capability,
                                     spec.kl_direction, spec.capability_first_token_weight,
                                     n_max, sbatch.base_states)
    dropped += _count(bt.target_mask[:, 1:]) - _count(b_tmask)

  l_contrast = zero
  if sbatch.contrast is not None and spec.w_contrast != 0.0:
    l_contrast = _contrast_term(params, cfg, aux, embed_fn, sbatch.contrast, spec)
    metrics["l_contrast"] = l_contrast

  total = (spec.w_safety * l_safety + spec.lam * l_cons + spec.w_capability * l_cap
           + spec.w_contrast * l_contrast)
  # Target tokens past loss.max_target_tokens (should stay 0).
  metrics["targets_dropped"] = dropped
  metrics.update(l_safety=l_safety, l_consistency=l_cons, l_capability=l_cap, l_total=total,
                 l_consistency_weighted=spec.lam * l_cons)
  return total, metrics


def rows_forward(params: Params, cfg: ModelConfig, t: Tokens, embed_fn: Callable | None = None,
                 need_states: bool = False) -> tuple[jax.Array, Any]:
  """(hidden [B, L, D] after the final norm, every layer's states [L+1, B, L, D] or None) of
  t's rows; computed on t.packed when t comes packed, and read back into t's layout, so
  what reads the states is the same either way. embed_fn None: the plain embedding."""
  pk = t.packed
  rows = t if pk is None else pk
  kw = dict(attention_mask_BxS=rows.mask, output_hidden_states=need_states,
            compute_logits=False)
  if pk is not None:
    kw.update(segment_ids_BxT=pk.segment_ids, positions_BxT=pk.positions)
  if embed_fn is None:
    out = transformer.forward(params, cfg, rows.ids, **kw)
  else:
    out = transformer.forward(params, cfg, inputs_embeds_BxTxD=embed_fn(params, cfg, rows.ids),
                              **kw)
  if pk is None:
    return out.hidden, out.hidden_states
  states = (None if out.hidden_states is None else
            jax.vmap(packing.unpack, in_axes=(0, None))(out.hidden_states, pk.unpack))
  return packing.unpack(out.hidden, pk.unpack), states


def _prompt_view(params: Params, cfg: ModelConfig, aux: Params, embed_fn: Callable, t: Tokens,
                 need_states: bool, need_first: bool) -> _Harm:
  """The forward of prompt-only rows (no response to read), as REPRS and SCORERS read it."""
  hidden, states = rows_forward(params, cfg, t, embed_fn, need_states)
  first_logits = None
  if need_first:
    first_logits = transformer.lm_head(params, cfg,
                                       gather_positions(hidden, t.prompt_end[:, None]))[:, 0]
  return _Harm(params=params, cfg=cfg, aux=aux, tokens=t, hidden=hidden,
               states=states, embed_fn=embed_fn,
               first_logits=first_logits, resp_logits=None, resp_mask=None)


def _prompt_repr(params: Params, cfg: ModelConfig, aux: Params, embed_fn: Callable, t: Tokens,
                 spec: LossSpec) -> jax.Array:
  """The consistency representation of prompt-only rows."""
  h = _prompt_view(params, cfg, aux, embed_fn, t, _needs_states(spec, cfg),
                   _needs_first_logits(spec))
  return REPRS[spec.consistency_repr](h, spec)


def _prompt_score(params: Params, cfg: ModelConfig, aux: Params, embed_fn: Callable, t: Tokens,
                  spec: LossSpec) -> jax.Array:
  """[B] refusal score (loss.scorer) of prompt-only rows."""
  h = _prompt_view(params, cfg, aux, embed_fn, t, spec.scorer == "probe",
                   spec.scorer == "first_token")
  return SCORERS[spec.scorer](h, spec)


def _contrast_term(params: Params, cfg: ModelConfig, aux: Params, embed_fn: Callable,
                   c: Contrast, spec: LossSpec) -> jax.Array:
  """Cross-label look-alikes: weighted mean of relu(margin - (score(harmful) - score(safe)))."""
  gap = (_prompt_score(params, cfg, aux, embed_fn, c.harmful, spec)
         - _prompt_score(params, cfg, aux, embed_fn, c.safe, spec))
  w = c.weight * c.valid.astype(jnp.float32)
  hinge = jax.nn.relu(spec.contrast_margin - gap)
  return jnp.where(w.sum() > 0, (w * hinge).sum() / jnp.maximum(w.sum(), 1e-12), 0.0)


def _unlabeled_consistency(params: Params, cfg: ModelConfig, aux: Params, embed_fn: Callable,
                           u: Unlabeled, spec: LossSpec) -> jax.Array:
  """Weighted mean distance between each partner's representation and its anchor's."""
  r_a = _prompt_repr(params, cfg, aux, embed_fn, u.anchor, spec)
  if spec.anchor_stop_gradient:
    r_a = jax.lax.stop_gradient(r_a)
  r_p = _prompt_repr(params, cfg, aux, embed_fn, u.partner, spec)
  n = r_a.shape[0]
  index_Ux2 = jnp.stack([jnp.arange(n), n + jnp.arange(n)], axis=1)
  return consistency_loss(jnp.concatenate([r_a, r_p]), index_Ux2, u.weight, u.valid,
                          kind=spec.consistency_repr, normalize=spec.normalize_hidden,
                          div=spec.divergence)


def capability_term(params: Params, base_params: Params, cfg: ModelConfig, embed_fn: Callable,
                    bt: Any, kind: str, direction: str, first_token_weight: float,
                    n_max: int, base_states: Any = None) -> tuple[jax.Array, jax.Array]:
  """(L_capability, target mask [B, n]) on a block of benign rows: KL to the frozen base
  ("kl"), or cross-entropy on its answers ("ce"). base_states: the base's hidden states at
  the target positions (`base_target_states`), or None to run the base forward here."""
  b_pos, b_targets, b_tmask = target_positions(bt.ids, bt.target_mask, n_max)
  hidden_b, _ = rows_forward(params, cfg, bt, embed_fn)
  logits_b = transformer.lm_head(params, cfg, gather_positions(hidden_b, b_pos))
  base_logits = None
  if kind == "kl":
    bp = jax.lax.stop_gradient(base_params)
    if base_states is None:
      base_states = gather_positions(rows_forward(bp, cfg, bt)[0], b_pos)
    base_logits = transformer.lm_head(bp, cfg, jax.lax.stop_gradient(base_states))
  return capability_loss(logits_b, b_tmask, base_logits_BxNxV=base_logits,
                         targets_BxN=b_targets, kind=kind, direction=direction,
                         first_token_weight=first_token_weight), b_tmask


def _target_states(params: Params, t: Tokens, *, cfg: ModelConfig, n: int) -> jax.Array:
  out = transformer.forward(params, cfg, t.ids, attention_mask_BxS=t.mask, compute_logits=False)
  return gather_positions(out.hidden, target_positions(t.ids, t.target_mask, n)[0])


def base_target_states(params: Params, cfg: ModelConfig, rows: Any, which: np.ndarray, n: int,
                       batch_size: int, mesh: jax.sharding.Mesh | None = None,
                       progress: bool = False) -> np.ndarray:
  """float32 [len(which), n, D]: the base model's final hidden states at the positions that
  predict the first n target tokens (`target_positions` order) of rows[which]. L_capability
  "kl" reads the frozen base only there, and the base does not change, so this runs once
  instead of once per step."""
  # Replicated out, so every process reads it whole. cfg as in training: under remat the
  # layers scan, which slices one layer's weights at a time (unrolled, XLA:CPU copies them
  # all out of the stack at once, 0.4 GB for SmolLM2-135M).
  step = jax.jit(functools.partial(_target_states, cfg=cfg, n=n),
                 out_shardings=None if mesh is None else sharding.replicated(mesh))
  return mcommon.map_rows(functools.partial(step, params), rows, which, batch_size,
                          desc="base states" if progress else None)


def build_aux(spec: LossSpec, loss_cfg: Any, tokenizer: Any = None, *,
              classifier: Params | None = None, probe: Params | None = None) -> Params:
  """What the configured scorer needs, as numpy arrays (frozen["aux"])."""
  aux: Params = {}
  if tokenizer is not None:
    ids, w = scorers.refusal_first_tokens(
        tokenizer, ambiguous_weight=float(loss_cfg.get("ambiguous_token_weight", 0.5)))
    aux["refusal_token_ids"], aux["refusal_token_weights"] = ids, w
    phrases = list(loss_cfg.get("refusal_phrases", None) or scorers.REFUSAL_PHRASES)
    aux["refusal_phrase_ids"], aux["refusal_phrase_mask"] = scorers.tokenize_phrases(
        tokenizer, phrases)
  if classifier is not None:
    aux["classifier"] = {k: np.asarray(v) for k, v in classifier.items()}
  if probe is not None:
    aux["probe"] = {k: np.asarray(v) for k, v in probe.items()}
  if spec.uses_consistency and spec.consistency_repr == "refusal_prob":
    need = {"first_token": "refusal_token_ids", "soft_pattern": "refusal_phrase_ids",
            "classifier": "classifier", "probe": "probe"}[spec.scorer]
    if need not in aux:
      raise ValueError(f"loss.scorer={spec.scorer!r} needs aux[{need!r}]: pass "
                       f"{'a tokenizer' if 'refusal' in need else need + '='} to build_aux")
  return aux


# --- Host-side preparation.


def prepare(ctx) -> Prepared:
  config = ctx.config
  spec = LossSpec.from_config(config.loss)
  uses = spec.uses_consistency and spec.consistency_repr == "refusal_prob"
  probe = None
  if uses and spec.scorer == "probe":
    if ctx.probe is None:
      raise ValueError("loss.scorer='probe' needs probe.train=True.")
    probe = {**ctx.probe["probe"], "layer": np.int32(ctx.probe["best_layer"])}
  classifier = ctx.refusal_classifier if uses and spec.scorer == "classifier" else None
  aux = build_aux(spec, config.loss, ctx.tokenizer, classifier=classifier, probe=probe)

  pair_weight_fn = None
  if config.probe.use == "weight_pairs":
    unsafe_prob = ctx.probe_scores(ctx.sft.harm_rows)
    pair_weight_fn = lambda hi, b: probe_lib.probe_pair_weights(unsafe_prob[hi], b.pair_index,
                                                                b.pair_weight)
  safety_fn = _packed_safety(ctx, ctx.safety_batch_fn(pair_weight_fn))
  # The LM head reads the positions a target can reach (the loss is the same).
  spec = dataclasses.replace(spec, max_target_tokens=mcommon.target_window(config))
  base_states_fn = _base_states_table(ctx, spec)
  unlabeled_fn, report = _unlabeled_stage(ctx, spec)
  contrast_fn, contrast_report = _contrast_stage(ctx, spec)
  report.update(contrast_report)

  def batch_fn(step: int) -> SemsafeBatch:
    return SemsafeBatch(safety=safety_fn(step),
                        unlabeled=None if unlabeled_fn is None else unlabeled_fn(step),
                        contrast=None if contrast_fn is None else contrast_fn(step),
                        base_states=None if base_states_fn is None else base_states_fn(step))

  loss_fn = functools.partial(_loss_fn, spec=spec, model_cfg=ctx.model_cfg,
                              adapter_cfg=config.adapters)
  return Prepared(trainable=ctx.init_trainable(), loss_fn=loss_fn, batch_fn=batch_fn,
                  frozen={"base": ctx.params, "aux": aux}, frozen_axes=ctx.base_axes(),
                  report=report)


def _base_states_table(ctx, spec: LossSpec) -> Callable[[int], np.ndarray] | None:
  """step -> `base_target_states` of that step's benign rows (method.cache_base_states), from
  a table of the rows the run draws (its batches are a pure function of seed and step; 611
  of the 787 benign training rows by default), or None when the step runs the base forward
  itself."""
  rows = ctx.sft.benign
  if not (spec.capability == "kl" and spec.w_capability != 0.0 and len(rows.ids)
          and ctx.config.method.get("cache_base_states", False)):
    return None
  steps = _pack_plan(ctx)["steps"]
  drawn = np.unique(np.concatenate([ctx.batch_rows(s)[2] for s in range(steps)]))
  t0 = time.perf_counter()
  table = base_target_states(ctx.params, ctx.model_cfg, rows, drawn,
                             int(spec.max_target_tokens), int(ctx.config.eval.batch_size),
                             mesh=ctx.mesh, progress=ctx.primary)
  logging.info("Base model states at the benign targets of the %d rows the run draws (of "
               "%d): %s float32 (%.0f MB), %.0f s.", len(drawn), len(rows.ids), table.shape,
               table.nbytes / 1e6, time.perf_counter() - t0)
  where = np.full(len(rows.ids), -1, np.int64)
  where[drawn] = np.arange(len(drawn))

  def states(step: int) -> np.ndarray:
    i = where[ctx.batch_rows(step)[2]]
    if (i < 0).any():
      raise ValueError(f"step {step} draws benign rows past the {steps} steps the base-state "
                       "table was built for (train.steps x train.grad_accum)")
    return table[i]
  return states


def _packed_safety(ctx, safety_fn: Callable[[int], SafetyBatch]) -> Callable[[int], SafetyBatch]:
  """safety_fn, its harmful and benign rows (prompt + target) packed per `packing.plan` where
  that computes fewer tokens: the benign block costs two forwards (adapted and base)."""
  pp = _pack_plan(ctx)
  if pp["width"] <= 0:
    return safety_fn
  drawn = [ctx.batch_rows(s)[1:] for s in range(pp["steps"])]  # (harm, benign) rows per step
  plans = {}
  for i, (name, rows) in enumerate((("harmful", ctx.sft.harm), ("benign", ctx.sft.benign))):
    lengths = rows.mask.sum(1)
    plans[name] = packing.plan(lambda s: lengths[drawn[s][i]], pp["steps"], pp["width"],
                               len(drawn[0][i]) * rows.ids.shape[1], pp["shards"], f"{name} rows")

  def pack(t: Tokens, p: packing.Plan | None) -> Tokens:
    return t if p is None else t.replace(packed=packing.pack(t.ids, t.mask, p.rows, p.width))

  def packed_fn(step: int) -> SafetyBatch:
    b = safety_fn(step)
    return b.replace(harm=pack(b.harm, plans["harmful"]), benign=pack(b.benign, plans["benign"]))
  return packed_fn


def _unlabeled_stage(ctx, spec: LossSpec):
  """(step -> Unlabeled or None, report entries): the anchor/partner table, tokenised once."""
  dc, data = ctx.config.data, ctx.data
  n = int(dc.get("unlabeled_per_step", 0))
  if not spec.uses_consistency or n <= 0:
    return None, {}
  partners, stats = unlabeled_lib.mine_pool(
      data.texts(np.arange(len(data.prompts))), data.emb_NxD, data.splits, tau=float(dc.tau),
      k=int(dc.get("unlabeled_k", 4)), opts=IndexOptions.from_config(dc))
  report = {"unlabeled": stats}
  logging.info("Unlabelled partners: %d of %d pool prompts have a labelled neighbour above "
               "tau (%d harmful-anchored, %d safe-anchored, %d ambiguous dropped): %d pairs.",
               stats["with_labelled_neighbour"], stats["pool"], stats["harmful_anchored"],
               stats["safe_anchored"], stats["ambiguous_dropped"], stats["pairs"])
  mc = ctx.config.method
  if mc.get("rule_rewrites", 0) or mc.get("paraphrases_per_prompt", 0):
    # Generated variants of every anchor-able training prompt, partners of their source.
    sources, _ = unlabeled_lib.anchor_rows(data.splits)
    para = paraphrase_lib.paraphrases(ctx, sources)
    partners = partners.concat(unlabeled_lib.variants(
        para.source_rows, para.texts, para.cos, set(data.splits["train"].tolist())))
    report["variants"] = para.counts
  if not len(partners):
    return None, report
  if spec.consistency_repr == "refusal_prob" and spec.scorer == "classifier":
    raise ValueError("loss.scorer='classifier' reads a response, which unlabelled partners "
                     "lack: use another scorer or set data.unlabeled_per_step=0.")
  tok, max_len = ctx.tokenizer, int(dc.max_len)
  share, seed = float(dc.get("unlabeled_harmful_share", 0.5)), int(ctx.config.seed)
  sample = functools.partial(unlabeled_lib.sample, partners, n, share, seed)
  draws, plan = lambda s: sample(s)[0], _pack_plan(ctx)
  anchors = _prompt_rows(tok, data.texts(partners.anchor_rows), max_len).packed_for(
      draws, what="unlabelled anchors", **plan)
  others = _prompt_rows(tok, partners.texts, max_len).packed_for(
      draws, what="unlabelled partners", **plan)

  def unlabeled_fn(step: int) -> Unlabeled:
    idx, valid = sample(step)
    return Unlabeled(anchor=anchors.take(idx), partner=others.take(idx),
                     weight=partners.weight[idx] * valid, valid=valid)
  return unlabeled_fn, report


def _contrast_stage(ctx, spec: LossSpec):
  """(step -> Contrast or None, report entries): cross-label look-alike pairs."""
  dc, data = ctx.config.data, ctx.data
  n = int(dc.get("contrast_per_step", 0))
  if spec.w_contrast == 0.0 or n <= 0:
    return None, {}
  if spec.scorer == "classifier":
    raise ValueError("loss.scorer='classifier' reads a response, which contrast pairs lack: "
                     "use another scorer or set loss.w_contrast=0.")
  pairs, stats = contrast_lib.mine(data.emb_NxD, data.splits, tau=float(dc.contrast_tau),
                                   k=int(dc.get("contrast_k", 4)),
                                   opts=IndexOptions.from_config(dc))
  logging.info("Contrast pairs: %d (harmful, safe) training pairs above cosine %.2f.",
               stats["pairs"], stats["tau"])
  if not len(pairs):
    return None, {"contrast": stats}
  tok, max_len, seed = ctx.tokenizer, int(dc.max_len), int(ctx.config.seed)
  sample = functools.partial(contrast_lib.sample, pairs, n, seed)
  draws, plan = lambda s: sample(s)[0], _pack_plan(ctx)
  harmful = _prompt_rows(tok, data.texts(pairs.harmful_rows), max_len).packed_for(
      draws, what="contrast harmful rows", **plan)
  safe = _prompt_rows(tok, data.texts(pairs.safe_rows), max_len).packed_for(
      draws, what="contrast safe rows", **plan)

  def contrast_fn(step: int) -> Contrast:
    idx, valid = sample(step)
    return Contrast(harmful=harmful.take(idx), safe=safe.take(idx),
                    weight=pairs.weight[idx] * valid, valid=valid)
  return contrast_fn, {"contrast": stats}


@dataclasses.dataclass(frozen=True)
class _PromptRows:
  """Prompt-only chat rows, right-padded (no response: target_mask is all False)."""
  ids: np.ndarray
  mask: np.ndarray
  plan: packing.Plan | None = None  # set: take() also packs its prompts this way

  def take(self, idx: np.ndarray) -> Tokens:
    ids, mask = self.ids[idx], self.mask[idx]
    p = self.plan
    packed = None if p is None else packing.pack(ids, mask, p.rows, p.width)
    return Tokens(ids=ids, mask=mask, target_mask=np.zeros_like(mask),
                  prompt_end=(mask.sum(1) - 1).astype(np.int32),
                  weight=np.ones(len(idx), np.float32), packed=packed)

  def packed_for(self, draws: Callable[[int], np.ndarray], steps: int, width: int,
                 what: str = "prompt rows", shards: int = 1) -> "_PromptRows":
    """These rows, packing each step's draw (`draws(step)`: row indices) per `packing.plan`."""
    lengths = self.mask.sum(1)
    p = packing.plan(lambda s: lengths[draws(s)], steps, width,
                     len(draws(0)) * self.ids.shape[1], shards, what)
    return self if p is None else dataclasses.replace(self, plan=p)


def _pack_plan(ctx) -> dict[str, int]:
  """`_PromptRows.packed_for`'s settings: the batches the run draws (train.steps optimizer
  steps of train.grad_accum micro-steps), data.pack_width and the batch shards."""
  tc = ctx.config.train
  return dict(steps=int(tc.steps) * int(tc.get("grad_accum", 1)),
              width=int(ctx.config.data.pack_width),
              shards=sharding.batch_size_divisor(ctx.mesh))


def _prompt_rows(tokenizer, texts: list[str], max_len: int, multiple: int = 16) -> _PromptRows:
  """Rows as wide as the longest prompt (rounded up to `multiple`, at most max_len): a
  prompt is much shorter than data.max_len, which bounds prompt + response, and every
  padded column would cost the step its forward, backward and stored activations."""
  ids, mask = probe_lib.encode_prompts(tokenizer, texts, max_len)
  longest = int(np.asarray(mask).sum(1).max(initial=1))
  width = min(int(max_len), -(-longest // multiple) * multiple)
  return _PromptRows(ids=np.asarray(ids, np.int32)[:, :width],
                     mask=np.asarray(mask, bool)[:, :width])


def _loss_fn(trainable, frozen, batch, rng, *, spec, model_cfg, adapter_cfg):
  return loss(trainable, frozen, batch, rng, spec=spec, model_cfg=model_cfg,
              adapter_cfg=adapter_cfg)
