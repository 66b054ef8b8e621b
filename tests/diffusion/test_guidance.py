"""Classifier-free guidance, thresholding and noise-conditioning augmentation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import guidance as G
from imagen_jax.diffusion import objectives as O
from imagen_jax.diffusion import schedules as S


def _preds(seed=0, shape=(6, 8, 8, 3)):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  x_t = jax.random.normal(ks[0], shape)
  lam = jax.random.uniform(ks[1], shape[:1], minval=-6, maxval=6)
  eps_c = jax.random.normal(ks[2], shape)
  eps_u = jax.random.normal(ks[3], shape)
  return x_t, lam, eps_c, eps_u


def _cfg(target, scale, x_t, lam, eps_c, eps_u):
  """Guided x0 from a model that predicts `target` (same underlying eps predictions)."""
  pair = lambda x, l: (O.convert(eps_c, x, l, "eps", target), O.convert(eps_u, x, l, "eps", target))
  return G.cfg_denoise_fn(pair, scale=scale, target=target)(x_t, lam)


@pytest.mark.parametrize("target", O.TARGETS)
def test_cfg_scale_one_is_conditional_and_zero_unconditional(target):
  x_t, lam, eps_c, eps_u = _preds()
  np.testing.assert_allclose(_cfg(target, 1.0, x_t, lam, eps_c, eps_u),
                             O.to_x0(eps_c, x_t, lam, "eps"), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(_cfg(target, 0.0, x_t, lam, eps_c, eps_u),
                             O.to_x0(eps_u, x_t, lam, "eps"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [0.5, 3.0, 7.5])
def test_cfg_is_the_same_for_every_target_and_equals_eps_space_guidance(scale):
  x_t, lam, eps_c, eps_u = _preds(1)
  # Reference: Ho & Salimans in eps space, eps_u + w (eps_c - eps_u), then to x0.
  ref = O.to_x0(eps_u + scale * (eps_c - eps_u), x_t, lam, "eps")
  for target in O.TARGETS:
    # Tolerance: x0 = (x_t - sigma eps) / alpha amplifies float32 rounding by 1/alpha
    # (about 20 at lambda = -6), times the guidance scale.
    np.testing.assert_allclose(_cfg(target, scale, x_t, lam, eps_c, eps_u), ref,
                               rtol=1e-4, atol=2e-5 * 20 * max(scale, 1.0))
  # And it is not a no-op: guidance moves the prediction away from the conditional one.
  assert float(jnp.abs(ref - O.to_x0(eps_c, x_t, lam, "eps")).mean()) > 0.1


def test_dynamic_threshold_bounds_and_matches_definition():
  x0 = 3.0 * jax.random.normal(jax.random.PRNGKey(2), (4, 16, 16, 3))
  out = G.dynamic_threshold(x0, 99.5)
  assert float(jnp.abs(out).max()) <= 1.0
  flat = np.abs(np.asarray(x0).reshape(4, -1))
  s = np.maximum(np.percentile(flat, 99.5, axis=1), 1.0)[:, None, None, None]
  np.testing.assert_allclose(out, np.clip(x0, -s, s) / s, rtol=1e-5, atol=1e-6)


def test_dynamic_threshold_is_identity_inside_bounds():
  x0 = jax.random.uniform(jax.random.PRNGKey(3), (3, 8, 8, 3), minval=-1, maxval=1)
  np.testing.assert_array_equal(G.dynamic_threshold(x0, 99.5), x0)
  # One example out of bounds leaves the others untouched (per-example s).
  x0_mixed = x0.at[0].multiply(4.0)
  out = G.dynamic_threshold(x0_mixed, 95.0)
  np.testing.assert_array_equal(out[1:], x0[1:])
  assert float(jnp.abs(out[0]).max()) <= 1.0


def test_static_threshold_and_wrapper():
  den = lambda x, l: 2.0 * x
  x = jnp.linspace(-1, 1, 12).reshape(2, 6)
  np.testing.assert_allclose(G.thresholded(den, "static")(x, jnp.zeros(2)), np.clip(2 * x, -1, 1))
  np.testing.assert_allclose(G.thresholded(den, None)(x, jnp.zeros(2)), 2 * x)
  assert float(jnp.abs(G.thresholded(den, "dynamic")(x, jnp.zeros(2))).max()) <= 1.0
  with pytest.raises(ValueError, match="thresholding"):
    G.thresholded(den, "clip")


def test_noise_augment():
  sched = S.get_schedule("cosine")
  x = jax.random.uniform(jax.random.PRNGKey(4), (2048, 8, 8, 3), minval=-1, maxval=1)
  rng = jax.random.PRNGKey(5)
  t = jnp.linspace(0.1, 0.9, 2048)
  x_aug, lam = G.noise_augment(rng, x, t, sched)
  np.testing.assert_allclose(lam, sched.logsnr(t), rtol=1e-6)
  # The noise it added is standard normal: (x_aug - alpha x) / sigma ~ N(0, 1).
  a, s = S.alpha_sigma(lam)
  z = (x_aug - a[:, None, None, None] * x) / s[:, None, None, None]
  assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01  # n = 393k: std err 0.0016
  # Deterministic in rng; a scalar level broadcasts; level 0 is (nearly) clean.
  np.testing.assert_array_equal(G.noise_augment(rng, x, t, sched)[0], x_aug)
  x0_aug, lam0 = G.noise_augment(rng, x[:4], 0.0, sched)
  assert lam0.shape == (4,) and float(lam0[0]) == pytest.approx(15.0)
  np.testing.assert_allclose(x0_aug, x[:4], atol=5e-3)  # sigma(15) = 5.5e-4, 8 sigma
  levels = G.sample_aug_t(jax.random.PRNGKey(6), 1000, max_t=0.5)
  assert 0.0 <= float(levels.min()) and float(levels.max()) <= 0.5


# Noise-conditioning augmentation levels: t, log-SNR and sigma ------------------------


def _closed_form_cosine(t: float) -> float:
  """lambda(t) of the clipped cosine schedule on [-15, 15], in Python floats."""
  u0 = 2 / math.pi * math.atan(math.exp(-7.5))
  u1 = 2 / math.pi * math.atan(math.exp(7.5))
  return -2.0 * math.log(math.tan(0.5 * math.pi * (u0 + t * (u1 - u0))))


def test_aug_level_default_on_cosine_in_three_forms():
  # The configs' default sample_t=0.2 (their comments quote these numbers).
  level = G.aug_level(S.get_schedule("cosine"), t=0.2)
  assert level.t == 0.2
  assert level.logsnr == pytest.approx(_closed_form_cosine(0.2), rel=1e-12)
  assert level.logsnr == pytest.approx(2.2461, abs=5e-5)
  assert level.sigma == pytest.approx(math.sqrt(1.0 / (1.0 + math.exp(level.logsnr))),
                                      rel=1e-12)
  assert level.sigma == pytest.approx(0.3093, abs=5e-5)


@pytest.mark.parametrize("name", ["cosine", "linear", "sigmoid", "edm"])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.2, 0.3, 0.9])
def test_aug_level_forms_resolve_to_the_same_logsnr(name, t):
  sched = S.get_schedule(name)
  by_t = G.aug_level(sched, t=t)
  by_logsnr = G.aug_level(sched, logsnr=by_t.logsnr)
  by_sigma = G.aug_level(sched, sigma=by_t.sigma)
  assert by_logsnr.logsnr == by_t.logsnr
  # float64 round trips through sigma and the schedule's inverse.
  assert by_sigma.logsnr == pytest.approx(by_t.logsnr, rel=1e-9, abs=1e-9)
  for other in (by_logsnr, by_sigma):
    assert other.t == pytest.approx(t, abs=1e-9)
    assert other.sigma == pytest.approx(by_t.sigma, rel=1e-9)
  # And the log-SNR is the one training's noise_augment conditions on at that t.
  np.testing.assert_allclose(by_t.logsnr, float(sched.logsnr(jnp.float32(t))), rtol=1e-5,
                             atol=1e-5)


def test_aug_level_rejects_none_several_and_out_of_range():
  sched = S.get_schedule("cosine")
  with pytest.raises(ValueError, match="exactly one"):
    G.aug_level(sched)
  with pytest.raises(ValueError, match="exactly one"):
    G.aug_level(sched, t=0.2, sigma=0.3)
  for kw in (dict(t=1.5), dict(t=-0.1), dict(logsnr=20.0), dict(sigma=0.0), dict(sigma=1.0),
             dict(t=float("nan"))):
    with pytest.raises(ValueError, match="outside"):
      G.aug_level(sched, **kw)
  lo, hi = G.aug_level_range(sched)["sigma"]
  assert 0.0 < lo < 1e-3 and 1.0 - 1e-3 < hi < 1.0


def test_sample_aug_t_per_batch_or_per_example():
  rng = jax.random.PRNGKey(7)
  # Per example is the draw training always made (bit-identical).
  np.testing.assert_array_equal(G.sample_aug_t(rng, 64, max_t=0.5),
                                jax.random.uniform(rng, (64,), maxval=0.5))
  per_ex = np.asarray(G.sample_aug_t(rng, 64, max_t=0.5, per="example"))
  assert len(np.unique(per_ex)) == 64
  per_batch = np.asarray(G.sample_aug_t(rng, 64, max_t=0.5, per="batch"))
  assert per_batch.shape == (64,) and len(np.unique(per_batch)) == 1
  levels = np.array([G.sample_aug_t(jax.random.PRNGKey(i), 4, 0.5, "batch")[0]
                     for i in range(200)])
  assert 0.0 <= levels.min() and levels.max() <= 0.5 and levels.std() > 0.1  # U[0, 0.5]
  with pytest.raises(ValueError, match="per"):
    G.sample_aug_t(rng, 4, per="step")


def test_noise_aug_from_config_new_and_old():
  new = dict(schedule="linear", schedule_kw={},
             noise_aug=dict(schedule="cosine", schedule_kw={"logsnr_min": -12.0}, max_t=0.5,
                            per="batch", sample_t=None, sample_logsnr=None, sample_sigma=0.4))
  aug = G.NoiseAug.from_config(new)
  assert aug.schedule == S.get_schedule("cosine", logsnr_min=-12.0)
  assert (aug.max_t, aug.per) == (0.5, "batch")
  assert aug.sample_level().sigma == 0.4
  # A config saved before noise_aug had its own schedule: it augmented on the diffusion
  # schedule, per example, at sample_t.
  old = dict(schedule="linear", schedule_kw={"logsnr_max": 9.0},
             noise_aug=dict(max_t=1.0, sample_t=0.2))
  aug = G.NoiseAug.from_config(old)
  assert aug.schedule == S.get_schedule("linear", logsnr_max=9.0)
  assert aug.per == "example"
  assert aug.sample_level().logsnr == G.aug_level(aug.schedule, t=0.2).logsnr
