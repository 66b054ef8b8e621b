"""A log-SNR-conditioned MLP denoiser for vector data (the Gaussian-mixture testbed).

The analytic testbed (imagen_jax/diffusion/testbed.py) knows the exact E[x0 | x_t], so a
network trained on it under a noise schedule, target and weighting can be scored level
by level against the Bayes-optimal answer. This network is that learner: small enough to
train in seconds on a CPU, conditioned on log-SNR the same way the U-Nets are (sinusoidal
features -> MLP, added in every block), with pre-norm residual blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models.layers import CondMLP


class _Block(nnx.Module):
  """h + W2 silu(W1 LN(h) + c): a pre-norm residual MLP block with additive conditioning."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.fc1 = nnx.Linear(width, 2 * width, rngs=rngs)
    self.cond = nnx.Linear(width, 2 * width, rngs=rngs)
    self.fc2 = nnx.Linear(2 * width, width, rngs=rngs)

  def __call__(self, h: jax.Array, c: jax.Array) -> jax.Array:
    return h + self.fc2(jax.nn.silu(self.fc1(self.norm(h)) + self.cond(c)))


class MLPDenoiser(nnx.Module):
  """(x_t [B, D], logsnr [B] or scalar) -> prediction [B, D] in the training target's space.

  The output layer starts at zero, so an untrained network predicts 0 (for an eps target,
  the denoiser x0_hat = x_t / alpha).
  """

  def __init__(self, dim: int, *, width: int = 256, depth: int = 3, feat_dim: int = 64,
               rngs: nnx.Rngs):
    self.cond = CondMLP(feat_dim, width, rngs, dtype=jnp.float32)
    self.inp = nnx.Linear(dim, width, rngs=rngs)
    self.blocks = nnx.List([_Block(width, rngs) for _ in range(depth)])
    self.norm = nnx.LayerNorm(width, rngs=rngs)
    self.out = nnx.Linear(width, dim, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, x_t: jax.Array, logsnr: jax.Array) -> jax.Array:
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), x_t.shape[:1])
    c = jax.nn.silu(self.cond(logsnr))
    h = self.inp(x_t)
    for block in self.blocks:
      h = block(h, c)
    return self.out(jax.nn.silu(self.norm(h)))
