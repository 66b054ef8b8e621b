"""Samplers against exact denoisers: closed-form ODE solutions and Gaussian mixtures.

Two testbeds isolate discretisation error (no network is involved):

* Gaussian data N(mu, diag(s^2)): the probability-flow ODE is linear, and its exact
  solution from lambda_min to lambda_max is known in closed form, so the convergence
  order of each deterministic method is measured exactly.
* Gaussian mixtures (2-D ring, 64-D random anisotropic): multimodal data whose exact
  denoiser is closed-form (`imagen_jax.diffusion.testbed`); samples must match fresh data
  (sliced Wasserstein, moments) and errors must shrink as steps grow.

DPM-Solver++(3M) is also checked step for step against k-diffusion's algorithm, rewritten
here in float64 NumPy in k-diffusion's own variables.
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


# DPM-Solver++(3M): k-diffusion parity and the warm-up choice ----------------------------


def _k_diffusion_dpmpp_3m(model, x, sigmas):
  """k-diffusion's `sample_dpmpp_3m_sde` at eta = 0 (k_diffusion/sampling.py, unchanged
  from 0.1.1.post1 to its main branch in 2026), written again in float64 NumPy in its own
  variables: VE x, sigma (ending in 0), t = -log sigma, model(x, sigma) -> denoised.
  Returns x after every step."""
  states = []
  den_1 = den_2 = h = h_1 = h_2 = None
  for i in range(len(sigmas) - 1):
    den = model(x, sigmas[i])
    if sigmas[i + 1] == 0:
      x = den                                # its denoising step
    else:
      h = np.log(sigmas[i]) - np.log(sigmas[i + 1])
      x = np.exp(-h) * x - np.expm1(-h) * den
      phi_2 = np.expm1(-h) / h + 1
      if h_2 is not None:                    # third order: two history points
        r0, r1 = h_1 / h, h_2 / h
        d1_0, d1_1 = (den - den_1) / r0, (den_1 - den_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        x = x + phi_2 * d1 - (phi_2 / h - 0.5) * d2
      elif h_1 is not None:                  # second order: the warm-up step
        x = x + phi_2 * (den - den_1) / (h_1 / h)
    den_1, den_2 = den, den_1
    h_1, h_2 = h, h_1
    states.append(x)
  return states


@pytest.mark.parametrize("schedule,grid", [("edm", "karras"), ("cosine", "logsnr")])
def test_dpmpp_3m_taylor_warmup_equals_k_diffusion_step_for_step(schedule, grid):
  # Same grid, same exact denoiser, float64 on both sides. k-diffusion's sigma is the VE
  # sigma / alpha = exp(-lambda / 2) (so its t = -log sigma is lambda / 2, DPM-Solver's
  # lambda) and its x is x_t / alpha. Our state after step k is the 3M loop on the first
  # k + 1 levels (the grid ends with +inf for the step to clean data). Measured max
  # |difference|: 8e-13 (states up to 3.6 in size); midpoint's is 2.5e-5 to 1.1e-3.
  steps, tol = 8, 1e-10
  gmm, _ = MIXTURES["random64d"]
  with jax.enable_x64(True):
    g64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), gmm)
    lam = np.asarray(S.logsnr_grid(S.get_schedule(schedule), steps, grid), np.float64)
    levels = jnp.asarray(np.append(lam, np.inf))
    x_init = jax.random.normal(jax.random.PRNGKey(0), (64, gmm.dim), jnp.float64)

    def ours(warmup):
      run = SM.METHODS["dpmpp_3m"]
      return [np.asarray(run(g64.denoise, levels[:k + 1], x_init, None, warmup=warmup)[0])
              for k in range(1, steps + 1)]

    def model(x_ve, sigma):
      lam_s = -2.0 * np.log(sigma)
      a, _ = S.alpha_sigma(lam_s)
      return np.asarray(g64.denoise(jnp.asarray(a * x_ve), jnp.full((x_ve.shape[0],), lam_s)))

    sigmas = np.append(np.exp(-0.5 * lam), 0.0)
    alphas = 1.0 / np.sqrt(1.0 + sigmas**2)   # alpha at each sigma; 1 at sigma = 0
    ref = _k_diffusion_dpmpp_3m(model, np.asarray(x_init) / alphas[0], sigmas)
    taylor, midpoint = ours("taylor"), ours("midpoint")
  for k in range(steps):
    np.testing.assert_allclose(taylor[k], alphas[k + 1] * ref[k], rtol=0, atol=tol,
                               err_msg=f"after step {k + 1}")
  # The first step is first order in both forms; from the second on, midpoint differs.
  np.testing.assert_allclose(midpoint[0], alphas[1] * ref[0], rtol=0, atol=tol)
  assert np.abs(midpoint[1] - alphas[2] * ref[1]).max() > 1e3 * tol


@pytest.mark.parametrize("mixture", MIXTURES)
def test_dpmpp_3m_default_warmup_is_the_measured_better_one(mixture):
  # With 3 levels the warm-up step is the last before x0_hat, so its form decides the
  # error: taylor's is the lower one on all 12 schedule x mixture cells of
  # benchmarks/results/samplers.md (measured here, EDM: ring 0.421 vs 0.543, 64-D 1.68 vs
  # 1.82). From 5 NFE on, that step is taken so noisy that x0_hat has barely moved and the
  # forms agree (here at 5 and 10 NFE: within 0.2%).
  gmm, _ = MIXTURES[mixture]
  sched = S.get_schedule("edm")
  x_init, ref = _reference(mixture)

  def run(steps, **kw):
    x = _run(gmm.denoise, sched, "dpmpp_3m", steps, x_init.shape, x_init=x_init, **kw).x
    return x, float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x - ref), -1))))

  assert SM.WARMUPS[0] == "taylor"
  (x_default, _), (x_taylor, e_taylor) = run(3), run(3, warmup="taylor")
  np.testing.assert_array_equal(x_default, x_taylor)
  e_midpoint = run(3, warmup="midpoint")[1]
  assert e_taylor < 0.95 * e_midpoint, (e_taylor, e_midpoint)
  for steps in (5, 10):
    e_t, e_m = run(steps, warmup="taylor")[1], run(steps, warmup="midpoint")[1]
    assert abs(e_t - e_m) < 0.01 * e_m, (steps, e_t, e_m)


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
  with pytest.raises(ValueError, match="takes options"):  # 2M's order-2 step is fixed
    SM.sample(GAUSS.denoise, sched, jax.random.PRNGKey(1), (8, D), method="dpmpp_2m", steps=6,
              warmup="taylor")
  with pytest.raises(ValueError, match="choose one of"):
    SM.sample(GAUSS.denoise, sched, jax.random.PRNGKey(1), (8, D), method="dpmpp_3m", steps=6,
              warmup="heun")
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
