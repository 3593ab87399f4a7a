"""Loss building blocks: known values, invariances, gradients, jit == no-jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semsafe_jax.losses import capability as C
from semsafe_jax.losses import common
from semsafe_jax.losses import consistency as K
from semsafe_jax.losses import safety as S
from semsafe_jax.losses import scorers


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
