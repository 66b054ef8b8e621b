"""Sample grids: shapes, range and determinism on the base and SR smoke stages; guidance
composed exactly as w * cond + (1 - w) * uncond; SR samples at full resolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax import config_files
from imagen_jax.diffusion import guidance, schedules
from imagen_jax.models import build_model
from imagen_jax import sampling as samples

N = 2


def random_params(abstract_params, seed: int = 1):
  """Random weights on the host, shaped like the network's: N(0, 1/fan_in) kernels,
  scales near 1, small biases. A fresh network would end in zero convs and predict 0
  whatever the text; and XLA takes longer to compile the real initialisers than to
  sample."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = str(path[-1].key if hasattr(path[-1], "key") else path[-1])
    noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    if name == "scale":
      return jnp.asarray(1.0 + 0.05 * noise)
    if leaf.ndim <= 1:
      return jnp.asarray(0.05 * noise)
    return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))

  return jax.tree_util.tree_map_with_path(draw, abstract_params)


def stage(config_file: str, dropout: float = 0.0):
  config = config_files.load(config_file, "smoke")
  config.model.dropout = dropout
  abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
  params = random_params(abstract_params)
  n_len, dim = config.data.max_text_len, config.model.text_dim
  text = jax.random.normal(jax.random.key(2), (N, n_len, dim))
  mask = jnp.arange(n_len)[None] < jnp.array([[3], [n_len]])
  lowres = None
  if config.kind == "sr":
    r = config.data.low_resolution
    lowres = jax.random.uniform(jax.random.key(3), (N, r, r, 3), minval=-1.0, maxval=1.0)
  return config, graphdef, params, (text, mask, lowres)


@pytest.fixture(scope="module")
def base():
  # Dropout on, so that sampling in train mode would show (see the rest= check).
  return stage("configs/base64.py", dropout=0.5)


def test_base_samples_shape_range_and_determinism(base):
  config, graphdef, params, (text, mask, _) = base
  assert config.log.guidance == 3.0 and config.diffusion.thresholding == "dynamic"
  fn = samples.make_sample_fn(config, graphdef)
  x = fn(params, text, mask, jax.random.key(0))
  r = config.data.resolution
  assert x.shape == (N, r, r, 3) and x.dtype == jnp.float32
  assert bool(jnp.isfinite(x).all())
  assert float(jnp.abs(x).max()) <= 1.0 + 1e-6       # dynamic thresholding
  assert float(jnp.abs(x).max()) > 0.1
  np.testing.assert_array_equal(fn(params, text, mask, jax.random.key(0)), x)
  assert not np.allclose(fn(params, text, mask, jax.random.key(1)), x)
  # Another model's dropout RNG state changes nothing: dropout is off when sampling.
  other_rest = jax.jit(lambda: nnx.state(build_model(config.model, nnx.Rngs(7)),
                                         nnx.Not(nnx.Param)))()
  np.testing.assert_array_equal(fn(params, text, mask, jax.random.key(0), rest=other_rest), x)


def test_guidance_is_the_affine_combination(base):
  # One DDIM step to lambda = +inf returns x0_hat itself, which with thresholding off is
  # x0_u + w (x0_c - x0_u) at the initial noise. The doubled-batch program (any array
  # weight; compiled once) must match the single-pass ones at w = 1 (the text) and w = 0
  # (the masked text), which checks the halves' order and the unconditional mask, and
  # be affine in w in between and beyond.
  config, graphdef, params, (text, mask, _) = base
  config = config.copy_and_resolve_references()
  config.diffusion.thresholding = "none"
  config.diffusion.sampler.update(method="ddim", steps=1)
  fn = samples.make_sample_fn(config, graphdef)
  run = lambda w: fn(params, text, mask, jax.random.key(5), guidance_scale=w)
  cond, uncond = run(1.0), run(0.0)                  # single pass each
  assert float(jnp.abs(cond - uncond).max()) > 1e-2  # the text matters
  for w in (0.0, 1.0, 3.0, 7.5):
    np.testing.assert_allclose(run(jnp.float32(w)), uncond + w * (cond - uncond),
                               rtol=1e-4, atol=1e-4 * max(w, 1.0))
  # Guidance 3 (the config's) is not the conditional model.
  assert float(jnp.abs(run(3.0) - cond).max()) > 1e-2


def test_sr_samples_full_resolution_from_lowres():
  config, graphdef, params, (text, mask, lowres) = stage("configs/sr256.py")
  fn = samples.make_sample_fn(config, graphdef)
  x = fn(params, text, mask, jax.random.key(0), lowres=lowres)
  r = config.data.resolution
  assert x.shape == (N, r, r, 3) and r == 4 * lowres.shape[1]
  assert bool(jnp.isfinite(x).all()) and float(jnp.abs(x).max()) <= 1.0 + 1e-6
  # The low-res input conditions the output.
  other = fn(params, text, mask, jax.random.key(0), lowres=-lowres)
  assert float(jnp.abs(other - x).max()) > 1e-3
  with pytest.raises(ValueError, match="lowres"):
    fn(params, text, mask, jax.random.key(0))


def test_sr_resolution_ignores_training_crop():
  config = config_files.load("configs/sr256.py", "emoji")
  assert config.data.crop == 64
  assert samples._resolution(config) == 256


def test_sampler_kwargs_and_schedule_from_config():
  config = config_files.load("configs/base64.py", "smoke")
  config.diffusion.sampler.update(method="ddim", eta=0.5)
  kw = samples.sampler_kwargs(config.diffusion.sampler)
  assert kw == dict(method="ddim", steps=4, grid="logsnr", rho=7.0, eta=0.5)
  config.diffusion.sampler.method = "heun"           # eta is not a heun option
  assert "eta" not in samples.sampler_kwargs(config.diffusion.sampler)
  config.diffusion.schedule_kw = {"logsnr_min": -12.0}
  assert schedules.from_config(config.diffusion).logsnr_min == -12.0


def test_sr_aug_level_from_config_in_any_form_or_per_call():
  # The config gives the level as a sigma; the same level as a per-call log-SNR (resolved
  # from the equivalent t) samples the same images, and another level other images, all
  # from one compiled program.
  config, graphdef, params, (text, mask, lowres) = stage("configs/sr256.py")
  cosine = schedules.get_schedule("cosine")
  level = guidance.aug_level(cosine, t=0.3)
  config.diffusion.noise_aug.update(sample_t=None, sample_sigma=level.sigma)
  fn = samples.make_sample_fn(config, graphdef)
  key = jax.random.key(0)
  x = fn(params, text, mask, key, lowres=lowres)
  same = fn(params, text, mask, key, lowres=lowres,
            aug_logsnr=guidance.aug_level(cosine, t=0.3).logsnr)
  np.testing.assert_allclose(same, x, atol=1e-5)
  other = fn(params, text, mask, key, lowres=lowres, aug_logsnr=-5.0)
  assert float(jnp.abs(other - x).max()) > 1e-3
  # A config with no valid level fails when the sampler is built, naming the forms.
  config.diffusion.noise_aug.sample_t = 0.2
  with pytest.raises(ValueError, match="exactly one"):
    samples.make_sample_fn(config, graphdef)
