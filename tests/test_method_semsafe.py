"""methods/semsafe.py: the combined loss on typed batches, against hand computations."""

import jax
import ml_collections
import numpy as np
import pytest

from conftest import ACFG, TINY, V
from semsafe_jax import adapters as A
from semsafe_jax.losses import capability as C
from semsafe_jax.losses import scorers
from semsafe_jax.methods import semsafe as T
from semsafe_jax.methods.base import Pairs, SafetyBatch, Tokens
from semsafe_jax.models import transformer
from semsafe_jax.train import packing


def loss_cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      w_safety=1.0, lam=1.0, w_capability=1.0, consistency_repr="refusal_prob",
      scorer="first_token", hidden_layer=-1, hidden_pool="mean", normalize_hidden=True,
      divergence="js", capability="kl", kl_direction="forward", max_target_tokens=8,
      ambiguous_token_weight=0.5, refusal_phrases=[], probe_pool="prompt"))
  c.update(kw)
  return c


def rows(lengths, L, seed):
  """Right-padded rows of (prompt_len, target_len): ids, mask, target_mask, prompt_end."""
  rng = np.random.default_rng(seed)
  B = len(lengths)
  ids = np.zeros((B, L), np.int32)
  mask = np.zeros((B, L), bool)
  tmask = np.zeros((B, L), bool)
  for b, (p, t) in enumerate(lengths):
    ids[b, :p + t] = rng.integers(3, V, p + t)
    mask[b, :p + t] = True
    tmask[b, p:p + t] = True
  return ids, mask, tmask, np.array([p - 1 for p, _ in lengths], np.int32)


def make_batch(seed=0):
  h_ids, h_mask, h_t, h_end = rows([(5, 4), (6, 3), (4, 5), (7, 2)], 12, seed)
  b_ids, b_mask, b_t, _ = rows([(4, 5), (3, 6), (5, 3)], 10, seed + 1)
  return {
      "harm_ids": h_ids, "harm_mask": h_mask, "harm_target_mask": h_t, "harm_prompt_end": h_end,
      "harm_weight": np.array([1.0, 1.0, 0.5, 1.0], np.float32),
      "pair_index": np.array([[0, 1], [2, 3], [1, 2]], np.int32),
      "pair_weight": np.array([0.9, 0.8, 0.7], np.float32),
      "pair_valid": np.array([True, True, False]),
      "benign_ids": b_ids, "benign_mask": b_mask, "benign_target_mask": b_t,
  }



def to_batch(d):
  """The dict form used here (easy to edit per test) -> the typed SafetyBatch."""
  ones = lambda n: np.ones(n, np.float32)
  harm = Tokens(ids=d["harm_ids"], mask=d["harm_mask"], target_mask=d["harm_target_mask"],
                prompt_end=d["harm_prompt_end"], weight=d["harm_weight"])
  benign = Tokens(ids=d["benign_ids"], mask=d["benign_mask"], target_mask=d["benign_target_mask"],
                  prompt_end=np.zeros(len(d["benign_ids"]), np.int32),
                  weight=ones(len(d["benign_ids"])))
  return SafetyBatch(harm=harm, benign=benign,
                     pairs=Pairs(index=d["pair_index"], weight=d["pair_weight"],
                                 valid=d["pair_valid"]))


def total_loss(adapters, base, batch, *, model_cfg, adapter_cfg, loss_cfg, aux, rng):
  return T.loss(adapters, {"base": base, "aux": aux}, T.SemsafeBatch(safety=to_batch(batch)),
                rng, spec=T.LossSpec.from_config(loss_cfg), model_cfg=model_cfg,
                adapter_cfg=adapter_cfg)


