"""An analytic testbed: Gaussian-mixture data, whose exact denoiser is closed-form.

For x0 ~ sum_k pi_k N(mu_k, Sigma_k) and x_t = alpha x0 + sigma eps, each component gives
x_t | k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I) and

  E[x0 | x_t, k] = mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^-1 (x_t - alpha mu_k),

so E[x0 | x_t] = sum_k p(k | x_t) E[x0 | x_t, k] is the Bayes-optimal denoiser at every
noise level. Plugging it into a sampler isolates discretisation error: the samples must
match the mixture up to that error. Used by the tests and `benchmarks/samplers.py`, and
handy for checking any new sampler or schedule before a network is trained with it.

The distances here (mean/covariance error, sliced Wasserstein) compare sample sets.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.diffusion.schedules import alpha_sigma

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Mixture with weights [K], means [K, D] and covariances given by eigenpairs.

  Sigma_k = U_k diag(s_k) U_k^T with `eigvecs` [K, D, D] and `eigvals` [K, D], so the
  posterior mean needs no matrix inverse at any noise level.
  """

  weights: Array
  means: Array
  eigvals: Array
  eigvecs: Array

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def covs(self) -> Array:
    return jnp.einsum("kij,kj,klj->kil", self.eigvecs, self.eigvals, self.eigvecs)

  def mean(self) -> Array:
    return self.weights @ self.means

  def cov(self) -> Array:
    """Covariance of the mixture: E[Sigma_k + mu_k mu_k^T] - m m^T."""
    m = self.mean()
    second = jnp.einsum("k,kij->ij", self.weights, self.covs + jnp.einsum("ki,kj->kij", self.means, self.means))
    return second - jnp.outer(m, m)

  def sample(self, rng: Array, n: int) -> Array:
    k_rng, z_rng = jax.random.split(rng)
    k = jax.random.choice(k_rng, self.weights.shape[0], (n,), p=self.weights)
    z = jax.random.normal(z_rng, (n, self.dim))
    return self.means[k] + jnp.einsum("nij,nj->ni", self.eigvecs[k], jnp.sqrt(self.eigvals[k]) * z)

  def _component_terms(self, x_t: Array, logsnr: Array):
    """Per-component log p(x_t | k) + log pi_k and E[x0 | x_t, k]; logsnr is [B]."""
    alpha, sigma = alpha_sigma(logsnr[:, None, None])          # [B, 1, 1]
    var = alpha**2 * self.eigvals[None] + sigma**2              # [B, K, D]
    resid = x_t[:, None, :] - alpha * self.means[None]          # [B, K, D]
    proj = jnp.einsum("kdj,bkd->bkj", self.eigvecs, resid)      # in each eigenbasis
    logp = -0.5 * jnp.sum(proj**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)
    logp = logp + jnp.log(self.weights)[None]
    gain = alpha * self.eigvals[None] / var                      # alpha s / (alpha^2 s + sigma^2)
    x0_k = self.means[None] + jnp.einsum("kdj,bkj->bkd", self.eigvecs, gain * proj)
    return logp, x0_k

  def denoise(self, x_t: Array, logsnr: Array) -> Array:
    """Exact E[x0 | x_t] for x_t [B, D] at log-SNR [B] (or scalar)."""
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, x_t.dtype), x_t.shape[:1])
    logp, x0_k = self._component_terms(x_t, logsnr)
    return jnp.einsum("bk,bkd->bd", jax.nn.softmax(logp, axis=-1), x0_k)

  def log_prob_noisy(self, x_t: Array, logsnr: Array) -> Array:
    """log p_t(x_t), the marginal density at log-SNR `logsnr` (for Tweedie checks)."""
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, x_t.dtype), x_t.shape[:1])
    logp, _ = self._component_terms(x_t, logsnr)
    return jax.nn.logsumexp(logp, axis=-1)


def ring_mixture(num_modes: int = 8, radius: float = 1.0, std: float = 0.1) -> GaussianMixture:
  """2-D isotropic modes evenly spaced on a circle: multimodal, simple to look at."""
  ang = 2 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(ang), np.sin(ang)], -1)
  return GaussianMixture(
      weights=jnp.full((num_modes,), 1.0 / num_modes),
      means=jnp.asarray(means, jnp.float32),
      eigvals=jnp.full((num_modes, 2), std**2, jnp.float32),
      eigvecs=jnp.broadcast_to(jnp.eye(2, dtype=jnp.float32), (num_modes, 2, 2)))


def random_mixture(dim: int = 64, num_modes: int = 4, seed: int = 0, mean_scale: float = 1.0,
                   log_std_range: tuple[float, float] = (-3.0, -0.5)) -> GaussianMixture:
  """A D-dim mixture with unequal weights, random means and anisotropic, randomly
  rotated covariances whose per-axis std spans `log_std_range` (natural log)."""
  rs = np.random.RandomState(seed)
  weights = rs.dirichlet(np.full(num_modes, 5.0))
  means = rs.randn(num_modes, dim) * mean_scale / np.sqrt(dim) * 2.0
  log_std = rs.uniform(*log_std_range, size=(num_modes, dim))
  eigvecs = np.stack([np.linalg.qr(rs.randn(dim, dim))[0] for _ in range(num_modes)])
  return GaussianMixture(
      weights=jnp.asarray(weights, jnp.float32), means=jnp.asarray(means, jnp.float32),
      eigvals=jnp.asarray(np.exp(2 * log_std), jnp.float32),
      eigvecs=jnp.asarray(eigvecs, jnp.float32))


def sliced_wasserstein(x: Array, y: Array, rng: Array, num_projections: int = 256) -> float:
  """Sliced 2-Wasserstein distance between equal-sized sample sets [N, D].

  Projects both onto random unit directions, where W2 between the 1-D empirical
  distributions is the RMS difference of the sorted projections; averages W2^2 over
  directions and takes the square root.
  """
  if x.shape != y.shape:
    raise ValueError(f"sliced_wasserstein needs equal shapes, got {x.shape} and {y.shape}.")
  dirs = np.asarray(jax.random.normal(rng, (x.shape[1], num_projections)), np.float64)
  dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
  # On the host: an evaluation metric, and NumPy sorts ~10x faster than XLA:CPU here.
  px = np.sort(np.asarray(x, np.float64) @ dirs, axis=0)
  py = np.sort(np.asarray(y, np.float64) @ dirs, axis=0)
  return float(np.sqrt(np.mean(np.square(px - py))))


def moment_errors(x: Array, gmm: GaussianMixture) -> tuple[Array, Array]:
  """(||mean(x) - m||, ||cov(x) - C||_F / ||C||_F) against the mixture's exact moments."""
  mean_err = jnp.linalg.norm(jnp.mean(x, 0) - gmm.mean())
  cov = jnp.cov(x, rowvar=False)
  true = gmm.cov()
  return mean_err, jnp.linalg.norm(cov - true) / jnp.linalg.norm(true)
