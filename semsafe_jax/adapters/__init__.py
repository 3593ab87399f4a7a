"""Trainable adapters as pure transforms of the base params.

adapters = {"lora": {...mirrors targeted kernel paths: {"a", "b"}...},
            "embed_mlp": {"w1", "b1", "ln_scale", "ln_bias", "w2", "b2"},  # absent if disabled
            "full": {...every model weight...}}  # only for full fine-tuning

Only this pytree is trained; the base params never reach the optimizer. With "full", the
trained weights replace the base model's, and LoRA / the MLP (if any) apply on top.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from semsafe_jax.adapters.embed_mlp import (
  EmbedFn,
  apply_embed_mlp,
  embed_fn_for,
  init_embed_mlp,
)
from semsafe_jax.adapters.lora import (
  DEFAULT_TARGETS,
  SHORT_TARGETS,
  adaptable_kernels,
  apply_lora,
  init_lora,
  lora_modules,
  resolve_targets,
)
from semsafe_jax.configs import cfg_get
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]

__all__ = [
    "DEFAULT_TARGETS", "SHORT_TARGETS", "adaptable_kernels", "adapted_embed_fn", "adapted_forward",
    "apply_adapters", "apply_embed_mlp", "apply_lora", "apply_trained", "count_params",
    "init_adapters", "init_embed_mlp", "init_lora", "lora_modules", "lora_scale",
    "param_summary", "resolve_targets",
]


def lora_scale(adapter_cfg: Any) -> float:
  rank = max(int(cfg_get(adapter_cfg, "lora_rank", 8)), 1)
  return float(cfg_get(adapter_cfg, "lora_alpha", 16.0)) / rank


def init_adapters(adapter_cfg: Any, model_cfg: ModelConfig, params: Params | None,
                  key: jax.Array) -> Params:
  """Fresh adapters (identity at init). `params` may hold ShapeDtypeStructs or be
  None (shapes then come from `transformer.param_specs`)."""
  if params is None:
    params = {}
    for path, (shape, _) in transformer.param_specs(model_cfg).items():
      node = params
      *parents, leaf = path.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = jax.ShapeDtypeStruct(shape, np.float32)
  k_lora, k_mlp = jax.random.split(key)
  out: Params = {}
  rank = int(cfg_get(adapter_cfg, "lora_rank", 0))
  targets = cfg_get(adapter_cfg, "lora_targets", DEFAULT_TARGETS)
  if rank > 0 and targets:
    out["lora"] = init_lora(params, targets, rank, k_lora)
  if cfg_get(adapter_cfg, "embed_mlp", False):
    out["embed_mlp"] = init_embed_mlp(model_cfg.hidden_size,
                                      int(cfg_get(adapter_cfg, "embed_mlp_hidden", 256)), k_mlp)
  return out


def apply_adapters(base_params: Params, adapters: Params, adapter_cfg: Any, *,
                   rng: jax.Array | None = None, merge: bool = True) -> Params:
  """Base params with LoRA merged into the targeted kernels (dropout only with rng).

  merge=False leaves the factors beside the kernels (see apply_lora): the form
  to differentiate, since it never builds a kernel-sized gradient.
  """
  if adapters.get("full") is not None:
    base_params = adapters["full"]
  if not adapters.get("lora"):
    return base_params
  return apply_lora(base_params, adapters["lora"], lora_scale(adapter_cfg),
                    dropout=float(cfg_get(adapter_cfg, "lora_dropout", 0.0)), rng=rng, merge=merge)


def adapted_embed_fn(adapters: Params) -> EmbedFn:
  """embed_fn(params, cfg, ids_BxT) for `generate`: embedding + embedding MLP."""
  return embed_fn_for(adapters.get("embed_mlp"))


def adapted_forward(base_params: Params, adapters: Params, model_cfg: ModelConfig,
                    adapter_cfg: Any, input_ids_BxT: jax.Array, *,
                    rng: jax.Array | None = None, merge: bool = True,
                    **forward_kw) -> transformer.ModelOutput:
  """`transformer.forward` of the adapted model (LoRA merged unless merge=False, MLP on
  the embeddings)."""
  params = apply_adapters(base_params, adapters, adapter_cfg, rng=rng, merge=merge)
  x_BxTxD = adapted_embed_fn(adapters)(params, model_cfg, input_ids_BxT)
  return transformer.forward(params, model_cfg, inputs_embeds_BxTxD=x_BxTxD, **forward_kw)


def count_params(tree: Any) -> int:
  """Number of scalars in a pytree of arrays or ShapeDtypeStructs."""
  return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree)))


def param_summary(adapters: Params, base_params: Any) -> dict[str, float]:
  """Trainable counts per adapter and as a percentage of the base model."""
  model = count_params(base_params)
  lora = count_params(adapters.get("lora", {}))
  mlp = count_params(adapters.get("embed_mlp", {}))
  full = count_params(adapters.get("full", {}))
  trainable = lora + mlp + full
  return {"lora": lora, "embed_mlp": mlp, "full": full, "trainable": trainable, "model": model,
          "lora_pct": 100.0 * lora / model, "trainable_pct": 100.0 * trainable / model}


def apply_trained(base_params: Params, trained: Params, adapter_cfg: Any, *, merge: bool = True
                  ) -> tuple[Params, EmbedFn | None]:
  """(params, embed_fn) for generation with trained adapters: LoRA merged (or, with
  merge=False, beside kernels shared with base_params: no second copy of the model),
  full weights in place, and the embedding MLP as a Partial (its weights traced by the
  jitted decoder, not baked into it); embed_fn is None without an MLP."""
  params = apply_adapters(base_params, trained, adapter_cfg, merge=merge)
  embed_fn = adapted_embed_fn(trained) if trained.get("embed_mlp") is not None else None
  return params, embed_fn
