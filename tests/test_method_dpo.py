"""methods/dpo.py: the DPO loss on the tiny model against hand computations."""

import math
import types

import jax
import ml_collections
import numpy as np
import pytest

from conftest import TINY, V
from semsafe_jax import adapters as A
from semsafe_jax.methods import dpo
from semsafe_jax.methods.base import Tokens
from semsafe_jax.models import transformer
from semsafe_jax.train import inputs

# Ours' LoRA placement at test size, no embedding MLP (as configs/methods/dpo.py).
ACFG = ml_collections.ConfigDict(dict(lora_rank=4, lora_alpha=8.0, lora_dropout=0.0,
                                      lora_targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"],
                                      embed_mlp=False, embed_mlp_hidden=32))
BETA = 0.1
L = 12


def tokens(lengths, seed, prompt_ids=None):
  """Right-padded rows of (prompt_len, response_len); prompt tokens reused when given."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  ids = np.zeros((B, L), np.int32)
  mask = np.zeros((B, L), bool)
  tmask = np.zeros((B, L), bool)
  for b, (p, t) in enumerate(lengths):
    ids[b, :p + t] = rng.integers(3, V, p + t)
    if prompt_ids is not None:
      ids[b, :p] = prompt_ids[b, :p]
    mask[b, :p + t] = True
    tmask[b, p:p + t] = True
  return Tokens(ids=ids, mask=mask, target_mask=tmask,
                prompt_end=np.array([p - 1 for p, _ in lengths], np.int32),
                weight=np.ones(B, np.float32))


def make_batch(base, weight=(1.0, 1.0, 0.5, 1.0), margin=(0.0, 0.0, 0.0, 0.0)):
  """Four pairs, the reference log-probabilities from the base model as prepare computes them."""
  prompts = [5, 6, 4, 7]
  chosen = tokens([(p, t) for p, t in zip(prompts, [4, 3, 5, 2])], 0)
  rejected = tokens([(p, t) for p, t in zip(prompts, [5, 2, 3, 4])], 1, chosen.ids)
  w = np.asarray(weight, np.float32)
  ref = lambda t: np.asarray(dpo.row_logprobs(base, TINY, t, n_max=8))
  return dpo.PreferenceBatch(chosen=chosen.replace(weight=w), rejected=rejected.replace(weight=w),
                             weight=w, margin=np.asarray(margin, np.float32),
                             harmful=np.array([True, True, False, False]),
                             ref_chosen=ref(chosen), ref_rejected=ref(rejected))


def _loss(trainable, base, batch):
  return dpo.loss(trainable, {"base": base}, batch, None, model_cfg=TINY, adapter_cfg=ACFG,
                  beta=BETA, n_max=8)


_LOSS_JIT = jax.jit(_loss)  # one compile for every test here (same shapes)


def run(trainable, base, batch, jit=True):
  return (_LOSS_JIT if jit else _loss)(trainable, base, batch)


def fresh_adapters(base):
  return A.init_adapters(ACFG, TINY, base, jax.random.key(1))


def trained_adapters(base):
  rng = np.random.default_rng(2)
  return jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32),
                      fresh_adapters(base))


def seq_logp(logits, t: Tokens):
  """[B] sum over response tokens of log p(token), read from full logits."""
  lp = np.asarray(jax.nn.log_softmax(logits, -1))
  out = np.zeros(len(t.ids))
  for b in range(len(t.ids)):
    for i in np.nonzero(t.target_mask[b])[0]:
      out[b] += lp[b, i - 1, t.ids[b, i]]
  return out


def test_loss_at_init_is_log2(base):
  """Fresh LoRA (B = 0): the policy is the reference, every pair's loss is log 2."""
  loss, m = run(fresh_adapters(base), base, make_batch(base))
  np.testing.assert_allclose(loss, math.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(m["reward_margin"], 0.0, atol=1e-5)
  np.testing.assert_allclose(m["dpo_harmful"], math.log(2.0), rtol=1e-5)
  np.testing.assert_allclose(m["dpo_benign"], math.log(2.0), rtol=1e-5)
  assert float(m["targets_dropped"]) == 0.0
  assert float(m["pairs"]) == 4.0


def test_loss_matches_full_logits_reference(base):
  """Summed response log-probs from full forwards, then the DPO formula, by hand."""
  ad = trained_adapters(base)
  batch = make_batch(base, margin=(0.0, 0.2, 0.0, 0.0))
  loss, m = run(ad, base, batch)
  lp = {}
  for side in ("chosen", "rejected"):
    t = getattr(batch, side)
    pol = A.adapted_forward(base, ad, TINY, ACFG, t.ids, attention_mask_BxS=t.mask).logits
    ref = transformer.forward(base, TINY, t.ids, attention_mask_BxS=t.mask).logits
    lp[side] = seq_logp(pol, t), seq_logp(ref, t)
  # The reference log-probabilities the batch carries are the base model's, by hand.
  np.testing.assert_allclose(batch.ref_chosen, lp["chosen"][1], rtol=1e-5)
  np.testing.assert_allclose(batch.ref_rejected, lp["rejected"][1], rtol=1e-5)
  h = (lp["chosen"][0] - lp["chosen"][1]) - (lp["rejected"][0] - lp["rejected"][1])
  z = BETA * h - batch.margin
  per_pair = np.log1p(np.exp(-z))
  w = batch.weight
  np.testing.assert_allclose(loss, (w * per_pair).sum() / w.sum(), rtol=1e-4)
  np.testing.assert_allclose(m["l_total"], loss)
  np.testing.assert_allclose(m["logp_chosen"], (w * lp["chosen"][0]).sum() / w.sum(), rtol=1e-4)
  harm = batch.harmful
  np.testing.assert_allclose(m["dpo_harmful"], per_pair[harm].mean(), rtol=1e-4)
  np.testing.assert_allclose(m["dpo_benign"], (w * per_pair)[~harm].sum() / w[~harm].sum(),
                             rtol=1e-4)
  np.testing.assert_allclose(m["reward_accuracy"], (w * (h > 0)).sum() / w.sum(), rtol=1e-5)


def test_jit_matches_eager_and_grads_finite(base):
  ad, batch = trained_adapters(base), make_batch(base)
  l_jit, m_jit = run(ad, base, batch, jit=True)
  l_eager, m_eager = run(ad, base, batch, jit=False)
  np.testing.assert_allclose(l_jit, l_eager, rtol=1e-5)
  for k in m_jit:
    np.testing.assert_allclose(m_jit[k], m_eager[k], rtol=1e-4, atol=1e-6, err_msg=k)
  grads = jax.grad(lambda a: run(a, base, batch)[0])(ad)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  assert any(float(np.abs(g).max()) > 0 for g in leaves)


def test_zero_weight_pairs_do_not_count(base):
  """A dropped pair (weight 0) changes neither the loss nor the metrics."""
  ad = trained_adapters(base)
  full, _ = run(ad, base, make_batch(base, weight=(1.0, 1.0, 1.0, 0.0)))
  changed = make_batch(base, weight=(1.0, 1.0, 1.0, 0.0))
  ids = changed.rejected.ids.copy()
  ids[3, 7:11] = 5  # another dispreferred response for the dropped pair
  changed = changed.replace(rejected=changed.rejected.replace(ids=ids))
  again, _ = run(ad, base, changed)
  np.testing.assert_allclose(full, again, rtol=1e-6)


def test_pair_table_batch_gathers_both_sides():
  """Pair p: chosen row p, rejected row n + p; harmful pairs first, benign after n_harm."""
  n, n_harm = 5, 3
  ids = np.arange(2 * n)[:, None].repeat(4, 1).astype(np.int32)
  rows = inputs.Rows(ids=ids, mask=np.ones_like(ids, bool), target_mask=np.ones_like(ids, bool),
                     prompt_end=np.zeros(2 * n, np.int32), truncated=0)
  table = dpo.PairTable(rows=rows, weight=np.array([1, 0.5, 1, 1, 0], np.float32),
                        margin=np.array([0, 0, 2, 0, 0], np.float32), n_harm=n_harm,
                        ref_logp=-np.arange(2 * n, dtype=np.float32))
  b = table.batch(np.array([2, 1]), np.array([0, 1]))
  np.testing.assert_array_equal(b.chosen.ids[:, 0], [2, 1, 3, 4])
  np.testing.assert_array_equal(b.rejected.ids[:, 0], [7, 6, 8, 9])
  np.testing.assert_array_equal(b.weight, [1, 0.5, 1, 0])
  np.testing.assert_array_equal(b.chosen.weight, b.weight)
  np.testing.assert_array_equal(b.margin, [2, 0, 0, 0])
  np.testing.assert_array_equal(b.harmful, [True, True, False, False])
  np.testing.assert_array_equal(b.ref_chosen, [-2, -1, -3, -4])
  np.testing.assert_array_equal(b.ref_rejected, [-7, -6, -8, -9])


def test_with_reference_reads_the_run_rows_and_caches(base, tmp_path, monkeypatch):
  """Reference log-probs of exactly the rows the steps read (NaN elsewhere), computed in
  padded batches, then reused from W on a second prepare (a resume)."""
  t = tokens([(5, 4), (6, 3), (4, 5), (7, 2), (5, 5), (3, 6)], 3)
  rows = inputs.Rows(ids=t.ids, mask=t.mask, target_mask=t.target_mask,
                     prompt_end=t.prompt_end, truncated=0)
  table = dpo.PairTable(rows=rows, weight=np.ones(3, np.float32), margin=np.zeros(3, np.float32),
                        n_harm=2)
  # One step, reading harmful position 0 and benign position 0: pairs 0 and 2, so rows 0 and
  # 2 (chosen) and 3 and 5 (rejected); batches of 3 rows, the second one padded.
  ctx = types.SimpleNamespace(
      config=ml_collections.ConfigDict(dict(
          train=dict(steps=1, grad_accum=1), eval=dict(batch_size=3),
          model=dict(name_or_path="tiny", dtype="float32"))),
      workdir=str(tmp_path), params=base, model_cfg=TINY, primary=True,
      batch_rows=lambda s: (None, np.array([s % 2]), np.array([0])))
  out = dpo.with_reference(ctx, table, n_max=8)
  want = np.asarray(dpo.row_logprobs(base, TINY, t, n_max=8))
  read = [0, 2, 3, 5]
  np.testing.assert_allclose(out.ref_logp[read], want[read], rtol=1e-6)
  assert np.isnan(out.ref_logp[[1, 4]]).all()
  monkeypatch.setattr(dpo, "reference_logprobs", lambda *a, **k: pytest.fail("not cached"))
  again = dpo.with_reference(ctx, table, n_max=8)
  np.testing.assert_array_equal(again.ref_logp, out.ref_logp)
