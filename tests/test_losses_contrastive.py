"""losses/contrastive.py: InfoNCE against a direct numpy computation."""

import jax
import numpy as np

from semsafe_jax.losses.contrastive import info_nce


def direct(z, pairs, temperature, weights=None, rows=None):
  """Loops over pairs and rows, as the formula reads."""
  z = np.asarray(z, np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n = len(z)
  rows = list(range(n)) if rows is None else rows
  weights = [1.0] * len(pairs) if weights is None else weights

  def nll(a, b):
    s = {k: float(z[a] @ z[k]) / temperature for k in rows if k != a}
    return -(s[b] - np.log(sum(np.exp(v) for v in s.values())))

  terms = [0.5 * (nll(a, b) + nll(b, a)) for a, b in pairs]
  return sum(w * t for w, t in zip(weights, terms)) / sum(weights)


def test_matches_direct_computation_and_ignores_padding_pairs():
  rng = np.random.default_rng(0)
  z = rng.standard_normal((6, 5)).astype(np.float32)
  index = np.array([[0, 1], [2, 3], [0, 0], [4, 1]], np.int32)
  valid = np.array([True, True, False, True])
  got = info_nce(z, index, valid, 0.5)
  want = direct(z, [(0, 1), (2, 3), (4, 1)], 0.5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Scale does not matter (cosine), and a padding pair's indices do not either.
  index2 = index.copy()
  index2[2] = [5, 2]
  np.testing.assert_allclose(float(info_nce(3.0 * z, index2, valid, 0.5)), want, rtol=1e-5)


def test_weights_temperature_and_padding_rows():
  rng = np.random.default_rng(1)
  z = rng.standard_normal((5, 3)).astype(np.float32)
  index = np.array([[0, 1], [1, 2]], np.int32)
  w = np.array([0.25, 1.0], np.float32)
  got = info_nce(z, index, np.ones(2, bool), 0.1, weight_P=w)
  np.testing.assert_allclose(float(got), direct(z, [(0, 1), (1, 2)], 0.1, [0.25, 1.0]),
                             rtol=1e-5)
  # Row 4 is padding: it is no negative, and a pair touching it does not count.
  rows = np.array([True, True, True, True, False])
  index3 = np.array([[0, 1], [1, 2], [3, 4]], np.int32)
  got = info_nce(z, index3, np.ones(3, bool), 0.1, weight_P=np.r_[w, 1.0], row_valid_N=rows)
  np.testing.assert_allclose(float(got), direct(z, [(0, 1), (1, 2)], 0.1, [0.25, 1.0],
                                                rows=[0, 1, 2, 3]), rtol=1e-5)


def test_aligned_positives_score_lower_and_no_pairs_is_zero_with_finite_grads():
  # Pair (0, 1) identical and orthogonal to the rest: near the minimum log(1 + (n-2)e^0/e^(1/t)).
  z = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
  t = 0.2
  got = float(info_nce(z, np.array([[0, 1]]), np.array([True]), t))
  np.testing.assert_allclose(got, np.log(1 + 2 * np.exp(-1 / t)), rtol=1e-5)
  bad = float(info_nce(z, np.array([[0, 2]]), np.array([True]), t))
  assert bad > got
  none = info_nce(z, np.array([[0, 1]]), np.array([False]), t)
  assert float(none) == 0.0
  g = jax.grad(lambda x: info_nce(x, np.array([[0, 0]]), np.array([False]), t))(z)
  assert np.isfinite(np.asarray(g)).all() and not np.asarray(g).any()
