"""Report statistics against values computed by hand."""

import math

import numpy as np
import pytest

from semsafe_jax.eval import report, stats


def test_wilson_by_hand():
  # p = 8/10, z = 1.959964: centre = (0.8 + z^2/20) / (1 + z^2/10),
  # half = z * sqrt(0.8 * 0.2 / 10 + z^2 / 400) / (1 + z^2/10).
  z = 1.959964
  centre = (0.8 + z * z / 20) / (1 + z * z / 10)
  half = z * math.sqrt(0.016 + z * z / 400) / (1 + z * z / 10)
  lo, hi = stats.wilson_ci(8, 10)
  assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-12)
  assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # published table values
  assert stats.wilson_ci(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
  assert stats.wilson_ci(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
  assert stats.wilson_ci(0, 0) == (0.0, 1.0)
  assert report.wilson_ci is stats.wilson_ci  # one copy


def test_t_quantiles():
  # Standard t-table values.
  assert stats.t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-5)
  assert stats.t_quantile(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
  assert stats.t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-5)


def test_mean_ci_by_hand():
  r = stats.mean_ci([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.302653
  half = 4.302653 / math.sqrt(3)
  assert r.mean == 2.0 and r.sd == pytest.approx(1.0) and r.n == 3
  assert (r.lo, r.hi) == pytest.approx((2 - half, 2 + half), abs=1e-5)
  one = stats.mean_ci([0.7])
  assert one.mean == 0.7 and one.lo is None and one.hi is None
  with pytest.raises(ValueError):
    stats.mean_ci([])


def test_mcnemar_exact_and_mid_p_by_hand():
  # a = baseline, b = method. 8 pairs flip 1 -> 0 (b10), 2 flip 0 -> 1 (b01), 5 tie.
  a = [1] * 8 + [0] * 2 + [1] * 3 + [0] * 2
  b = [0] * 8 + [1] * 2 + [1] * 3 + [0] * 2
  r = stats.mcnemar(a, b)
  assert (r.b01, r.b10, r.n) == (2, 8, 15)
  # X ~ Bin(10, 1/2): P(X <= 2) = (1 + 10 + 45) / 1024, P(X = 2) = 45 / 1024.
  assert r.p_exact == pytest.approx(2 * 56 / 1024)
  assert r.p_mid == pytest.approx(2 * 56 / 1024 - 45 / 1024)
  r = stats.mcnemar([1] * 5, [0] * 5)  # 5 discordant pairs, all one way
  assert r.p_exact == pytest.approx(2 / 32) and r.p_mid == pytest.approx(1 / 32)
  r = stats.mcnemar([1, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1])  # balanced: no evidence
  assert r.p_exact == 1.0 and r.p_mid == pytest.approx(1.0)
  assert stats.mcnemar([1, 0], [1, 0]).p_exact == 1.0  # no discordant pair
  with pytest.raises(ValueError, match="differ in length"):
    stats.mcnemar([1], [1, 0])


def test_paired_bootstrap():
  same = stats.paired_bootstrap([0, 1, 1, 0], [0, 1, 1, 0], num_samples=500)
  assert same.diff == 0 and same.lo == same.hi == 0 and same.p_value == 1.0
  all_flip = stats.paired_bootstrap([0] * 40, [1] * 40, num_samples=999)
  assert all_flip.diff == 1 and all_flip.lo == all_flip.hi == 1
  assert all_flip.p_value == pytest.approx(1 / 1000)
  # A mixed case against the normal approximation: d has mean 0.3 and the bootstrap
  # standard error of a mean is sd(ddof=0) / sqrt(n).
  rng = np.random.default_rng(1)
  a = (rng.random(400) < 0.4).astype(float)
  b = np.where(rng.random(400) < 0.3, 1.0, a)
  d = b - a
  se = d.std() / math.sqrt(len(d))
  r = stats.paired_bootstrap(a, b, num_samples=20_000, seed=3)
  assert r.diff == pytest.approx(d.mean())
  assert (r.hi - r.lo) / 2 == pytest.approx(1.959964 * se, rel=0.08)
  assert r.lo < d.mean() < r.hi
  # A small effect: the p-value is close to the normal approximation's.
  b2 = np.where(rng.random(400) < 0.05, 1.0, a)
  d2 = b2 - a
  z = d2.mean() / (d2.std() / math.sqrt(len(d2)))
  p_normal = math.erfc(abs(z) / math.sqrt(2))
  r2 = stats.paired_bootstrap(a, b2, num_samples=20_000, seed=4)
  assert r2.p_value == pytest.approx(p_normal, abs=0.02)
  # Deterministic by seed.
  assert stats.paired_bootstrap(a, b2, seed=4, num_samples=1000) == stats.paired_bootstrap(
      a, b2, seed=4, num_samples=1000)


def test_cohen_kappa_by_hand():
  # 2x2 table: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no. po = 0.7,
  # pe = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = (0.7 - 0.5) / 0.5 = 0.4.
  x = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
  y = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
  assert stats.cohen_kappa(x, y) == pytest.approx(0.4)
  assert stats.cohen_kappa([True, False, True], [True, False, True]) == 1.0
  assert stats.cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
  assert stats.cohen_kappa([1, 1, 1], [1, 1, 1]) is None  # chance agreement is 1
  assert stats.cohen_kappa([], []) is None
