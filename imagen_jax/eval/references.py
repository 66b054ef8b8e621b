"""The real images an evaluation compares against: Inception features and captions of a
built split (cached), the held-out captions to sample, and the real images themselves.
Shared by the cascade's guidance sweep and a stage's checkpoint evaluation.

In a multi-host evaluation each process computes the features of its share of a split's
images, gathered on every process; process 0 writes the cache (imagen_jax/multihost.py)."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Sequence

import numpy as np

from imagen_jax import multihost
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


def has_split(data_cfg: Any, split: str) -> bool:
  """Whether the built dataset holds `split` (raises if the dataset is not built at all)."""
  builder = datasets.make_builder(data_cfg)
  if not datasets.is_built(builder):
    datasets.data_source(data_cfg, split)  # raises DatasetNotBuiltError with the fix
  return split in builder.info.splits


def one_per_image(ids: Sequence[str]) -> np.ndarray:
  """Record indices keeping one record per image id, in record order: of an image with
  several captions (COCO has five), the caption picked by a hash of the id, so the choice
  is fixed whatever else the split holds. Records without ids count as distinct images."""
  groups: dict[str, list[int]] = {}
  for i, image_id in enumerate(ids):
    groups.setdefault(image_id, []).append(i)
  keep = [g[int.from_bytes(hashlib.sha256(k.encode("utf-8")).digest()[:8], "big") % len(g)]
          for k, g in groups.items()]
  return np.sort(np.asarray(keep, np.int64))


def _image_ids(source: Any) -> list[str]:
  if not len(source) or "id" not in source[0]:
    return [str(i) for i in range(len(source))]
  return [_text(source[i]["id"]) for i in range(len(source))]


def split_features(data_cfg: Any, split: str, limit: int, cache_dir: str, *,
                   inception: str | None, batch_size: int,
                   resize: str = fid_lib.DEFAULT_RESIZE) -> tuple[np.ndarray, list[str]]:
  """Inception pool3 features and captions of (up to `limit` of) the images of a built
  split, one caption per image (`one_per_image`: FID counts each image once, and prompts
  drawn from the captions are one per sampled image, as the COCO protocol asks), cached
  in cache_dir under a key of the dataset, split, resolution, limit, weights and resize.

  Multi-host: a collective. The cache is read only where every process sees it; else each
  process featurises a share of the images (boundaries on batch_size multiples, so every
  Inception batch is one a single process forms), and the features are gathered."""
  source = datasets.data_source(data_cfg, split)
  key = align_lib.cache_key(kind="features", dataset=data_cfg.dataset,
                            data_dir=datasets.data_dir(data_cfg), split=split,
                            resolution=int(data_cfg.resolution), limit=int(limit),
                            records=len(source), one_per_image=True,
                            dataset_limit=data_cfg.get("limit", 0),
                            inception=inception or "default", resize=resize)
  path = os.path.join(cache_dir, f"features-{split}-{key}.npz")
  if not multihost.any_process(not os.path.isfile(path)):
    with np.load(path) as z:
      return z["features"], [str(c) for c in z["captions"]]
  labels = datasets.data_source(data_cfg, split, decode_images=False)
  images_idx = one_per_image(_image_ids(labels))
  idx = images_idx[pick(len(images_idx), int(limit))]
  mine = idx[multihost.share(len(idx), align=batch_size)]
  images = np.stack([np.asarray(source[int(i)]["image"]) for i in mine]) if len(mine) else (
      np.zeros((0, 1, 1, 3), np.uint8))
  captions = [_text(labels[int(i)]["caption"]) for i in idx]
  main = multihost.is_main()
  if main:
    print(f"Inception features of {len(idx)} {split} images ({images.shape[1]}px, "
          f"{resize} resize) -> {path}")
  feats = multihost.gather(fid_lib.inception_features(
      images, batch_size=batch_size, weights=inception or None, resize=resize, progress=main))
  if main:
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
  """The images of (up to `limit` of) a built split, one per image id as `split_features`
  picks them (same order), uint8 [N, R, R, 3]."""
  source = datasets.data_source(data_cfg, split)
  labels = datasets.data_source(data_cfg, split, decode_images=False)
  images_idx = one_per_image(_image_ids(labels))
  return np.stack([np.asarray(source[int(i)]["image"])
                   for i in images_idx[pick(len(images_idx), limit)]])
