"""Checkpoint tensor names -> our param paths, one table per model family.

Each table row is `(checkpoint name, our param path, transform)`. `{i}` in a
name stands for the layer index; rows whose path has a `layers/` prefix are
stacked on a leading layer axis. Transforms:
  "linear": a torch `Linear.weight` [out, in] -> our kernel [in, out].
  "copy":   stored as is (embeddings, norm scales, biases).

GGUF files are read through a second table that renames llama.cpp tensor
names to transformers names (plus the few value fixes llama.cpp applies when
converting), so both formats share the per-family tables.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

LINEAR, COPY = "linear", "copy"
Row = tuple[str, str, str]

# --- transformers (safetensors / .bin) names --------------------------------

_EMBED_AND_HEAD: tuple[Row, ...] = (
    ("model.embed_tokens.weight", "embed/embedding", COPY),
    ("model.norm.weight", "final_norm/scale", COPY),
    ("lm_head.weight", "lm_head/kernel", LINEAR),
)


def _projections(bias: bool) -> tuple[Row, ...]:
  rows = []
  for sub, ours, names in (("self_attn", "attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                           ("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"))):
    for n in names:
      rows.append((f"model.layers.{{i}}.{sub}.{n}.weight", f"layers/{ours}/{n}/kernel", LINEAR))
      if bias:  # present only when the config enables it (checked against param_specs)
        rows.append((f"model.layers.{{i}}.{sub}.{n}.bias", f"layers/{ours}/{n}/bias", COPY))
  return tuple(rows)


_PRE_NORMS: tuple[Row, ...] = (
    ("model.layers.{i}.input_layernorm.weight", "layers/pre_attn_norm/scale", COPY),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/pre_mlp_norm/scale", COPY),
)
_QK_NORM: tuple[Row, ...] = (
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/attn/q_norm/scale", COPY),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/attn/k_norm/scale", COPY),
)
_GEMMA3_NORMS: tuple[Row, ...] = (
    ("model.layers.{i}.input_layernorm.weight", "layers/pre_attn_norm/scale", COPY),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/post_attn_norm/scale", COPY),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers/pre_mlp_norm/scale", COPY),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers/post_mlp_norm/scale", COPY),
)

HF_TABLES: dict[str, tuple[Row, ...]] = {
    "llama": _EMBED_AND_HEAD + _projections(bias=True) + _PRE_NORMS,
    "mistral": _EMBED_AND_HEAD + _projections(bias=True) + _PRE_NORMS,
    "qwen2": _EMBED_AND_HEAD + _projections(bias=True) + _PRE_NORMS,
    "qwen3": _EMBED_AND_HEAD + _projections(bias=True) + _PRE_NORMS + _QK_NORM,
    "gemma3": _EMBED_AND_HEAD + _projections(bias=True) + _GEMMA3_NORMS + _QK_NORM,
}
SUPPORTED_FAMILIES = tuple(HF_TABLES)

# Prefixes of wrapper models whose text decoder we load (e.g. Gemma 3 multimodal).
_PREFIX_REWRITES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head."))
# Tensors that carry no information we need (buffers, other towers of a wrapper).
_IGNORED = re.compile(r"(.*rotary_emb\.inv_freq$)|(^(model\.)?vision_tower\.)|"
                      r"(^(model\.)?multi_modal_projector\.)")


def canonical_hf_name(name: str) -> str:
  for old, new in _PREFIX_REWRITES:
    if name.startswith(old):
      return new + name[len(old):]
  return name


def is_ignored(name: str) -> bool:
  return bool(_IGNORED.match(name))


class NameMapper:
  """Maps one family's checkpoint names to (param path, layer index, transform)."""

  def __init__(self, family: str):
    if family not in HF_TABLES:
      raise ValueError(f"Unsupported family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}.")
    self._exact: dict[str, tuple[str, str]] = {}
    self._layered: list[tuple[re.Pattern, str, str]] = []
    for name, path, transform in HF_TABLES[family]:
      if "{i}" in name:
        pat = re.escape(name).replace(re.escape("{i}"), r"(\d+)")
        self._layered.append((re.compile(pat + "$"), path, transform))
      else:
        self._exact[name] = (path, transform)

  def __call__(self, name: str) -> tuple[str, int | None, str] | None:
    name = canonical_hf_name(name)
    if name in self._exact:
      path, transform = self._exact[name]
      return path, None, transform
    for pat, path, transform in self._layered:
      m = pat.match(name)
      if m:
        return path, int(m.group(1)), transform
    return None


# --- GGUF (llama.cpp) names --------------------------------------------------

# llama.cpp name -> transformers name, shared by the GGUF architectures we read.
_GGUF_COMMON = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_output.bias": "model.layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
}
_GGUF_PRE_NORM = {"blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight"}
_GGUF_GEMMA3 = {
    "blk.{i}.post_attention_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.pre_feedforward_layernorm.weight",
    "blk.{i}.post_ffw_norm.weight": "model.layers.{i}.post_feedforward_layernorm.weight",
}
GGUF_TABLES: dict[str, dict[str, str]] = {
    "llama": {**_GGUF_COMMON, **_GGUF_PRE_NORM},
    "qwen2": {**_GGUF_COMMON, **_GGUF_PRE_NORM},
    "qwen3": {**_GGUF_COMMON, **_GGUF_PRE_NORM},
    "gemma3": {**_GGUF_COMMON, **_GGUF_GEMMA3},
}


def gguf_to_hf_name(arch: str, name: str) -> str | None:
  m = re.match(r"blk\.(\d+)\.(.*)$", name)
  key = f"blk.{{i}}.{m.group(2)}" if m else name
  hf = GGUF_TABLES[arch].get(key)
  if hf is None:
    return None
  return hf.replace("{i}", m.group(1)) if m else hf


def unpermute_rope(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's q/k row permutation for llama-architecture GGUFs.

  llama.cpp interleaves the two rotary halves of every head ("rotate pairs");
  transformers uses "rotate half". Same inverse as transformers' GGUF loader.
  """
  half = w_OxI.shape[0] // n_heads // 2
  w = w_OxI.reshape(n_heads, half, 2, *w_OxI.shape[1:])
  return w.swapaxes(1, 2).reshape(w_OxI.shape)


def gguf_value_fix(arch: str, hf_cfg: dict,
                   gguf_name: str) -> Callable[[np.ndarray], np.ndarray] | None:
  """The inverse of the value change llama.cpp made to this tensor, if any."""
  if arch == "llama" and ".attn_q." in gguf_name:
    return lambda w: unpermute_rope(w, hf_cfg["num_attention_heads"])
  if arch == "llama" and ".attn_k." in gguf_name:
    return lambda w: unpermute_rope(w, hf_cfg["num_key_value_heads"])
  if arch == "gemma3" and gguf_name.endswith("norm.weight"):
    return lambda w: w - 1.0  # llama.cpp bakes Gemma's (1 + w) into the stored scale
  return None
