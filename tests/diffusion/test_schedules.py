"""Schedules: monotone, exact endpoints, exact inverse, and equal to their papers' formulas.

Formulas are re-derived here in float64 numpy, independently of the module's
reparametrised, both-sided float32 evaluation.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from imagen_jax.diffusion import schedules as S

ALL = {
    "linear": {}, "cosine": {}, "shifted_cosine": {"resolution": 256}, "sigmoid": {},
    "edm": {}, "laplace": {}, "lognormal": {}, "sigmoid_paper_b": {"start": 0.0, "end": 3.0, "tau": 0.9},
}


def make(name):
  return S.get_schedule(name.split("_paper")[0], **ALL[name])


def u_of_t(sched, t):
  u0, u1, _ = sched._u_range
  return u0 + np.asarray(t, np.float64) * (u1 - u0)


@pytest.mark.parametrize("name", ALL)
def test_monotone_endpoints_and_inverse(name):
  s = make(name)
  t = jnp.linspace(0.0, 1.0, 4001)
  lam = s.logsnr(t)
  assert bool(jnp.all(jnp.diff(lam) < 0)), "lambda(t) must be strictly decreasing"
  # Endpoints: stated clip range, to float32 precision of lambda (|lambda| <= 18).
  np.testing.assert_allclose(lam[0], s.logsnr_max, atol=2e-5 * abs(s.logsnr_max) + 1e-6)
  np.testing.assert_allclose(lam[-1], s.logsnr_min, atol=2e-5 * abs(s.logsnr_min) + 1e-6)
  # t(lambda(t)) = t to 1e-6: a few float32 ulps, amplified by the conditioning of the
  # two maps (worst: sigmoid with tau < 1).
  np.testing.assert_allclose(s.t_from_logsnr(lam), t, atol=1e-6)
  # lambda(t(lambda)) = lambda wherever float32 t resolves lambda: there one ulp of t
  # (<= 1.2e-7) moves lambda by <= 1.2e-7 / p(lambda) <= 1.2e-3. Where a schedule is flat
  # in t (p < 1e-4: sigmoid's and lognormal's far tails) t cannot carry lambda in float32.
  grid = jnp.linspace(s.logsnr_min, s.logsnr_max, 1001)
  ok = S.logsnr_density(s, grid) >= 1e-4
  assert float(ok.mean()) > 0.25
  np.testing.assert_allclose(s.logsnr(s.t_from_logsnr(grid))[ok], grid[ok], rtol=1e-4, atol=2e-3)
  # Out-of-range levels map to the ends.
  assert float(s.t_from_logsnr(s.logsnr_max + 5)) == 0.0
  assert float(s.t_from_logsnr(s.logsnr_min - 5)) == 1.0


def test_alpha_sigma_variance_preserving_and_accurate():
  lam = np.linspace(-30, 30, 121)
  a, s = S.alpha_sigma(jnp.asarray(lam, jnp.float32))
  np.testing.assert_allclose(a**2 + s**2, 1.0, rtol=1e-6)
  np.testing.assert_allclose(a, np.sqrt(1 / (1 + np.exp(-lam))), rtol=1e-6)
  np.testing.assert_allclose(s, np.sqrt(1 / (1 + np.exp(lam))), rtol=1e-6)  # tiny at +30
  np.testing.assert_allclose(2 * np.log(np.asarray(a) / np.asarray(s)), lam, atol=1e-4)
  a_inf, s_inf = S.alpha_sigma(jnp.inf)
  assert float(a_inf) == 1.0 and float(s_inf) == 0.0
  np.testing.assert_allclose(S.edm_sigma(lam), np.asarray(s) / np.asarray(a), rtol=1e-5)
  np.testing.assert_allclose(S.logsnr_from_edm_sigma(S.edm_sigma(lam)), lam, atol=1e-5)


T = np.linspace(0.0, 1.0, 101)[1:-1]


def test_cosine_is_nichol_dhariwal():
  s = S.get_schedule("cosine")
  alpha = np.cos(0.5 * np.pi * u_of_t(s, T))
  np.testing.assert_allclose(S.alpha_sigma(s.logsnr(T))[0], alpha, rtol=1e-5)


def test_shifted_cosine_is_cosine_plus_resolution_shift():
  base, shifted = S.get_schedule("cosine"), S.get_schedule("shifted_cosine", resolution=256)
  np.testing.assert_allclose(shifted.logsnr(T) - base.logsnr(T), 2 * math.log(64 / 256), atol=1e-5)
  same = S.get_schedule("shifted_cosine", resolution=64)
  np.testing.assert_allclose(same.logsnr(T), base.logsnr(T), atol=1e-6)


def test_linear_beta_is_ddpm_continuous():
  s = S.get_schedule("linear")
  u = u_of_t(s, T)
  log_a2 = -(0.1 * u + 0.5 * (20.0 - 0.1) * u**2)
  np.testing.assert_allclose(s.logsnr(T), log_a2 - np.log1p(-np.exp(log_a2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start,end,tau", [(-3.0, 3.0, 1.0), (0.0, 3.0, 0.9)])
def test_sigmoid_is_chen_2023(start, end, tau):
  s = S.get_schedule("sigmoid", start=start, end=end, tau=tau)
  u = u_of_t(s, T)
  sig = lambda z: 1 / (1 + np.exp(-z))
  gamma = (sig(end / tau) - sig((u * (end - start) + start) / tau)) / (sig(end / tau) - sig(start / tau))
  np.testing.assert_allclose(s.logsnr(T), np.log(gamma / (1 - gamma)), rtol=1e-5, atol=1e-5)


def test_edm_is_karras_rho_schedule():
  s = S.get_schedule("edm", sigma_min=0.002, sigma_max=80.0, rho=7.0)
  sigma = (0.002 ** (1 / 7) + T * (80.0 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
  np.testing.assert_allclose(S.edm_sigma(s.logsnr(T)), sigma, rtol=1e-5)
  assert s.logsnr_max == pytest.approx(-2 * math.log(0.002))


def test_cosine_density_is_sech():
  # Kingma & Gao (2023): the cosine schedule puts p(lambda) ~ sech(lambda / 2) / (2 pi).
  s = S.get_schedule("cosine")
  lam = np.linspace(-14, 14, 57)
  u0, u1, _ = s._u_range
  np.testing.assert_allclose(S.logsnr_density(s, lam),
                             1 / np.cosh(lam / 2) / (2 * np.pi * (u1 - u0)), rtol=1e-4)


@pytest.mark.parametrize("name,dist", [
    ("laplace", stats.laplace(loc=0.0, scale=0.5)),
    ("lognormal", stats.norm(loc=2.4, scale=2.4)),  # lambda = -2 ln sigma, ln sigma ~ N(-1.2, 1.2^2)
])
def test_training_distributions(name, dist):
  s = S.get_schedule(name)
  lam = np.linspace(-6, 6, 49)
  mass = dist.cdf(s.logsnr_max) - dist.cdf(s.logsnr_min)  # truncation to the clip range
  np.testing.assert_allclose(S.logsnr_density(s, lam), dist.pdf(lam) / mass, rtol=2e-4, atol=1e-7)
  # Drawing t ~ U[0, 1] gives that distribution (KS test, n=20000).
  t = jax.random.uniform(jax.random.PRNGKey(0), (20000,))
  assert stats.kstest(np.asarray(s.logsnr(t)), dist.cdf).pvalue > 1e-3


def test_grids():
  s = S.get_schedule("cosine")
  for kind in ("t", "logsnr", "karras"):
    g = S.logsnr_grid(s, 12, kind)
    assert g.shape == (12,)
    assert bool(jnp.all(jnp.diff(g) > 0)), kind
    np.testing.assert_allclose([g[0], g[-1]], [s.logsnr_min, s.logsnr_max], rtol=1e-5)
  np.testing.assert_allclose(jnp.diff(S.logsnr_grid(s, 7, "logsnr")), 5.0, rtol=1e-5)
  # The EDM schedule's own spacing is the Karras grid.
  e = S.get_schedule("edm")
  np.testing.assert_allclose(S.logsnr_grid(e, 18, "t"), S.logsnr_grid(e, 18, "karras"), atol=2e-5)
  assert S.logsnr_grid(s, 1).shape == (1,)
  with pytest.raises(ValueError, match="grid"):
    S.logsnr_grid(s, 4, "uniform")


def test_registry_errors_name_the_fix():
  with pytest.raises(ValueError, match="did you mean 'cosine'"):
    S.get_schedule("cosin")
  with pytest.raises(ValueError, match="unknown argument.*'rhoo'"):
    S.get_schedule("edm", rhoo=7)
  with pytest.raises(ValueError, match="logsnr_min < logsnr_max"):
    S.get_schedule("cosine", logsnr_min=5.0, logsnr_max=-5.0)


def test_usable_under_jit():
  @jax.jit
  def f(t):
    s = S.get_schedule("sigmoid")  # built while tracing: endpoints are computed eagerly
    return s.t_from_logsnr(s.logsnr(t))

  t = jnp.linspace(0, 1, 9)
  np.testing.assert_allclose(f(t), t, atol=3e-7)
