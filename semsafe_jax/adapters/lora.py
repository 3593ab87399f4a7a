"""LoRA as a pure transform of the params dict: W' = W + (alpha / r) * a @ b.

The LoRA tree mirrors the params paths of the targeted (stacked) kernels, e.g.
`{"layers": {"attn": {"q_proj": {"a": [L, in, r], "b": [L, r, out]}}}}` adapts
`layers/attn/q_proj/kernel [L, in, out]`. Merging keeps the forward pass the
plain model, so every model feature (scan, cache, sharding) works unchanged.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

Params = dict[str, Any]

DEFAULT_TARGETS = ("q_proj", "v_proj")  # when a config leaves lora_targets unset

# Short names accepted in `lora_targets`; anything else is a regex over kernel paths.
SHORT_TARGETS = {
    "q_proj": r"layers/attn/q_proj/kernel",
    "k_proj": r"layers/attn/k_proj/kernel",
    "v_proj": r"layers/attn/v_proj/kernel",
    "o_proj": r"layers/attn/o_proj/kernel",
    "gate_proj": r"layers/mlp/gate_proj/kernel",
    "up_proj": r"layers/mlp/up_proj/kernel",
    "down_proj": r"layers/mlp/down_proj/kernel",
}


def flat_paths(tree: Params, prefix: str = "", sep: str = "/") -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf} (with sep="/")."""
  out = {}
  for k, v in tree.items():
    path = f"{prefix}{sep}{k}" if prefix else k
    if isinstance(v, dict):
      out.update(flat_paths(v, path, sep))
    else:
      out[path] = v
  return out


def set_path(tree: Params, path: str, value: Any) -> None:
  """tree['a']['b']['c'] = value for path 'a/b/c', creating the dicts on the way."""
  *parents, leaf = path.split("/")
  for p in parents:
    tree = tree.setdefault(p, {})
  tree[leaf] = value


def get_path(tree: Params, path: str) -> Any:
  """tree['a']['b']['c'] for path 'a/b/c'."""
  for part in path.split("/"):
    tree = tree[part]
  return tree


def nest_paths(flat: dict[str, Any]) -> Params:
  """The inverse of flat_paths: {'a/b/c': x} -> {'a': {'b': {'c': x}}}."""
  out: Params = {}
  for path, value in flat.items():
    set_path(out, path, value)
  return out


def adaptable_kernels(params: Params) -> list[str]:
  """Paths of the stacked layer kernels LoRA can target ([L, in, out])."""
  return sorted(p for p, v in flat_paths(params).items()
                if p.startswith("layers/") and p.endswith("/kernel") and len(v.shape) == 3)


def parse_targets(targets: str | Sequence[str]) -> list[str]:
  """Config value -> list of names/regexes. Items may be comma-separated strings, since
  a CLI override of the tuple field arrives as ("q_proj,v_proj",)."""
  if isinstance(targets, str):
    targets = [targets]
  return [t for item in targets for t in (s.strip() for s in item.split(",")) if t]


def resolve_targets(params: Params, targets: str | Sequence[str]) -> list[str]:
  """Kernel paths selected by short names and/or full-match regexes.

  Raises ValueError for a target that matches no adaptable kernel, so a typo
  never silently trains nothing.
  """
  kernels = adaptable_kernels(params)
  chosen: set[str] = set()
  for t in parse_targets(targets):
    pattern = SHORT_TARGETS.get(t, t)
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"LoRA target {t!r} is neither a known module name "
                       f"({', '.join(SHORT_TARGETS)}) nor a valid regex: {e}") from None
    hits = [k for k in kernels if rx.fullmatch(k)]
    if not hits:
      raise ValueError(
          f"LoRA target {t!r} matches no adaptable kernel. Known names: "
          f"{', '.join(SHORT_TARGETS)}; regexes must fully match one of: {', '.join(kernels)}")
    chosen.update(hits)
  return sorted(chosen)


def init_lora(params: Params, targets: str | Sequence[str], rank: int, key: jax.Array) -> Params:
  """a ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), b = 0.

  Only shapes of `params` are read, so it works on jax.ShapeDtypeStruct leaves.
  """
  if rank <= 0:
    raise ValueError(f"lora_rank must be positive, got {rank}")
  flat = flat_paths(params)
  paths = resolve_targets(params, targets)
  lora: Params = {}
  for k, path in zip(jax.random.split(key, len(paths)), paths):
    L, d_in, d_out = flat[path].shape
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(k, (L, d_in, rank), jnp.float32, -bound, bound)
    b = jnp.zeros((L, rank, d_out), jnp.float32)
    set_path(lora, path[: -len("/kernel")], {"a": a, "b": b})
  return lora


def lora_modules(lora: Params, prefix: str = "") -> dict[str, dict[str, jax.Array]]:
  """{'layers/attn/q_proj': {'a': ..., 'b': ...}} for every adapted module."""
  out = {}
  for k, v in lora.items():
    path = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict) and set(v) == {"a", "b"}:
      out[path] = v
    elif isinstance(v, dict):
      out.update(lora_modules(v, path))
  return out


def lora_delta(a_LxIxR: jax.Array, b_LxRxO: jax.Array, scale: float) -> jax.Array:
  return scale * jnp.einsum("lir,lro->lio", a_LxIxR.astype(jnp.float32),
                            b_LxRxO.astype(jnp.float32))


def apply_lora(params: Params, lora: Params, scale: float, *, dropout: float = 0.0,
               rng: jax.Array | None = None, merge: bool = True) -> Params:
  """Returns params with every adapted kernel replaced by W + scale * a @ b.

  merge=False instead puts `lora_a` = a and `lora_b` = scale * b beside the
  kernel, and the model computes x @ W + (x @ a) @ b. Training prefers that: it
  never forms W + a @ b nor its [in, out] gradient.

  A merged kernel cannot drop per-token inputs, so dropout (when rng is given)
  masks rows of `a` (input features) with one mask per step and layer: PEFT's
  input dropout with the mask shared across the batch's tokens. Both forms use
  this mask, so they compute the same function.
  """
  mods = lora_modules(lora)
  keys = (jax.random.split(rng, len(mods)) if (dropout > 0 and rng is not None)
          else [None] * len(mods))
  out = _copy_dicts(params)
  for key, (path, ab) in zip(keys, sorted(mods.items())):
    node = out
    for p in path.split("/"):
      node = node[p]
    a = ab["a"]
    if key is not None:  # drop a's input rows (one mask per step and layer), either form
      keep = jax.random.bernoulli(key, 1.0 - dropout, a.shape[:2] + (1,))
      a = jnp.where(keep, a / (1.0 - dropout), 0.0)
    if merge:
      w = node["kernel"]
      node["kernel"] = (w.astype(jnp.float32) + lora_delta(a, ab["b"], scale)).astype(w.dtype)
    else:
      node["lora_a"], node["lora_b"] = a, scale * ab["b"]
  return out


def _copy_dicts(tree: Params) -> Params:
  """Copies the dict structure (not the arrays) so callers' params stay untouched."""
  return {k: _copy_dicts(v) if isinstance(v, dict) else v for k, v in tree.items()}
