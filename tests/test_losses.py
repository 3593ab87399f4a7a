"""Losses: known values, invariances, gradients, jit == no-jit, total_loss wiring."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ACFG, TINY, V
from semsafe_jax import adapters as A
from semsafe_jax.losses import capability as C
from semsafe_jax.losses import common
from semsafe_jax.losses import consistency as K
from semsafe_jax.losses import safety as S
from semsafe_jax.losses import scorers
from semsafe_jax.losses import total as T
from semsafe_jax.models import transformer


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


# `base` (tiny model params) and `adapters` are fixtures from conftest.py.


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


# --- Gathering ------------------------------------------------------------------


def test_target_positions():
  ids = jnp.array([[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 0, 0]])
  tmask = jnp.array([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], bool)
  pos, tgt, m = common.target_positions(ids, tmask, 4)
  np.testing.assert_array_equal(pos[0, :3], [1, 2, 3])
  np.testing.assert_array_equal(tgt[0, :3], [3, 4, 5])
  np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 0, 0, 0]])
  assert pos[1, 0] == 0 and tgt[1, 0] == 7
  pos, tgt, m = common.target_positions(ids, tmask, 2)  # capped: the first 2 targets
  np.testing.assert_array_equal(tgt[0], [3, 4])
  assert common.target_positions(ids, tmask, 100)[0].shape == (2, 5)


# --- L_safety -------------------------------------------------------------------


def test_safety_known_values():
  p = np.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]], [[0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]]])
  logits = jnp.log(jnp.asarray(p, jnp.float32))
  targets = jnp.array([[0, 1], [2, 0]])
  mask = jnp.array([[1, 1], [1, 0]], bool)
  ce = -np.log([0.5, 0.8, 0.6])
  np.testing.assert_allclose(S.safety_loss(logits, targets, mask), ce.mean(), rtol=1e-6)
  w = jnp.array([1.0, 3.0])
  want = (ce[0] + ce[1] + 3 * ce[2]) / 5
  np.testing.assert_allclose(S.safety_loss(logits, targets, mask, w), want, rtol=1e-6)
  assert S.safety_loss(logits, targets, mask, jnp.zeros(2)) == 0.0
  g = jax.grad(lambda x: S.safety_loss(x, targets, mask, jnp.zeros(2)))(logits)
  assert np.all(np.isfinite(g)) and not np.any(g)


def test_safety_first_token_weight():
  """Column 0 (the first refusal token) counts first_token_weight times in the mean."""
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((3, 4, 7)).astype(np.float32) * 2
  targets = rng.integers(0, 7, (3, 4))
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], bool)  # row 2: no targets
  w = np.array([1.0, 2.0, 3.0], np.float32)
  lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(lp, targets[..., None], -1)[..., 0]

  def want(first_w, row_w):
    m = mask * row_w[:, None]
    m[:, 0] *= first_w
    return (ce * m).sum() / m.sum()

  args = (jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  np.testing.assert_allclose(S.safety_loss(*args, jnp.asarray(w), first_token_weight=5.0),
                             want(5.0, w), rtol=1e-5)
  np.testing.assert_allclose(S.safety_loss(*args, first_token_weight=5.0),
                             want(5.0, np.ones(3, np.float32)), rtol=1e-5)
  # 1 is the old behaviour: the plain (row-weighted) token mean.
  old = (ce * mask * w[:, None]).sum() / (mask * w[:, None]).sum()
  np.testing.assert_allclose(S.safety_loss(*args, jnp.asarray(w), first_token_weight=1.0), old,
                             rtol=1e-5)
  assert S.safety_loss(*args, jnp.asarray(w)) == S.safety_loss(*args, jnp.asarray(w), 1.0)


# --- L_consistency ----------------------------------------------------------------


PAIRS = jnp.array([[0, 1], [2, 3], [0, 3]])
W = jnp.array([2.0, 1.0, 5.0])
VALID = jnp.array([True, True, False])


def test_consistency_refusal_prob_known_values():
  p = jnp.array([0.9, 0.5, 0.2, 0.2])
  got = K.consistency_loss(p, PAIRS, W, VALID, kind="refusal_prob")
  np.testing.assert_allclose(got, (2 * 0.16 + 1 * 0.0) / 3, rtol=1e-6)
  # Scaling every weight changes nothing (normalised by the weight sum).
  np.testing.assert_allclose(K.consistency_loss(p, PAIRS, 7 * W, VALID, kind="refusal_prob"),
                             got, rtol=1e-6)


def test_consistency_hidden_known_values():
  h = jnp.array([[3.0, 4.0], [0.0, 1.0], [1.0, 1.0], [2.0, 2.0]])
  raw = K.consistency_loss(h, PAIRS, W, VALID, kind="hidden", normalize=False)
  np.testing.assert_allclose(raw, (2 * (9 + 9) + 1 * (1 + 1)) / 3, rtol=1e-6)
  unit = K.consistency_loss(h, PAIRS, W, VALID, kind="hidden", normalize=True)
  cos01 = 4 / 5
  np.testing.assert_allclose(unit, 2 * (2 - 2 * cos01) / 3, rtol=1e-5)  # pair 2->3 is parallel


def test_consistency_next_token_divergences():
  p = np.array([0.7, 0.2, 0.1])
  q = np.array([0.1, 0.3, 0.6])
  kl = lambda a, b: float((a * np.log(a / b)).sum())
  m = (p + q) / 2
  logp = jnp.log(jnp.asarray(np.stack([p, q, p, p]), jnp.float32))
  pairs, w, valid = jnp.array([[0, 1], [2, 3]]), jnp.ones(2), jnp.array([True, True])
  js = K.consistency_loss(logp, pairs, w, valid, kind="next_token", div="js")
  np.testing.assert_allclose(js, 0.5 * (0.5 * (kl(p, m) + kl(q, m)) + 0), rtol=1e-5)
  sk = K.consistency_loss(logp, pairs, w, valid, kind="next_token", div="sym_kl")
  np.testing.assert_allclose(sk, 0.5 * (0.5 * (kl(p, q) + kl(q, p))), rtol=1e-5)
  assert js <= np.log(2)


@pytest.mark.parametrize("kind,r", [
    ("refusal_prob", jnp.array([0.9, 0.5, 0.2, 0.4])),
    ("hidden", jnp.arange(8.0).reshape(4, 2) + 1),
    ("next_token", jax.nn.log_softmax(jnp.arange(12.0).reshape(4, 3) % 5, -1)),
])
def test_consistency_invariances(kind, r):
  loss = lambda x, pairs=PAIRS, valid=VALID: K.consistency_loss(x, pairs, W, valid, kind=kind)
  # An invalid pair contributes nothing, whatever its members hold (even NaN).
  poisoned = r.at[3].set(jnp.nan)
  pairs_nan = jnp.array([[0, 1], [1, 0], [0, 3]])
  base_val = loss(r, pairs_nan, jnp.array([True, True, False]))
  np.testing.assert_allclose(loss(poisoned, pairs_nan, jnp.array([True, True, False])), base_val)
  g = jax.grad(lambda x: loss(x, pairs_nan, jnp.array([True, True, False])))(poisoned)
  assert np.all(np.isfinite(g))
  # Identical members -> zero loss and zero gradient.
  same = jnp.array([[0, 0], [2, 2], [1, 1]])
  assert loss(r, same, jnp.ones(3, bool)) == 0.0
  # No valid pair -> exactly 0, finite gradient.
  assert loss(r, PAIRS, jnp.zeros(3, bool)) == 0.0
  g = jax.grad(lambda x: loss(x, PAIRS, jnp.zeros(3, bool)))(r)
  assert np.all(np.isfinite(g)) and not np.any(g)
  # Swapping pair members changes nothing (every distance is symmetric).
  np.testing.assert_allclose(loss(r, PAIRS[:, ::-1]), loss(r), rtol=1e-6)


# --- L_capability ----------------------------------------------------------------


def test_capability_known_values():
  p = np.array([[[0.5, 0.5], [0.9, 0.1]]], np.float32)
  q = np.array([[[0.25, 0.75], [0.5, 0.5]]], np.float32)
  mask = jnp.array([[1, 0]], bool)
  kl = lambda a, b: float((a * np.log(a / b)).sum())
  lp, lq = jnp.log(p), jnp.log(q)
  fwd = C.capability_loss(lq, mask, base_logits_BxNxV=lp)  # KL(base || adapted)
  np.testing.assert_allclose(fwd, kl(p[0, 0], q[0, 0]), rtol=1e-5)
  rev = C.capability_loss(lq, mask, base_logits_BxNxV=lp, direction="reverse")
  np.testing.assert_allclose(rev, kl(q[0, 0], p[0, 0]), rtol=1e-5)
  ce = C.capability_loss(lq, jnp.ones((1, 2), bool), targets_BxN=jnp.array([[1, 0]]), kind="ce")
  np.testing.assert_allclose(ce, -(np.log(0.75) + np.log(0.5)) / 2, rtol=1e-6)
  assert C.capability_loss(lp, jnp.ones((1, 2), bool), base_logits_BxNxV=lp) == 0.0
  # The first response token (column 0) can count more: weighted mean.
  both = jnp.ones((1, 2), bool)
  w3 = C.capability_loss(lq, both, base_logits_BxNxV=lp, first_token_weight=3.0)
  np.testing.assert_allclose(w3, (3 * kl(p[0, 0], q[0, 0]) + kl(p[0, 1], q[0, 1])) / 4,
                             rtol=1e-5)
  # No gradient flows into the base distribution.
  g = jax.grad(lambda b: C.capability_loss(lq, mask, base_logits_BxNxV=b))(lp)
  assert not np.any(g)


def test_each_loss_jit_equals_no_jit():
  k = jax.random.split(jax.random.key(0), 6)
  logits = jax.random.normal(k[0], (3, 4, 11)) * 3
  base_logits = jax.random.normal(k[1], (3, 4, 11)) * 3
  targets = jax.random.randint(k[2], (3, 4), 0, 11)
  mask = jax.random.bernoulli(k[3], 0.7, (3, 4))
  h = jax.random.normal(k[4], (4, 5))
  fns = {
      "safety": lambda: S.safety_loss(logits, targets, mask, jnp.array([1.0, 0.5, 2.0])),
      "cap_kl": lambda: C.capability_loss(logits, mask, base_logits_BxNxV=base_logits),
      "cap_rev": lambda: C.capability_loss(logits, mask, base_logits_BxNxV=base_logits,
                                           direction="reverse"),
      "cap_ce": lambda: C.capability_loss(logits, mask, targets_BxN=targets, kind="ce"),
      "cons_hidden": lambda: K.consistency_loss(h, PAIRS, W, VALID, kind="hidden"),
      "cons_prob": lambda: K.consistency_loss(jax.nn.sigmoid(h[:, 0]), PAIRS, W, VALID,
                                              kind="refusal_prob"),
      "cons_js": lambda: K.consistency_loss(jax.nn.log_softmax(h), PAIRS, W, VALID,
                                            kind="next_token"),
      "first_token": lambda: scorers.first_token_refusal_prob(logits[:, 0], jnp.array([1, 4])),
      "soft_pattern": lambda: scorers.soft_pattern_prob(logits[:2], targets[:2], mask[:2], 2),
      "classifier": lambda: scorers.classifier_score(
          {"mu": 0.0, "sd": 1.0, "w1": jnp.ones((5, 3)), "b1": jnp.zeros(3),
           "w2": jnp.ones(3), "b2": 0.0}, logits, mask, h[jnp.arange(11) % 4]),
      "probe": lambda: scorers.probe_score({"mu": 0.0, "sd": 1.0, "w": jnp.ones(5), "b": 0.1},
                                           h[None].repeat(2, 0), jnp.ones((2, 4), bool)),
  }
  for name, f in fns.items():
    with jax.disable_jit():
      eager = np.asarray(f())
    np.testing.assert_allclose(jax.jit(f)(), eager, rtol=1e-6, atol=1e-7, err_msg=name)
    assert np.all(np.isfinite(eager)), name


# --- total_loss -----------------------------------------------------------------


_JITTED = {}


def run_total(adapters, base, batch, aux, cfg, rng=None, jit=True, acfg=ACFG):
  """total_loss, jitted once per config (tests reuse the compiled step)."""
  key = (cfg.to_json(), acfg.to_json())
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda a, b, bt, x, r: T.total_loss(
        a, b, bt, model_cfg=TINY, adapter_cfg=acfg, loss_cfg=cfg, aux=x, rng=r))
  if not jit:
    return T.total_loss(adapters, base, batch, model_cfg=TINY, adapter_cfg=acfg, loss_cfg=cfg,
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
  f = lambda a: T.total_loss(a, base, batch, model_cfg=TINY, adapter_cfg=ACFG, loss_cfg=cfg,
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

  aux = T.build_aux(loss_cfg(), Tok())
  assert aux["refusal_token_ids"].dtype == np.int32
  assert aux["refusal_phrase_ids"].shape == aux["refusal_phrase_mask"].shape
  with pytest.raises(ValueError, match="classifier"):
    T.build_aux(loss_cfg(scorer="classifier"), Tok())
  with pytest.raises(ValueError, match="loss.scorer"):
    T.build_aux(loss_cfg(scorer="nope"))
  with pytest.raises(ValueError, match="consistency_repr"):
    T.total_loss({}, base, make_batch(), model_cfg=TINY, adapter_cfg=ACFG,
                 loss_cfg=loss_cfg(consistency_repr="nope"), aux={}, rng=None)
