"""Adapters baked into the weights: a plain transformers checkpoint.

LoRA merges exactly (`W' = W + (alpha/r) a @ b`). The embedding MLP acts on
each token's embedding alone, so it folds exactly into a new input table:
`table'[v] = embed_mlp(embed(v)) / embed_scale` (Gemma's model multiplies by
sqrt(D) after the lookup, so the division lets its own scaling reproduce the
adapted embedding). The LM head keeps the original table, so a tied model is
written untied with both matrices.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.adapters import apply_lora, lora_modules
from semsafe_jax.adapters.embed_mlp import embed_fn_for
from semsafe_jax.export import hf, staging
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]
Adapters = dict[str, Any]


def lora_rank(lora: Params) -> int:
  """r, read off the `a` factors [L, in, r] (all modules share it)."""
  ranks = {int(m["a"].shape[-1]) for m in lora_modules(lora).values()}
  if len(ranks) != 1:
    raise ValueError(f"Expected one LoRA rank across modules, got {sorted(ranks)}.")
  return ranks.pop()


def fold_embed_mlp(params: Params, cfg: ModelConfig, embed_mlp: Params,
                   chunk: int = 8192) -> np.ndarray:
  """The input table [V, D] (float32) whose plain lookup gives the adapted embedding."""
  cfg32 = cfg.replace(dtype="float32")

  @jax.jit
  def rows(table_VxD, mlp, ids_C):
    # The very embed_fn training feeds the model with, on one chunk of the vocabulary.
    x_1xCxD = embed_fn_for(mlp)({"embed": {"embedding": table_VxD}}, cfg32, ids_C[None])
    return x_1xCxD[0] / jnp.float32(cfg.embed_scale)

  table_VxD = jnp.asarray(params["embed"]["embedding"])
  mlp = jax.tree.map(jnp.asarray, embed_mlp)
  V = cfg.vocab_size
  chunk = min(chunk, V)
  out = np.empty((V, cfg.hidden_size), np.float32)
  for start in range(0, V, chunk):
    ids = np.minimum(np.arange(start, start + chunk), V - 1)  # fixed shape: one compile
    n = min(chunk, V - start)
    out[start:start + n] = np.asarray(rows(table_VxD, mlp, jnp.asarray(ids)))[:n]
  return out


def merged_params(base_params: Params, cfg: ModelConfig, adapters: Adapters, *,
                  lora_alpha: float) -> tuple[Params, ModelConfig]:
  """Plain params (and config) whose ordinary forward equals the adapted forward.

  Returns params with LoRA merged and the embedding MLP folded into the input
  table; a tied config becomes untied (lm_head = the original table) when the
  table changed.
  """
  params = base_params
  if adapters.get("full") is not None:  # full fine-tuning: the trained weights themselves
    params = jax.tree.map(lambda t, b: jnp.asarray(t, b.dtype), adapters["full"], base_params)
  if adapters.get("lora"):
    lora = adapters["lora"]
    params = apply_lora(params, lora, float(lora_alpha) / lora_rank(lora))
  if adapters.get("embed_mlp") is None:
    return params, cfg
  table = params["embed"]["embedding"]
  new_table = fold_embed_mlp(params, cfg, adapters["embed_mlp"]).astype(table.dtype)
  params = {**params, "embed": {"embedding": jnp.asarray(new_table)}}
  if cfg.tie_word_embeddings:
    params["lm_head"] = {"kernel": jnp.asarray(table).T}
    cfg = cfg.replace(tie_word_embeddings=False)
  return params, cfg


def save_merged(out_dir: str, base_params: Params, cfg: ModelConfig, adapters: Adapters, *,
                lora_alpha: float, tokenizer=None, config_dict: dict[str, Any] | None = None,
                dtype: str = "float32", max_shard_bytes: float = 5e9) -> str:
  """Writes the adapted model as a transformers checkpoint (config, safetensors, tokenizer).

  `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` then computes
  the adapted logits. See `hf.save_hf_model` for the arguments and how an
  existing `out_dir` is treated.
  """
  return staging.write_export(
      out_dir, {"format": "merged"},
      lambda path: write_merged(path, base_params, cfg, adapters, lora_alpha=lora_alpha,
                                tokenizer=tokenizer, config_dict=config_dict, dtype=dtype,
                                max_shard_bytes=max_shard_bytes))


def write_merged(out_dir: str, base_params: Params, cfg: ModelConfig, adapters: Adapters, *,
                 lora_alpha: float, tokenizer=None, config_dict: dict[str, Any] | None = None,
                 dtype: str = "float32", max_shard_bytes: float = 5e9) -> str:
  """`save_merged`'s files, written straight into `out_dir` (created if missing)."""
  params, cfg = merged_params(base_params, cfg, adapters, lora_alpha=lora_alpha)
  return hf.write_hf_model(out_dir, params, cfg, config_dict=config_dict, tokenizer=tokenizer,
                           dtype=dtype, max_shard_bytes=max_shard_bytes)
