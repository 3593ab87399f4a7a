"""methods/circuit_breakers.py: target layers and the loss against direct computations."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import TINY, V
from semsafe_jax import adapters as A
from semsafe_jax.methods import circuit_breakers as CB
from semsafe_jax.methods.base import Tokens
from semsafe_jax.models import transformer

ACFG = ml_collections.ConfigDict(dict(
    lora_rank=4, lora_alpha=8.0, lora_dropout=0.0, embed_mlp=False,
    lora_targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def method_cfg(**kw):
  c = ml_collections.ConfigDict(dict(target_layers=(), target_depths=(10 / 32, 20 / 32)))
  c.update(kw)
  return c


@pytest.mark.parametrize("num_layers,want", [(32, (10, 20)), (30, (9, 19)), (2, (1,)),
                                             (1, (1,))])
def test_default_target_layers_scale_with_depth(num_layers, want):
  assert CB.target_layers(method_cfg(), num_layers) == want


def test_explicit_target_layers_and_errors():
  assert CB.target_layers(method_cfg(target_layers=(3, -1, 3)), 4) == (3, 4)
  with pytest.raises(ValueError, match=r"method.target_layers=\[0\]; 0 is out of range: use 1..4"):
    CB.target_layers(method_cfg(target_layers=(0,)), 4)
  with pytest.raises(ValueError, match="method.target_layers"):
    CB.target_layers(method_cfg(target_layers=(5,)), 4)
  with pytest.raises(ValueError, match=r"method.target_depths=\[1.5\]"):
    CB.target_layers(method_cfg(target_depths=(1.5,)), 4)


def tokens(lengths, L, seed, weight=None):
  """Right-padded rows of (prompt_len, response_len)."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  ids = np.zeros((B, L), np.int32)
  mask = np.zeros((B, L), bool)
  tmask = np.zeros((B, L), bool)
  for b, (p, r) in enumerate(lengths):
    ids[b, :p + r] = rng.integers(3, V, p + r)
    mask[b, :p + r] = True
    tmask[b, p:p + r] = True
  w = np.ones(B, np.float32) if weight is None else np.asarray(weight, np.float32)
  return Tokens(ids=ids, mask=mask, target_mask=tmask,
                prompt_end=np.array([p - 1 for p, _ in lengths], np.int32), weight=w)


def batch(step):
  return CB.ReroutingBatch(harm=tokens([(4, 5), (6, 2), (3, 6)], 10, 0, [1.0, 0.5, 1.0]),
                           retain=tokens([(3, 4), (5, 3)], 8, 1), step=np.int32(step))


def run_loss(trainable, base, b, **kw):
  kw = dict(dict(layers=(1,), total_steps=10, alpha=10.0, reroute_tokens="all"), **kw)
  return CB.loss(trainable, {"base": base}, b, None, model_cfg=TINY, adapter_cfg=ACFG, **kw)


def test_fresh_lora_gives_full_rerouting_and_zero_retain(base):
  # B = 0 at init: adapted == frozen, so cos = 1 everywhere and the distance is 0.
  fresh = A.init_adapters(ACFG, TINY, base, jax.random.key(1))
  total, m = run_loss(fresh, base, batch(step=5))
  np.testing.assert_allclose([float(m["c_rerouting"]), float(m["c_retain"])], [7.5, 2.5])
  np.testing.assert_allclose(float(m["l_rerouting"]), 1.0, rtol=1e-5)
  assert float(m["l_retain"]) == 0.0
  np.testing.assert_allclose(float(total), 7.5, rtol=1e-5)
  grads = jax.grad(lambda t: run_loss(t, base, batch(step=5))[0])(fresh)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.fixture(scope="module")
def lora(base):
  rng = np.random.default_rng(3)
  ad = A.init_adapters(ACFG, TINY, base, jax.random.key(1))
  return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), ad)


def _np_states(params, t):
  out = transformer.forward(params, TINY, t.ids, attention_mask_BxS=t.mask,
                            output_hidden_states=True, compute_logits=False)
  return np.asarray(out.hidden_states, np.float64)


@pytest.mark.parametrize("reroute_tokens", ["all", "response"])
def test_loss_matches_direct_computation(base, lora, reroute_tokens):
  b = batch(step=3)
  layers = (1, 2)
  total, m = run_loss(lora, base, b, layers=layers, reroute_tokens=reroute_tokens)

  merged = A.apply_adapters(base, lora, ACFG)
  ha, hf = _np_states(merged, b.harm)[list(layers)], _np_states(base, b.harm)[list(layers)]
  cos = (ha * hf).sum(-1) / (np.linalg.norm(ha, axis=-1) * np.linalg.norm(hf, axis=-1))
  tok = b.harm.target_mask if reroute_tokens == "response" else b.harm.mask
  w = np.broadcast_to(tok * b.harm.weight[:, None], cos.shape)
  want_reroute = (np.maximum(cos, 0) * w).sum() / w.sum()

  ra, rf = _np_states(merged, b.retain), _np_states(base, b.retain)
  dist = np.linalg.norm(ra - rf, axis=-1)  # [L+1, B, T]: every layer
  rm = np.broadcast_to(b.retain.mask, dist.shape)
  want_retain = (dist * rm).sum() / rm.sum()

  c_s, c_r = 10.0 * (1 - 3 / 20), 10.0 * 3 / 20
  np.testing.assert_allclose(float(m["l_rerouting"]), want_reroute, rtol=2e-4)
  np.testing.assert_allclose(float(m["l_retain"]), want_retain, rtol=2e-4)
  np.testing.assert_allclose(float(total), c_s * want_reroute + c_r * want_retain, rtol=2e-4)
  assert 0.0 < want_reroute < 1.0 and want_retain > 0.0  # the adapters do move the states


def test_jit_matches_eager(base, lora):
  b = batch(step=7)
  eager = run_loss(lora, base, b)[0]
  jitted = jax.jit(lambda t, bb: run_loss(t, base, bb)[0])(lora, b)
  np.testing.assert_allclose(float(jitted), float(eager), rtol=1e-5)
