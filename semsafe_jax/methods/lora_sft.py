"""lora_sft: the primary baseline. LoRA fine-tuning with plain cross-entropy.

Harmful prompts train towards their refusal target, benign and borderline prompts
towards the base model's own answers, pooled into one token mean as an SFT run on the
mixed dataset would. No consistency term, no KL, no embedding MLP (the configs under
configs/methods/ turn it off). The smallest method: copy it to start a new one.
"""

from __future__ import annotations

import functools

from semsafe_jax.losses.common import safe_div
from semsafe_jax.methods import common
from semsafe_jax.methods.base import Prepared, SafetyBatch


def loss(trainable, frozen, batch: SafetyBatch, rng, *, model_cfg, adapter_cfg, n_max: int):
  params, embed_fn = common.adapted(trainable, frozen["base"], adapter_cfg, rng)
  sums = {}
  for name, t in (("safety", batch.harm), ("capability", batch.benign)):
    logits, targets, mask, _ = common.response_logits(params, model_cfg, embed_fn, t, n_max)
    sums[name] = common.token_ce_sums(logits, targets, mask, t.weight)
  (s_h, n_h), (s_b, n_b) = sums["safety"], sums["capability"]
  total = safe_div(s_h + s_b, n_h + n_b)
  return total, {"l_safety": safe_div(s_h, n_h), "l_capability": safe_div(s_b, n_b),
                 "l_total": total}


def prepare(ctx) -> Prepared:
  return sft_prepared(ctx, ctx.init_trainable())


def sft_prepared(ctx, trainable) -> Prepared:
  """The SFT loss on the shared batches, for any trainable tree (LoRA or full weights)."""
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              n_max=common.target_window(ctx.config))
  return Prepared(trainable=trainable, loss_fn=loss_fn, batch_fn=ctx.safety_batch_fn(),
                  frozen={"base": ctx.params}, frozen_axes=ctx.base_axes())
