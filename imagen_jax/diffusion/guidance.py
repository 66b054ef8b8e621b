"""Classifier-free guidance, Imagen's thresholding, and SR noise-conditioning augmentation.

Everything here builds or wraps a `denoise_fn(x_t, logsnr) -> x0_hat` for the samplers.

Guidance space. Ho & Salimans' guided prediction is w * cond + (1 - w) * uncond
(Imagen's convention: w = 1 is the plain conditional model). Given x_t and lambda,
x0, eps and v are affine functions of one another with the same x_t, and an affine
combination whose weights sum to 1 commutes with affine maps. So guiding in eps, x0 or
v space gives the same x0_hat for every model target; we combine in x0 space, where
thresholding then acts, and `tests/diffusion/test_guidance.py` checks the equivalence.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.objectives import diffuse, expand_to, to_x0
from imagen_jax.diffusion.schedules import Schedule

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


def cfg_denoise_fn(pred_fn: Callable[[Array, Array], tuple[Array, Array]], *, scale: float,
                   target: str) -> DenoiseFn:
  """Classifier-free guidance as a denoiser.

  Args:
    pred_fn: (x_t, logsnr) -> (conditional, unconditional) predictions in `target` space
      (a model usually computes both in one forward on a doubled batch).
    scale: guidance weight w; 1 gives the conditional model, 0 the unconditional.
    target: "eps", "x0" or "v", what the network predicts.
  """

  def denoise(x_t, logsnr):
    cond, uncond = pred_fn(x_t, logsnr)
    x0_c = to_x0(cond, x_t, logsnr, target)
    x0_u = to_x0(uncond, x_t, logsnr, target)
    return x0_u + scale * (x0_c - x0_u)

  return denoise


def dynamic_threshold(x0: Array, percentile: float = 99.5) -> Array:
  """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3).

  s = max(percentile of |x0| per example, 1); x0 -> clip(x0, -s, s) / s. Output lies in
  [-1, 1]; examples already inside [-1, 1] are returned unchanged (s = 1).
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
  s = expand_to(s, x0).astype(x0.dtype)
  return jnp.clip(x0, -s, s) / s


def static_threshold(x0: Array) -> Array:
  """Static clipping of x0 to the data range [-1, 1]."""
  return jnp.clip(x0, -1.0, 1.0)


def thresholded(denoise_fn: DenoiseFn, method: str | None = "dynamic",
                percentile: float = 99.5) -> DenoiseFn:
  """Applies "dynamic", "static" or no (None / "none") thresholding to x0_hat."""
  if method in (None, "none"):
    return denoise_fn
  if method == "static":
    return lambda x_t, logsnr: static_threshold(denoise_fn(x_t, logsnr))
  if method == "dynamic":
    return lambda x_t, logsnr: dynamic_threshold(denoise_fn(x_t, logsnr), percentile)
  raise ValueError(f"Unknown thresholding {method!r}; choose 'dynamic', 'static' or 'none'.")


def noise_augment(rng: Array, x_lowres: Array, aug_t: Array, schedule: Schedule
                  ) -> tuple[Array, Array]:
  """Noise-conditioning augmentation of a low-res image for a super-resolution stage.

  Corrupts `x_lowres` [B, ...] to time `aug_t` (scalar or [B]) of `schedule`,
  x_aug = alpha x + sigma eps at lambda = schedule.logsnr(aug_t), and returns
  (x_aug, lambda [B]); the SR network is conditioned on that lambda. Imagen draws
  aug_t at random during training (`sample_aug_t`) and fixes it at sampling time.
  """
  aug_t = jnp.broadcast_to(jnp.asarray(aug_t, jnp.float32), x_lowres.shape[:1])
  logsnr = schedule.logsnr(aug_t)
  eps = jax.random.normal(rng, x_lowres.shape, x_lowres.dtype)
  return diffuse(x_lowres, eps, logsnr), logsnr


def sample_aug_t(rng: Array, batch: int, max_t: float = 1.0) -> Array:
  """Training-time augmentation levels, uniform in [0, max_t] (Imagen's choice)."""
  return jax.random.uniform(rng, (batch,), maxval=max_t)
