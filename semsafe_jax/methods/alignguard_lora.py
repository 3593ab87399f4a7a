"""alignguard_lora: AlignGuard-LoRA (Das et al., 2025) with a diagonal Fisher.

  L = L_task + lambda_align · Σ F_A ⊙ ΔW² + lambda_task · Σ H_T ⊙ ΔW²

F is the empirical diagonal Fisher of the safety loss (cross-entropy of the refusal
targets on the harmful training prompts) at the aligned model, H that of the task loss;
each is scaled to mean 1 over the adapted weights. The alignment-critical part of an
update is its `retention.alignguard.critical_frac` coordinates of highest F (F_A = F
there, 0 elsewhere): moving them costs in proportion to how much the safety loss depends
on them. The rest is the task part, regularised by the task's own curvature H (the
paper's task-specific term, which steadies the new knowledge). With a diagonal Fisher the
two parts never share a coordinate, so the paper's collision terms vanish. ΔW = scale · a b
is formed per step (a kernel-sized product: this method's extra cost). Both Fishers are
cached in W/alignguard.npz.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax.adapters import lora_modules, lora_scale
from semsafe_jax.errors import ConfigError
from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods.base import Prepared
from semsafe_jax.retention import common, regularizers
from semsafe_jax.train import inputs

CACHE_FILE = "alignguard.npz"


def validate(config) -> None:
  common.check(config)
  ac = config.retention.alignguard
  for field in ("lambda_align", "lambda_task"):
    if float(ac[field]) < 0:
      raise ConfigError(f"retention.alignguard.{field}", ac[field], "expected >= 0")
  if not 0.0 <= float(ac.critical_frac) <= 1.0:
    raise ConfigError("retention.alignguard.critical_frac", ac.critical_frac,
                      "expected a number in [0, 1]")
  for field in ("fisher_batches", "fisher_batch_size"):
    if int(ac[field]) < 1:
      raise ConfigError(f"retention.alignguard.{field}", ac[field], "expected an integer >= 1")


def loss(trainable, frozen, batch: common.TaskBatch, rng, *, model_cfg, adapter_cfg, n: int,
         lambda_align: float, lambda_task: float):
  params, embed_fn = mcommon.adapted(trainable, frozen["base"], adapter_cfg, rng)
  l_task = common.task_loss(params, model_cfg, embed_fn, batch.task, n)
  s, w = lora_scale(adapter_cfg), frozen["alignguard"]
  zero = jnp.zeros((), jnp.float32)
  l_align, l_space = zero, zero
  for m, ab in lora_modules(trainable["lora"]).items():
    l_align = l_align + regularizers.weighted_sq_penalty(ab["a"], ab["b"], w[m]["align"], s)
    l_space = l_space + regularizers.weighted_sq_penalty(ab["a"], ab["b"], w[m]["task"], s)
  total = l_task + lambda_align * l_align + lambda_task * l_space
  return total, {"l_task": l_task, "l_fisher": l_align, "l_task_space": l_space,
                 "l_total": total}


def _weights(ctx, modules, stage: common.TaskStage) -> dict:
  config, data = ctx.config, ctx.data
  ac = config.retention.alignguard
  harm = np.asarray(data.splits["train"], np.int64)
  harm_rows = inputs.encode_rows(ctx.tokenizer, data.texts(harm), ctx.refusal_targets(harm),
                                 int(config.data.max_len), int(config.data.max_response_tokens))
  kw = dict(batch_size=int(ac.fisher_batch_size), batches=int(ac.fisher_batches),
            seed=int(config.seed), n=common.n_max(config))
  safety = common.diag_fisher(ctx.params, ctx.model_cfg, harm_rows, modules, **kw)
  task = common.diag_fisher(ctx.params, ctx.model_cfg, stage.rows, modules, **kw)
  logging.info("AlignGuard: diagonal Fishers of the safety and task losses over %d modules "
               "(%d batches of %d).", len(modules), kw["batches"], kw["batch_size"])
  return regularizers.fisher_weights(safety, task, float(ac.critical_frac))


def prepare(ctx) -> Prepared:
  stage = common.task_stage(ctx)
  trainable = ctx.init_trainable()
  modules = common.lora_paths(trainable)
  ac = ctx.config.retention.alignguard
  settings = {"aligned": ctx.aligned.identity if ctx.aligned else "", "modules": modules,
              "critical_frac": float(ac.critical_frac), "batches": int(ac.fisher_batches),
              "batch_size": int(ac.fisher_batch_size), "seed": int(ctx.config.seed),
              "tasks": common.tasks_key(ctx.config),
              "max_response_tokens": int(ctx.config.data.max_response_tokens)}
  weights = common.cached_modules(ctx, CACHE_FILE, settings,
                                  lambda: _weights(ctx, modules, stage))
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              n=common.n_max(ctx.config),
                              lambda_align=float(ac.lambda_align),
                              lambda_task=float(ac.lambda_task))
  return common.prepared(ctx, trainable, loss_fn, stage, frozen={"alignguard": weights},
                         report={"alignguard": {"critical_frac": float(ac.critical_frac)}})
