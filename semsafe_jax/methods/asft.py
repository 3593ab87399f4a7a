"""asft: AsFT (Yang et al., 2025), the task loss plus lambda · Σ ||(I - Ĉ) ΔW||²_F.

Ĉ = V Vᵀ / ||V||_F per layer and kernel, with V = W_aligned - W_base, the safety training's
update (the reference code's alignment matrix; for a LoRA safety run, the merged LoRA
delta, of rank r). An update along V costs little; one off it is penalised. ΔW is the
LoRA update as applied (scale · a b). `retention.asft.lam` is lambda; the penalty costs
[r, r] products per layer (retention/regularizers.py).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from semsafe_jax.adapters import lora_modules, lora_scale
from semsafe_jax.errors import ConfigError
from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods.base import Prepared
from semsafe_jax.retention import common, regularizers


def validate(config) -> None:
  common.check(config)
  if float(config.retention.asft.lam) < 0:
    raise ConfigError("retention.asft.lam", config.retention.asft.lam, "expected >= 0")


def loss(trainable, frozen, batch: common.TaskBatch, rng, *, model_cfg, adapter_cfg, n: int,
         lam: float):
  params, embed_fn = mcommon.adapted(trainable, frozen["base"], adapter_cfg, rng)
  l_task = common.task_loss(params, model_cfg, embed_fn, batch.task, n)
  s = lora_scale(adapter_cfg)
  mods = lora_modules(trainable["lora"])
  l_reg = sum((regularizers.asft_penalty(ab["a"], ab["b"], frozen["asft"][m], s)
               for m, ab in mods.items()), jnp.zeros((), jnp.float32))
  total = l_task + lam * l_reg
  return total, {"l_task": l_task, "l_asft": l_reg, "l_total": total}


def alignment_factors(ctx, modules) -> dict:
  """{module: F [L, out, k]} with F Fᵀ = Ĉ, from the aligned run's LoRA factors when it
  trained LoRA alone, else from the dense difference of the kernels."""
  aligned = ctx.aligned
  out = {}
  for m in modules:
    xy = aligned.lora_factors(m)
    if xy is not None:
      out[m] = regularizers.asft_factor(*xy)
    elif aligned.adapters.get("full") is not None:
      out[m] = regularizers.asft_factor(aligned.kernel_delta(m), None)
    else:  # a kernel the safety run left alone: V = 0, Ĉ = 0
      L, _, d_out = common.kernel(ctx.params, m).shape
      out[m] = np.zeros((L, d_out, 1), np.float32)
  return out


def prepare(ctx) -> Prepared:
  stage = common.task_stage(ctx)
  trainable = ctx.init_trainable()
  with common.single_threaded_lapack():
    factors = alignment_factors(ctx, common.lora_paths(trainable))
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              n=common.n_max(ctx.config),
                              lam=float(ctx.config.retention.asft.lam))
  ranks = {m: int(f.shape[-1]) for m, f in factors.items()}
  return common.prepared(ctx, trainable, loss_fn, stage, frozen={"asft": factors},
                         report={"asft": {"alignment_rank": ranks}})
