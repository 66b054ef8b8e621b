"""Continuous-time variance-preserving noise schedules, written as log-SNR functions.

Conventions (used by every module in `imagen_jax.diffusion`):

* time t in [0, 1]; t = 0 is (nearly) clean data, t = 1 is (nearly) pure noise;
* a schedule is a strictly decreasing map t -> lambda(t) = log SNR = log(alpha^2 / sigma^2);
* variance preserving: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda), so
  x_t = alpha x0 + sigma eps has unit variance for unit-variance data;
* EDM's sigma (the variance-exploding noise level) is exp(-lambda / 2).

Each schedule is defined by an unclipped map ``u -> lambda`` on u in (0, 1) that may be
infinite at the ends (cosine, sigmoid, ...). Endpoints are clipped by reparametrising
time linearly, u = u(lambda_max) + t (u(lambda_min) - u(lambda_max)), so that
lambda(0) = logsnr_max and lambda(1) = logsnr_min exactly and t(lambda) stays the exact
inverse (the diffusion_distillation / simple-diffusion way; it also subsumes the
offset `s` of Nichol & Dhariwal's cosine). Clipped schedules are what samplers step along
and, read as t ~ U[0, 1], what training draws noise levels from: the density of lambda
is then |dt/dlambda| (`logsnr_density`), the "which noise levels are trained" axis of
Kingma & Gao (2023); the loss weighting lives in `objectives.py`.

Laplace and log-normal are such maps too: their quantile functions turn t ~ U[0, 1]
into the training distributions of Hang et al. (2024) and EDM (Karras et al. 2022).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtri, ndtr

from imagen_jax.diffusion.registry import lookup

Array = jax.Array


def alpha_sigma(logsnr: Array) -> tuple[Array, Array]:
  """(alpha, sigma) of a variance-preserving process at log-SNR `logsnr`.

  Computed through log-sigmoid so that both stay accurate at |lambda| ~ 30; lambda = +inf
  gives (1, 0), i.e. clean data.
  """
  logsnr = jnp.asarray(logsnr)
  return (jnp.exp(0.5 * jax.nn.log_sigmoid(logsnr)),
          jnp.exp(0.5 * jax.nn.log_sigmoid(-logsnr)))


def edm_sigma(logsnr: Array) -> Array:
  """EDM's variance-exploding noise level sigma_e = sigma / alpha = exp(-lambda / 2)."""
  return jnp.exp(-0.5 * jnp.asarray(logsnr))


