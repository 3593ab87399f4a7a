"""salora: SaLoRA (Li et al., ICLR 2025), LoRA whose output passes through a fixed safety
module C = I - U Uᵀ.

Per adapted kernel and layer, U holds the top `retention.salora.safety_rank` principal
directions of the aligned layer's outputs on the harmful training prompts (the safety
features); LoRA's output x a b becomes x a (b C), so the update has no component along
them. Initialisation as the paper: the trainable factors start at the kernel's principal
part (top-r SVD), its output side projected on the top `task_rank` output directions on
task inputs, and the same part, through C, is subtracted as a fixed offset (the paper's
W_res = W - C A0 B0), so training starts at the aligned model. Both statistics come from
the aligned model (`retention.salora.prompts` prompts each), are cached in W/salora.npz,
and make the run's final adapters: rank 2r LoRA factors (trainable part and offset) with
C folded in, which the evaluation and export apply like any LoRA.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from semsafe_jax.adapters import lora_modules, lora_scale
from semsafe_jax.adapters.lora import nest_paths
from semsafe_jax.errors import ConfigError
from semsafe_jax.methods import common as mcommon
from semsafe_jax.methods.base import Prepared
from semsafe_jax.probes import safety as probe_lib
from semsafe_jax.retention import common, regularizers

CACHE_FILE = "salora.npz"  # in W: the fixed module and the initial factors
FIXED = ("u", "a0", "b0", "b0c")


def validate(config) -> None:
  common.check(config)
  sc = config.retention.salora
  for field in ("safety_rank", "task_rank", "prompts", "iters"):
    if int(sc[field]) < 1:
      raise ConfigError(f"retention.salora.{field}", sc[field], "expected an integer >= 1")
  if float(config.adapters.get("lora_dropout", 0.0)) > 0:
    raise ConfigError("adapters.lora_dropout", config.adapters.lora_dropout, "salora keeps its "
                      "fixed offset beside the LoRA factors, whose input rows dropout would "
                      "drop: use 0")


def final_lora(trainable, fixed) -> dict:
  """The trainable tree as plain LoRA on the frozen model: rank 2r, C folded in."""
  return {"lora": nest_paths({
      m: dict(zip(("a", "b"), regularizers.salora_factors(ab["a"], ab["b"], fixed[m])))
      for m, ab in lora_modules(trainable["lora"]).items()})}


def loss(trainable, frozen, batch: common.TaskBatch, rng, *, model_cfg, adapter_cfg, n: int):
  params, embed_fn = mcommon.adapted(final_lora(trainable, frozen["salora"]), frozen["base"],
                                     adapter_cfg, rng)
  l_task = common.task_loss(params, model_cfg, embed_fn, batch.task, n)
  return l_task, {"l_task": l_task, "l_total": l_task}


@functools.partial(jax.jit, static_argnames=("rank", "safety_rank", "task_rank", "scale",
                                             "iters"))
def _layers(k_LxIxO, gh_LxIxI, gt_LxIxI, keys, *, rank, safety_rank, task_rank, scale, iters):
  one = functools.partial(regularizers.salora_layer, rank=rank, safety_rank=safety_rank,
                          task_rank=task_rank, scale=scale, iters=iters)
  # Layer by layer: one layer's working set at a time.
  return jax.lax.map(lambda xs: one(*xs), (k_LxIxO, gh_LxIxI, gt_LxIxI, keys))


def _settings(ctx, modules) -> dict:
  sc, ad = ctx.config.retention.salora, ctx.config.adapters
  return {"aligned": ctx.aligned.identity if ctx.aligned else "", "modules": list(modules),
          "rank": int(ad.lora_rank), "alpha": float(ad.lora_alpha),
          "safety_rank": int(sc.safety_rank), "task_rank": int(sc.task_rank),
          "prompts": int(sc.prompts), "iters": int(sc.iters), "seed": int(ctx.config.seed),
          "tasks": common.tasks_key(ctx.config)}


def fixed_parts(ctx, modules, stage: common.TaskStage) -> dict:
  """{module: {u, a0, b0, b0c}} from the aligned model, cached in W/salora.npz."""
  return common.cached_modules(ctx, CACHE_FILE, _settings(ctx, modules),
                               lambda: _compute(ctx, modules, stage))


def _compute(ctx, modules, stage: common.TaskStage) -> dict:
  sc, data, tok, max_len = ctx.config.retention.salora, ctx.data, ctx.tokenizer, \
      int(ctx.config.data.max_len)
  rng = np.random.default_rng([int(ctx.config.seed), 5151])
  harm = np.asarray(data.splits["train"], np.int64)
  harm = np.sort(rng.choice(harm, min(int(sc.prompts), len(harm)), replace=False))
  h_ids, h_mask = probe_lib.encode_prompts(tok, data.texts(harm), max_len)
  t_idx = np.sort(rng.choice(len(stage.rows.ids), min(int(sc.prompts), len(stage.rows.ids)),
                             replace=False))
  bs = int(ctx.config.eval.batch_size)
  gh = common.kernel_input_grams(ctx.params, ctx.model_cfg, h_ids, h_mask, modules, bs)
  gt = common.kernel_input_grams(ctx.params, ctx.model_cfg, stage.rows.ids[t_idx],
                                 stage.rows.mask[t_idx], modules, bs)
  scale = lora_scale(ctx.config.adapters)
  with common.single_threaded_lapack():
    fixed = _spectral(ctx, modules, gh, gt, scale)
  logging.info("SaLoRA: safety module and initialisation of %d modules from %d harmful "
               "and %d task prompts.", len(modules), len(harm), len(t_idx))
  return fixed


def _spectral(ctx, modules, gh, gt, scale) -> dict:
  sc = ctx.config.retention.salora
  fixed = {}
  for i, m in enumerate(modules):
    k = jnp.asarray(common.kernel(ctx.params, m), jnp.float32)
    L, _, out_dim = k.shape
    keys = jax.random.split(jax.random.key(int(ctx.config.seed) * 1000 + i), L)
    got = _layers(k, jnp.asarray(gh[m]), jnp.asarray(gt[m]), keys,
                  rank=int(ctx.config.adapters.lora_rank),
                  safety_rank=min(int(sc.safety_rank), out_dim),
                  task_rank=min(int(sc.task_rank), out_dim), scale=scale, iters=int(sc.iters))
    fixed[m] = {name: np.asarray(got[name], np.float32) for name in FIXED}
  return fixed


def prepare(ctx) -> Prepared:
  stage = common.task_stage(ctx)
  modules = common.lora_paths(ctx.init_trainable())
  fixed = fixed_parts(ctx, modules, stage)
  trainable = {"lora": nest_paths({m: {"a": jnp.asarray(f["a0"]), "b": jnp.asarray(f["b0"])}
                                    for m, f in fixed.items()})}
  frozen_fixed = {m: {k: f[k] for k in ("u", "a0", "b0c")} for m, f in fixed.items()}
  loss_fn = functools.partial(loss, model_cfg=ctx.model_cfg, adapter_cfg=ctx.config.adapters,
                              n=common.n_max(ctx.config))
  sc = ctx.config.retention.salora
  return common.prepared(
      ctx, trainable, loss_fn, stage, frozen={"salora": frozen_fixed},
      finalize=lambda t: final_lora(t, frozen_fixed),
      report={"salora": {"safety_rank": int(sc.safety_rank), "task_rank": int(sc.task_rank),
                         "modules": len(modules)}})


def final_adapters(workdir: str, trainable) -> dict:
  """The run's final adapters from a checkpoint's trainable tree (export, generation)."""
  got = common.load_modules(os.path.join(workdir, CACHE_FILE))
  if got is None:
    raise FileNotFoundError(f"{os.path.join(workdir, CACHE_FILE)} is missing: the salora run "
                            "in this workdir cannot be rebuilt from its checkpoint alone")
  return final_lora(trainable, got[0])
