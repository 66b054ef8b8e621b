"""Samplers: pure functions stepping a denoiser along a log-SNR grid (k-diffusion style).

`sample(denoise_fn, schedule, rng, shape, method=..., steps=...)` starts from
x ~ N(0, I) at the schedule's logsnr_min and visits `steps` grid levels up to
logsnr_max, then takes a last step to clean data (lambda = +inf, sigma = 0), as
k-diffusion appends sigma = 0. `denoise_fn(x_t, logsnr [B]) -> x0_hat` is the only
model interface; guidance and thresholding wrap it (`guidance.py`).

Methods (all one `lax.fori_loop`, so one compiled step whatever `steps` is):

* "ddim": DDIM (Song et al. 2021) with `eta` (0 = deterministic ODE, 1 = ancestral).
  Its eta = 0 update is exactly first-order DPM-Solver(++) / Euler in lambda.
* "ddpm": ancestral sampling from the DDPM posterior q(x_s | x_t, x0_hat), i.e. DDIM eta=1.
* "dpmpp_2m", "dpmpp_3m": multistep DPM-Solver++ (Lu et al. 2022) in data-prediction
  form; the first steps use lower orders while history builds up; the last step to
  sigma = 0 returns x0_hat, as in k-diffusion. 2M's second-order step is the "midpoint"
  form (k-diffusion's `sample_dpmpp_2m`); 3M's one second-order warm-up step has the
  option `warmup` ("taylor" or "midpoint", see `_dpmpp`).
* "heun": EDM's 2nd-order Heun (Karras et al. 2022, Algorithm 2) in variance-exploding
  coordinates x / alpha, with optional churn (s_churn, s_tmin, s_tmax, s_noise); its step
  to sigma = 0 is Euler, so NFE = 2 steps - 1. Its trapezoidal correction is unstable on
  a first step from a very large sigma_e (cosine's lambda = -15 is sigma_e = 1800): use it
  with EDM's sigma_max = 80 or enough steps.

NFE (denoise_fn calls) is counted while sampling and returned with the samples. With
classifier-free guidance each call runs the network on a doubled batch.

Note on conventions: DPM-Solver's "lambda" is log(alpha / sigma) = logsnr / 2, so its
step h is half the log-SNR difference.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from imagen_jax.diffusion.registry import lookup
from imagen_jax.diffusion.schedules import Schedule, alpha_sigma, logsnr_grid

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]


class SampleOutput(NamedTuple):
  x: Array    # samples at lambda = +inf (clean)
  nfe: Array  # number of denoise_fn calls made (int32 scalar)


def _call(denoise_fn: DenoiseFn, x: Array, logsnr: Array) -> Array:
  return denoise_fn(x, jnp.full((x.shape[0],), logsnr, x.dtype))


def _phi1(h):
  """(1 - e^-h): the DPM-Solver++ first-order coefficient; 1 at h = inf."""
  return -jnp.expm1(-h)


def _ddim(denoise_fn, grid, x, rng, *, eta: float):
  """DDIM with stochasticity eta; grid ends with +inf."""

  def body(i, carry):
    x, rng, nfe = carry
    l_s, l_t = grid[i], grid[i + 1]           # s: current (noisier), t: next (cleaner)
    a_s, s_s = alpha_sigma(l_s)
    a_t, s_t = alpha_sigma(l_t)
    x0 = _call(denoise_fn, x, l_s)
    eps = (x - a_s * x0) / s_s
    # Posterior std sigma_t sqrt(1 - SNR_s / SNR_t), scaled by eta; 0 at the last step.
    c = eta * s_t * jnp.sqrt(-jnp.expm1(l_s - l_t))
    rng, key = jax.random.split(rng)
    noise = jax.random.normal(key, x.shape, x.dtype)
    x = a_t * x0 + jnp.sqrt(jnp.maximum(s_t**2 - c**2, 0.0)) * eps + c * noise
    return x, rng, nfe + 1

  return jax.lax.fori_loop(0, grid.shape[0] - 1, body, (x, rng, jnp.int32(0)))


# Forms of the one second-order step 3M takes before it has two history points; the
# first is the default (measured, see `_dpmpp`).
WARMUPS = ("taylor", "midpoint")


def _dpmpp(denoise_fn, grid, x, rng, *, order: int, warmup: str):
  """Multistep DPM-Solver++ of order 1..3 in data prediction.

  `grid` ends with +inf, the step to clean data (x0_hat, as k-diffusion's step to
  sigma = 0); a finite last level stops there, so grid[:k + 1] gives the state after
  the first k steps of the full grid (tests compare intermediate states this way).

  `warmup` is the form of the order-2 steps; for 3M that is only its second step, the
  first with history. "taylor" integrates the linear extrapolation of x0_hat exactly,
  a_t (phi_1 m0 + phi_2 (m0 - m1) / r) with phi_2 = 1 - phi_1 / h, as k-diffusion's
  `sample_dpmpp_3m_sde` (eta = 0) does, so 3M then equals that sampler step for step;
  "midpoint" is 2M's a_t phi_1 (m0 + (m0 - m1) / (2 r)) (k-diffusion's 2M). Both are
  second order. 3M defaults to "taylor", measured against converged ODE solutions on the
  exact-denoiser mixtures (benchmarks/results/samplers.md, 2 mixtures x 6 grids): at 3
  NFE, where this step is the last before x0_hat, its error is the lower one in 12 of 12
  cells (midpoint's is 5-29% higher); at 4 NFE midpoint's is lower in 11 of 12, by 0-8%
  (geometric mean 1%); from 5 to 50 NFE the step is taken where x0_hat has hardly moved
  and the two agree within 1.5% (each lower in 24 of 48 cells). So the form matters only
  at 3-4 NFE, taylor by more there, and it buys exact parity with k-diffusion. 3M's large
  errors below 20 NFE on most grids come from its third-order steps, not from this one.
  """
  if warmup not in WARMUPS:
    raise ValueError(f"Unknown warmup {warmup!r}; choose one of {WARMUPS}.")
  n = grid.shape[0] - 1

  def body(i, carry):
    x, m1, m2, nfe = carry                   # m1, m2: x0_hat at the previous two levels
    l_s, l_t = grid[i], grid[i + 1]
    a_t, s_t = alpha_sigma(l_t)
    _, s_s = alpha_sigma(l_s)
    m0 = _call(denoise_fn, x, l_s)
    h = 0.5 * (l_t - l_s)                     # half log-SNR: DPM-Solver's lambda
    h0 = 0.5 * (l_s - grid[jnp.maximum(i - 1, 0)])
    h1 = 0.5 * (grid[jnp.maximum(i - 1, 0)] - grid[jnp.maximum(i - 2, 0)])
    # Step ratios; set to 1 where a history step is missing or h is infinite (those
    # branches are not selected below) so no inf/NaN is formed, e.g. under jax.grad.
    usable = jnp.isfinite(h)
    r0 = jnp.where(usable & (h0 > 0), h0 / h, 1.0)
    r1 = jnp.where(usable & (h1 > 0), h1 / h, 1.0)
    d1_0 = (m0 - m1) / r0
    d1_1 = (m1 - m2) / r1
    # Lu et al.'s multistep updates with phi_1 = 1 - e^-h (their -expm1(-h)).
    phi1 = _phi1(h)
    phi2 = 1.0 - phi1 / h
    phi3 = phi2 / h - 0.5
    first = a_t * phi1 * m0
    if warmup == "taylor":
      second = first + a_t * phi2 * d1_0
    else:                                     # 2M: (1 + 1/(2r)) m0 - 1/(2r) m1
      second = first + 0.5 * a_t * phi1 * d1_0
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    third = first + a_t * phi2 * d1 - a_t * phi3 * d2
    # Order actually used: limited by history (i) and lowered to 1 for the step to +inf.
    k = jnp.where(jnp.isinf(l_t), 1, jnp.minimum(i + 1, order))
    update = jnp.where(k == 1, first, jnp.where(k == 2, second, third))
    ratio = jnp.where(jnp.isinf(l_t), 0.0, s_t / s_s)
    x = ratio * x + update
    return x, m0, m1, nfe + 1

  zeros = jnp.zeros_like(x)
  x, _, _, nfe = jax.lax.fori_loop(0, n, body, (x, zeros, zeros, jnp.int32(0)))
  return x, rng, nfe


def _heun(denoise_fn, grid, x, rng, *, s_churn: float, s_tmin: float, s_tmax: float,
          s_noise: float):
  """EDM Algorithm 2 in VE coordinates y = x / alpha, sigma_e = exp(-lambda / 2)."""
  n = grid.shape[0] - 1
  sig = jnp.exp(-0.5 * grid)                  # sigma_e, 0 at the final +inf
  alpha0, _ = alpha_sigma(grid[0])
  gamma_max = min(s_churn / max(n, 1), 2**0.5 - 1)

  def den(y, s):
    lam = -2.0 * jnp.log(s)
    a, _ = alpha_sigma(lam)
    return _call(denoise_fn, a * y, lam)

  def body(i, carry):
    y, rng, nfe = carry
    s_cur, s_next = sig[i], sig[i + 1]
    gamma = jnp.where((s_cur >= s_tmin) & (s_cur <= s_tmax), gamma_max, 0.0)
    s_hat = s_cur * (1.0 + gamma)
    rng, key = jax.random.split(rng)
    eps = jax.random.normal(key, y.shape, y.dtype) * s_noise
    y_hat = y + jnp.sqrt(jnp.maximum(s_hat**2 - s_cur**2, 0.0)) * eps
    d = (y_hat - den(y_hat, s_hat)) / s_hat
    y_euler = y_hat + (s_next - s_hat) * d

    def correct(_):
      d2 = (y_euler - den(y_euler, s_next)) / s_next
      return y_hat + (s_next - s_hat) * 0.5 * (d + d2)

    last = i == n - 1
    y = jax.lax.cond(last, lambda _: y_euler, correct, None)
    return y, rng, nfe + jnp.where(last, 1, 2)

  y, rng, nfe = jax.lax.fori_loop(0, n, body, (x / alpha0, rng, jnp.int32(0)))
  return y, rng, nfe  # alpha = 1 at sigma = 0: y is x


METHODS = {
    "ddim": functools.partial(_ddim, eta=0.0),
    "ddpm": functools.partial(_ddim, eta=1.0),
    "dpmpp_2m": functools.partial(_dpmpp, order=2, warmup="midpoint"),
    "dpmpp_3m": functools.partial(_dpmpp, order=3, warmup=WARMUPS[0]),
    "heun": functools.partial(_heun, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0),
}
# Numeric keyword arguments each method accepts through `sample(**kw)` (configs carry
# them as numbers; see diffusion/settings.py and imagen_jax/testbed_eval.py).
METHOD_KWARGS = {
    "ddim": ("eta",), "ddpm": (), "dpmpp_2m": (), "dpmpp_3m": (),
    "heun": ("s_churn", "s_tmin", "s_tmax", "s_noise"),
}
# Keyword arguments that pick one of named forms, with their choices. Kept apart from
# METHOD_KWARGS, whose consumers expect numbers every config carries.
METHOD_CHOICES = {"dpmpp_3m": {"warmup": WARMUPS}}


def nfe_for(method: str, steps: int) -> int:
  """Denoiser calls `sample` makes for `method` and `steps` (checked against the count)."""
  return 2 * steps - 1 if method == "heun" else steps


def steps_for_nfe(method: str, nfe: int) -> int:
  """The number of steps that spends (at most) `nfe` denoiser calls."""
  return (nfe + 1) // 2 if method == "heun" else nfe


def sample(denoise_fn: DenoiseFn, schedule: Schedule, rng: Array, shape: tuple[int, ...], *,
           method: str = "dpmpp_2m", steps: int = 50, grid: str = "logsnr", rho: float = 7.0,
           x_init: Array | None = None, **kw) -> SampleOutput:
  """Draws samples by integrating from logsnr_min to clean data.

  Args:
    denoise_fn: (x_t [B, ...], logsnr [B]) -> x0_hat [B, ...].
    schedule: provides the log-SNR range and, for grid="t", the spacing.
    rng: PRNG key for the initial noise and any stochastic steps.
    shape: shape of the samples, batch first.
    method: one of METHODS.
    steps: grid levels visited, each costing one denoiser call (heun: two, but one
      for the last).
    grid: "logsnr" (uniform in lambda, the default), "t" (uniform in the schedule's t)
      or "karras". Multistep DPM-Solver++ wants smoothly varying steps: a schedule's own t
      spacing can end in one very long step (cosine: lambda 3.5 -> 15 at 10 steps), where
      its extrapolation overshoots; see benchmarks/results/samplers.md.
    rho: Karras grid exponent.
    x_init: optional starting point (else N(0, I), the VP marginal at logsnr_min).
    **kw: method options, e.g. eta for ddim, s_churn for heun, warmup for dpmpp_3m.

  Returns:
    SampleOutput(x, nfe).
  """
  run = lookup(METHODS, method, "sampler")
  choices = METHOD_CHOICES.get(method, {})
  accepted = METHOD_KWARGS[method] + tuple(choices)
  unknown = set(kw) - set(accepted)
  if unknown:
    raise ValueError(f"Sampler {method!r} takes options {accepted}; "
                     f"got unknown {sorted(unknown)}.")
  for key, allowed in choices.items():
    if key in kw and kw[key] not in allowed:
      raise ValueError(f"Sampler {method!r}: {key}={kw[key]!r}; choose one of {allowed}.")
  levels = logsnr_grid(schedule, steps, grid, rho=rho)
  levels = jnp.concatenate([levels.astype(jnp.float32), jnp.array([jnp.inf], jnp.float32)])
  rng, key = jax.random.split(rng)
  x = jax.random.normal(key, shape, jnp.float32) if x_init is None else x_init
  x, _, nfe = run(denoise_fn, levels, x, rng, **kw)
  return SampleOutput(x, nfe)
