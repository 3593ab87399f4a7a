"""Embedding MLP: a residual per-token MLP on the input embeddings.

x -> x + w2 · relu(LayerNorm(x · w1 + b1)) + b2. With w2 and b2 zero the
residual branch is exactly 0, so a fresh adapter leaves the model unchanged.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]
EmbedFn = Callable[[Params, ModelConfig, jax.Array], jax.Array]
LN_EPS = 1e-5


def init_embed_mlp(hidden_size: int, mlp_hidden: int, key: jax.Array) -> Params:
  """w1 like torch.nn.Linear (U(+-1/sqrt(D))), LayerNorm identity, last layer zero."""
  bound = hidden_size ** -0.5
  return {
      "w1": jax.random.uniform(key, (hidden_size, mlp_hidden), jnp.float32, -bound, bound),
      "b1": jnp.zeros((mlp_hidden,), jnp.float32),
      "ln_scale": jnp.ones((mlp_hidden,), jnp.float32),
      "ln_bias": jnp.zeros((mlp_hidden,), jnp.float32),
      "w2": jnp.zeros((mlp_hidden, hidden_size), jnp.float32),
      "b2": jnp.zeros((hidden_size,), jnp.float32),
  }


def apply_embed_mlp(p: Params, x_BxTxD: jax.Array) -> jax.Array:
  """Computes in float32 and returns the input dtype (x + 0 is exact in any dtype)."""
  x = x_BxTxD.astype(jnp.float32)
  h = x @ p["w1"] + p["b1"]
  mu = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mu), axis=-1, keepdims=True)
  h = (h - mu) * jax.lax.rsqrt(var + LN_EPS) * p["ln_scale"] + p["ln_bias"]
  y = jax.nn.relu(h) @ p["w2"] + p["b2"]
  return (x + y).astype(x_BxTxD.dtype)


def _embed(embed_mlp: Params | None, params: Params, cfg: ModelConfig,
           ids_BxT: jax.Array) -> jax.Array:
  x = transformer.embed(params, cfg, ids_BxT)
  return x if embed_mlp is None else apply_embed_mlp(embed_mlp, x)


def embed_fn_for(embed_mlp: Params | None) -> EmbedFn:
  """`embed_fn(params, cfg, ids_BxT)` = model embedding followed by the MLP (if any).

  A `jax.tree_util.Partial`: the MLP weights are pytree leaves, so a jitted
  caller (generation) traces them instead of baking them in as constants.
  """
  return jax.tree_util.Partial(_embed, embed_mlp)
