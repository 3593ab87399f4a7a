"""ModelConfig: one dataclass covers every supported decoder family.

Built from a checkpoint's `config.json` (see `from_hf_dict`) or from GGUF
metadata (see `loading.py`, which converts that metadata to the same dict).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")
LAYER_LOOPS = ("auto", "scan", "unroll")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  family: str  # llama | mistral | qwen2 | qwen3 | gemma3
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_eps: float = 1e-6
  # Gemma stores RMSNorm scales as (w - 1): the norm multiplies by (offset + w).
  norm_offset: float = 0.0
  rope_theta: float = 10000.0
  rope_scaling: tuple[tuple[str, Any], ...] | None = None  # frozen dict of HF rope params
  rope_local_theta: float | None = None  # Gemma 3 sliding layers use their own base
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over head_dim on q and k
  sandwich_norm: bool = False  # Gemma 3: extra norms after attention and MLP
  act: str = "silu"  # silu | gelu_tanh
  embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
  query_scale: float | None = None  # default head_dim**-0.5
  sliding_window: int | None = None
  layer_is_sliding: tuple[bool, ...] | None = None  # per layer; None = all global
  tie_word_embeddings: bool = False
  final_logit_softcap: float | None = None
  # Runtime choices (not part of the checkpoint).
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: bool | str = False  # off | full (True) | dots; see transformer.remat_policy
  layer_loop: str = "auto"  # auto | scan | unroll; see transformer.unrolls_layers

  def __post_init__(self):
    if self.layer_loop not in LAYER_LOOPS:
      raise ValueError(f"model.layer_loop={self.layer_loop!r}; expected one of {LAYER_LOOPS}")

  @property
  def attn_scale(self) -> float:
    return self.query_scale if self.query_scale is not None else self.head_dim**-0.5

  @property
  def sliding_layers(self) -> tuple[bool, ...]:
    if self.layer_is_sliding is None:
      return (self.sliding_window is not None,) * self.num_layers
    return self.layer_is_sliding

  @property
  def rope_scaling_dict(self) -> dict[str, Any] | None:
    return dict(self.rope_scaling) if self.rope_scaling else None

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def _rope_params(d: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
  """Rope settings in either the transformers v4 or v5 layout."""
  rp = d.get("rope_parameters")
  if isinstance(rp, dict):
    if layer_type and layer_type in rp:
      return dict(rp[layer_type])
    if "rope_type" in rp or "rope_theta" in rp:
      return dict(rp)
  out = dict(d.get("rope_scaling") or {})
  if "type" in out and "rope_type" not in out:
    out["rope_type"] = out.pop("type")
  out.setdefault("rope_theta", d.get("rope_theta", 10000.0))
  return out


def _freeze_scaling(rp: dict[str, Any]) -> tuple[tuple[str, Any], ...] | None:
  kind = rp.get("rope_type", "default")
  if kind in (None, "default"):
    return None
  if kind not in ("llama3", "linear"):
    raise ValueError(f"Unsupported rope_type {kind!r}; supported: default, linear, llama3.")
  return tuple(sorted((k, v) for k, v in rp.items() if k != "rope_theta"))


def from_hf_dict(d: dict[str, Any], **runtime) -> ModelConfig:
  """Maps a transformers `config.json` dict to ModelConfig."""
  model_type = d.get("model_type")
  if model_type == "gemma3":  # multimodal wrapper: the text tower is what we run
    d = {**d["text_config"], "model_type": "gemma3_text"}
    model_type = "gemma3_text"
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise ValueError(
        f"Unsupported model_type {model_type!r}. Supported: {', '.join(SUPPORTED_MODEL_TYPES)}.")
  n_heads = d["num_attention_heads"]
  common = dict(
      vocab_size=d["vocab_size"],
      hidden_size=d["hidden_size"],
      intermediate_size=d["intermediate_size"],
      num_layers=d["num_hidden_layers"],
      num_heads=n_heads,
      num_kv_heads=d.get("num_key_value_heads") or n_heads,
      head_dim=d.get("head_dim") or d["hidden_size"] // n_heads,
      rms_eps=d.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
      **runtime,
  )
  if model_type == "gemma3_text":
    layer_types = d.get("layer_types")
    if layer_types is None:  # older configs: every Nth layer is global
      pattern = d.get("sliding_window_pattern", 6)
      layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                     for i in range(d["num_hidden_layers"])]
    glob = _rope_params(d, "full_attention")
    local = _rope_params(d, "sliding_attention")
    local_theta = local.get("rope_theta", d.get("rope_local_base_freq", 10000.0))
    if "rope_parameters" not in d:
      local_theta = d.get("rope_local_base_freq", 10000.0)
    return ModelConfig(
        family="gemma3", norm_offset=1.0, qk_norm=True, sandwich_norm=True, act="gelu_tanh",
        embed_scale=math.sqrt(d["hidden_size"]),
        query_scale=d.get("query_pre_attn_scalar", common["head_dim"]) ** -0.5,
        rope_theta=glob.get("rope_theta", 1_000_000.0), rope_scaling=_freeze_scaling(glob),
        rope_local_theta=local_theta,
        sliding_window=d.get("sliding_window"),
        layer_is_sliding=tuple(t == "sliding_attention" for t in layer_types),
        qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
        final_logit_softcap=d.get("final_logit_softcapping"),
        **{**common, "tie_word_embeddings": bool(d.get("tie_word_embeddings", True))})
  rp = _rope_params(d)
  rope = dict(rope_theta=rp.get("rope_theta", 10000.0), rope_scaling=_freeze_scaling(rp))
  if model_type in ("llama", "mistral"):
    bias = bool(d.get("attention_bias", False))
    window = d.get("sliding_window") if model_type == "mistral" else None
    return ModelConfig(family=model_type, qkv_bias=bias, o_bias=bias,
                       mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=window,
                       **rope, **common)
  # Qwen2/3: sliding only when use_sliding_window; saved layer_types win over max_window_layers.
  window = d.get("sliding_window") if d.get("use_sliding_window") else None
  sliding = None
  if window is not None:
    layer_types = d.get("layer_types")
    if layer_types is None:
      max_window_layers = d.get("max_window_layers", common["num_layers"])
      layer_types = ["sliding_attention" if i >= max_window_layers else "full_attention"
                     for i in range(common["num_layers"])]
    sliding = tuple(t == "sliding_attention" for t in layer_types)
  if model_type == "qwen2":
    return ModelConfig(family="qwen2", qkv_bias=True, sliding_window=window,
                       layer_is_sliding=sliding, **rope, **common)
  # qwen3
  bias = bool(d.get("attention_bias", False))
  return ModelConfig(family="qwen3", qk_norm=True, qkv_bias=bias, o_bias=bias,
                     sliding_window=window, layer_is_sliding=sliding, **rope, **common)