@pytest.fixture(scope="module")
def aux(base):
  D = TINY.hidden_size
  k = jax.random.split(jax.random.key(7), 4)
  clf = {"mu": np.zeros(D, np.float32), "sd": np.ones(D, np.float32),
         "w1": np.asarray(jax.random.normal(k[0], (D, 8))), "b1": np.zeros(8, np.float32),
         "w2": np.asarray(jax.random.normal(k[1], (8,))), "b2": np.zeros((), np.float32)}
  probe = {"w": np.asarray(jax.random.normal(k[2], (D,))), "b": np.zeros((), np.float32),
           "mu": np.zeros(D, np.float32), "sd": np.full(D, 0.5, np.float32),
           "layer": np.int32(1)}
  return {"refusal_token_ids": np.array([3, 10, 17], np.int32),
          "refusal_token_weights": np.array([1.0, 0.5, 1.0], np.float32),
          "refusal_phrase_ids": np.array([[5, 6, 7], [8, 9, 0]], np.int32),
          "refusal_phrase_mask": np.array([[1, 1, 1], [1, 1, 0]], bool),
          "classifier": clf, "probe": probe}


# --- total_loss -----------------------------------------------------------------


_JITTED = {}


def run_total(adapters, base, batch, aux, cfg, rng=None, jit=True, acfg=ACFG):
  """total_loss, jitted once per config (tests reuse the compiled step)."""
  key = (cfg.to_json(), acfg.to_json())
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda a, b, bt, x, r: total_loss(
        a, b, bt, model_cfg=TINY, adapter_cfg=acfg, loss_cfg=cfg, aux=x, rng=r))
  if not jit:
    return total_loss(adapters, base, batch, model_cfg=TINY, adapter_cfg=acfg, loss_cfg=cfg,
                        aux=aux, rng=rng)
  return _JITTED[key](adapters, base, batch, aux, rng)


def test_total_matches_full_logits_reference(base, adapters, aux):
  """Gathered-position losses equal the same losses computed from full logits."""
  batch = make_batch()
  loss, m = run_total(adapters, base, batch, aux, loss_cfg())
  out = A.adapted_forward(base, adapters, TINY, ACFG, batch["harm_ids"],
                          attention_mask_BxS=batch["harm_mask"])
  lp = jax.nn.log_softmax(out.logits, -1)
  ce, wsum = 0.0, 0.0
  for b in range(4):
    for t in np.nonzero(batch["harm_target_mask"][b])[0]:
      ce -= batch["harm_weight"][b] * lp[b, t - 1, batch["harm_ids"][b, t]]
      wsum += batch["harm_weight"][b]
  np.testing.assert_allclose(m["l_safety"], ce / wsum, rtol=1e-5)
  first = out.logits[np.arange(4), batch["harm_prompt_end"]]
  p = scorers.first_token_refusal_prob(first, aux["refusal_token_ids"],
                                       aux["refusal_token_weights"])
  want_c = (0.9 * (p[0] - p[1]) ** 2 + 0.8 * (p[2] - p[3]) ** 2) / 1.7
  np.testing.assert_allclose(m["l_consistency"], want_c, rtol=1e-4)
  ad_b = A.adapted_forward(base, adapters, TINY, ACFG, batch["benign_ids"],
                           attention_mask_BxS=batch["benign_mask"]).logits
  base_b = transformer.forward(base, TINY, batch["benign_ids"],
                               attention_mask_BxS=batch["benign_mask"]).logits
  kl = C.token_kl(base_b[:, :-1], ad_b[:, :-1])
  tm = batch["benign_target_mask"][:, 1:]
  np.testing.assert_allclose(m["l_capability"], (kl * tm).sum() / tm.sum(), rtol=1e-5)
  np.testing.assert_allclose(loss, m["l_safety"] + m["l_consistency"] + m["l_capability"],
                             rtol=1e-6)
  np.testing.assert_allclose(m["l_total"], loss)
  assert float(m["targets_dropped"]) == 0.0


