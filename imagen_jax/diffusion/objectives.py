"""Prediction targets, their exact conversions, and the weighted diffusion loss.

With x_t = alpha x0 + sigma eps (variance preserving, see `schedules`), a network may
predict eps, x0 or v = alpha eps - sigma x0 (Salimans & Ho 2022). Given (x_t, lambda),
each determines the others exactly:

  x0  = (x_t - sigma eps) / alpha        eps = (x_t - alpha x0) / sigma
  x0  = alpha x_t - sigma v              eps = sigma x_t + alpha v

Training follows Kingma & Gao (2023): the loss is E_{t~U, eps}[ w(lambda) ||eps_hat - eps||^2 ]
with lambda = lambda_train(t). Two config choices, kept apart:

* which noise levels are trained: the training schedule (`schedules.get_schedule`),
  i.e. the density p(lambda) of `schedules.logsnr_density`;
* how much each counts: the weighting w(lambda) below, always expressed as a weight on
  the eps-MSE. The MSE of each target is a fixed multiple of the eps-MSE:

    ||x0_hat - x0||^2 = e^-lambda ||eps_hat - eps||^2
    ||v_hat  - v ||^2 = (1 + e^-lambda) ||eps_hat - eps||^2

  so any weighting can be used with any target; the loss is computed in the target's
  own space (numerically stable) and rescaled by w(lambda) / (its eps-MSE factor).

The effective weighting over lambda is w(lambda) p(lambda) (`implied_weighting`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.registry import lookup
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, logsnr_density

Array = jax.Array
TARGETS = ("eps", "x0", "v")


def expand_to(v: Array, x: Array) -> Array:
  """Reshapes a per-example value [B] (or a scalar) to broadcast against x [B, ...]."""
  v = jnp.asarray(v, x.dtype)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def diffuse(x0: Array, eps: Array, logsnr: Array) -> Array:
  """x_t = alpha x0 + sigma eps at per-example log-SNR `logsnr` ([B] or scalar)."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, x0))
  return alpha * x0 + sigma * eps


def _check_target(target: str) -> None:
  if target not in TARGETS:
    raise ValueError(f"Unknown prediction target {target!r}; choose one of {TARGETS}.")


def to_x0(pred: Array, x_t: Array, logsnr: Array, target: str) -> Array:
  """Converts a prediction in `target` space into an x0 prediction."""
  _check_target(target)
  alpha, sigma = alpha_sigma(expand_to(logsnr, x_t))
  if target == "x0":
    return pred
  if target == "eps":
    return (x_t - sigma * pred) / alpha
  return alpha * x_t - sigma * pred


def from_x0(x0: Array, x_t: Array, logsnr: Array, target: str) -> Array:
  """Converts an x0 prediction into `target` space."""
  _check_target(target)
  alpha, sigma = alpha_sigma(expand_to(logsnr, x_t))
  if target == "x0":
    return x0
  eps = (x_t - alpha * x0) / sigma
  if target == "eps":
    return eps
  return alpha * eps - sigma * x0


def convert(pred: Array, x_t: Array, logsnr: Array, src: str, dst: str) -> Array:
  """Converts a prediction between any two of eps / x0 / v.

  Direct formulas are used where one exists, so eps <-> v never divides by alpha.
  """
  _check_target(src)
  _check_target(dst)
  if src == dst:
    return pred
  alpha, sigma = alpha_sigma(expand_to(logsnr, x_t))
  if (src, dst) == ("v", "eps"):
    return sigma * x_t + alpha * pred
  if (src, dst) == ("eps", "v"):
    # v = alpha eps - sigma x0 with x0 = (x_t - sigma eps) / alpha = (eps - sigma x_t) / alpha
    return (pred - sigma * x_t) / alpha
  return from_x0(to_x0(pred, x_t, logsnr, src), x_t, logsnr, dst)


def targets(x0: Array, eps: Array, logsnr: Array) -> dict[str, Array]:
  """The regression target of each kind for a noised example."""
  alpha, sigma = alpha_sigma(expand_to(logsnr, x0))
  return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}


def denoiser(pred_fn: Callable[[Array, Array], Array], target: str) -> Callable[[Array, Array], Array]:
  """Wraps a network predicting `target` into `denoise_fn(x_t, logsnr) -> x0_hat`."""
  _check_target(target)
  return lambda x_t, logsnr: to_x0(pred_fn(x_t, logsnr), x_t, logsnr, target)


# Weightings w(lambda), as weights on the eps-MSE --------------------------------------


def _eps_mse_factor(target: str, logsnr: Array) -> Array:
  """||target_hat - target||^2 / ||eps_hat - eps||^2 at log-SNR `logsnr`."""
  return {"eps": jnp.ones_like(logsnr), "x0": jnp.exp(-logsnr),
          "v": 1.0 + jnp.exp(-logsnr)}[target]


def _min_snr(logsnr, gamma=5.0):
  # Hang et al. (2023): min(SNR, gamma) on the x0-MSE.
  return jnp.minimum(jnp.exp(logsnr), gamma) * jnp.exp(-logsnr)


