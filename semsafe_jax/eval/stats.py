"""Statistics for the reports: intervals for rates and means, paired tests, agreement.

- `wilson_ci`: 95% interval for one rate k/n (every refusal rate in a report).
- `mean_ci`: mean and t-interval of one number across seeds.
- `paired_bootstrap`: a difference of two rates measured on the SAME prompts
  (method vs baseline), resampling prompts so the pairing is kept.
- `mcnemar`: the exact (binomial) McNemar test on the same pairs, and its mid-p.
- `cohen_kappa`: chance-corrected agreement of two judges on the same answers.

Pure functions of numbers and arrays (numpy, scipy for the t quantile).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

Z95 = 1.959964


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float]:
  """95% Wilson score interval: sane at 0/n and n/n, unlike the normal approximation."""
  if n == 0:
    return (0.0, 1.0)
  p = k / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


def t_quantile(q: float, df: int) -> float:
  """Student t quantile (scipy ships with jax)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.t.ppf(q, df))


class MeanCI(NamedTuple):
  mean: float
  lo: float | None  # None with fewer than two values
  hi: float | None
  n: int
  sd: float | None  # sample standard deviation (ddof=1)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> MeanCI:
  """Mean and two-sided t-interval (e.g. one metric over seeds)."""
  x = np.asarray([float(v) for v in values], np.float64)
  n = len(x)
  if n == 0:
    raise ValueError("mean_ci needs at least one value.")
  m = float(x.mean())
  if n < 2:
    return MeanCI(m, None, None, n, None)
  sd = float(x.std(ddof=1))
  half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
  return MeanCI(m, m - half, m + half, n, sd)


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64).reshape(-1), np.asarray(b, np.float64).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"paired samples differ in length: {a.size} vs {b.size}.")
  return a, b


class BootstrapResult(NamedTuple):
  diff: float  # mean(b) - mean(a)
  lo: float  # percentile interval of the difference
  hi: float
  p_value: float  # two-sided, H0: no difference
  n: int


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, num_samples: int = 10_000,
                     seed: int = 0, confidence: float = 0.95) -> BootstrapResult:
  """Paired bootstrap of mean(b) - mean(a) over the same items (0/1 decisions or scores).

  Items are resampled with replacement, keeping each item's (a, b) pair. The
  interval is the percentile interval; the p-value is the share of resampled
  differences at least as far from the observed one as the observed one is from
  zero (the null distribution is the bootstrap distribution shifted to 0), with
  the +1 correction so it is never exactly 0.
  """
  a, b = _paired(a, b)
  n = a.size
  if n == 0:
    raise ValueError("paired_bootstrap needs at least one pair.")
  d = b - a
  obs = float(d.mean())
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(num_samples, n))
  boot = d[idx].mean(axis=1)
  alpha = (1 - confidence) / 2
  lo, hi = np.quantile(boot, [alpha, 1 - alpha])
  extreme = np.abs(boot - obs) >= abs(obs) - 1e-12
  p = (1 + int(extreme.sum())) / (1 + num_samples)
  return BootstrapResult(obs, float(lo), float(hi), float(min(1.0, p)), n)


class McNemarResult(NamedTuple):
  b01: int  # a=0, b=1 (e.g. baseline answered, method refused)
  b10: int  # a=1, b=0
  p_exact: float  # two-sided exact binomial p-value
  p_mid: float  # mid-p (less conservative; Fagerland et al. 2013 recommend it)
  n: int  # pairs


def _binom_cdf_half(k: int, n: int) -> float:
  """P(X <= k) for X ~ Binomial(n, 1/2), exact in rationals."""
  return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemarResult:
  """McNemar's test on paired binary outcomes (same prompts, two models)."""
  a, b = _paired(a, b)
  a, b = a > 0.5, b > 0.5
  b01, b10 = int((~a & b).sum()), int((a & ~b).sum())
  m = b01 + b10
  if m == 0:
    return McNemarResult(b01, b10, 1.0, 1.0, int(a.size))
  k = min(b01, b10)
  two_tail = 2 * _binom_cdf_half(k, m)
  mid = two_tail - math.comb(m, k) / 2 ** m  # half the point probability on each side
  return McNemarResult(b01, b10, min(1.0, two_tail), min(1.0, mid), int(a.size))


def cohen_kappa(x: Sequence[bool], y: Sequence[bool]) -> float | None:
  """Cohen's kappa of two raters' labels on the same items; None when undefined
  (both raters give one and the same label to every item: chance agreement is 1)."""
  x, y = np.asarray(x).reshape(-1), np.asarray(y).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"cohen_kappa: {x.size} vs {y.size} labels.")
  if x.size == 0:
    return None
  labels = np.union1d(x, y)
  po = float((x == y).mean())
  pe = float(sum((x == c).mean() * (y == c).mean() for c in labels))
  if pe >= 1.0 - 1e-12:
    return None
  return (po - pe) / (1 - pe)
