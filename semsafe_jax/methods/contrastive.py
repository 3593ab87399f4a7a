"""contrastive: LoRA SFT plus InfoNCE on pooled hidden states.

loss = lora_sft's token mean of cross-entropy + method.w_contrastive * InfoNCE, where
InfoNCE (losses/contrastive.py, temperature method.temperature) reads one representation
per prompt of the step: the final hidden state (after the last norm) averaged over the
prompt tokens, unit-normalised. The mined neighbour pairs of the harmful block (batch.pairs,
SBERT cosine > data.tau) are the positives; every other prompt of the step, harmful and
benign, is a negative. Same shared batches and LoRA placement as lora_sft, no embedding MLP.

Cost per step: as lora_sft (the SFT forwards already compute the hidden states pooled here).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from semsafe_jax.losses.common import prompt_mask, safe_div
from semsafe_jax.losses.contrastive import info_nce
from semsafe_jax.methods import common, lora_sft
from semsafe_jax.methods.base import Prepared, SafetyBatch
from semsafe_jax.probes.heads import masked_mean_pool


def loss(trainable, frozen, batch: SafetyBatch, rng, *, model_cfg, adapter_cfg, n_max: int,
         temperature: float, w_contrastive: float):
  params, embed_fn = common.adapted(trainable, frozen["base"], adapter_cfg, rng)
  sums, pooled = {}, []
  for name, t in (("safety", batch.harm), ("capability", batch.benign)):
    logits, targets, mask, out = common.response_logits(params, model_cfg, embed_fn, t, n_max)
    sums[name] = common.token_ce_sums(logits, targets, mask, t.weight)
    pooled.append(masked_mean_pool(out.hidden, prompt_mask(t.mask, t.prompt_end)))
  (s_h, n_h), (s_b, n_b) = sums["safety"], sums["capability"]
  l_sft = safe_div(s_h + s_b, n_h + n_b)
  # Rows: the harmful block, then the benign block; pair indices are harmful positions.
  z_NxD = jnp.concatenate(pooled)
  p = batch.pairs
  l_con = info_nce(z_NxD, p.index, p.valid, temperature)
  total = l_sft + w_contrastive * l_con
  return total, {"l_safety": safe_div(s_h, n_h), "l_capability": safe_div(s_b, n_b),
                 "l_sft": l_sft, "l_contrastive": l_con,
                 "pairs_valid": p.valid.astype(jnp.float32).sum(), "l_total": total}


def prepare(ctx) -> Prepared:
  mc = ctx.config.method
  temperature, w = float(mc.temperature), float(mc.w_contrastive)
  if temperature <= 0:
    raise ValueError(f"method.temperature={temperature}; expected > 0")
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              n_max=common.target_window(ctx.config),
                              temperature=temperature, w_contrastive=w)
  return dataclasses.replace(lora_sft.prepare(ctx), loss_fn=loss_fn,
                             report={"temperature": temperature, "w_contrastive": w})
