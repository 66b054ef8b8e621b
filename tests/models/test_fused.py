"""models/fused.py: the hand-written GroupNorm / bias gradients equal autodiff's of the
flax layers they replace, and the layers keep flax's parameters and initialisation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.models import fused, layers

# float32 sums over 4096-65536 elements reordered: the hand-written backward adds in a
# different order than autodiff's, which moves results by a few ulps of the largest
# partial sum; 1e-5 relative to the largest entry is ~100 ulps, far below any real bug
# (a wrong term moves the gradient by O(1) relative).
RTOL = 1e-5


def _close(a, b, rtol=RTOL):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-30)
  np.testing.assert_array_less(np.abs(a - b).max() / scale, rtol)


def _flax_group_norm(x, scale, bias, groups, eps=1e-6):
  gn = nnx.GroupNorm(x.shape[-1], num_groups=groups, epsilon=eps, dtype=jnp.float32,
                     rngs=nnx.Rngs(0))
  gn.scale[...], gn.bias[...] = scale, bias
  return gn(x)


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((3, 4, 6, 96), 32),
                                          ((2, 16, 48), 16), ((2, 4, 4, 12), 4)])
def test_group_norm_and_its_gradients_match_flax(shape, groups):
  kx, ks, kb, kc = jax.random.split(jax.random.key(0), 4)
  x = 3.0 * jax.random.normal(kx, shape) + 1.5  # a mean and scale far from 0 and 1
  c = shape[-1]
  scale = 1.0 + 0.3 * jax.random.normal(ks, (c,))
  bias = 0.2 * jax.random.normal(kb, (c,))
  ct = jax.random.normal(kc, shape)

  def loss(fn):
    # A nonlinearity after the norm, as in the networks, so the cotangent is not constant.
    return lambda x, s, b: jnp.sum(jax.nn.silu(fn(x, s, b)) * ct)

  ours = jax.value_and_grad(loss(lambda x, s, b: fused.group_norm(x, s, b, groups)),
                            argnums=(0, 1, 2))(x, scale, bias)
  ref = jax.value_and_grad(loss(lambda x, s, b: _flax_group_norm(x, s, b, groups)),
                           argnums=(0, 1, 2))(x, scale, bias)
  _close(fused.group_norm(x, scale, bias, groups), _flax_group_norm(x, scale, bias, groups))
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
    _close(a, b)


@pytest.mark.parametrize("shape,groups,film", [((2, 8, 8, 64), 32, True),
                                               ((3, 4, 6, 96), 32, False),
                                               ((2, 4, 4, 12), 4, True)])
def test_group_norm_silu_and_its_gradients_match_the_composition(shape, groups, film):
  """silu(GroupNorm(x) * (1 + s) + t) as one op: value and every gradient (x, the norm's
  scale and bias, the conditioning s and t) against autodiff of flax's layers."""
  ks = jax.random.split(jax.random.key(10), 6)
  x = 3.0 * jax.random.normal(ks[0], shape) + 1.5
  b, c = shape[0], shape[-1]
  scale = 1.0 + 0.3 * jax.random.normal(ks[1], (c,))
  bias = 0.2 * jax.random.normal(ks[2], (c,))
  s = 0.5 * jax.random.normal(ks[3], (b, c))
  t = 0.5 * jax.random.normal(ks[4], (b, c))
  ct = jax.random.normal(ks[5], shape)
  bc = lambda v: v.reshape(b, *(1,) * (len(shape) - 2), c)

  def ours(x, scale, bias, s, t):
    if not film:
      return fused.group_norm_silu(x, scale, bias, groups)
    return fused.group_norm_silu(x, scale, bias, groups, film_scale=s, film_shift=t)

  def ref(x, scale, bias, s, t):
    g = _flax_group_norm(x, scale, bias, groups)
    return jax.nn.silu(g * (1.0 + bc(s)) + bc(t) if film else g)

  args = (x, scale, bias, s, t)
  _close(ours(*args), ref(*args))
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * ct)
  got = jax.grad(loss(ours), argnums=(0, 1, 2, 3, 4))(*args)
  want = jax.grad(loss(ref), argnums=(0, 1, 2, 3, 4))(*args)
  for a, w in zip(got, want):  # without FiLM, both give zero s and t gradients
    _close(a, w)


def test_group_norm_bfloat16_input_keeps_float32_statistics():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 64)) * 5 + 2
  s, b = jnp.ones(64), jnp.zeros(64)
  y16 = fused.group_norm(x.astype(jnp.bfloat16), s, b, 32)
  assert y16.dtype == jnp.float32
  # Only the input's bf16 rounding (8 bits of mantissa) separates it from float32.
  _close(y16, fused.group_norm(x, s, b, 32), rtol=2e-2)
  g = jax.grad(lambda x: fused.group_norm(x, s, b, 32).sum())(x.astype(jnp.bfloat16))
  assert g.dtype == jnp.bfloat16


def test_bias_add_and_channel_sum():
  y = jax.random.normal(jax.random.key(2), (4, 8, 16, 32))
  b = jax.random.normal(jax.random.key(3), (32,))
  ct = jax.random.normal(jax.random.key(4), y.shape)
  _close(fused.channel_sum(y), y.sum((0, 1, 2)))
  _close(fused.channel_sum(y[0, 0]), y[0, 0].sum(0))
  gy, gb = jax.grad(lambda y, b: jnp.sum(fused.bias_add(y, b) * ct), argnums=(0, 1))(y, b)
  np.testing.assert_array_equal(gy, ct)
  _close(gb, ct.sum((0, 1, 2)))


def test_layers_keep_flax_parameters_initialisation_and_outputs():
  """Checkpoints written before these layers (assets/emoji32_base.npz among them) load
  into them: the same parameter names, shapes and initial values as nnx.Conv and
  nnx.GroupNorm, and the same outputs."""
  x = jax.random.normal(jax.random.key(5), (2, 8, 8, 32))
  for stride in (1, 2):
    ours = layers.conv(32, 64, 3, nnx.Rngs(7), dtype=jnp.float32, stride=stride)
    ref = nnx.Conv(32, 64, (3, 3), strides=stride, padding="SAME", rngs=nnx.Rngs(7),
                   kernel_init=nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform"))
    ref.bias[...] = ours.bias[...] = jnp.linspace(-1, 1, 64)
    assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(ref))
    np.testing.assert_array_equal(ours.kernel[...], ref.kernel[...])
    _close(ours(x), ref(x))
  ours = layers.group_norm(32, nnx.Rngs(3), dtype=jnp.float32)
  ref = nnx.GroupNorm(32, num_groups=32, dtype=jnp.float32, rngs=nnx.Rngs(3))
  assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(ref))
  _close(ours(x), ref(x))
