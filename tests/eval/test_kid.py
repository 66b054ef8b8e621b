"""KID against a direct computation of the unbiased MMD^2, and FID's bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import kid as kid_lib


def _mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
  """The unbiased MMD^2 under (x.y/d + 1)^3, written as its three sums over index pairs."""
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
  m, n = len(x), len(y)
  sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return sxx + syy - 2 * sxy


def test_kid_is_the_unbiased_mmd():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((12, 5))
  y = rng.standard_normal((12, 5)) + 0.5
  # One subset holding every row (a permutation, which MMD does not see): the direct value,
  # to float64 round-off.
  mean, std = kid_lib.kid(x, y, subsets=1, subset_size=12)
  assert mean == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
  assert std == 0.0


def test_kid_separates_distributions_and_is_unbiased_at_zero():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((400, 16))
  same = rng.standard_normal((400, 16))
  shifted = rng.standard_normal((400, 16)) + 0.3
  k_same, s_same = kid_lib.kid(a, same, subsets=50, subset_size=200)
  k_shift, _ = kid_lib.kid(a, shifted, subsets=50, subset_size=200)
  # Unbiased: same-distribution KID is 0 within its spread (a biased estimate such as
  # FID's would sit above 0 by O(d / N)).
  assert abs(k_same) < 3 * s_same
  assert k_shift > 10 * max(abs(k_same), s_same)


def test_fid_interval_brackets_the_spread_of_the_draw():
  rng = np.random.default_rng(2)
  ref = rng.standard_normal((600, 8))
  small = rng.standard_normal((40, 8)) + 0.2
  large = rng.standard_normal((400, 8)) + 0.2
  point, low, high = kid_lib.fid_interval(small, ref, resamples=200, seed=0)
  assert point == fid_lib.feature_distance(small, ref)
  assert low < point < high  # centred on the estimate (raw percentiles sit above it)
  _, low_l, high_l = kid_lib.fid_interval(large, ref, resamples=200, seed=0)
  assert high_l - low_l < (high - low) / 2  # ~1/sqrt(N): 10x the samples, ~3x narrower
  assert np.isnan(kid_lib.fid_interval(small, ref, resamples=0)[1])
