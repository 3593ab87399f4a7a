"""Decoder-only transformer (Llama, Mistral, Qwen2/3, Gemma 3): a functional core.

The forward pass is a pure function of a plain params dict (the state an NNX module
would hold), so adapters are pure transforms of that dict and the loss is a pure
function of the trainable pytree. Layer params are stacked on a leading axis; the layers run
under one `jax.lax.scan` (compile time independent of depth) or, on CPU, as an
unrolled loop (see `unrolls_layers`).

Shape suffixes: B batch, T new tokens, S key slots (T, or the cache length),
D model width, F MLP width, N query heads, K kv heads, G = N // K, H head dim,
V vocab, L layers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semsafe_jax.models.config import ModelConfig

Params = dict[str, Any]
_NEG_INF = -1e30  # finite, so fully masked (padding) rows stay NaN-free


class ModelOutput(NamedTuple):
  logits: jax.Array | None  # [B, T, V] (None when compute_logits=False)
  hidden: jax.Array  # [B, T, D] after the final norm
  hidden_states: jax.Array | None  # [L+1, B, T, D], transformers' convention
  cache: dict[str, jax.Array] | None  # {"k","v": [L, B, S, K, H]}


# ----------------------------------------------------------------------------
# Parameters: one table of shapes and logical axes. Sharding rules map logical
# axes to mesh axes (semsafe_jax/train/sharding.py), so FSDP or tensor
# parallelism is a rule change, not a model change.


def param_specs(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
  """Flat 'a/b/c' path -> (shape, logical axes) for every parameter."""
  L, D, F, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  NH, KH = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  s = {"embed/embedding": ((V, D), ("vocab", "embed")),
       "final_norm/scale": ((D,), ("norm",))}
  lin = {"attn/q_proj": (D, NH, "embed", "q_heads"), "attn/k_proj": (D, KH, "embed", "kv_heads"),
         "attn/v_proj": (D, KH, "embed", "kv_heads"), "attn/o_proj": (NH, D, "q_heads", "embed"),
         "mlp/gate_proj": (D, F, "embed", "mlp"), "mlp/up_proj": (D, F, "embed", "mlp"),
         "mlp/down_proj": (F, D, "mlp", "embed")}
  for name, (i, o, ai, ao) in lin.items():
    s[f"layers/{name}/kernel"] = ((L, i, o), ("layers", ai, ao))
    has_bias = (cfg.qkv_bias if name[5] in "qkv" and name.startswith("attn") else
                cfg.o_bias if name == "attn/o_proj" else cfg.mlp_bias)
    if has_bias:
      s[f"layers/{name}/bias"] = ((L, o), ("layers", ao))
  norms = ["pre_attn_norm", "pre_mlp_norm"]
  if cfg.sandwich_norm:
    norms += ["post_attn_norm", "post_mlp_norm"]
  for n in norms:
    s[f"layers/{n}/scale"] = ((L, D), ("layers", "norm"))
  if cfg.qk_norm:
    s["layers/attn/q_norm/scale"] = ((L, cfg.head_dim), ("layers", "norm"))
    s["layers/attn/k_norm/scale"] = ((L, cfg.head_dim), ("layers", "norm"))
  if not cfg.tie_word_embeddings:
    s["lm_head/kernel"] = ((D, V), ("embed", "vocab"))
  return s


def init_params(cfg: ModelConfig, key: jax.Array, std: float = 0.02) -> Params:
  """Random params (tiny test models); real weights come from loading.py."""
  out: Params = {}
  specs = param_specs(cfg)
  keys = jax.random.split(key, len(specs))
  for k, (path, (shape, _)) in zip(keys, sorted(specs.items())):
    if path.endswith("scale"):
      v = jnp.zeros(shape) if cfg.norm_offset else jnp.ones(shape)
    elif path.endswith("bias"):
      v = std * jax.random.normal(k, shape)
    else:
      v = std * jax.random.normal(k, shape)
    _set(out, path, v.astype(cfg.param_dtype))
  return out


def _set(tree: Params, path: str, value) -> None:
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


# ----------------------------------------------------------------------------
# Pure functions.


def rms_norm(x: jax.Array, scale: jax.Array, eps: float, offset: float) -> jax.Array:
  # float32 statistics whatever the compute dtype, as transformers does.
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if offset:  # Gemma scales in float32 before casting back
    return (x32 * (offset + scale.astype(jnp.float32))).astype(x.dtype)
  return scale.astype(x.dtype) * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig, theta: float, scaling: dict | None) -> np.ndarray:
  inv = 1.0 / theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim)
  if not scaling:
    return inv.astype(np.float32)
  if scaling["rope_type"] == "linear":
    return (inv / scaling["factor"]).astype(np.float32)
  # llama3: long wavelengths slowed by `factor`, short kept, smooth in between.
  f, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
  old = scaling["original_max_position_embeddings"]
  wavelen = 2 * np.pi / inv
  out = np.where(wavelen > old / lo, inv / f, inv)
  smooth = (old / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * out / f + smooth * out
  medium = (wavelen >= old / hi) & (wavelen <= old / lo)
  return np.where(medium, smoothed, out).astype(np.float32)


def rope_tables(positions_BxT: jax.Array, inv_freq: np.ndarray,
                dtype) -> tuple[jax.Array, jax.Array]:
  """(cos, sin), each [B, T, 1, 2, H/2], for apply_rope; sin carries the rotation's signs.

  Built once per forward pass, outside the layer loop: the tables are the same for
  every layer, and inside it they would also be saved once per layer for the backward.
  """
  freqs_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos, sin = jnp.cos(freqs_BxTxH2), jnp.sin(freqs_BxTxH2)
  cos = jnp.stack([cos, cos], axis=2)[:, :, None]
  sin = jnp.stack([-sin, sin], axis=2)[:, :, None]
  return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  # "Rotate half" layout, as in transformers: out = [x1 cos - x2 sin, x2 cos + x1 sin].
  # Written over a (2, H/2) view with a flip rather than split + concatenate: one
  # elementwise loop forward and backward, where a concatenate costs a copy on CPU.
  B, T, N, H = x_BxTxNxH.shape
  x = x_BxTxNxH.reshape(B, T, N, 2, H // 2)
  return (x * cos + jnp.flip(x, axis=3) * sin).reshape(B, T, N, H)


@jax.custom_vjp
def lora_term(x_NxI: jax.Array, a_IxR: jax.Array, b_RxO: jax.Array) -> jax.Array:
  """(x @ a) @ b, with a backward pass that never transposes x.

  Autodiff forms a's gradient as x^T @ g, and XLA:CPU then copies x into
  transposed layout: for a [tokens, 1536] input that copy costs more than all
  the LoRA matmuls together. (g^T @ x)^T reads x as it lies.
  """
  return (x_NxI @ a_IxR) @ b_RxO


def _lora_fwd(x_NxI, a_IxR, b_RxO):
  xa_NxR = x_NxI @ a_IxR
  return xa_NxR @ b_RxO, (x_NxI, a_IxR, b_RxO, xa_NxR)


def _lora_bwd(res, g_NxO):
  x_NxI, a_IxR, b_RxO, xa_NxR = res
  g_xa_NxR = g_NxO @ b_RxO.T
  da_IxR = (g_xa_NxR.T @ x_NxI).T
  db_RxO = xa_NxR.T @ g_NxO
  return g_xa_NxR @ a_IxR.T, da_IxR, db_RxO


lora_term.defvjp(_lora_fwd, _lora_bwd)


def _linear(p: Params, x: jax.Array) -> jax.Array:
  y = x @ p["kernel"].astype(x.dtype)
  if "lora_a" in p:  # unmerged LoRA (adapters.apply_lora(merge=False)); lora_b carries the scale
    x_NxI = x.reshape(-1, x.shape[-1])
    d = lora_term(x_NxI, p["lora_a"].astype(x.dtype), p["lora_b"].astype(x.dtype))
    y = y + d.reshape(y.shape)
  return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _act(cfg: ModelConfig, x: jax.Array) -> jax.Array:
  return jax.nn.silu(x) if cfg.act == "silu" else jax.nn.gelu(x, approximate=True)


def _block(cfg: ModelConfig, p: Params, x_BxTxD, k_BxSxKxH, v_BxSxKxH, bias_BxTxS,
           rope_global, rope_local, is_sliding, cache_index):
  """One decoder layer. Returns (new x, full k, full v) so callers can cache."""
  B, T, _ = x_BxTxD.shape
  K, H, G = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
  norm = lambda name, x: rms_norm(x, p[name]["scale"], cfg.rms_eps, cfg.norm_offset)
  a = p["attn"]

  h = norm("pre_attn_norm", x_BxTxD)
  q = _linear(a["q_proj"], h).reshape(B, T, K * G, H)
  k = _linear(a["k_proj"], h).reshape(B, T, K, H)
  v = _linear(a["v_proj"], h).reshape(B, T, K, H)
  if cfg.qk_norm:
    q = rms_norm(q, a["q_norm"]["scale"], cfg.rms_eps, cfg.norm_offset)
    k = rms_norm(k, a["k_norm"]["scale"], cfg.rms_eps, cfg.norm_offset)
  cos, sin = rope_global
  if rope_local is not None:  # Gemma 3: sliding-window layers use their own rope base
    cos, sin = (jnp.where(is_sliding, l, g) for l, g in zip(rope_local, rope_global))
  q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
  if k_BxSxKxH is None:
    k_all, v_all = k, v
  else:  # write the new keys/values into the cache at cache_index
    k_all = jax.lax.dynamic_update_slice_in_dim(k_BxSxKxH, k.astype(k_BxSxKxH.dtype), cache_index, 1)
    v_all = jax.lax.dynamic_update_slice_in_dim(v_BxSxKxH, v.astype(v_BxSxKxH.dtype), cache_index, 1)
  bias = jnp.where(is_sliding, bias_BxTxS[1], bias_BxTxS[0])

  q = q.reshape(B, T, K, G, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k_all.astype(q.dtype)).astype(jnp.float32)
  # An additive mask: its gradient needs no saved [B, K, G, T, S] predicate, unlike where().
  scores = scores * cfg.attn_scale + bias[:, None, None]
  probs = jax.nn.softmax(scores, axis=-1).astype(x_BxTxD.dtype)
  o = jnp.einsum("bkgts,bskh->btkgh", probs, v_all.astype(probs.dtype)).reshape(B, T, K * G * H)
  o = _linear(a["o_proj"], o)
  if cfg.sandwich_norm:
    o = norm("post_attn_norm", o)
  x = x_BxTxD + o

  m = p["mlp"]
  h = norm("pre_mlp_norm", x)
  h = _linear(m["down_proj"], _act(cfg, _linear(m["gate_proj"], h)) * _linear(m["up_proj"], h))
  if cfg.sandwich_norm:
    h = norm("post_mlp_norm", h)
  return x + h, k_all, v_all


def embed(params: Params, cfg: ModelConfig, input_ids_BxT: jax.Array) -> jax.Array:
  table = params["embed"]["embedding"].astype(cfg.dtype)
  x = jnp.take(table, input_ids_BxT, axis=0)
  # transformers scales in the compute dtype; do the same for bitwise parity.
  return x * jnp.asarray(cfg.embed_scale, cfg.dtype) if cfg.embed_scale != 1.0 else x


def lm_head(params: Params, cfg: ModelConfig, hidden_BxTxD: jax.Array) -> jax.Array:
  if cfg.tie_word_embeddings:
    w_DxV = params["embed"]["embedding"].astype(hidden_BxTxD.dtype).T
  else:
    w_DxV = params["lm_head"]["kernel"].astype(hidden_BxTxD.dtype)
  logits = (hidden_BxTxD @ w_DxV).astype(jnp.float32)
  if cfg.final_logit_softcap:
    c = cfg.final_logit_softcap
    logits = jnp.tanh(logits / c) * c
  return logits


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> dict[str, jax.Array]:
  shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


REMAT = ("off", "full", "dots")


def remat_policy(remat: bool | str):
  """jax.checkpoint policy for a block, or None (save every activation).

  "full" (True) saves nothing and recomputes the block in the backward pass: the
  least memory. "dots" saves the matmul outputs and recomputes only elementwise
  work (norms, rotary, activations): on CPU this is faster than no remat, since
  the elementwise intermediates cost more memory traffic to save than to redo.
  """
  mode = {False: "off", True: "full", None: "off", "": "off"}.get(remat, remat)
  if mode not in REMAT:
    raise ValueError(f"model.remat={remat!r}; expected one of {REMAT} (or a bool)")
  return {"off": None, "full": jax.checkpoint_policies.nothing_saveable,
          "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}[mode]


def unrolls_layers(cfg: ModelConfig, *, differentiated: bool = True) -> bool:
  """Whether `forward` runs stacked layers as a Python loop instead of a scan.

  A scan compiles one block whatever the depth, but on XLA:CPU it copies every
  layer's weights out of the stacked arrays, and every activation saved for the
  backward pass into stacked arrays, on each call: 11% of a SmolLM2-135M LoRA
  train step (benchmarks/bench_train_step.py --layer_loop), and a decode step's
  memory traffic doubles (generate.py slices once per call). Unrolled, each layer
  reads a static slice and the program holds L copies of the block, which costs
  compile time. "auto" unrolls on CPU and scans elsewhere, except under remat:
  XLA:CPU schedules an unrolled program's recomputation so early that the
  activations stay alive anyway (SmolLM2-135M LoRA gradient at 8 x 128: 2.57 GB of
  temporaries without remat, 2.39 GB with full remat unrolled, 0.17 GB scanned), so
  a differentiated forward with remat scans. `differentiated=False` (decoding, where
  remat does nothing) keeps the unrolled loop.
  """
  if cfg.layer_loop == "auto":
    if differentiated and remat_policy(cfg.remat) is not None:
      return False
    return jax.default_backend() == "cpu"
  return cfg.layer_loop == "unroll"


def unstack_layers(params: Params, num_layers: int) -> Params:
  """params with "layers" as a list of per-layer dicts (see `forward`)."""
  layers = params["layers"]
  if isinstance(layers, (list, tuple)):
    return params
  return {**params, "layers": [jax.tree.map(lambda a, i=i: a[i], layers)
                               for i in range(num_layers)]}


def unstack_shared(num_layers: int, *trees: Params) -> tuple[Params, ...]:
  """Each params tree with per-layer "layers" (see `forward`), outside jit. A stacked array
  that several trees share (the base kernels under unmerged LoRA) is split once and its
  slices shared, so the trees together still hold one copy of each weight."""
  memo: dict[int, tuple[jax.Array, list[jax.Array]]] = {}

  def split(a):
    if id(a) not in memo:  # the array rides along, so its id stays its own
      memo[id(a)] = (a, [a[i] for i in range(num_layers)])
    return memo[id(a)][1]

  is_split = lambda x: isinstance(x, list)
  out = []
  for tree in trees:
    if isinstance(tree["layers"], (list, tuple)):
      out.append(tree)
      continue
    per = jax.tree.map(split, tree["layers"])
    out.append({**tree, "layers": [jax.tree.map(lambda s, i=i: s[i], per, is_leaf=is_split)
                                   for i in range(num_layers)]})
  return tuple(out)


def unstack_cache(cache: dict[str, jax.Array], num_layers: int) -> dict[str, list[jax.Array]]:
  """A stacked cache {"k","v": [L, B, S, K, H]} as per-layer lists (see `forward`)."""
  return {name: [c[i] for i in range(num_layers)] for name, c in cache.items()}


def forward(params: Params, cfg: ModelConfig, input_ids_BxT: jax.Array | None = None, *,
            inputs_embeds_BxTxD: jax.Array | None = None,
            attention_mask_BxS: jax.Array | None = None,
            positions_BxT: jax.Array | None = None,
            segment_ids_BxT: jax.Array | None = None,
            cache: dict[str, jax.Array] | None = None,
            cache_index: jax.Array | int = 0,
            output_hidden_states: bool = False,
            compute_logits: bool = True) -> ModelOutput:
  """Runs the decoder.

  Without a cache, S == T and attention_mask_BxS marks real tokens (left or
  right padding). With a cache, the T new tokens are written at slots
  [cache_index, cache_index + T) and attention_mask_BxS marks every filled
  slot of the cache (the caller keeps it up to date). `segment_ids_BxT` (no cache) packs
  several sequences per row: a token attends only to earlier tokens of its own segment;
  pass their positions too (train/packing.py).

  `params["layers"]` may also be a list of per-layer dicts (with the cache,
  if any, as per-layer lists {"k","v": L x [B, S, K, H]}): the layers then run
  as a Python loop that reads each layer's weights and cache in place. CPU
  decoding passes that (generate.py) so the slicing happens once per call, not
  once per token. Stacked params run the same loop when `unrolls_layers(cfg)`,
  and a scan otherwise; the cache comes back in the layout it came in.
  """
  if (input_ids_BxT is None) == (inputs_embeds_BxTxD is None):
    raise ValueError("Pass exactly one of input_ids_BxT or inputs_embeds_BxTxD.")
  if segment_ids_BxT is not None and cache is not None:
    raise ValueError("segment_ids_BxT packs training rows; decoding with a cache takes none")
  x = embed(params, cfg, input_ids_BxT) if inputs_embeds_BxTxD is None else inputs_embeds_BxTxD
  x = x.astype(cfg.dtype)
  B, T, _ = x.shape
  restack_cache = False
  if not isinstance(params["layers"], (list, tuple)) and unrolls_layers(cfg):
    params = unstack_layers(params, cfg.num_layers)
    if cache is not None:
      cache = unstack_cache(cache, cfg.num_layers)
      restack_cache = True
  unstacked = isinstance(params["layers"], (list, tuple))
  S = T if cache is None else cache["k"][0].shape[1] if unstacked else cache["k"].shape[2]
  mask_BxS = (jnp.ones((B, S), bool) if attention_mask_BxS is None
              else attention_mask_BxS.astype(bool))
  if positions_BxT is None:  # positions count real tokens only, so left padding is harmless
    pos_BxS = jnp.maximum(jnp.cumsum(mask_BxS, axis=1) - 1, 0)
    positions_BxT = jax.lax.dynamic_slice_in_dim(pos_BxS, cache_index, T, axis=1)

  # Padding and packed segments are contiguous: within a sequence, slot distance == position
  # distance.
  q_slot_T = cache_index + jnp.arange(T)
  k_slot_S = jnp.arange(S)
  causal_TxS = k_slot_S[None, :] <= q_slot_T[:, None]
  glob_BxTxS = causal_TxS[None] & mask_BxS[:, None, :]
  if segment_ids_BxT is not None:
    seg_BxT = jnp.asarray(segment_ids_BxT)
    glob_BxTxS = glob_BxTxS & (seg_BxT[:, :, None] == seg_BxT[:, None, :])
  if cfg.sliding_window:
    near_TxS = (q_slot_T[:, None] - k_slot_S[None, :]) < cfg.sliding_window
    local_BxTxS = glob_BxTxS & near_TxS[None]
  else:
    local_BxTxS = glob_BxTxS
  bias = jnp.where(jnp.stack([glob_BxTxS, local_BxTxS]), 0.0, _NEG_INF).astype(jnp.float32)

  rope_g = rope_tables(positions_BxT, rope_inv_freq(cfg, cfg.rope_theta, cfg.rope_scaling_dict),
                       cfg.dtype)
  rope_l = (rope_tables(positions_BxT, rope_inv_freq(cfg, cfg.rope_local_theta, None), cfg.dtype)
            if cfg.rope_local_theta else None)
  sliding_L = jnp.asarray(cfg.sliding_layers)

  def body(x, xs):
    p, k_c, v_c, is_sliding = xs
    x, k_all, v_all = _block(cfg, p, x, k_c, v_c, bias, rope_g, rope_l, is_sliding, cache_index)
    new_kv = (k_all, v_all) if cache is not None else None
    return x, (new_kv, x if output_hidden_states else None)

  policy = remat_policy(cfg.remat)
  if policy is not None:
    body = jax.checkpoint(body, policy=policy)
  kc = None if cache is None else cache["k"]
  vc = None if cache is None else cache["v"]
  if unstacked:
    h, ys = x, []
    for i, p in enumerate(params["layers"]):
      h, y = body(h, (p, None if kc is None else kc[i], None if vc is None else vc[i],
                      cfg.sliding_layers[i]))
      ys.append(y)
    new_kv = None if cache is None else ([y[0][0] for y in ys], [y[0][1] for y in ys])
    layer_outs = jnp.stack([y[1] for y in ys]) if output_hidden_states else None
  else:
    h, (new_kv, layer_outs) = jax.lax.scan(body, x, (params["layers"], kc, vc, sliding_L))
  h_final = rms_norm(h, params["final_norm"]["scale"], cfg.rms_eps, cfg.norm_offset)

  hidden_states = None
  if output_hidden_states:  # embeddings, layer 1..L-1 outputs, final normed output
    hidden_states = jnp.concatenate([x[None], layer_outs[:-1], h_final[None]], axis=0)
  new_cache = None if cache is None else {"k": new_kv[0], "v": new_kv[1]}
  if restack_cache:
    new_cache = {k: jnp.stack(c) for k, c in new_cache.items()}
  logits = lm_head(params, cfg, h_final) if compute_logits else None
  return ModelOutput(logits, h_final, hidden_states, new_cache)