def test_total_loss_target_cap(base, adapters, aux):
  """Only the first max_target_tokens targets per row count; the rest are reported."""
  batch = make_batch()
  cfg = loss_cfg(max_target_tokens=3, lam=0.0, w_capability=0.0)
  _, m = run_total(adapters, base, batch, aux, cfg)
  assert float(m["targets_dropped"]) == (4 - 3) + 0 + (5 - 3) + 0
  capped = dict(batch, harm_target_mask=batch["harm_target_mask"].copy())
  for b, p in enumerate(batch["harm_prompt_end"] + 1):
    capped["harm_target_mask"][b, p + 3:] = False
  _, m2 = run_total(adapters, base, capped, aux, cfg)
  np.testing.assert_allclose(m2["l_safety"], m["l_safety"], rtol=1e-6)



def test_total_loss_safety_first_token_weight(base, adapters, aux):
  """loss.safety_first_token_weight reaches L_safety (safety-only configs: cheap compiles)."""
  batch = make_batch()
  only_safety = dict(lam=0.0, w_capability=0.0)
  _, m1 = run_total(adapters, base, batch, aux, loss_cfg(**only_safety))
  _, m5 = run_total(adapters, base, batch, aux,
                    loss_cfg(safety_first_token_weight=5.0, **only_safety))
  # The first-target-token CE alone (every harmful row has targets).
  _, m_first = run_total(adapters, base, batch, aux,
                         loss_cfg(max_target_tokens=1, **only_safety))
  w = batch["harm_weight"]
  w_all = float((batch["harm_target_mask"].sum(1) * w).sum())  # weighted token count
  w_first = float(w.sum())
  want = (m1["l_safety"] * w_all + 4 * m_first["l_safety"] * w_first) / (w_all + 4 * w_first)
  np.testing.assert_allclose(m5["l_safety"], want, rtol=1e-5)
  assert abs(float(m5["l_safety"]) - float(m1["l_safety"])) > 1e-4
  np.testing.assert_allclose(m5["l_total"], m5["l_safety"], rtol=1e-6)

