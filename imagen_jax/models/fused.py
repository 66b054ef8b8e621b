"""GroupNorm and bias addition with hand-written gradients, for XLA:CPU's reductions.

Why by hand: profiling the base U-Net's train step on CPU (benchmarks/profile_step.py)
showed 40% of it in reductions that autodiff emits and XLA:CPU lowers badly. The gradient
of a per-channel bias or GroupNorm scale is a sum over (batch, height, width) down to [C];
XLA:CPU emits it as a reduce-window plus a reduce that runs at ~1 GB/s (27 ms for one
16x64x64x64 tensor), while the same sum written as a column sum of a [N*H, W*C] matrix
runs at memory speed (0.4 ms). GroupNorm's autodiff backward also takes several passes
over the activations where three suffice (the derivation torch and apex use): one pass
for the two per-(example, channel) sums, one for the input gradient.

`group_norm` and `bias_add` compute the same functions as flax's `nnx.GroupNorm` and a
plain `y + b` (the statistics in float32, two-pass variance instead of E[x^2] - E[x]^2,
which differs in the last float32 bits); `channel_sum` is the fast [.., C] -> [C] sum.
`group_norm_silu` is GroupNorm, an optional per-example scale and shift (the residual
blocks' conditioning) and SiLU as one op: the three are one affine map per (example,
channel) and a SiLU, so its backward recomputes the pre-activation from x instead of
storing it and takes the conditioning's gradients from the same two per-(example, channel)
sums GroupNorm's backward needs (autodiff summed [B, H, W, C] -> [B, C] twice more).
They are backend-neutral JAX, so GPUs and TPUs run the same maths.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

Array = jax.Array


def channel_sum(x: Array) -> Array:
  """Sum over every axis but the last: [..., W, C] -> [C], as a column sum of
  [prod(...), W*C] and then over W (the form XLA:CPU vectorises)."""
  c = x.shape[-1]
  if x.ndim < 3:
    return x.reshape(-1, c).sum(0)
  w = x.shape[-2]
  return x.reshape(-1, w * c).sum(0).reshape(w, c).sum(0)


def _per_example_channel_sum(x: Array) -> Array:
  """[B, ..., C] -> [B, C]."""
  return x.reshape(x.shape[0], -1, x.shape[-1]).sum(1)


@jax.custom_vjp
def bias_add(y: Array, b: Array) -> Array:
  """y + b with b broadcast along the last axis; the gradient of b is `channel_sum`."""
  return y + b.astype(y.dtype)


def _bias_add_fwd(y, b):
  return bias_add(y, b), b  # b only for its dtype (a dtype is not a valid residual)


def _bias_add_bwd(b, g):
  return g, channel_sum(g.astype(jnp.float32)).astype(b.dtype)


bias_add.defvjp(_bias_add_fwd, _bias_add_bwd)


def _per_channel(v: Array, group_size: int) -> Array:
  """[B, G] -> [B, G * group_size]: each group's value on each of its channels."""
  return jnp.repeat(v, group_size, axis=1)


def _bcast(v: Array, ndim: int) -> Array:
  """[B, C] -> [B, 1, ..., 1, C] against an activation of rank `ndim`."""
  return v.reshape(v.shape[:1] + (1,) * (ndim - 2) + v.shape[1:])


def _stats(x: Array, groups: int, eps: float) -> tuple[Array, Array]:
  """Per-(example, group) mean and 1/sqrt(var + eps) of float32 x [B, ..., C]."""
  b, c = x.shape[0], x.shape[-1]
  xs = x.reshape(b, -1, groups, c // groups)
  mean = xs.mean((1, 3), keepdims=True)
  var = jnp.square(xs - mean).mean((1, 3))
  return mean[:, 0, :, 0], jax.lax.rsqrt(var + eps)


def _affine(x: Array, groups: int, eps: float) -> tuple[Array, Array]:
  """r, q [B, C] with xhat = x * r + q, the normalised x.

  Materialised behind a barrier: left to fuse, XLA recomputes the group -> channel
  expansion for every element of the activation, which made each pass 3-5x slower."""
  mean, rstd = _stats(x, groups, eps)
  gs = x.shape[-1] // groups
  r = _per_channel(rstd, gs)
  return jax.lax.optimization_barrier((r, -_per_channel(mean, gs) * r))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float = 1e-6) -> Array:
  """GroupNorm of x [B, ..., C] over its spatial axes and `groups` channel groups, with a
  per-channel `scale` and `bias`; float32 out, statistics in float32."""
  return _gn_fwd(x, scale, bias, groups, eps)[0]


def _gn_fwd(x, scale, bias, groups, eps):
  x32 = x.astype(jnp.float32)
  r, q = _affine(x32, groups, eps)
  a, c = jax.lax.optimization_barrier((r * scale, q * scale + bias))
  y = x32 * _bcast(a, x.ndim) + _bcast(c, x.ndim)
  return y, (x, scale, r, q)