def logsnr_from_edm_sigma(sigma: Array) -> Array:
  """Inverse of `edm_sigma`: lambda = -2 log sigma_e."""
  return -2.0 * jnp.log(jnp.asarray(sigma))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses define `_raw_logsnr(u, ubar)` (decreasing) and its inverse `_raw_u`.

  Attributes:
    logsnr_min: lambda(1), the noisiest level.
    logsnr_max: lambda(0), the cleanest level.
  """

  logsnr_min: float
  logsnr_max: float

  def __post_init__(self):
    if not self.logsnr_min < self.logsnr_max:
      raise ValueError(
          f"{type(self).__name__}: need logsnr_min < logsnr_max, got "
          f"logsnr_min={self.logsnr_min}, logsnr_max={self.logsnr_max}.")
    u0, u1, ubar1 = self._u_range
    if not (all(map(math.isfinite, (u0, u1, ubar1))) and 0.0 <= u0 < u1 <= 1.0):
      raise ValueError(
          f"{type(self).__name__}: log-SNR range [{self.logsnr_min}, {self.logsnr_max}] "
          f"is outside what this schedule can reach; narrow it.")

  # Subclass interface -----------------------------------------------------------------
  def _raw_logsnr(self, u: Array, ubar: Array) -> Array:
    """Unclipped lambda at u in (0, 1); ubar = 1 - u is passed separately, computed
    without rounding, so that schedules singular at u = 1 stay accurate there."""
    raise NotImplementedError

  def _raw_u(self, logsnr: Array) -> Array:
    """Inverse of `_raw_logsnr`."""
    raise NotImplementedError

  # Public API ---------------------------------------------------------------------------
  @functools.cached_property
  def _u_range(self) -> tuple[float, float, float]:
    """u(logsnr_max), u(logsnr_min) and 1 - u(logsnr_min), in float64 Python floats.

    Evaluated once, eagerly (also when first touched inside a jit trace).
    """
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):
      u0 = float(self._raw_u(jnp.float64(self.logsnr_max)))
      u1 = float(self._raw_u(jnp.float64(self.logsnr_min)))
    return u0, u1, 1.0 - u1

  def logsnr(self, t: Array) -> Array:
    """lambda(t) for t in [0, 1] (decreasing; lambda(0)=logsnr_max, lambda(1)=logsnr_min)."""
    u0, u1, ubar1 = self._u_range
    t = jnp.asarray(t, jnp.result_type(t, jnp.float32))
    lam = self._raw_logsnr(u0 + t * (u1 - u0), ubar1 + (1.0 - t) * (u1 - u0))
    return jnp.clip(lam, self.logsnr_min, self.logsnr_max)

  def t_from_logsnr(self, logsnr: Array) -> Array:
    """Inverse of `logsnr`; levels outside [logsnr_min, logsnr_max] map to the ends."""
    u0, u1, _ = self._u_range
    logsnr = jnp.clip(jnp.asarray(logsnr, jnp.result_type(logsnr, jnp.float32)),
                      self.logsnr_min, self.logsnr_max)
    t = jnp.clip((self._raw_u(logsnr) - u0) / (u1 - u0), 0.0, 1.0)
    # Exact ends (float32 u and float64 u0 can differ by an ulp at the clip points).
    return jnp.where(logsnr >= self.logsnr_max, 0.0, jnp.where(logsnr <= self.logsnr_min, 1.0, t))

  @staticmethod
  def alpha_sigma(logsnr: Array) -> tuple[Array, Array]:
    """(alpha, sigma) at log-SNR `logsnr`; see the module-level `alpha_sigma`."""
    return alpha_sigma(logsnr)


@dataclasses.dataclass(frozen=True)
class LinearBeta(Schedule):
  """DDPM's linear beta schedule in continuous time (the VP SDE of Song et al. 2021).

  beta(u) = beta_min + u (beta_max - beta_min), log alpha^2(u) = -int_0^u beta, so
  lambda(u) = log alpha^2 - log(1 - alpha^2). beta_min=0.1, beta_max=20 is DDPM's
  1e-4..0.02 over 1000 steps; its natural lambda(1) is about -10.05.
  """

  logsnr_min: float = -10.0
  logsnr_max: float = 10.0
  beta_min: float = 0.1
  beta_max: float = 20.0

  def _raw_logsnr(self, u, ubar):
    log_alpha2 = -(self.beta_min * u + 0.5 * (self.beta_max - self.beta_min) * u**2)
    return log_alpha2 - jnp.log(-jnp.expm1(log_alpha2))

  def _raw_u(self, logsnr):
    c = jax.nn.softplus(-logsnr)  # = -log alpha^2
    d = self.beta_max - self.beta_min
    # Root of d/2 u^2 + beta_min u - c = 0, written to avoid cancellation.
    return 2.0 * c / (self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * d * c))


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """Nichol & Dhariwal's cosine schedule: alpha = cos(pi u / 2), lambda = -2 log tan(pi u / 2).

  Imagen's base model uses it. `shift` adds a constant to lambda (see `ShiftedCosine`).
  """

  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  shift: float = 0.0

  def _raw_logsnr(self, u, ubar):
    # -2 log tan(pi u / 2) = 2 log tan(pi (1 - u) / 2): use the side that is accurate.
    lam = jnp.where(u < 0.5, -2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * u)),
                    2.0 * jnp.log(jnp.tan(0.5 * jnp.pi * ubar)))
    return lam + self.shift

  def _raw_u(self, logsnr):
    return (2.0 / jnp.pi) * jnp.arctan(jnp.exp(-0.5 * (logsnr - self.shift)))


@dataclasses.dataclass(frozen=True)
class ShiftedCosine(Cosine):
  """Resolution-shifted cosine of "simple diffusion" (Hoogeboom et al. 2023).

  lambda(u) = cosine(u) + 2 log(base_resolution / resolution): an image at 4x the
  base resolution has 4x4 times more pixels averaging away the noise, so it needs
  16x less SNR (a shift of 2 log 4) for the same perceived corruption.
  """

  logsnr_min: float | None = None
  logsnr_max: float | None = None
  resolution: int = 64
  base_resolution: int = 64
  shift: float = dataclasses.field(init=False, default=0.0)

  def __post_init__(self):
    if self.resolution <= 0 or self.base_resolution <= 0:
      raise ValueError("ShiftedCosine: resolution and base_resolution must be positive.")
    shift = 2.0 * math.log(self.base_resolution / self.resolution)
    object.__setattr__(self, "shift", shift)
    # As in the paper, the clip range shifts with the curve unless given explicitly.
    if self.logsnr_min is None:
      object.__setattr__(self, "logsnr_min", -15.0 + shift)
    if self.logsnr_max is None:
      object.__setattr__(self, "logsnr_max", 15.0 + shift)
    super().__post_init__()


@dataclasses.dataclass(frozen=True)
class Sigmoid(Schedule):
  """Chen (2023), "On the importance of noise scheduling": alpha^2 = gamma(u) with

  gamma(u) = (sigmoid(end / tau) - sigmoid((start + u (end - start)) / tau))
             / (sigmoid(end / tau) - sigmoid(start / tau)),
  so gamma(0) = 1 and gamma(1) = 0; lambda = logit(gamma). Defaults are the paper's.
  """

  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  start: float = -3.0
  end: float = 3.0
  tau: float = 1.0

  def _raw_logsnr(self, u, ubar):
    a, b = self.start / self.tau, self.end / self.tau
    w = jnp.where(u < 0.5, a + u * (b - a), b - ubar * (b - a))
    # logit(gamma) = log(sigmoid(b) - sigmoid(w)) - log(sigmoid(w) - sigmoid(a)), each
    # difference in closed form so float32 keeps |lambda| ~ 15 accurate.
    return _log_sigmoid_gap(b, ubar * (b - a)) - _log_sigmoid_gap(w, u * (b - a))

  def _raw_u(self, logsnr):
    s0, s1 = jax.nn.sigmoid(self.start / self.tau), jax.nn.sigmoid(self.end / self.tau)
    # sigmoid(w) = s1 - gamma (s1 - s0); solve for w from the nearer end with log1p:
    # near u = 0, sigmoid(w) = s0 + d0; near u = 1, sigmoid(w) = s1 - d1.
    d0 = jax.nn.sigmoid(-logsnr) * (s1 - s0)
    d1 = jax.nn.sigmoid(logsnr) * (s1 - s0)
    w_from_start = jnp.log1p(d0 / s0) - jnp.log1p(-d0 / (1.0 - s0))
    w_to_end = jnp.log1p(d1 / (1.0 - s1)) - jnp.log1p(-d1 / s1)
    span = (self.end - self.start) / self.tau
    return jnp.where(logsnr > 0, w_from_start / span, 1.0 - w_to_end / span)


def _log_sigmoid_gap(a: Array, gap: Array) -> Array:
  """log(sigmoid(a) - sigmoid(a - gap)) for gap >= 0, accurate for tiny gaps.

  sigmoid(a) - sigmoid(c) = sigmoid(a) sigmoid(-c) (1 - e^(c - a)), here c = a - gap.
  """
  return jax.nn.log_sigmoid(a) + jax.nn.log_sigmoid(gap - a) + jnp.log(-jnp.expm1(-gap))


@dataclasses.dataclass(frozen=True)
class EDM(Schedule):
  """Karras et al. (2022) rho-spaced sigma schedule, as a VP log-SNR schedule.

  sigma_e(u) = (sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho and
  lambda = -2 log sigma_e. Its ends are natural, so logsnr_min/max follow from
  sigma_max/sigma_min and should not be passed.
  """

  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0
  logsnr_min: float = dataclasses.field(init=False, default=0.0)
  logsnr_max: float = dataclasses.field(init=False, default=0.0)

  def __post_init__(self):
    if not 0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"EDM: need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}.")
    object.__setattr__(self, "logsnr_min", -2.0 * math.log(self.sigma_max))
    object.__setattr__(self, "logsnr_max", -2.0 * math.log(self.sigma_min))
    super().__post_init__()

  def _raw_logsnr(self, u, ubar):
    a, b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    return -2.0 * self.rho * jnp.log(a + u * (b - a))

  def _raw_u(self, logsnr):
    a, b = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
    return (jnp.exp(-logsnr / (2.0 * self.rho)) - a) / (b - a)


@dataclasses.dataclass(frozen=True)
class Laplace(Schedule):
  """lambda ~ Laplace(mu, b) when t ~ U[0, 1] (Hang et al. 2024, "Improved noise schedule").

  Concentrates training on the mid-SNR levels that matter most for perception.
  """

  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  mu: float = 0.0
  b: float = 0.5

  def _raw_logsnr(self, u, ubar):
    # Laplace quantile at p = 1 - u: mu - b log(2u) above the median, mu + b log(2p) below.
    return jnp.where(u < 0.5, self.mu - self.b * jnp.log(2.0 * u),
                     self.mu + self.b * jnp.log(2.0 * ubar))

  def _raw_u(self, logsnr):
    z = (logsnr - self.mu) / self.b
    cdf = jnp.where(z < 0, 0.5 * jnp.exp(z), 1.0 - 0.5 * jnp.exp(-z))
    return 1.0 - cdf


@dataclasses.dataclass(frozen=True)
class LogNormal(Schedule):
  """EDM's training distribution: ln sigma_e ~ N(p_mean, p_std^2), i.e.
  lambda ~ N(-2 p_mean, (2 p_std)^2) when t ~ U[0, 1]."""

  logsnr_min: float = -15.0
  logsnr_max: float = 15.0
  p_mean: float = -1.2
  p_std: float = 1.2

  def _raw_logsnr(self, u, ubar):
    z = jnp.where(u < 0.5, ndtri(u), -ndtri(ubar))
    return -2.0 * (self.p_mean + self.p_std * z)

  def _raw_u(self, logsnr):
    return ndtr((-0.5 * logsnr - self.p_mean) / self.p_std)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": LinearBeta,
    "cosine": Cosine,
    "shifted_cosine": ShiftedCosine,
    "sigmoid": Sigmoid,
    "edm": EDM,
    "laplace": Laplace,
    "lognormal": LogNormal,
}


def get_schedule(name: str, **kw) -> Schedule:
  """Builds a schedule by registry name, e.g. `get_schedule("cosine", logsnr_min=-20)`.

  Raises ValueError naming the valid schedules or the valid keyword arguments.
  """
  cls = lookup(SCHEDULES, name, "schedule")
  fields = {f.name for f in dataclasses.fields(cls) if f.init}
  unknown = set(kw) - fields
  if unknown:
    raise ValueError(
        f"Schedule {name!r} takes {sorted(fields)}; unknown argument(s) {sorted(unknown)}.")
  return cls(**kw)


def from_config(section: Any) -> Schedule:
  """The schedule of a config section holding `schedule` and optionally `schedule_kw`
  (config.diffusion, a sampler section): the one place a config names a schedule."""
  kw = section.get("schedule_kw", None) or {}
  kw = kw.to_dict() if hasattr(kw, "to_dict") else dict(kw)
  return get_schedule(section["schedule"], **kw)


def logsnr_density(schedule: Schedule, logsnr: Array) -> Array:
  """Density p(lambda) = |dt/dlambda| of lambda(t) when t ~ U[0, 1]."""
  dt = jax.vmap(jax.grad(lambda l: schedule.t_from_logsnr(l)))
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.abs(dt(logsnr.reshape(-1))).reshape(logsnr.shape)


GRIDS = ("t", "logsnr", "karras")


def logsnr_grid(schedule: Schedule, steps: int, kind: str = "t", rho: float = 7.0) -> Array:
  """`steps` log-SNR levels from logsnr_min to logsnr_max, the points a sampler visits.

  kind: "t" (uniform in the schedule's time), "logsnr" (uniform in lambda), or "karras"
  (uniform in sigma_e^(1/rho), Karras et al. 2022, eq. 5).
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  frac = jnp.linspace(0.0, 1.0, steps) if steps > 1 else jnp.zeros((1,))
  lo, hi = schedule.logsnr_min, schedule.logsnr_max
  if kind == "t":
    return schedule.logsnr(1.0 - frac)
  if kind == "logsnr":
    return lo + frac * (hi - lo)
  if kind == "karras":
    a, b = math.exp(-lo / (2 * rho)), math.exp(-hi / (2 * rho))  # sigma_max^(1/rho), sigma_min^(1/rho)
    return -2.0 * rho * jnp.log(a + frac * (b - a))
  raise ValueError(f"Unknown grid {kind!r}; choose one of {GRIDS}.")