# The capability term is covered by two configs; the others turn it off to keep
# compile time (one extra forward + backward each) out of the suite.
NOCAP = dict(w_capability=0.0)
CONFIGS = {
    "first_token": dict(),
    "soft_pattern": dict(scorer="soft_pattern", **NOCAP),
    "classifier": dict(scorer="classifier", **NOCAP),
    "probe": dict(scorer="probe", **NOCAP),
    "hidden_layer1_last": dict(consistency_repr="hidden", hidden_layer=1, hidden_pool="last",
                               **NOCAP),
    "next_token_symkl": dict(consistency_repr="next_token", divergence="sym_kl", **NOCAP),
    "reverse_kl_weights": dict(kl_direction="reverse", w_safety=0.5, lam=2.0, w_capability=0.3,
                               consistency_repr="hidden"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_total_loss_configs_have_finite_grads(base, adapters, aux, name):
  cfg = loss_cfg(**CONFIGS[name])
  batch = make_batch()
  f = lambda a: total_loss(a, base, batch, model_cfg=TINY, adapter_cfg=ACFG, loss_cfg=cfg,
                             aux=aux, rng=None)
  (loss, m), g = jax.jit(jax.value_and_grad(f, has_aux=True))(adapters)
  assert np.isfinite(loss) and float(m["l_consistency"]) > 0
  assert (float(m["l_capability"]) > 0) == (cfg.w_capability != 0)
  for k in ("l_safety", "l_consistency", "l_capability", "l_total"):
    assert np.isfinite(m[k])
  np.testing.assert_allclose(
      loss, cfg.w_safety * m["l_safety"] + cfg.lam * m["l_consistency"]
      + cfg.w_capability * m["l_capability"], rtol=1e-5)
  assert jax.tree.structure(g) == jax.tree.structure(adapters)
  for leaf in jax.tree.leaves(g):
    assert np.all(np.isfinite(leaf))
  for part in ("lora", "embed_mlp"):
    assert sum(float(np.abs(x).sum()) for x in jax.tree.leaves(g[part])) > 0


def test_total_loss_jit_equals_no_jit(base, adapters, aux):
  cfg = loss_cfg()
  batch = make_batch()
  loss_j, m_j = run_total(adapters, base, batch, aux, cfg)
  with jax.disable_jit():
    loss_e, m_e = run_total(adapters, base, batch, aux, cfg, jit=False)
  np.testing.assert_allclose(loss_j, loss_e, rtol=1e-5)
  for k in m_j:
    np.testing.assert_allclose(m_j[k], m_e[k], rtol=1e-5, atol=1e-7)


def test_total_loss_invariances(base, adapters, aux):
  batch = make_batch()
  cfg = loss_cfg()
  _, m = run_total(adapters, base, batch, aux, cfg)
  # Invalid pairs contribute nothing, wherever they point.
  b2 = dict(batch, pair_index=batch["pair_index"].copy())
  b2["pair_index"][2] = [0, 3]
  _, m2 = run_total(adapters, base, b2, aux, cfg)
  np.testing.assert_allclose(m2["l_consistency"], m["l_consistency"], rtol=1e-6)
  # Identical members -> no consistency loss; no valid pair -> 0.
  _, m3 = run_total(adapters, base, dict(batch, pair_index=np.array([[0, 0], [1, 1], [2, 2]],
                                                                    np.int32)), aux, cfg)
  assert float(m3["l_consistency"]) == 0.0
  _, m4 = run_total(adapters, base, dict(batch, pair_valid=np.zeros(3, bool)), aux, cfg)
  assert float(m4["l_consistency"]) == 0.0
  # Fresh adapters are the base model: the capability KL is exactly 0.
  fresh = A.init_adapters(ACFG, TINY, base, jax.random.key(9))
  _, m5 = run_total(fresh, base, batch, aux, cfg)
  assert float(m5["l_capability"]) == 0.0


def test_total_loss_dropout_rng(base, adapters, aux):
  acfg = ml_collections.ConfigDict(dict(ACFG.to_dict(), lora_dropout=0.3))
  batch = make_batch()
  f = lambda rng: run_total(adapters, base, batch, aux, loss_cfg(**NOCAP), rng, acfg=acfg)[0]
  a, b, c = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
  assert a == b and a != c and np.isfinite(c)


def test_build_aux_and_errors(base):
  class Tok:
    def encode(self, text, add_special_tokens=False):
      return [3 + (sum(map(ord, w)) % 100) for w in text.split()]

  spec = lambda **kw: T.LossSpec.from_config(loss_cfg(**kw))
  aux = T.build_aux(spec(), loss_cfg(), Tok())
  assert aux["refusal_token_ids"].dtype == np.int32
  assert aux["refusal_phrase_ids"].shape == aux["refusal_phrase_mask"].shape
  with pytest.raises(ValueError, match="classifier"):
    T.build_aux(spec(scorer="classifier"), loss_cfg(), Tok())
  with pytest.raises(ValueError, match="loss.scorer"):
    spec(scorer="nope")
  with pytest.raises(ValueError, match="consistency_repr"):
    spec(consistency_repr="nope")


# --- Unlabelled partners ------------------------------------------------------------


def prompt_tokens(lengths, L, seed):
  ids, mask, _, end = rows([(n, 0) for n in lengths], L, seed)
  return Tokens(ids=ids, mask=mask, target_mask=np.zeros_like(mask), prompt_end=end,
                weight=np.ones(len(lengths), np.float32))


def test_unlabeled_partners_against_hand_computation(base, adapters, aux):
  """L_consistency = pair term + sum_u w_u (p(anchor_u) - p(partner_u))^2 / sum_u w_u, and
  with anchor_stop_gradient only the partner side carries a gradient."""
  u = T.Unlabeled(anchor=prompt_tokens([5, 7, 4], 9, 3), partner=prompt_tokens([6, 3, 8], 9, 4),
                  weight=np.array([0.9, 0.75, 0.8], np.float32),
                  valid=np.array([True, True, False]))
  sb = T.SemsafeBatch(safety=to_batch(make_batch()), unlabeled=u)
  frozen = {"base": base, "aux": aux}

  def run(a, stop):
    spec = T.LossSpec.from_config(loss_cfg(w_capability=0.0, anchor_stop_gradient=stop))
    return T.loss(a, frozen, sb, None, spec=spec, model_cfg=TINY, adapter_cfg=ACFG)

  _, m = jax.jit(run, static_argnums=1)(adapters, True)

  def first_prob(a, t):
    out = A.adapted_forward(base, a, TINY, ACFG, t.ids, attention_mask_BxS=t.mask)
    first = out.logits[np.arange(len(t.ids)), t.prompt_end]
    return scorers.first_token_refusal_prob(first, aux["refusal_token_ids"],
                                            aux["refusal_token_weights"])

  def hand(a, stop):
    pa, pp = first_prob(a, u.anchor), first_prob(a, u.partner)
    if stop:
      pa = jax.lax.stop_gradient(pa)
    return (0.9 * (pa[0] - pp[0]) ** 2 + 0.75 * (pa[1] - pp[1]) ** 2) / 1.65

  np.testing.assert_allclose(m["l_consistency_unlabeled"], hand(adapters, True), rtol=1e-4)
  np.testing.assert_allclose(m["l_consistency"],
                             m["l_consistency_pairs"] + m["l_consistency_unlabeled"], rtol=1e-6)
  assert float(m["unlabeled_valid"]) == 2.0
  for stop in (True, False):
    want = jax.grad(hand)(adapters, stop)
    got = jax.grad(lambda a: run(a, stop)[1]["l_consistency_unlabeled"])(adapters)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-7)
  g_stop = jax.grad(lambda a: hand(a, True))(adapters)
  g_free = jax.grad(lambda a: hand(a, False))(adapters)
  assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(g_stop),
                                                   jax.tree.leaves(g_free)))


