"""Targets, conversions and loss weightings: every identity the trainer relies on.

Algebraic identities are checked in float64 (jax.enable_x64) to 1e-9, so a wrong sign
or factor cannot hide behind float32 noise.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import objectives as O
from imagen_jax.diffusion import schedules as S


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _batch(rng, lo=-12.0, hi=12.0, shape=(16, 4, 4, 3)):
  k0, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(rng), 4)
  x0 = jax.random.uniform(k0, shape, jnp.float64, -1, 1)
  eps = jax.random.normal(k1, shape, jnp.float64)
  lam = jax.random.uniform(k2, shape[:1], jnp.float64, lo, hi)
  noise = 0.3 * jax.random.normal(k3, shape, jnp.float64)  # an imperfect model's error
  return x0, eps, lam, noise


def test_diffuse_and_targets(x64):
  x0, eps, lam, _ = _batch(0)
  x_t = O.diffuse(x0, eps, lam)
  a = np.sqrt(1 / (1 + np.exp(-np.asarray(lam))))[:, None, None, None]
  s = np.sqrt(1 / (1 + np.exp(np.asarray(lam))))[:, None, None, None]
  np.testing.assert_allclose(x_t, a * x0 + s * eps, rtol=1e-12)
  np.testing.assert_allclose(O.targets(x0, eps, lam)["v"], a * eps - s * x0, rtol=1e-12)


@pytest.mark.parametrize("src", O.TARGETS)
@pytest.mark.parametrize("dst", O.TARGETS)
def test_conversions_are_exact(x64, src, dst):
  x0, eps, lam, _ = _batch(1)
  x_t = O.diffuse(x0, eps, lam)
  tg = O.targets(x0, eps, lam)
  np.testing.assert_allclose(O.convert(tg[src], x_t, lam, src, dst), tg[dst], atol=1e-9)
  np.testing.assert_allclose(O.to_x0(tg[src], x_t, lam, src), x0, atol=1e-9)
  np.testing.assert_allclose(O.from_x0(x0, x_t, lam, dst), tg[dst], atol=1e-9)
  # Round trip through a third space for an arbitrary (wrong) prediction.
  pred = tg[src] + 0.1
  back = O.convert(O.convert(pred, x_t, lam, src, dst), x_t, lam, dst, src)
  np.testing.assert_allclose(back, pred, atol=1e-9)


def test_mse_identities(x64):
  # v-MSE = (1 + SNR) x0-MSE = (1 + 1/SNR) eps-MSE, and x0-MSE = eps-MSE / SNR, per example.
  x0, eps, lam, noise = _batch(2)
  x_t = O.diffuse(x0, eps, lam)
  eps_hat = eps + noise
  tg = O.targets(x0, eps, lam)
  mse = {}
  for k in O.TARGETS:
    pred = O.convert(eps_hat, x_t, lam, "eps", k)
    mse[k] = jnp.mean((pred - tg[k]) ** 2, axis=(1, 2, 3))
  snr = jnp.exp(lam)
  np.testing.assert_allclose(mse["v"], (1 + snr) * mse["x0"], rtol=1e-9)
  np.testing.assert_allclose(mse["v"], (1 + 1 / snr) * mse["eps"], rtol=1e-9)
  np.testing.assert_allclose(mse["x0"], mse["eps"] / snr, rtol=1e-9)


@pytest.mark.parametrize("weighting", sorted(O.WEIGHTINGS))
def test_weighted_loss_is_the_same_in_every_target_space(x64, weighting):
  # The same model, written as an eps-, x0- or v-predictor, gets the same loss.
  x0, eps, lam, noise = _batch(3, lo=-8, hi=8)
  x_t = O.diffuse(x0, eps, lam)
  eps_hat = eps + noise
  w = O.get_weighting(weighting)
  losses = [O.weighted_mse(O.convert(eps_hat, x_t, lam, "eps", k), x0, eps, lam,
                           target=k, weighting=w) for k in O.TARGETS]
  for other in losses[1:]:
    np.testing.assert_allclose(other, losses[0], rtol=1e-7)
  # ... and equals its definition on the eps-MSE.
  eps_mse = jnp.mean(noise**2, axis=(1, 2, 3))
  np.testing.assert_allclose(losses[0], w(lam) * eps_mse, rtol=1e-7)


def test_weighting_definitions(x64):
  lam = jnp.linspace(-10, 10, 81, dtype=jnp.float64)
  snr = jnp.exp(lam)
  w = lambda name, **kw: O.get_weighting(name, **kw)(lam)
  # Each as the weight on the x0-MSE, converted to the eps-MSE by the factor 1/SNR.
  np.testing.assert_allclose(w("eps"), 1.0)
  np.testing.assert_allclose(w("x0"), 1 / snr, rtol=1e-12)
  np.testing.assert_allclose(w("v"), (1 + snr) / snr, rtol=1e-12)
  np.testing.assert_allclose(w("snr"), w("eps"), rtol=1e-12)
  np.testing.assert_allclose(w("truncated_snr"), np.maximum(snr, 1) / snr, rtol=1e-12)
  np.testing.assert_allclose(w("min_snr", gamma=5.0), np.minimum(snr, 5.0) / snr, rtol=1e-12)
  sig2 = 1 / snr  # EDM sigma_e^2
  np.testing.assert_allclose(w("edm", sigma_data=0.5), (sig2 + 0.25) / (sig2 * 0.25) / snr, rtol=1e-12)
  np.testing.assert_allclose(w("edm", sigma_data=1.0), w("v"), rtol=1e-12)  # EDM(sigma_d=1) = v-MSE
  np.testing.assert_allclose(w("sigmoid", bias=2.0), 1 / (1 + np.exp(lam - 2.0)), rtol=1e-12)


def test_weighting_errors():
  with pytest.raises(ValueError, match="did you mean 'min_snr'"):
    O.get_weighting("minsnr")
  with pytest.raises(ValueError, match="does not take"):
    O.get_weighting("eps", gamma=5.0)
  with pytest.raises(ValueError, match="prediction target"):
    O.to_x0(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1,)), "score")


def test_implied_weighting_cosine_eps():
  # eps-MSE under the cosine schedule weighs lambda by sech(lambda/2) / (2 pi) (Kingma & Gao).
  s = S.get_schedule("cosine")
  lam = jnp.linspace(-10, 10, 41)
  u0, u1, _ = s._u_range
  np.testing.assert_allclose(O.implied_weighting(s, O.get_weighting("eps"), lam),
                             1 / np.cosh(lam / 2) / (2 * np.pi * (u1 - u0)), rtol=1e-4)


def test_sample_t_antithetic_is_stratified():
  t = O.sample_t(jax.random.PRNGKey(0), 64, antithetic=True)
  counts = np.bincount(np.floor(np.asarray(t) * 64).astype(int), minlength=64)
  assert (counts == 1).all()
  assert t.min() >= 0 and t.max() < 1


def test_diffusion_loss_matches_manual_computation():
  s = S.get_schedule("cosine")
  x0 = jax.random.uniform(jax.random.PRNGKey(1), (8, 4, 4, 3), minval=-1, maxval=1)
  model = lambda x_t, lam: 0.5 * x_t  # some v-predictor
  rng = jax.random.PRNGKey(7)
  loss, lam = O.diffusion_loss(model, x0, rng, s, target="v", weighting="min_snr")
  # Manual: same draws, the v-MSE converted to min-SNR weighting of the eps-MSE.
  rng_t, rng_eps = jax.random.split(rng)
  lam_ref = s.logsnr(O.sample_t(rng_t, 8, antithetic=True))
  eps = jax.random.normal(rng_eps, x0.shape)
  x_t = O.diffuse(x0, eps, lam_ref)
  v_mse = jnp.mean((0.5 * x_t - O.targets(x0, eps, lam_ref)["v"]) ** 2, axis=(1, 2, 3))
  snr = jnp.exp(lam_ref)
  np.testing.assert_allclose(lam, lam_ref, rtol=1e-6)
  np.testing.assert_allclose(loss, v_mse / (1 + 1 / snr) * jnp.minimum(snr, 5.0) / snr, rtol=1e-5)
  assert loss.shape == (8,)
  # The loss is differentiable in the model's parameters.
  g = jax.grad(lambda c: O.diffusion_loss(lambda x, l: c * x, x0, rng, s, target="v")[0].mean())(0.5)
  assert np.isfinite(g) and g != 0
