"""The Gaussian-mixture testbed itself: exact denoiser, sampling, distances."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import schedules as S
from imagen_jax.diffusion import testbed as T


@pytest.mark.parametrize("gmm", [T.ring_mixture(), T.random_mixture(dim=16, num_modes=3, seed=1)],
                         ids=["ring2d", "random16d"])
@pytest.mark.parametrize("logsnr", [-6.0, 0.0, 4.0, 9.0])
def test_denoiser_satisfies_tweedie(gmm, logsnr):
  # Tweedie: E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with the score from
  # autodiff of the exact marginal log-density: an independent route to the same mean.
  with jax.enable_x64(True):
    g64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gmm)
    # Re-orthonormalise the float32 eigenvectors so U^T U = I holds to float64 precision.
    g64 = dataclasses.replace(g64, eigvecs=jnp.linalg.qr(g64.eigvecs)[0])
    a, s = S.alpha_sigma(jnp.float64(logsnr))
    x0 = g64.sample(jax.random.PRNGKey(0), 64)
    x_t = a * x0 + s * jax.random.normal(jax.random.PRNGKey(1), x0.shape, jnp.float64)
    lam = jnp.full((64,), logsnr, jnp.float64)
    score = jax.grad(lambda x: g64.log_prob_noisy(x, lam).sum())(x_t)
    np.testing.assert_allclose(g64.denoise(x_t, lam), (x_t + s**2 * score) / a, rtol=1e-8, atol=1e-8)


def test_single_gaussian_posterior_mean_closed_form():
  rs = np.random.RandomState(0)
  d = 5
  q = np.linalg.qr(rs.randn(d, d))[0]
  ev = rs.uniform(0.1, 2.0, d)
  mu = rs.randn(d)
  g = T.GaussianMixture(jnp.ones((1,)), jnp.asarray(mu[None], jnp.float32),
                        jnp.asarray(ev[None], jnp.float32), jnp.asarray(q[None], jnp.float32))
  cov = q @ np.diag(ev) @ q.T
  lam = 0.7
  a, s = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))
  x_t = rs.randn(10, d)
  gain = a * cov @ np.linalg.inv(a**2 * cov + s**2 * np.eye(d))
  ref = mu + (x_t - a * mu) @ gain.T
  np.testing.assert_allclose(g.denoise(jnp.asarray(x_t, jnp.float32), lam), ref, rtol=1e-5, atol=1e-5)


def test_sample_moments_and_mixture_moments():
  g = T.random_mixture(dim=8, num_modes=3, seed=2)
  x = g.sample(jax.random.PRNGKey(3), 200_000)
  np.testing.assert_allclose(x.mean(0), g.mean(), atol=0.01)
  np.testing.assert_allclose(jnp.cov(x, rowvar=False), g.cov(), atol=0.01)
  mean_err, cov_err = T.moment_errors(x, g)
  assert float(mean_err) < 0.02 and float(cov_err) < 0.02


def test_sliced_wasserstein():
  rng = jax.random.PRNGKey(4)
  x = jax.random.normal(rng, (20000, 4))
  assert float(T.sliced_wasserstein(x, x, rng)) == 0.0
  # Shifting N(0, I) by m: every projection shifts by m . theta, so SW^2 = E[(m . theta)^2]
  # = |m|^2 / D for uniform unit directions (stated tolerance: Monte Carlo over 2048 dirs).
  m = jnp.array([1.0, -2.0, 0.5, 0.0])
  sw = T.sliced_wasserstein(x, x + m, rng, num_projections=2048)
  assert float(sw) == pytest.approx(float(jnp.linalg.norm(m)) / 2.0, rel=0.05)
  with pytest.raises(ValueError, match="equal shapes"):
    T.sliced_wasserstein(x, x[:10], rng)