def test_contrast_margin_against_hand_computation(base, adapters, aux):
  """l_contrast = sum_c w_c relu(m - (p(harmful_c) - p(safe_c))) / sum_c w_c."""
  c = T.Contrast(harmful=prompt_tokens([5, 6], 8, 5), safe=prompt_tokens([7, 4], 8, 6),
                 weight=np.array([0.6, 0.55], np.float32), valid=np.array([True, True]))
  sb = T.SemsafeBatch(safety=to_batch(make_batch()), contrast=c)
  spec = T.LossSpec.from_config(loss_cfg(w_capability=0.0, lam=0.0, w_contrast=2.0,
                                         contrast_margin=0.3))
  loss, m = jax.jit(lambda a: T.loss(a, {"base": base, "aux": aux}, sb, None, spec=spec,
                                     model_cfg=TINY, adapter_cfg=ACFG))(adapters)

  def first_prob(t):
    out = A.adapted_forward(base, adapters, TINY, ACFG, t.ids, attention_mask_BxS=t.mask)
    first = out.logits[np.arange(len(t.ids)), t.prompt_end]
    return scorers.first_token_refusal_prob(first, aux["refusal_token_ids"],
                                            aux["refusal_token_weights"])

  hinge = np.maximum(0.0, 0.3 - (first_prob(c.harmful) - first_prob(c.safe)))
  want = (0.6 * hinge[0] + 0.55 * hinge[1]) / 1.15
  np.testing.assert_allclose(m["l_contrast"], want, rtol=1e-4)
  np.testing.assert_allclose(loss, m["l_safety"] + 2.0 * m["l_contrast"], rtol=1e-5)


class _WordTokenizer:
  pad_token_id = 0

  def encode(self, text, add_special_tokens=False):
    del add_special_tokens
    return [3 + len(w) % (V - 3) for w in text.split()]