def _grad_sums(d: Array, x32: Array, r: Array, q: Array) -> tuple[Array, Array]:
  """The two per-(example, channel) sums GroupNorm's backward needs, from the cotangent d
  of the normalised-and-scaled output and x alone (xhat = x r + q): sum(d), sum(d xhat)."""
  s_d = _per_example_channel_sum(d)                          # [B, C]
  s_dxhat = r * _per_example_channel_sum(d * x32) + q * s_d  # sum of d * xhat
  # The barrier keeps XLA from merging the callers' [B, C] -> [C] sums with these into
  # the single slow reduction this module exists to avoid.
  return jax.lax.optimization_barrier((s_d, s_dxhat))


def _input_grad(d: Array, x32: Array, r: Array, q: Array, eff: Array, s_d: Array,
                s_dxhat: Array, groups: int) -> Array:
  """GroupNorm's input gradient, float32, for the output xhat * eff (+ anything not
  depending on x), eff the per-channel [C] or per-(example, channel) [B, C] scale.

  dxhat = d eff; dx = r (dxhat - mean_g(dxhat) - xhat mean_g(dxhat xhat)), written as
  d * ca + x * cb + cc with per-(example, channel) coefficients: one pass."""
  b, c = x32.shape[0], x32.shape[-1]
  gs = c // groups
  n = math.prod(x32.shape[1:-1]) * gs  # elements per (example, group)
  m1 = _per_channel((s_d * eff).reshape(b, groups, gs).sum(-1) / n, gs)
  m2 = _per_channel((s_dxhat * eff).reshape(b, groups, gs).sum(-1) / n, gs)
  ca, cb, cc = jax.lax.optimization_barrier((r * eff, -r * r * m2, -r * (m1 + q * m2)))
  return d * _bcast(ca, x32.ndim) + x32 * _bcast(cb, x32.ndim) + _bcast(cc, x32.ndim)


def _gn_bwd(groups, eps, res, dy):
  del eps
  x, scale, r, q = res
  dy, x32 = dy.astype(jnp.float32), x.astype(jnp.float32)
  s_dy, s_dyx = _grad_sums(dy, x32, r, q)
  dx = _input_grad(dy, x32, r, q, scale, s_dy, s_dyx, groups)
  return (dx.astype(x.dtype), s_dyx.sum(0).astype(scale.dtype),
          s_dy.sum(0).astype(scale.dtype))


group_norm.defvjp(_gn_fwd, _gn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gn_silu(x: Array, scale: Array, bias: Array, film_scale: Array, film_shift: Array,
             groups: int, eps: float) -> Array:
  return _gn_silu_fwd(x, scale, bias, film_scale, film_shift, groups, eps)[0]


def _gn_silu_coeffs(x32, scale, bias, film_scale, film_shift, groups, eps):
  """r, q [B, C] (xhat = x r + q) and a, c [B, C] with the pre-activation x a + c."""
  r, q = _affine(x32, groups, eps)
  g1 = 1.0 + film_scale
  return r, q, *jax.lax.optimization_barrier(
      (r * scale * g1, (q * scale + bias) * g1 + film_shift))


def _gn_silu_fwd(x, scale, bias, film_scale, film_shift, groups, eps):
  x32 = x.astype(jnp.float32)
  r, q, a, c = _gn_silu_coeffs(x32, scale, bias, film_scale, film_shift, groups, eps)
  y = jax.nn.silu(x32 * _bcast(a, x.ndim) + _bcast(c, x.ndim))
  return y, (x, scale, bias, film_scale, r, q, a, c)


def _gn_silu_bwd(groups, eps, res, dy):
  del eps
  x, scale, bias, film_scale, r, q, a, c = res
  x32 = x.astype(jnp.float32)
  pre = x32 * _bcast(a, x.ndim) + _bcast(c, x.ndim)  # recomputed, not stored
  sig = jax.nn.sigmoid(pre)
  dpre = dy.astype(jnp.float32) * sig * (1.0 + pre * (1.0 - sig))
  s_d, s_dxhat = _grad_sums(dpre, x32, r, q)
  g1 = 1.0 + film_scale
  # pre = g (1 + s) + t with g = xhat scale + bias, the GroupNorm output.
  d_shift = s_d
  d_film_scale = scale * s_dxhat + bias * s_d  # sum of dpre * g
  d_scale, d_bias = (g1 * s_dxhat).sum(0), (g1 * s_d).sum(0)
  dx = _input_grad(dpre, x32, r, q, scale * g1, s_d, s_dxhat, groups)
  return (dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype),
          d_film_scale.astype(film_scale.dtype), d_shift.astype(film_scale.dtype))


_gn_silu.defvjp(_gn_silu_fwd, _gn_silu_bwd)


def group_norm_silu(x: Array, scale: Array, bias: Array, groups: int, eps: float = 1e-6,
                    film_scale: Array | None = None, film_shift: Array | None = None
                    ) -> Array:
  """silu(GroupNorm(x) * (1 + film_scale) + film_shift), float32 out: GroupNorm as
  `group_norm`, then an optional per-example conditioning scale and shift [B, C]."""
  zeros = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
  s = zeros if film_scale is None else film_scale.astype(jnp.float32)
  t = zeros if film_shift is None else film_shift.astype(jnp.float32)
  return _gn_silu(x, scale, bias, s, t, groups, eps)
