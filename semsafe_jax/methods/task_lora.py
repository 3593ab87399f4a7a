"""task_lora: plain LoRA fine-tuning of the aligned model on a benign task.

The reference of the retention scenario (semsafe_jax/retention): token-mean cross-entropy
of the task's reference answers, nothing that protects the refusals. What it leaves of
them is what a user who fine-tunes the safety-trained model would get.
"""

from __future__ import annotations

import functools

from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods.base import Prepared
from semsafe_jax.retention import common


def validate(config) -> None:
  common.check(config)


def loss(trainable, frozen, batch: common.TaskBatch, rng, *, model_cfg, adapter_cfg, n: int):
  params, embed_fn = mcommon.adapted(trainable, frozen["base"], adapter_cfg, rng)
  l_task = common.task_loss(params, model_cfg, embed_fn, batch.task, n)
  return l_task, {"l_task": l_task, "l_total": l_task}


def prepare(ctx) -> Prepared:
  stage = common.task_stage(ctx)
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              n=common.n_max(ctx.config))
  return common.prepared(ctx, ctx.init_trainable(), loss_fn, stage)
