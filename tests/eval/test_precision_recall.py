"""Precision and recall on feature sets with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from imagen_jax.eval import precision_recall as pr


def test_identical_sets_score_one_and_one():
  x = np.random.default_rng(0).standard_normal((300, 16))
  assert pr.precision_recall(x, x.copy()) == (1.0, 1.0)


def test_mode_collapse_keeps_precision_and_loses_recall():
  rng = np.random.default_rng(1)
  real = rng.standard_normal((600, 8))
  # Samples on 5 real points only (tiny jitter): each looks real, but they cover little.
  modes = real[rng.choice(600, 5, replace=False)]
  fake = modes[rng.integers(0, 5, 600)] + 1e-3 * rng.standard_normal((600, 8))
  precision, recall = pr.precision_recall(real, fake)
  assert precision > 0.95
  assert recall < 0.1


def test_samples_off_the_data_have_no_precision():
  rng = np.random.default_rng(2)
  real = rng.standard_normal((400, 8))
  fake = rng.standard_normal((400, 8)) + 20.0  # far from every real ball
  precision, recall = pr.precision_recall(real, fake)
  assert precision == 0.0 and recall == 0.0


def test_knn_radius_is_the_kth_neighbour():
  # Points on a line at 0, 1, 3, 7: the 2nd nearest other point of 0 is 3 (squared 9).
  x = np.array([[0.0], [1.0], [3.0], [7.0]])
  np.testing.assert_allclose(pr.knn_radii(x, k=2), [9.0, 4.0, 9.0, 36.0])
  with pytest.raises(ValueError, match="more than k=3"):
    pr.knn_radii(x[:3], k=3)
