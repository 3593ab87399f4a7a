"""semsafe_retain: ours as the regulariser of task fine-tuning.

  L = L_task + weight · (w_s · L_safety + lambda · L_consistency + w_c · L_capability)

on the safety-training prompts, each step: the task batch, plus the blocks ours trains on
(semsafe.py, with `config.loss` and `config.data` as there): the harmful block with the
safety training's refusal targets, its mined pairs and unlabelled partners, and the benign,
borderline and look-alike block. The frozen model is the aligned one, so L_capability is the
KL to the aligned model's own answers on that block: without it, the safety term alone
teaches the model to refuse whatever it is asked (the task prompts are no counterweight on
safety-looking prompts). `loss.w_capability=0` leaves the block out and generates no
answers. `retention.semsafe_retain.weight` weighs our terms against the task.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import numpy as np

from semsafe_jax.errors import ConfigError
from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods import semsafe
from semsafe_jax.methods.base import Pairs, Prepared, SafetyBatch, Tokens
from semsafe_jax.retention import common
from semsafe_jax.train import inputs


@flax.struct.dataclass
class RetainBatch:
  task: Tokens
  safety: semsafe.SemsafeBatch


def validate(config) -> None:
  common.check(config)
  if config.probe.use != "off":
    raise ConfigError("probe.use", config.probe.use, "semsafe_retain takes off")
  if float(config.retention.semsafe_retain.weight) < 0:
    raise ConfigError("retention.semsafe_retain.weight", config.retention.semsafe_retain.weight,
                      "expected >= 0")


def loss(trainable, frozen, batch: RetainBatch, rng, *, model_cfg, adapter_cfg, n: int,
         spec: semsafe.LossSpec, weight: float):
  params, embed_fn = mcommon.adapted(trainable, frozen["base"], adapter_cfg, rng)
  l_task = common.task_loss(params, model_cfg, embed_fn, batch.task, n)
  l_ours, metrics = semsafe.loss(trainable, {"base": frozen["base"], "aux": frozen["aux"]},
                                 batch.safety, rng, spec=spec, model_cfg=model_cfg,
                                 adapter_cfg=adapter_cfg)
  total = l_task + weight * l_ours
  metrics = {**metrics, "l_task": l_task, "l_ours": l_ours, "l_total": total,
             "l_consistency_weighted": weight * metrics["l_consistency_weighted"]}
  return total, metrics


def _safety_batch_fn(ctx):
  """step -> SafetyBatch: the shared batcher's harmful block and pairs, with the safety
  training's refusal targets, and its benign block with the aligned model's answers; without
  L_capability the benign block stays empty (no answers generated)."""
  if float(ctx.config.loss.w_capability) > 0:
    return ctx.safety_batch_fn()
  data, dc = ctx.data, ctx.config.data
  rows = np.asarray(data.splits["train"], np.int64)
  harm = inputs.encode_rows(ctx.tokenizer, data.texts(rows), ctx.refusal_targets(rows),
                            int(dc.max_len), int(dc.max_response_tokens))
  pos = np.full(len(data.prompts), -1, np.int64)
  pos[rows] = np.arange(len(rows))
  width = harm.ids.shape[1]
  empty = Tokens(ids=np.zeros((0, width), np.int32), mask=np.zeros((0, width), bool),
                 target_mask=np.zeros((0, width), bool), prompt_end=np.zeros(0, np.int32),
                 weight=np.zeros(0, np.float32))

  def batch_fn(step: int) -> SafetyBatch:
    b = ctx.batcher.batch(step)
    return SafetyBatch(harm=Tokens.take(harm, pos[b.harmful_idx]), benign=empty,
                       pairs=Pairs(index=b.pair_index, weight=np.asarray(b.pair_weight,
                                                                         np.float32),
                                   valid=b.pair_valid))
  return batch_fn


def prepare(ctx) -> Prepared:
  config = ctx.config
  stage = common.task_stage(ctx)
  spec = semsafe.LossSpec.from_config(config.loss)
  uses = spec.uses_consistency and spec.consistency_repr == "refusal_prob"
  probe = None
  if uses and spec.scorer == "probe":
    if ctx.probe is None:
      raise ConfigError("loss.scorer", "probe", "needs probe.train=True")
    probe = {**ctx.probe["probe"], "layer": np.int32(ctx.probe["best_layer"])}
  classifier = ctx.refusal_classifier if uses and spec.scorer == "classifier" else None
  aux = semsafe.build_aux(spec, config.loss, ctx.tokenizer, classifier=classifier, probe=probe)
  safety_fn = _safety_batch_fn(ctx)
  # pylint: disable=protected-access; ours' own stages, shared as they are
  unlabeled_fn, report = semsafe._unlabeled_stage(ctx, spec)
  contrast_fn, contrast_report = semsafe._contrast_stage(ctx, spec)
  report.update(contrast_report)

  def batch_fn(step: int) -> RetainBatch:
    return RetainBatch(task=stage.tokens(step), safety=semsafe.SemsafeBatch(
        safety=safety_fn(step),
        unlabeled=None if unlabeled_fn is None else unlabeled_fn(step),
        contrast=None if contrast_fn is None else contrast_fn(step)))

  weight = float(config.retention.semsafe_retain.weight)
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=config.adapters,
                              n=common.n_max(config), spec=spec, weight=weight)
  report["semsafe_retain"] = {"weight": weight, **dataclasses.asdict(spec)}
  return common.prepared(ctx, ctx.init_trainable(), loss_fn, stage, frozen={"aux": aux},
                         batch_fn=batch_fn, report=report)