def test_prompt_rows_are_as_wide_as_the_longest_prompt(monkeypatch):
  """Prompt-only rows are cut to the longest prompt, rounded up to 16 (not data.max_len)."""
  real = T.probe_lib.encode_prompts
  monkeypatch.setattr(T.probe_lib, "encode_prompts",
                      lambda tok, texts, max_len: real(tok, texts, max_len, chat=False))
  tok = _WordTokenizer()
  r = T._prompt_rows(tok, ["a " * 5, "bb " * 20], max_len=128)
  assert r.ids.shape == (2, 32)
  np.testing.assert_array_equal(r.mask.sum(1), [5, 20])
  assert T._prompt_rows(tok, ["a " * 200], max_len=128).ids.shape == (1, 128)  # capped
  t = r.take(np.array([1, 0]))
  np.testing.assert_array_equal(t.prompt_end, [19, 4])


def test_unlabeled_term_does_not_depend_on_padding_width(base, adapters, aux):
  """Right padding is masked: the same prompts at width 9 and 40 give the same loss."""
  def term(width):
    u = T.Unlabeled(anchor=prompt_tokens([5, 7, 4], width, 3),
                    partner=prompt_tokens([6, 3, 8], width, 4),
                    weight=np.array([0.9, 0.75, 0.8], np.float32),
                    valid=np.array([True, True, True]))
    sb = T.SemsafeBatch(safety=to_batch(make_batch()), unlabeled=u)
    spec = T.LossSpec.from_config(loss_cfg(w_capability=0.0))
    return T.loss(adapters, {"base": base, "aux": aux}, sb, None, spec=spec, model_cfg=TINY,
                  adapter_cfg=ACFG)[1]["l_consistency_unlabeled"]
  np.testing.assert_allclose(term(9), term(40), rtol=1e-5)


@pytest.mark.parametrize("repr_kw", [
    dict(consistency_repr="refusal_prob", scorer="first_token"),
    dict(consistency_repr="refusal_prob", scorer="probe"),  # a hidden state, mean-pooled
], ids=["first_token", "probe"])
def test_packed_rows_give_the_same_loss_and_gradient(base, adapters, aux, repr_kw,
                                                    fast_compile):
  """Unlabelled and contrast rows, and the harmful and benign rows with their targets,
  packed several to a row: the same loss and gradient."""
  del fast_compile
  lengths = ([5, 7, 4, 6], [6, 3, 8, 2], [4, 9], [7, 3])
  rows = [T._PromptRows(ids=t.ids, mask=t.mask)
          for t in (prompt_tokens(n, 16, seed) for seed, n in enumerate(lengths))]
  spec = T.LossSpec.from_config(loss_cfg(w_contrast=1.0, contrast_margin=0.5, **repr_kw))

  def batch(rows, pack_safety=False):
    take = [r.take(np.arange(r.ids.shape[0])) for r in rows]
    u = T.Unlabeled(anchor=take[0], partner=take[1],
                    weight=np.array([0.9, 0.75, 0.8, 0.7], np.float32), valid=np.ones(4, bool))
    c = T.Contrast(harmful=take[2], safe=take[3], weight=np.array([0.6, 0.55], np.float32),
                   valid=np.ones(2, bool))
    safety = to_batch(make_batch())
    if pack_safety:  # harmful rows of 9 tokens two to a row of 18; benign 9 + 9 and 8
      pk = lambda t: t.replace(packed=packing.pack(t.ids, t.mask, 2, 18))
      safety = safety.replace(harm=pk(safety.harm), benign=pk(safety.benign))
    return T.SemsafeBatch(safety=safety, unlabeled=u, contrast=c)

  def run(a, sb):
    return T.loss(a, {"base": base, "aux": aux}, sb, None, spec=spec, model_cfg=TINY,
                  adapter_cfg=ACFG)

  packed = [r.packed_for(lambda s, n=r.ids.shape[0]: np.arange(n), steps=1, width=12)
            for r in rows]
  # 22, 19, 13 and 10 real tokens in rows of 16: 2, 2, 2 and 1 packed rows of 12.
  assert [p.plan.rows for p in packed] == [2, 2, 2, 1]
  plain, pk = batch(rows), batch(packed, pack_safety=True)
  assert pk.unlabeled.partner.packed.ids.shape == (2, 12)
  assert int(pk.safety.benign.packed.segment_ids.max()) == 2
  grad = jax.jit(jax.grad(run, has_aux=True))
  (g0, m0), (g1, m1) = grad(adapters, plain), grad(adapters, pk)
  assert float(m0["l_capability"]) > 0 and float(m0["l_safety"]) > 0
  for k in ("l_total", "l_safety", "l_consistency", "l_capability",
            "l_consistency_unlabeled", "l_contrast"):
    np.testing.assert_allclose(m1[k], m0[k], rtol=2e-5, atol=1e-7)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(x, y, rtol=2e-4, atol=1e-6)


