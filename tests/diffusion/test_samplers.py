"""Samplers against exact denoisers: closed-form ODE solutions and Gaussian mixtures.

Two testbeds isolate discretisation error (no network is involved):

* Gaussian data N(mu, diag(s^2)): the probability-flow ODE is linear, and its exact
  solution from lambda_min to lambda_max is known in closed form, so the convergence
  order of each deterministic method is measured exactly.
* Gaussian mixtures (2-D ring, 64-D random anisotropic): multimodal data whose exact
  denoiser is closed-form (`imagen_jax.diffusion.testbed`); samples must match fresh data
  (sliced Wasserstein, moments) and errors must shrink as steps grow.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imagen_jax.diffusion import samplers as SM
from imagen_jax.diffusion import schedules as S
from imagen_jax.diffusion import testbed as T

DETERMINISTIC = ("ddim", "dpmpp_2m", "dpmpp_3m", "heun")


def _run(denoise, sched, method, steps, shape, seed=1, grid="t", x_init=None, **kw):
  fn = jax.jit(functools.partial(SM.sample, denoise, sched, shape=shape, method=method,
                                 steps=steps, grid=grid, x_init=x_init, **kw))
  return fn(jax.random.PRNGKey(seed))


# Gaussian data: exact ODE solution --------------------------------------------------------

D = 8
STD = jnp.exp(jnp.linspace(jnp.log(0.05), 0.0, D))
MU = jnp.linspace(-0.5, 0.5, D)
GAUSS = T.GaussianMixture(jnp.ones((1,)), MU[None], (STD**2)[None], jnp.eye(D)[None])


def _exact_final(sched, x_init):
  """Exact ODE transport from lambda_min to lambda_max, then the sampler's last step
  (x0_hat at lambda_max). Per axis the flow is affine: x -> a mu + sqrt(a^2 s^2 + o^2) z."""
  a0, o0 = S.alpha_sigma(sched.logsnr_min)
  a1, o1 = S.alpha_sigma(sched.logsnr_max)
  z = (x_init - a0 * MU) / jnp.sqrt(a0**2 * STD**2 + o0**2)
  x1 = a1 * MU + jnp.sqrt(a1**2 * STD**2 + o1**2) * z
  return GAUSS.denoise(x1, jnp.full(x1.shape[:1], sched.logsnr_max))


@functools.lru_cache(maxsize=None)
def _gauss_errors(schedule: str, grid: str, method: str) -> tuple[float, ...]:
  sched = S.get_schedule(schedule)
  x_init = jax.random.normal(jax.random.PRNGKey(0), (256, D))
  exact = _exact_final(sched, x_init)
  errs = []
  for steps in (16, 32, 64, 128):
    x = _run(GAUSS.denoise, sched, method, steps, (256, D), grid=grid, x_init=x_init).x
    errs.append(float(jnp.sqrt(jnp.mean(jnp.square(x - exact)))))
  return tuple(errs)


def _orders(errs):
  e = np.asarray(errs)
  return np.log2(e[:-1] / e[1:])


@pytest.mark.parametrize("schedule,grid", [("edm", "karras"), ("cosine", "logsnr")])
def test_convergence_order_on_gaussian_data(schedule, grid):
  """Observed orders at 16 -> 32 -> 64 -> 128 steps (errors measured, see the note)."""
  errs = {m: _gauss_errors(schedule, grid, m) for m in DETERMINISTIC}
  # DDIM is first order: halving the step halves the error (measured: 0.95 to 1.00).
  assert np.all(np.abs(_orders(errs["ddim"]) - 1.0) < 0.1), errs["ddim"]
  # DPM-Solver++(2M) and Heun are second order (measured: 1.94 to 2.24 on the last two pairs).
  for m in ("dpmpp_2m", "heun"):
    assert np.all(_orders(errs[m])[1:] > 1.8), (m, errs[m])
  # 3M's lower-order warm-up steps cap its global order near 2 with smaller constants:
  # it must beat 2M at every resolution from 32 steps on (measured: 2x to 12x better).
  assert all(e3 < e2 for e3, e2 in zip(errs["dpmpp_3m"][1:], errs["dpmpp_2m"][1:])), errs
  # At equal NFE (heun spends 2 steps - 1), every higher-order method beats DDIM from 64 NFE.
  for m in ("dpmpp_2m", "dpmpp_3m"):
    assert errs[m][2] < errs["ddim"][2] and errs[m][3] < errs["ddim"][3], (m, errs)
  assert errs["heun"][1] < errs["ddim"][2] and errs["heun"][2] < errs["ddim"][3], errs


def test_ddpm_ancestral_matches_gaussian_moments():
  # Stochastic: no pathwise solution, so compare moments with their sampling error stated.
  # Plugging x0_hat into the DDPM posterior drops Var(x0 | x_t) from each step, a first-
  # order variance deficit (measured on the narrowest axis, s = 0.05: 13% at 100 uniform-
  # lambda steps, under 3% at 1600); it must shrink with steps and be small at 1600.
  n = 20000
  sched = S.get_schedule("cosine")
  deficit = {}
  for steps in (100, 1600):
    x = _run(GAUSS.denoise, sched, "ddpm", steps, (n, D), grid="logsnr").x
    deficit[steps] = float(jnp.max(1.0 - x.var(0) / STD**2))
  np.testing.assert_allclose(x.mean(0), MU, atol=5 * 1.0 / np.sqrt(n))          # 5 std errs
  # Relative variance std err is sqrt(2/n) = 1%: allow 5%.
  np.testing.assert_allclose(x.var(0) / STD**2, 1.0, atol=0.05)
  assert deficit[1600] < deficit[100] / 3, deficit


# Gaussian mixtures: distributions ---------------------------------------------------------

MIXTURES = {
    "ring2d": (T.ring_mixture(), 8192),
    "random64d": (T.random_mixture(dim=64, num_modes=4, seed=0), 4096),
}


@functools.lru_cache(maxsize=None)
def _data(name, seed):
  gmm, n = MIXTURES[name]
  return gmm.sample(jax.random.PRNGKey(100 + seed), n)


def _sw(name, x):
  return float(T.sliced_wasserstein(x, _data(name, 0), jax.random.PRNGKey(7)))


@functools.lru_cache(maxsize=None)
def _floor(name, draws=8):
  """Mean and std of SW between fresh data draws and the reference draw: the finite-n
  noise floor that no sampler can beat."""
  sw = [_sw(name, _data(name, k)) for k in range(1, draws + 1)]
  return float(np.mean(sw)), float(np.std(sw))


@pytest.mark.parametrize("method", SM.METHODS)
@pytest.mark.parametrize("mixture", MIXTURES)
def test_every_sampler_reproduces_the_mixture(mixture, method):
  gmm, n = MIXTURES[mixture]
  sched = S.get_schedule("edm")
  floor_mean, floor_std = _floor(mixture)
  # Ancestral DDPM's plug-in variance deficit is first order (see the Gaussian test above),
  # so it gets the many small steps it was designed for (4000, as in Nichol & Dhariwal;
  # measured on random64d: SW 0.0162 at 1000 steps, 0.0134 at 4000, floor 0.0132).
  steps = 4000 if method == "ddpm" else 200
  coarse = _run(gmm.denoise, sched, method, 5, (n, gmm.dim))
  fine = _run(gmm.denoise, sched, method, steps, (n, gmm.dim))
  assert int(fine.nfe) == SM.nfe_for(method, steps)
  sw_coarse, sw_fine = _sw(mixture, coarse.x), _sw(mixture, fine.x)
  assert sw_fine < sw_coarse, (sw_fine, sw_coarse)
  # With that many steps the discretisation error is far below the sampling noise: the
  # sampler's distance to data lies within the spread of distances between data draws.
  assert sw_fine < floor_mean + 3 * floor_std, (sw_fine, floor_mean, floor_std)
  mean_err, cov_err = T.moment_errors(fine.x, gmm)
  data_mean_err, data_cov_err = T.moment_errors(_data(mixture, 1), gmm)
  assert float(mean_err) < 3 * float(data_mean_err) + 0.01, (mean_err, data_mean_err)
  assert float(cov_err) < 3 * float(data_cov_err) + 0.01, (cov_err, data_cov_err)


@functools.lru_cache(maxsize=None)
def _reference(mixture):
  """A converged ODE solution (3M, 1000 uniform-lambda steps) from the shared x_init."""
  gmm, n = MIXTURES[mixture]
  x_init = jax.random.normal(jax.random.PRNGKey(3), (n // 4, gmm.dim))
  ref = _run(gmm.denoise, S.get_schedule("edm"), "dpmpp_3m", 1000, x_init.shape,
             grid="logsnr", x_init=x_init).x
  return x_init, ref


@pytest.mark.parametrize("mixture", MIXTURES)
def test_second_order_beats_ddim_at_equal_nfe_on_mixtures(mixture):
  gmm, _ = MIXTURES[mixture]
  sched = S.get_schedule("edm")
  x_init, ref = _reference(mixture)
  err = {}
  for method in DETERMINISTIC:
    for nfe in (40, 80):
      steps = SM.steps_for_nfe(method, nfe)
      x = _run(gmm.denoise, sched, method, steps, x_init.shape, x_init=x_init).x
      err[method, nfe] = float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x - ref), -1))))
  for nfe in (40, 80):
    for method in ("dpmpp_2m", "dpmpp_3m", "heun"):
      assert err[method, nfe] < err["ddim", nfe], (method, nfe, err)
  # And errors shrink with NFE for every method.
  for method in DETERMINISTIC:
    assert err[method, 80] < err[method, 40], err


# Mechanics ------------------------------------------------------------------------------


@pytest.mark.parametrize("method", SM.METHODS)
def test_nfe_is_counted(method):
  out = _run(GAUSS.denoise, S.get_schedule("cosine"), method, 7, (4, D))
  assert int(out.nfe) == SM.nfe_for(method, 7)
  assert bool(jnp.all(jnp.isfinite(out.x)))
  calls = []

  def counting(x, lam):
    calls.append(1)  # Python side effect: runs once per trace of a call site
    return GAUSS.denoise(x, lam)

  SM.sample(counting, S.get_schedule("cosine"), jax.random.PRNGKey(0), (4, D), method=method, steps=7)
  assert 1 <= len(calls) <= 2  # one compiled loop body (heun: predictor + corrector)


def test_ddim_eta_one_is_ddpm_and_one_step_is_x0_hat():
  sched = S.get_schedule("cosine")
  a = _run(GAUSS.denoise, sched, "ddim", 10, (16, D), eta=1.0).x
  b = _run(GAUSS.denoise, sched, "ddpm", 10, (16, D)).x
  np.testing.assert_array_equal(a, b)
  x_init = jax.random.normal(jax.random.PRNGKey(0), (16, D))
  one = _run(GAUSS.denoise, sched, "ddim", 1, (16, D), x_init=x_init).x
  np.testing.assert_allclose(one, GAUSS.denoise(x_init, jnp.full((16,), sched.logsnr_min)), atol=1e-6)


def test_heun_churn_is_stochastic_and_still_converges():
  gmm, n = MIXTURES["ring2d"]
  sched = S.get_schedule("edm")
  kw = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)
  a = _run(gmm.denoise, sched, "heun", 100, (n, 2), seed=1, **kw)
  assert int(a.nfe) == 199
  floor_mean, floor_std = _floor("ring2d")
  assert _sw("ring2d", a.x) < floor_mean + 3 * floor_std
  x_init = jax.random.normal(jax.random.PRNGKey(0), (n, 2))
  c = _run(gmm.denoise, sched, "heun", 100, (n, 2), seed=1, x_init=x_init, **kw).x
  d = _run(gmm.denoise, sched, "heun", 100, (n, 2), seed=2, x_init=x_init, **kw).x
  assert float(jnp.abs(c - d).max()) > 1e-3  # churn noise depends on the key


def test_eager_equals_jit_and_errors():
  sched = S.get_schedule("cosine")
  eager = SM.sample(GAUSS.denoise, sched, jax.random.PRNGKey(1), (8, D), method="dpmpp_2m",
                    steps=6, grid="t")
  jitted = _run(GAUSS.denoise, sched, "dpmpp_2m", 6, (8, D))
  np.testing.assert_allclose(eager.x, jitted.x, atol=1e-5)
  with pytest.raises(ValueError, match="Unknown sampler"):
    SM.sample(GAUSS.denoise, sched, jax.random.PRNGKey(1), (8, D), method="euler_a", steps=6)
  with pytest.raises(ValueError, match="takes options"):
    SM.sample(GAUSS.denoise, sched, jax.random.PRNGKey(1), (8, D), method="dpmpp_2m", steps=6, eta=1.0)
  assert SM.steps_for_nfe("heun", 39) == 20 and SM.nfe_for("heun", 20) == 39


@pytest.mark.parametrize("method", DETERMINISTIC)
def test_gradients_through_sampling_are_finite(method):
  # Distillation and guided-sampling research differentiate through the sampler: the
  # unused higher-order branches at the first and last step must not poison gradients.
  sched = S.get_schedule("cosine")
  x_init = jax.random.normal(jax.random.PRNGKey(0), (16, D))

  def loss(scale):
    den = lambda x, lam: scale * GAUSS.denoise(x, lam)
    return SM.sample(den, sched, jax.random.PRNGKey(1), (16, D), method=method, steps=6,
                     x_init=x_init).x.sum()

  g = jax.grad(loss)(1.0)
  assert np.isfinite(float(g)) and float(g) != 0.0
