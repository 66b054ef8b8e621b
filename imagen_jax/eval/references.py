"""The real images an evaluation compares against: Inception features and captions of a
built split (cached), the held-out captions to sample, and the real images themselves.
Shared by the cascade's guidance sweep and a stage's checkpoint evaluation."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from imagen_jax.data import datasets
from imagen_jax.eval import alignment as align_lib
from imagen_jax.eval import fid as fid_lib


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def pick(n: int, limit: int) -> np.ndarray:
  """`limit` indices spread evenly over [0, n) (all when limit is 0 or >= n)."""
  if not limit or limit >= n:
    return np.arange(n)
  return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def split_features(data_cfg: Any, split: str, limit: int, cache_dir: str, *,
                   inception: str | None, batch_size: int) -> tuple[np.ndarray, list[str]]:
  """Inception pool3 features and captions of (up to `limit` of) a built split, cached in
  cache_dir under a key of the dataset, split, resolution, limit and weights."""
  source = datasets.data_source(data_cfg, split)
  idx = pick(len(source), int(limit))
  key = align_lib.cache_key(kind="features", dataset=data_cfg.dataset,
                            data_dir=datasets.data_dir(data_cfg), split=split,
                            resolution=int(data_cfg.resolution), limit=int(limit),
                            records=len(source), dataset_limit=data_cfg.get("limit", 0),
                            inception=inception or "default")
  path = os.path.join(cache_dir, f"features-{split}-{key}.npz")
  if os.path.isfile(path):
    with np.load(path) as z:
      return z["features"], [str(c) for c in z["captions"]]
  images = np.stack([np.asarray(source[int(i)]["image"]) for i in idx])
  captions = [_text(source[int(i)]["caption"]) for i in idx]
  print(f"Inception features of {len(idx)} {split} images ({images.shape[1]}px) -> {path}")
  feats = fid_lib.inception_features(images, batch_size=batch_size, weights=inception or None)
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, features=feats, captions=np.asarray(captions))
  os.replace(tmp, path)
  return feats, captions


def eval_prompts(captions: Sequence[str], n: int, seed: int) -> list[str]:
  """n held-out captions: a seeded permutation, repeated when n exceeds the split."""
  order = np.random.default_rng(seed).permutation(len(captions))
  return [captions[order[i % len(order)]] for i in range(n)]


def real_images(data_cfg: Any, split: str, limit: int) -> np.ndarray:
  """The images of (up to `limit` of) a built split, uint8 [N, R, R, 3]."""
  source = datasets.data_source(data_cfg, split)
  return np.stack([np.asarray(source[int(i)]["image"]) for i in pick(len(source), limit)])
