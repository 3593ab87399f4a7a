"""methods/contrastive.py: lora_sft's loss plus InfoNCE on pooled final hidden states,
against a direct computation."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import TINY, V
from semsafe_jax import adapters as A
from semsafe_jax.methods import contrastive as C
from semsafe_jax.methods import lora_sft
from semsafe_jax.methods.base import Pairs, SafetyBatch, Tokens
from semsafe_jax.models import transformer

ACFG = ml_collections.ConfigDict(dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                      embed_mlp=False, lora_targets=["q_proj", "v_proj"]))


def tokens(lengths, L, seed):
  """Right-padded rows of (prompt_len, response_len)."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  ids = np.zeros((B, L), np.int32)
  mask, tmask = np.zeros((B, L), bool), np.zeros((B, L), bool)
  for b, (p, r) in enumerate(lengths):
    ids[b, :p + r] = rng.integers(3, V, p + r)
    mask[b, :p + r] = True
    tmask[b, p:p + r] = True
  return Tokens(ids=ids, mask=mask, target_mask=tmask,
                prompt_end=np.array([p - 1 for p, _ in lengths], np.int32),
                weight=np.ones(B, np.float32))


def batch():
  return SafetyBatch(harm=tokens([(4, 3), (6, 2), (3, 4), (5, 3)], 10, 0),
                     benign=tokens([(3, 4), (5, 2)], 8, 1),
                     pairs=Pairs(index=np.array([[0, 1], [2, 3], [0, 0]], np.int32),
                                 weight=np.array([0.8, 0.9, 0.0], np.float32),
                                 valid=np.array([True, True, False])))


@pytest.fixture(scope="module")
def lora(base):
  rng = np.random.default_rng(3)
  ad = A.init_adapters(ACFG, TINY, base, jax.random.key(1))
  return jax.tree.map(lambda x: x + 0.3 * rng.standard_normal(x.shape, np.float32), ad)


def run(trainable, base, b, w=0.5, t=0.2):
  return C.loss(trainable, {"base": base}, b, None, model_cfg=TINY, adapter_cfg=ACFG,
                n_max=1 << 30, temperature=t, w_contrastive=w)


def pooled(params, t):
  """Final hidden state averaged over the prompt tokens, unit rows (numpy)."""
  out = transformer.forward(params, TINY, t.ids, attention_mask_BxS=t.mask,
                            compute_logits=False)
  h = np.asarray(out.hidden, np.float64)
  z = np.stack([h[b, :t.prompt_end[b] + 1].mean(0) for b in range(len(h))])
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def test_loss_is_sft_plus_weighted_info_nce(base, lora):
  b, w, temp = batch(), 0.5, 0.2
  total, m = run(lora, base, b, w, temp)
  sft, sft_m = lora_sft.loss(lora, {"base": base}, b, None, model_cfg=TINY, adapter_cfg=ACFG,
                             n_max=1 << 30)
  merged = A.apply_adapters(base, lora, ACFG)
  z = np.concatenate([pooled(merged, b.harm), pooled(merged, b.benign)])
  s = z @ z.T / temp

  def nll(a, p):
    others = [k for k in range(len(z)) if k != a]
    return -(s[a, p] - np.log(np.exp(s[a, others]).sum()))

  want_con = np.mean([0.5 * (nll(0, 1) + nll(1, 0)), 0.5 * (nll(2, 3) + nll(3, 2))])
  np.testing.assert_allclose(float(m["l_contrastive"]), want_con, rtol=2e-4)
  np.testing.assert_allclose(float(m["l_sft"]), float(sft), rtol=1e-5)
  np.testing.assert_allclose(float(m["l_safety"]), float(sft_m["l_safety"]), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(sft) + w * want_con, rtol=2e-4)
  assert float(m["pairs_valid"]) == 2.0
  # w = 0 is lora_sft.
  np.testing.assert_allclose(float(run(lora, base, b, 0.0)[0]), float(sft), rtol=1e-6)


def test_jit_matches_eager_and_grads_are_finite(base, lora):
  b = batch()
  eager = run(lora, base, b)[0]
  f = jax.jit(jax.value_and_grad(lambda tr, bb: run(tr, base, bb)[0]))
  val, g = f(lora, b)
  np.testing.assert_allclose(float(val), float(eager), rtol=1e-5)
  leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
  assert all(np.isfinite(x).all() for x in leaves) and any(np.abs(x).sum() > 0 for x in leaves)
