"""Fixtures shared by several test files.

Constants are imported by the tests (`from conftest import TINY`): pytest puts
tests/ on sys.path (no __init__.py), so this is the module pytest loaded.
"""

import os
import pathlib

import jax
import ml_collections
import numpy as np
import pytest

from semsafe_jax import adapters as A
from semsafe_jax.data import embed, loaders
from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig

# --- Tiny model (test_losses, test_losses_scorers) -----------------------------

V = 128
TINY = ModelConfig(family="llama", vocab_size=V, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
ACFG = ml_collections.ConfigDict(dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                      lora_targets=["q_proj", "v_proj"], embed_mlp=True,
                                      embed_mlp_hidden=32))


@pytest.fixture(scope="session")
def base():
  # One compiled init instead of one eager op per parameter shape; session
  # scope so the loss and scorer tests share it (nothing mutates the params).
  return jax.jit(transformer.init_params, static_argnums=0)(TINY, jax.random.key(0))


@pytest.fixture(scope="session")
def adapters(base):
  """Non-trivial adapters (so every adapter leaf has a gradient path).

  Numpy noise on top of init: no per-shape compiles.
  """
  rng = np.random.default_rng(2)
  ad = A.init_adapters(ACFG, TINY, base, jax.random.key(1))
  return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), ad)


@pytest.fixture(scope="module")
def fast_compile():
  """XLA at -O0, as semsafe_jax.main does for configs/tiny.py (compiles dominate a tiny
  model's time); the old setting is restored after the module."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


# --- Real prompts + SBERT embeddings (test_data_neighbors, test_data_splits) ---

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
XSTEST = SHARED / "xstest" / "xstest_prompts.csv"
# Public data sets live in ../shared/data beside the repository, which a clean clone lacks:
# tests that read them skip without it, saying so. SEMSAFE_REQUIRE_SHARED=1 (.ci/run sets it
# when ../shared exists) turns every such skip into a failure.
REQUIRE_SHARED_ENV = "SEMSAFE_REQUIRE_SHARED"
SHARED_REQUIRED = os.environ.get(REQUIRE_SHARED_ENV) == "1"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir() and not SHARED_REQUIRED,
    reason=f"needs ../shared/data (the shared data folder beside the repository); absent, "
           f"and {REQUIRE_SHARED_ENV} is not 1")


def shared_file(*parts: str) -> pathlib.Path:
  """The path of ../shared/data/<parts>; skips the test when it is absent (fails instead
  under SEMSAFE_REQUIRE_SHARED=1)."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    msg = f"needs ../shared/data/{'/'.join(parts)} (the shared data folder beside the repository)"
    if SHARED_REQUIRED:
      pytest.fail(f"{msg}: missing, and {REQUIRE_SHARED_ENV}=1")
    pytest.skip(f"{msg}: absent")
  return path


@pytest.fixture(scope="session")
def real_data(tmp_path_factory):
  """Built-in prompts (+ XSTest when the shared folder exists) and their SBERT embeddings.

  Same sources and session cache dir as test_data_pipeline, so the session
  encodes them once (the on-disk cache is keyed by model + exact texts).
  """
  sources = ["builtin"] + ([f"xstest:{XSTEST}"] if XSTEST.is_file() else [])
  prompts, _ = loaders.load_sources(sources)
  emb = embed.embed_texts([p.text for p in prompts],
                          cache_dir=tmp_path_factory.getbasetemp() / "sbert_cache")
  return prompts, emb
