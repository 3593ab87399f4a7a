"""circuit_breakers: representation rerouting with LoRA (Zou et al., 2024).

Harmful prompts come with the base model's own harmful answers (ctx.harmful_answers).
At the target layers, the adapted hidden states of those rows are pushed away from the
frozen model's: ReLU(cos(h_adapted, h_frozen)), averaged over layers and tokens. On the
retain set (benign and borderline prompts with the base model's answers) the adapted
states stay equal to the frozen ones: the L2 norm of their difference at every layer.

  loss = c_rerouting * L_rerouting + c_retain * L_retain
  c_rerouting = alpha (1 - t / 2T),  c_retain = alpha t / 2T

as in the reference code (lorra_circuit_breaker.py: progress = step / 300 for 150
steps). The loss is not told the step, so each batch carries it (`ReroutingBatch.step`,
the micro-step index batch_fn was called with) and T counts micro-steps too
(train.steps * train.grad_accum), so the schedule is the same with or without gradient
accumulation.

Like the reference, rerouting reads every real token of a harmful row (prompt and
answer; method.reroute_tokens="response" keeps the answer only) and retain reads every
real token of a benign row. Target layers index hidden states in the transformers
convention (0 = embeddings, l = output of layer l); by default they sit at the same
relative depths as the reference's 10 and 20 of 32 (method.target_depths), or are given
explicitly (method.target_layers). LoRA sits where ours does; no embedding MLP.

Cost per step: two adapted forwards (harmful, retain) and two frozen forwards, all
with every layer's hidden states; no LM head.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.losses.rerouting import cosine, rerouting_loss, retain_loss, schedule
from semsafe_jax.methods import common
from semsafe_jax.methods.base import Prepared, Tokens
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.train import inputs

REROUTE_TOKENS = ("all", "response")


@flax.struct.dataclass
class ReroutingBatch:
  """One step: harmful rows (prompt + the base model's harmful answer), retain rows
  (benign/borderline prompt + the base model's answer), and the step for the schedule."""
  harm: Tokens
  retain: Tokens
  step: Any  # int32 [], the micro-step index (replicated, not a batch dim)


def target_layers(method_cfg: Any, num_layers: int) -> tuple[int, ...]:
  """Hidden-state indices (1..num_layers) the rerouting term reads.

  method.target_layers, when set, lists them (negative counts from the end); otherwise
  method.target_depths gives fractions of the depth, rounded to the nearest layer.
  """
  explicit = tuple(method_cfg.get("target_layers", ()) or ())
  if explicit:
    out = []
    for layer in explicit:
      i = int(layer)
      j = i + num_layers + 1 if i < 0 else i
      if not 1 <= j <= num_layers:
        raise ValueError(f"method.target_layers={list(explicit)}; {i} is out of range: use "
                         f"1..{num_layers} (or -{num_layers}..-1) for this {num_layers}-layer "
                         "model")
      out.append(j)
    return tuple(sorted(set(out)))
  depths = tuple(method_cfg.get("target_depths", ()) or ())
  if not depths or any(not 0.0 < float(f) <= 1.0 for f in depths):
    raise ValueError(f"method.target_depths={list(depths)}; expected fractions in (0, 1] "
                     "(or set method.target_layers)")
  return tuple(sorted({min(num_layers, max(1, round(float(f) * num_layers))) for f in depths}))


def _states(params: Any, cfg: ModelConfig, t: Tokens, embed_fn: Any = None) -> jax.Array:
  """[L+1, B, T, D] hidden states of a block of rows (no LM head)."""
  kw = (dict(inputs_embeds_BxTxD=embed_fn(params, cfg, t.ids)) if embed_fn is not None
        else dict(input_ids_BxT=t.ids))
  return transformer.forward(params, cfg, attention_mask_BxS=t.mask, output_hidden_states=True,
                             compute_logits=False, **kw).hidden_states


def loss(trainable, frozen, batch: ReroutingBatch, rng, *, model_cfg: ModelConfig,
         adapter_cfg: Any, layers: Sequence[int], total_steps: int, alpha: float,
         reroute_tokens: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  params, embed_fn = common.adapted(trainable, frozen["base"], adapter_cfg, rng)
  base = jax.lax.stop_gradient(frozen["base"])
  c_reroute, c_retain = schedule(batch.step, total_steps, alpha)
  idx = jnp.asarray(layers, jnp.int32)

  t = batch.harm
  h_adapted = _states(params, model_cfg, t, embed_fn)[idx]
  h_frozen = jax.lax.stop_gradient(_states(base, model_cfg, t)[idx])
  tokens = t.target_mask if reroute_tokens == "response" else t.mask
  w_BxL = tokens.astype(jnp.float32) * t.weight.astype(jnp.float32)[:, None]
  l_reroute = rerouting_loss(h_adapted, h_frozen, w_BxL)
  # Plain cosine (no ReLU), for the log: it should fall to about 0 and below.
  cos = cosine(h_adapted, h_frozen)
  w = jnp.broadcast_to(w_BxL, cos.shape)
  harm_cos = jnp.sum(cos * w) / jnp.maximum(jnp.sum(w), 1e-6)

  r = batch.retain
  l_retain = retain_loss(_states(params, model_cfg, r, embed_fn),
                         jax.lax.stop_gradient(_states(base, model_cfg, r)), r.mask)

  total = c_reroute * l_reroute + c_retain * l_retain
  return total, {"l_rerouting": l_reroute, "l_retain": l_retain, "l_total": total,
                 "c_rerouting": c_reroute, "c_retain": c_retain, "harm_cos": harm_cos}


def prepare(ctx) -> Prepared:
  config, dc, mc = ctx.config, ctx.config.data, ctx.config.method
  reroute_tokens = str(mc.reroute_tokens)
  if reroute_tokens not in REROUTE_TOKENS:
    raise ValueError(f"method.reroute_tokens={reroute_tokens!r}; expected one of "
                     f"{', '.join(REROUTE_TOKENS)}")
  layers = target_layers(mc, ctx.model_cfg.num_layers)
  sft = ctx.sft
  answers = ctx.harmful_answers
  harm = inputs.encode_rows(ctx.tokenizer, ctx.data.texts(sft.harm_rows), answers, dc.max_len,
                            dc.max_response_tokens)
  total_steps = int(config.train.steps) * int(config.train.get("grad_accum", 1))

  def batch_fn(step: int) -> ReroutingBatch:
    _, hi, bi = ctx.batch_rows(step)
    return ReroutingBatch(harm=Tokens.take(harm, hi, sft.harm_weight[hi]),
                          retain=Tokens.take(sft.benign, bi), step=np.asarray(step, np.int32))

  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=config.adapters,
                              layers=layers, total_steps=total_steps, alpha=float(mc.alpha),
                              reroute_tokens=reroute_tokens)
  return Prepared(trainable=ctx.init_trainable(), loss_fn=loss_fn, batch_fn=batch_fn,
                  frozen={"base": ctx.params}, frozen_axes=ctx.base_axes(),
                  report={"target_layers": list(layers), "alpha": float(mc.alpha),
                          "reroute_tokens": reroute_tokens, "harmful_answers": len(answers),
                          "harmful_rows_shortened": int(harm.truncated)})
