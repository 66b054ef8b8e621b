"""Improved precision and recall (Kynkäänniemi et al. 2019) on Inception features.

Each set's manifold is the union of balls around its points, each ball's radius the
distance to the point's k-th nearest neighbour in its own set (k = 3, the paper's). Then

  precision  the fraction of generated samples inside the real manifold (fidelity)
  recall     the fraction of real samples inside the generated manifold (diversity)

so a sweep can tell "samples look real" from "samples cover the data", which FID mixes.
Written here (numpy, chunked distances) because the reference implementations are in
TensorFlow 1 and torch; it reads the features the FID path already computed.
"""

from __future__ import annotations

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def knn_radii(features: np.ndarray, k: int = 3, chunk: int = 1024) -> np.ndarray:
  """Squared distance from each row to its k-th nearest other row [N]."""
  f = np.asarray(features, np.float64)
  if len(f) <= k:
    raise ValueError(f"k-NN radii need more than k={k} points, got {len(f)}.")
  out = np.empty(len(f))
  for i in range(0, len(f), chunk):
    d = _sq_dists(f[i:i + chunk], f)
    # Column k of the sorted row: index 0 is the point itself (distance 0).
    out[i:i + chunk] = np.partition(d, k, axis=1)[:, k]
  return out


def _inside(points: np.ndarray, centres: np.ndarray, radii: np.ndarray,
            chunk: int = 1024) -> np.ndarray:
  """For each point: is it within some centre's radius (squared distances)?"""
  hit = np.zeros(len(points), bool)
  for i in range(0, len(points), chunk):
    d = _sq_dists(points[i:i + chunk], centres)
    hit[i:i + chunk] = (d <= radii[None, :]).any(axis=1)
  return hit


def precision_recall(real: np.ndarray, fake: np.ndarray, *, k: int = 3
                     ) -> tuple[float, float]:
  """(precision, recall) of generated features `fake` [M, D] against `real` [N, D]."""
  real = np.asarray(real, np.float64)
  fake = np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall needs features [N, D] with equal D; got {real.shape} "
                     f"and {fake.shape}.")
  precision = _inside(fake, real, knn_radii(real, k)).mean()
  recall = _inside(real, fake, knn_radii(fake, k)).mean()
  return float(precision), float(recall)
