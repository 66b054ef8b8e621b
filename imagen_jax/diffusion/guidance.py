"""Classifier-free guidance, Imagen's thresholding, and SR noise-conditioning augmentation.

The guidance and thresholding functions build or wrap a `denoise_fn(x_t, logsnr) -> x0_hat`
for the samplers.

Guidance space. Ho & Salimans' guided prediction is w * cond + (1 - w) * uncond
(Imagen's convention: w = 1 is the plain conditional model). Given x_t and lambda,
x0, eps and v are affine functions of one another with the same x_t, and an affine
combination whose weights sum to 1 commutes with affine maps. So guiding in eps, x0 or
v space gives the same x0_hat for every model target; we combine in x0 space, where
thresholding then acts, and `tests/diffusion/test_guidance.py` checks the equivalence.

Noise-conditioning augmentation (Imagen sec. 2.5) corrupts an SR stage's low-res input
on its own schedule (`NoiseAug.schedule`, not the diffusion schedule: an ablation of the
training schedule must leave the augmentation alone), at levels drawn per example or
per batch during training and at one fixed level when sampling. That level can be given
as a time t of the augmentation schedule, a log-SNR, or the VP noise std sigma
(x_aug = alpha x + sigma eps, sigma^2 = sigmoid(-lambda)); `aug_level` converts between
the three, and is the only place that does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.objectives import diffuse, expand_to, to_x0
from imagen_jax.diffusion.schedules import Schedule, get_schedule

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


THRESHOLDINGS = ("dynamic", "static", "none")


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


# How training draws augmentation levels: one per example, or one for the whole batch
# (the paper's pseudo-code and imagen-pytorch's default).
AUG_PER = ("example", "batch")
# The ways to give the sampling level, as noise_aug keys and as `aug_level` arguments.
AUG_LEVEL_FORMS = ("t", "logsnr", "sigma")


def sample_aug_t(rng: Array, batch: int, max_t: float = 1.0, per: str = "example") -> Array:
  """Training-time augmentation levels [batch], uniform in [0, max_t] (Imagen's choice).

  per="example" draws one level per example; per="batch" draws one level and repeats it.
  """
  if per == "example":
    return jax.random.uniform(rng, (batch,), maxval=max_t)
  if per == "batch":
    return jnp.broadcast_to(jax.random.uniform(rng, (), maxval=max_t), (batch,))
  raise ValueError(f"Unknown per={per!r}; choose one of {AUG_PER}.")


@dataclasses.dataclass(frozen=True)
class AugLevel:
  """One augmentation level in its three forms on one schedule."""
  t: float        # time of the augmentation schedule, in [0, 1]
  logsnr: float   # lambda(t), what the SR network is conditioned on
  sigma: float    # std of the added noise: x_aug = alpha x + sigma eps, sigma^2 = sigmoid(-lambda)


def _sigma(logsnr: float) -> float:
  """VP sigma = sqrt(sigmoid(-lambda)), in float64."""
  return math.sqrt(math.exp(-logsnr) / (1.0 + math.exp(-logsnr)) if logsnr >= 0
                   else 1.0 / (1.0 + math.exp(logsnr)))


def _logsnr_from_sigma(sigma: float) -> float:
  """Inverse of `_sigma`: lambda = log(1 - sigma^2) - 2 log sigma."""
  return math.log1p(-sigma * sigma) - 2.0 * math.log(sigma)


def aug_level_range(schedule: Schedule) -> dict[str, tuple[float, float]]:
  """The (low, high) values each form of a level can take on `schedule`."""
  lo, hi = float(schedule.logsnr_min), float(schedule.logsnr_max)
  return {"t": (0.0, 1.0), "logsnr": (lo, hi), "sigma": (_sigma(hi), _sigma(lo))}


def aug_level(schedule: Schedule, *, t: float | None = None, logsnr: float | None = None,
              sigma: float | None = None) -> AugLevel:
  """The level given as exactly one of t, logsnr or sigma, in all three forms.

  Computed in float64 on the host (a Python constant for the sampler). Raises ValueError
  when none or several are given, or a value lies outside what `schedule` reaches
  (`aug_level_range`).
  """
  given = {k: v for k, v in zip(AUG_LEVEL_FORMS, (t, logsnr, sigma)) if v is not None}
  if len(given) != 1:
    raise ValueError(f"Give the augmentation level as exactly one of {AUG_LEVEL_FORMS}; "
                     f"got {given or 'none'}.")
  (form, value), = given.items()
  value = float(value)
  lo, hi = aug_level_range(schedule)[form]
  if not lo <= value <= hi:  # also rejects NaN
    raise ValueError(f"Augmentation level {form}={value} lies outside [{lo:.6g}, {hi:.6g}], "
                     f"the range of {form} on {type(schedule).__name__}.")
  with jax.ensure_compile_time_eval(), jax.enable_x64(True):
    if form == "t":
      lam = float(schedule.logsnr(jnp.float64(value)))
    else:
      lam = value if form == "logsnr" else _logsnr_from_sigma(value)
    t_val = value if form == "t" else float(schedule.t_from_logsnr(jnp.float64(lam)))
  return AugLevel(t=t_val, logsnr=lam, sigma=value if form == "sigma" else _sigma(lam))


def _plain(d: Any) -> dict[str, Any]:
  return d.to_dict() if hasattr(d, "to_dict") else dict(d or {})


@dataclasses.dataclass(frozen=True)
class NoiseAug:
  """An SR stage's noise-conditioning augmentation, read from its `diffusion` section.

  Training corrupts the low-res input to aug_t ~ U[0, max_t] of `schedule` (one level per
  example or per batch, `per`); sampling uses the one level `sample_level()`.
  """
  schedule_name: str
  schedule_kw: dict = dataclasses.field(default_factory=dict)
  max_t: float = 1.0
  per: str = "example"
  sample_t: float | None = 0.2
  sample_logsnr: float | None = None
  sample_sigma: float | None = None

  @classmethod
  def from_config(cls, diffusion: Mapping[str, Any]) -> "NoiseAug":
    """From diffusion.noise_aug. Configs saved before the augmentation had its own
    schedule lack noise_aug.schedule (and per, sample_logsnr, sample_sigma): they
    corrupted on diffusion.schedule, one level per example, and so do these."""
    na = diffusion["noise_aug"]
    if na.get("schedule") is None:
      name, kw = diffusion["schedule"], _plain(diffusion.get("schedule_kw"))
    else:
      name, kw = na["schedule"], _plain(na.get("schedule_kw"))
    return cls(schedule_name=name, schedule_kw=kw, max_t=float(na.get("max_t", 1.0)),
               per=na.get("per") or "example", sample_t=na.get("sample_t"),
               sample_logsnr=na.get("sample_logsnr"), sample_sigma=na.get("sample_sigma"))

  @property
  def schedule(self) -> Schedule:
    return get_schedule(self.schedule_name, **self.schedule_kw)

  def sample_level(self) -> AugLevel:
    """The sampling level (whichever of sample_t / _logsnr / _sigma is set)."""
    return aug_level(self.schedule, t=self.sample_t, logsnr=self.sample_logsnr,
                     sigma=self.sample_sigma)