def test_prompt_rows_pack_only_when_it_saves_tokens():
  t = prompt_tokens([9, 9, 9, 9], 10, 0)
  rows = T._PromptRows(ids=t.ids, mask=t.mask)
  assert rows.packed_for(lambda s: np.arange(4), steps=3, width=12).plan is None
  assert rows.packed_for(lambda s: np.arange(4), steps=3, width=0) is rows
  # A prompt longer than the width widens the rows; the plan covers every step's draw.
  t = prompt_tokens([3, 2, 14, 2], 16, 0)
  rows = T._PromptRows(ids=t.ids, mask=t.mask)
  p = rows.packed_for(lambda s: np.array([[0, 1, 3, 1], [2, 0, 1, 3]][s]), steps=2, width=8)
  assert p.plan == packing.Plan(rows=2, width=14)
  assert p.take(np.array([2, 0, 1, 3])).packed.ids.shape == (2, 14)


def test_base_states_table_gives_the_same_loss_and_gradient(base, adapters, aux):
  """L_capability "kl" reading the base model's states from the table computed before
  training equals the step's own base forward, in value and gradient (the last table batch
  is padded), rows in the order asked for."""
  spec = T.LossSpec.from_config(loss_cfg(w_safety=0.0, lam=0.0, max_target_tokens=6))
  safety = to_batch(make_batch())
  table = T.base_target_states(base, TINY, safety.benign, np.array([2, 0, 1]),
                               spec.max_target_tokens, batch_size=2)[[1, 2, 0]]
  assert table.shape == (3, 6, TINY.hidden_size) and table.dtype == np.float32

  def run(a, sb):
    return T.loss(a, {"base": base, "aux": aux}, sb, None, spec=spec, model_cfg=TINY,
                  adapter_cfg=ACFG)

  grad = jax.jit(jax.grad(run, has_aux=True))
  (g0, m0) = grad(adapters, T.SemsafeBatch(safety=safety))
  (g1, m1) = grad(adapters, T.SemsafeBatch(safety=safety, base_states=table))
  assert float(m0["l_capability"]) > 0
  np.testing.assert_allclose(m1["l_capability"], m0["l_capability"], rtol=1e-5, atol=1e-7)
  for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
  # A wrong table is read, not ignored.
  _, m2 = grad(adapters, T.SemsafeBatch(safety=safety, base_states=table[::-1].copy()))
  assert not np.isclose(float(m2["l_capability"]), float(m0["l_capability"]), rtol=1e-3)


def test_target_window_is_what_a_target_can_reach():
  """The LM head reads loss.max_target_tokens positions (0 = no cap), never more than
  data.max_response_tokens, the longest a tokenised response can be."""
  from semsafe_jax.methods import common
  cfg = lambda n, r: ml_collections.ConfigDict({"loss": {"max_target_tokens": n},
                                                "data": {"max_response_tokens": r}})
  assert common.target_window(cfg(48, 32)) == 32
  assert common.target_window(cfg(0, 32)) == 32
  assert common.target_window(cfg(8, 32)) == 8
