"""Shared layers: attention paths agree, masks are respected, blocks start as identities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import layers as L

F32 = jnp.float32


def _qkv(seed=0, t=7, s=5):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (2, t, 4, 16)), jax.random.normal(ks[1], (2, s, 4, 16)),
          jax.random.normal(ks[2], (2, s, 4, 16)))


def test_fused_attention_matches_plain_reference():
  q, k, v = _qkv()
  mask = jnp.array([[1, 1, 0, 1, 1], [1, 0, 0, 0, 0]], bool)
  np.testing.assert_allclose(L.attention(q, k, v, mask), L.attention(q, k, v, mask, implementation="plain"),
                             atol=1e-5)
  np.testing.assert_allclose(L.attention(q, k, v), L.attention(q, k, v, implementation="plain"), atol=1e-5)


def test_attention_ignores_masked_keys():
  q, k, v = _qkv(1)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  k2 = k.at[:, 3:].set(100.0)
  v2 = v.at[:, 3:].set(-100.0)
  np.testing.assert_allclose(L.attention(q, k, v, mask), L.attention(q, k2, v2, mask), atol=1e-6)


def test_text_attention_mask_and_null_token():
  rngs = nnx.Rngs(0)
  att = L.Attention(64, rngs, dtype=F32, head_dim=16, text_dim=32)
  # Give the zero-initialised output projection weights so the text path is visible.
  att.out.kernel[...] = jax.random.normal(jax.random.PRNGKey(5), att.out.kernel.shape) * 0.1
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 64))
  text = jax.random.normal(jax.random.PRNGKey(2), (2, 6, 32))
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [0] * 6], bool)
  y = att(x, text, mask)
  np.testing.assert_allclose(att(x, text.at[:, 3:].set(9.0), mask), y, atol=1e-6)  # padding ignored
  assert float(jnp.abs(att(x, text.at[0, 0].set(9.0), mask)[0] - y[0]).max()) > 1e-4  # text used
  assert bool(jnp.all(jnp.isfinite(y)))  # example 1 has no text at all: the null token keeps it defined
  pool = L.AttentionPool(32, 48, rngs, dtype=F32)
  p = pool(text, mask)
  assert p.shape == (2, 48) and bool(jnp.all(jnp.isfinite(p)))
  np.testing.assert_allclose(pool(text.at[:, 3:].set(9.0), mask), p, atol=1e-6)


def test_resblock_starts_as_identity_and_conditions():
  rb = L.ResBlock(32, 32, 16, nnx.Rngs(0), dtype=F32, residual_scaling="sum")
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 32))
  cond = jax.random.normal(jax.random.PRNGKey(2), (2, 16))
  np.testing.assert_allclose(rb(x, cond), x * 2**-0.5, atol=1e-6)  # zero-init last conv
  rb.conv2.kernel[...] = jax.random.normal(jax.random.PRNGKey(3), rb.conv2.kernel.shape) * 0.05
  assert float(jnp.abs(rb(x, cond) - rb(x, cond + 1.0)).max()) > 1e-4


def test_resblock_residual_scalings():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 32))
  cond = jax.random.normal(jax.random.PRNGKey(2), (2, 16))
  plain = L.ResBlock(32, 32, 16, nnx.Rngs(0), dtype=F32)
  assert plain.skip is None
  np.testing.assert_allclose(plain(x, cond), x, atol=1e-6)
  # Rosetta: h + conv1x1(x) / sqrt(2), with the 1x1 conv even at equal widths.
  rosetta = L.ResBlock(32, 32, 16, nnx.Rngs(0), dtype=F32, residual_scaling="shortcut")
  assert rosetta.skip is not None
  np.testing.assert_allclose(rosetta(x, cond), rosetta.skip(x) * 2**-0.5, atol=1e-6)
  with pytest.raises(ValueError, match="residual_scaling"):
    L.ResBlock(32, 32, 16, nnx.Rngs(0), dtype=F32, residual_scaling="both")


def test_pixel_shuffle_is_lossless_and_resampling_blocks_resize():
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 6, 5))
  y = L.pixel_unshuffle(x)
  assert y.shape == (2, 4, 3, 20)
  np.testing.assert_array_equal(L.pixel_shuffle(y), x)
  # Channel (i*2 + j)*C + c holds pixel (i, j) of each 2x2 window.
  np.testing.assert_array_equal(y[:, :, :, 3 * 5:4 * 5], x[:, 1::2, 1::2])
  rngs = nnx.Rngs(0)
  up = L.PixelShuffleUp(32, rngs, dtype=F32)
  z = up(jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 32)))
  assert z.shape == (2, 8, 8, 32)
  # ICNR init: a fresh layer repeats each pixel over its 2x2 window (nearest neighbour);
  # GroupNorm's groups each lie inside one sub-pixel's block of channels, so they agree.
  np.testing.assert_allclose(z[:, 0::2, 0::2], z[:, 1::2, 1::2], atol=1e-6)
  cond = jnp.zeros((2, 16))
  down = L.ResBlock(32, 64, 16, rngs, dtype=F32, resample="down")
  assert down(jnp.ones((2, 8, 8, 32)), cond).shape == (2, 4, 4, 64)
  upb = L.ResBlock(32, 32, 16, rngs, dtype=F32, resample="up")
  assert upb(jnp.ones((2, 8, 8, 32)), cond).shape == (2, 16, 16, 32)


def test_resampling_shapes_and_embedding():
  rngs = nnx.Rngs(0)
  x = jnp.ones((1, 8, 8, 4))
  assert L.Downsample(4, 6, rngs, dtype=F32)(x).shape == (1, 4, 4, 6)
  assert L.Upsample(4, 6, rngs, dtype=F32)(x).shape == (1, 16, 16, 6)
  assert L.Downsample(4, 6, rngs, dtype=F32, stride=1)(x).shape == (1, 8, 8, 6)
  assert L.Upsample(4, 6, rngs, dtype=F32, factor=1)(x).shape == (1, 8, 8, 6)
  e = L.logsnr_embedding(jnp.array([-20.0, 0.0, 20.0]), 64)
  assert e.shape == (3, 64) and float(jnp.abs(e).max()) <= 1.0
  assert float(jnp.abs(e[0] - e[2]).max()) > 0.1  # distinct levels, distinct features


def test_every_param_has_logical_names():
  rngs = nnx.Rngs(0)
  mods = [L.ResBlock(8, 16, 4, rngs, dtype=F32), L.Attention(16, rngs, dtype=F32, text_dim=8),
          L.AttentionPool(8, 4, rngs, dtype=F32), L.CondMLP(8, 4, rngs, dtype=F32),
          L.ResBlock(8, 8, 4, rngs, dtype=F32, resample="up"),
          L.ResBlock(8, 8, 4, rngs, dtype=F32, resample="down"),
          L.TextProjection(8, 4, rngs, dtype=F32)]
  for m in mods:
    for path, var in nnx.to_flat_state(nnx.state(m, nnx.Param)):
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var[...].ndim, (type(m).__name__, path)