def _edm(logsnr, sigma_data=0.5):
  # Karras et al. (2022): (sigma_e^2 + sigma_d^2) / (sigma_e sigma_d)^2 on the x0-MSE,
  # sigma_e^2 = e^-lambda, which times e^-lambda gives the eps-MSE weight.
  return 1.0 + jnp.exp(-logsnr) / sigma_data**2


WEIGHTINGS: dict[str, Callable[..., Array]] = {
    # The eps-MSE of DDPM ("simple" loss) and of Imagen.
    "eps": lambda logsnr: jnp.ones_like(logsnr),
    # Plain x0-MSE.
    "x0": lambda logsnr: jnp.exp(-logsnr),
    # Plain v-MSE = "SNR + 1" weighting of the x0-MSE (Salimans & Ho 2022).
    "v": lambda logsnr: 1.0 + jnp.exp(-logsnr),
    # x0-MSE weighted by SNR: by the identity above, exactly the eps-MSE (tested).
    "snr": lambda logsnr: jnp.exp(logsnr) * jnp.exp(-logsnr),
    # "Truncated SNR": x0-MSE weighted by max(SNR, 1) (Salimans & Ho 2022).
    "truncated_snr": lambda logsnr: jnp.maximum(jnp.exp(logsnr), 1.0) * jnp.exp(-logsnr),
    "min_snr": _min_snr,
    "edm": _edm,
    # Kingma & Gao (2023): sigmoid(b - lambda) on the eps-MSE, their best on ImageNet.
    "sigmoid": lambda logsnr, bias=2.0: jax.nn.sigmoid(bias - logsnr),
}


def get_weighting(name: str, **kw) -> Callable[[Array], Array]:
  """w(lambda) by name, e.g. `get_weighting("min_snr", gamma=5.0)`."""
  fn = lookup(WEIGHTINGS, name, "loss weighting")
  try:
    fn(jnp.zeros(()), **kw)
  except TypeError as e:
    raise ValueError(f"Loss weighting {name!r} does not take {sorted(kw)}: {e}") from None
  return lambda logsnr: fn(logsnr, **kw)


def implied_weighting(schedule: Schedule, weighting: Callable[[Array], Array],
                      logsnr: Array) -> Array:
  """w(lambda) p(lambda): how much the loss weighs each noise level overall."""
  return weighting(logsnr) * logsnr_density(schedule, logsnr)


def weighted_mse(pred: Array, x0: Array, eps: Array, logsnr: Array, *, target: str,
                 weighting: Callable[[Array], Array]) -> Array:
  """Per-example w(lambda) ||eps_hat - eps||^2 (mean over non-batch axes), from a
  prediction in `target` space."""
  _check_target(target)
  err = pred - targets(x0, eps, logsnr)[target]
  err = err.astype(jnp.promote_types(err.dtype, jnp.float32))  # bf16 models: f32 loss
  mse = jnp.mean(jnp.square(err), axis=tuple(range(1, err.ndim)))
  logsnr = jnp.asarray(logsnr, mse.dtype)
  return mse * weighting(logsnr) / _eps_mse_factor(target, logsnr)


def sample_t(rng: Array, batch: int, *, antithetic: bool = False) -> Array:
  """t ~ U[0, 1] per example; `antithetic` uses the low-discrepancy stratified draw of
  Kingma et al. (2021, VDM), which lowers the loss variance at no cost."""
  if antithetic:
    u0 = jax.random.uniform(rng, ())
    return jnp.mod(u0 + jnp.arange(batch) / batch, 1.0)
  return jax.random.uniform(rng, (batch,))


def diffusion_loss(pred_fn: Callable[[Array, Array], Array], x0: Array, rng: Array,
                   train_schedule: Schedule, *, target: str = "eps",
                   weighting: Callable[[Array], Array] | str = "eps",
                   antithetic: bool = True) -> tuple[Array, Array]:
  """Per-example training loss and the log-SNR each example was trained at.

  Args:
    pred_fn: (x_t, logsnr [B]) -> prediction in `target` space (the network).
    x0: clean data [B, ...].
    rng: PRNG key.
    train_schedule: draws the noise levels (lambda = schedule.logsnr(t), t ~ U[0, 1]).
    target: what `pred_fn` predicts: "eps", "x0" or "v".
    weighting: a name from WEIGHTINGS or a function lambda -> weight on the eps-MSE.
    antithetic: stratified t (see `sample_t`).

  Returns:
    (loss [B], logsnr [B]); return the log-SNR so callers can log loss per noise level.
  """
  if isinstance(weighting, str):
    weighting = get_weighting(weighting)
  rng_t, rng_eps = jax.random.split(rng)
  logsnr = train_schedule.logsnr(sample_t(rng_t, x0.shape[0], antithetic=antithetic))
  eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  x_t = diffuse(x0, eps, logsnr)
  pred = pred_fn(x_t, logsnr)
  return weighted_mse(pred, x0, eps, logsnr, target=target, weighting=weighting), logsnr
