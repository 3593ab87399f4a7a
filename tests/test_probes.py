"""Safety probe: per-layer logistic probes, report files, pair weights and flags."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsafe_jax.models import transformer
from semsafe_jax.models.config import ModelConfig
from semsafe_jax.probes import safety as P

V = 128
TINY = ModelConfig(family="llama", vocab_size=V, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def synthetic_layers(n=80, d=16, seed=0):
  """Layer 0: noise; layer 1: weak signal; layer 2: clean signal."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n).astype(np.float32)
  signal = (2 * y - 1)[:, None] * np.eye(d)[0]
  feats = np.stack([rng.normal(size=(n, d)),
                    rng.normal(size=(n, d)) * 3 + 0.7 * signal,
                    rng.normal(size=(n, d)) + 3 * signal]).astype(np.float32)
  return feats * 5 + 2, y  # scale/offset: probes standardise


def test_layer_probes_vectorised():
  f_tr, y_tr = synthetic_layers()
  f_ho, y_ho = synthetic_layers(seed=1)
  probes = P.train_layer_probes(f_tr, y_tr, steps=200)
  assert probes["w"].shape == (3, 16) and probes["b"].shape == (3,)
  acc = P.probe_accuracy(probes, f_ho, y_ho)
  assert acc[2] > 0.95 and acc[0] < 0.75 and acc[2] > acc[1] > acc[0] - 0.1
  # vmap over layers == training each layer on its own.
  alone = P.train_layer_probes(f_tr[2:], y_tr, steps=200)
  np.testing.assert_allclose(alone["w"][0], probes["w"][2], rtol=1e-4, atol=1e-5)
  probs = P.probe_probs(probes, f_ho)
  assert probs.shape == (3, 80) and np.all((probs >= 0) & (probs <= 1))


def test_class_balance():
  f, y = synthetic_layers(n=120)
  keep = (y == 1) | (np.arange(120) % 4 == 0)  # ~4:1 harmful:benign
  probes = P.train_layer_probes(f[:, keep], y[keep], steps=200)
  pred = P.probe_probs(probes, f)[2] > 0.5
  assert (pred[y == 0] == 0).mean() > 0.9  # the minority class is still recognised


def prompts(n, seed, harmful):
  """Token ids from disjoint ranges stand in for harmful vs benign prompts."""
  rng = np.random.default_rng(seed)
  lo, hi = (3, 30) if harmful else (70, 110)
  ids = np.zeros((n, 10), np.int32)
  mask = np.zeros((n, 10), bool)
  for i in range(n):
    t = rng.integers(5, 11)
    ids[i, :t] = rng.integers(lo, hi, t)
    mask[i, :t] = True
  return ids, mask


def split(seed, n=12):
  hi, hm = prompts(n, seed, True)
  bi, bm = prompts(n, seed + 100, False)
  return (np.concatenate([hi, bi]), np.concatenate([hm, bm]),
          np.r_[np.ones(n), np.zeros(n)].astype(np.float32))


def test_fit_safety_probe_end_to_end(tmp_path):
  base = jax.jit(transformer.init_params, static_argnums=0)(TINY, jax.random.key(0))
  train, heldout = split(0), split(1)
  cfg = {"steps": 150, "lr": 0.05, "l2": 1e-3, "batch_size": 16, "layer": "best"}
  res = P.fit_safety_probe(base, TINY, train, heldout, str(tmp_path), probe_cfg=cfg)
  L1 = TINY.num_layers + 1
  assert res["train_acc"].shape == res["heldout_acc"].shape == (L1,)
  best = res["best_layer"]
  assert res["heldout_acc"][best] == res["heldout_acc"].max() >= 0.9
  # Files: markdown table, PNG plot, probe arrays and metadata.
  md = open(tmp_path / "safety_probe.md", encoding="utf-8").read()
  assert "| layer | train acc | held-out acc |" in md and "(best)" in md
  assert md.count("\n| ") == L1 + 1
  with open(tmp_path / "safety_probe.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  meta = json.load(open(tmp_path / "safety_probe.json", encoding="utf-8"))
  assert meta["layer"] == meta["best_layer"] == best and len(meta["heldout_acc"]) == L1
  loaded = P.load_probe(str(tmp_path))
  assert int(loaded["layer"]) == best
  for k in ("w", "b", "mu", "sd"):
    np.testing.assert_array_equal(loaded[k], res["probe"][k])
  # Scoring prompts with the saved probe reproduces the held-out predictions.
  p = P.score_prompts(base, TINY, loaded, heldout[0], heldout[1], batch_size=16)
  assert p.shape == (24,)
  assert ((p > 0.5) == (heldout[2] > 0.5)).mean() == res["heldout_acc"][best]
  # A fixed layer from the config is honoured.
  res = P.fit_safety_probe(base, TINY, train, heldout, str(tmp_path / "fixed"),
                           probe_cfg=dict(cfg, layer=-1))
  assert res["best_layer"] == L1 - 1 and int(res["probe"]["layer"]) == L1 - 1


def test_pooled_hidden_states_masking():
  base = jax.jit(transformer.init_params, static_argnums=0)(TINY, jax.random.key(0))
  ids, mask = prompts(5, 0, True)
  f = P.pooled_hidden_states(base, TINY, ids, mask, batch_size=4)  # 2 batches, last padded
  assert f.shape == (TINY.num_layers + 1, 5, TINY.hidden_size)
  out = transformer.forward(base, TINY, ids[:1, :int(mask[0].sum())], output_hidden_states=True)
  np.testing.assert_allclose(f[:, 0], out.hidden_states[:, 0].mean(1), rtol=1e-5, atol=1e-6)
  # Padding tokens (any id) do not change the pooled features.
  ids2 = np.where(mask, ids, 77)
  np.testing.assert_allclose(P.pooled_hidden_states(base, TINY, ids2, mask, batch_size=4), f,
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("xp", [np, jnp])
def test_pair_weights_and_flags(xp):
  prob = xp.asarray([0.9, 0.5, 0.1, 0.7])
  pairs = xp.asarray([[0, 1], [2, 3], [1, 1]])
  w = P.probe_pair_weights(prob, pairs, xp.asarray([1.0, 0.5, 2.0]))
  np.testing.assert_allclose(np.asarray(w), [0.7, 0.2, 1.0], rtol=1e-6)
  flags, hw = P.flag_unlabeled(prob, threshold=0.6)
  np.testing.assert_array_equal(np.asarray(flags), [True, False, False, True])
  np.testing.assert_allclose(np.asarray(hw), [0.9, 0.0, 0.0, 0.7], rtol=1e-6)
  assert isinstance(w, jax.Array) == (xp is jnp)


class WordLenTokenizer:
  pad_token_id = 0

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [3 + len(w) for w in text.split()]


def test_encode_prompts_keeps_the_end():
  tok = WordLenTokenizer()
  ids, mask = P.encode_prompts(tok, ["a bb ccc", "dddd"], max_len=4, chat=False)
  np.testing.assert_array_equal(ids, [[4, 5, 6, 0], [7, 0, 0, 0]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 0, 0, 0]])
  ids, mask = P.encode_prompts(tok, ["a bb ccc dddd"], max_len=3, chat=False)
  np.testing.assert_array_equal(ids, [[5, 6, 7]])  # truncated on the left
