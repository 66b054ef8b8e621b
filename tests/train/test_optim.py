"""Optimizers and schedules: warmup/cosine values, clipping, decay masks, bad names."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from imagen_jax import config_files
from imagen_jax.train.optim import learning_rate, make_optimizer


def optim_cfg(**kw) -> ml_collections.ConfigDict:
  c = config_files.load("configs/base64.py", "smoke").optim
  c.update(kw)
  return c


def test_constant_schedule_with_warmup():
  lr = learning_rate(optim_cfg(lr=1e-3, warmup_steps=4, schedule="constant"), 100)
  np.testing.assert_allclose([float(lr(n)) for n in (0, 1, 3, 4, 99, 10_000)],
                             [2.5e-4, 5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rtol=1e-6)
  flat = learning_rate(optim_cfg(lr=1e-3, warmup_steps=0, schedule="constant"), 100)
  assert float(flat(0)) == pytest.approx(1e-3)


def test_cosine_schedule():
  cfg = optim_cfg(lr=1.0, warmup_steps=10, schedule="cosine", decay_steps=0, end_lr_frac=0.1)
  lr = learning_rate(cfg, total_steps=110)  # decays over 110 - 10 = 100 updates
  np.testing.assert_allclose(float(lr(4)), 0.5, rtol=1e-6)  # warmup: (4 + 1) / 10
  np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(lr(60)), 0.1 + 0.9 * 0.5, rtol=1e-6)  # half way
  np.testing.assert_allclose(float(lr(35)), 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)),
                             rtol=1e-6)
  np.testing.assert_allclose([float(lr(110)), float(lr(500))], [0.1, 0.1], rtol=1e-6)
  cfg.decay_steps = 20  # explicit decay length: end value reached at 10 + 20
  np.testing.assert_allclose(float(learning_rate(cfg, 110)(30)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(learning_rate(cfg, 110)(20)), 0.55, rtol=1e-6)


def _first_update(opt, grads, params):
  updates, _ = opt.update(grads, opt.init(params), params)
  return updates


def test_clipping_bounds_the_update():
  # With eps far above |g|, Adam's first update is ~ -lr g / eps: proportional to the
  # (clipped) gradient, so clipping shows in its size.
  params = {"w": jnp.zeros((4, 4))}
  grads = {"w": jnp.full((4, 4), 250.0)}  # global norm 1000
  kw = dict(name="adam", lr=1.0, warmup_steps=0, eps=1e6)
  clipped = _first_update(make_optimizer(optim_cfg(grad_clip=1.0, **kw), 10), grads, params)
  free = _first_update(make_optimizer(optim_cfg(grad_clip=0.0, **kw), 10), grads, params)
  norm = lambda t: float(optax.tree.norm(t))
  assert norm(clipped) <= 1.0 / 1e6 * 1.001
  np.testing.assert_allclose(norm(free), 1000.0 / (1e6 + 250.0), rtol=1e-4)


def test_adamw_decays_matrices_not_vectors():
  params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones((3,)), "scale": jnp.ones((3,))}
  zeros = {k: jnp.zeros_like(v) for k, v in params.items()}
  opt = make_optimizer(optim_cfg(name="adamw", lr=0.1, warmup_steps=0, weight_decay=0.5), 10)
  u = _first_update(opt, zeros, params)
  np.testing.assert_allclose(u["kernel"], -0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(u["bias"], 0.0)
  np.testing.assert_array_equal(u["scale"], 0.0)


def test_adafactor_steps():
  params = {"kernel": jnp.ones((256, 256)), "bias": jnp.ones((8,))}
  grads = {"kernel": jnp.full((256, 256), 0.1), "bias": jnp.full((8,), -0.1)}
  opt = make_optimizer(optim_cfg(name="adafactor", lr=0.01, warmup_steps=0), 10)
  u = _first_update(opt, grads, params)
  assert float(u["kernel"][0, 0]) < 0 < float(u["bias"][0])
  assert np.isfinite(np.asarray(u["kernel"])).all()


def test_unknown_names_are_errors():
  with pytest.raises(ValueError, match="unknown optimizer.*adamw"):
    make_optimizer(optim_cfg(name="sgdx"), 10)
  with pytest.raises(ValueError, match="unknown schedule.*cosine"):
    learning_rate(optim_cfg(schedule="linear"), 10)
  with pytest.raises(ValueError, match="grad_clip"):
    make_optimizer(optim_cfg(grad_clip=-1.0), 10)
