"""Shared layers of the base U-Net and the Efficient U-Net (Flax NNX).

Every parameter carries logical axis names (Variable metadata `out_sharding`); the trainer maps
them to mesh axes with the rules in its config. Names used here:

  conv kernels    (None, None, "conv_in", "conv_out")
  dense kernels   ("embed", "mlp") for feature -> feature maps
  attention       ("embed", "heads") for q/k/v projections, ("heads", "embed") for output
  biases/scales   the name of the axis they run along

Parameters are float32; `dtype` is the compute dtype (float32 or bfloat16). Conditioning
(log-SNR, pooled text, SR augmentation level) is one vector per example, `cond` [B, C],
applied in every residual block as a scale and shift after the second GroupNorm.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax.models import fused
from imagen_jax.sharding import logical as _names

Array = jax.Array
Dtype = Any

# Logical names are metadata until a mesh exists; creating variables must not try to
# shard them eagerly (the trainer shards the whole state from abstract shapes instead).
nnx.use_eager_sharding(False)


class Conv(nnx.Conv):
  """nnx.Conv (same parameters, same initialisation) for NHWC inputs and "SAME" padding,
  whose bias gradient is `fused.channel_sum` (models/fused.py says why)."""

  def __call__(self, x: Array) -> Array:
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), self.kernel[...].astype(self.dtype), strides, self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)
    return fused.bias_add(y, self.bias[...].astype(self.dtype))


class GroupNorm(nnx.GroupNorm):
  """nnx.GroupNorm (same parameters, same initialisation) computed by `fused.group_norm`,
  whose backward takes two passes over the activations where autodiff's takes several."""

  def __call__(self, x: Array) -> Array:
    return fused.group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.epsilon)

  def silu(self, x: Array, film_scale: Array | None = None,
           film_shift: Array | None = None) -> Array:
    """silu(self(x) * (1 + film_scale) + film_shift) as one op (`fused.group_norm_silu`);
    film_scale / film_shift [B, C] are optional per-example conditioning."""
    return fused.group_norm_silu(x, self.scale[...], self.bias[...], self.num_groups,
                                 self.epsilon, film_scale, film_shift)


def conv(cin: int, cout: int, k: int, rngs: nnx.Rngs, *, dtype: Dtype, stride: int = 1,
         zero: bool = False) -> Conv:
  """A k x k convolution with logical names; `zero` initialises it to output 0 (so a
  residual branch starts as the identity)."""
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.variance_scaling(
      1.0, "fan_avg", "uniform")
  return Conv(cin, cout, (k, k), strides=stride, padding="SAME", dtype=dtype,
                  kernel_init=init, rngs=rngs,
                  kernel_metadata=_names(None, None, "conv_in", "conv_out"),
                  bias_metadata=_names("conv_out"))


def dense(cin: int, cout: int, rngs: nnx.Rngs, *, dtype: Dtype, names=("embed", "mlp"),
          zero: bool = False, use_bias: bool = True) -> nnx.Linear:
  init = nnx.initializers.zeros_init() if zero else nnx.initializers.lecun_normal()
  return nnx.Linear(cin, cout, dtype=dtype, kernel_init=init, use_bias=use_bias, rngs=rngs,
                    kernel_metadata=_names(*names), bias_metadata=_names(names[1]))


def group_norm(ch: int, rngs: nnx.Rngs, *, dtype: Dtype, groups: int = 32) -> GroupNorm:
  # Statistics in float32 whatever the compute dtype (bf16 variance is too coarse).
  return GroupNorm(ch, num_groups=math.gcd(groups, ch), dtype=jnp.float32, rngs=rngs,
                       scale_metadata=_names("conv_out"), bias_metadata=_names("conv_out"))


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, dtype=jnp.float32, rngs=rngs,
                       scale_metadata=_names("embed"), bias_metadata=_names("embed"))


def logsnr_embedding(logsnr: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Sinusoidal features of log-SNR [B] -> [B, dim].

  lambda spans about [-20, 20]; it is scaled by 1/40 into [-0.5, 0.5] x 1000 so the
  frequencies cover the same range a 1000-step index embedding would.
  """
  x = jnp.asarray(logsnr, jnp.float32) * (1000.0 / 40.0)
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = x[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class CondMLP(nnx.Module):
  """Sinusoidal log-SNR features -> MLP -> conditioning vector [B, cond_dim]."""

  def __init__(self, feat_dim: int, cond_dim: int, rngs: nnx.Rngs, *, dtype: Dtype):
    self.feat_dim = feat_dim
    self.fc1 = dense(feat_dim, cond_dim, rngs, dtype=dtype)
    self.fc2 = dense(cond_dim, cond_dim, rngs, dtype=dtype, names=("mlp", "embed"))

  def __call__(self, logsnr: Array) -> Array:
    return self.fc2(jax.nn.silu(self.fc1(logsnr_embedding(logsnr, self.feat_dim))))


RESIDUAL_SCALINGS = ("none", "sum", "shortcut")
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


class ResBlock(nnx.Module):
  """GroupNorm-SiLU-conv, then GroupNorm with scale/shift from `cond`, SiLU, dropout, conv.

  The last conv starts at zero, so a fresh block is the (projected, rescaled) identity.
  `residual_scaling` says where a 1/sqrt(2) goes (efficient_unet.py says which reading of
  the paper each is): "none"; "sum", (h + shortcut) / sqrt(2), NCSN++'s `skip_rescale`;
  "shortcut", h + shortcut / sqrt(2) with a 1x1 conv shortcut even when the width does
  not change, as Rosetta's EfficientResBlock. Otherwise the shortcut is the identity, or a
  1x1 conv where the width changes.

  `resample` ("up" / "down") makes it a resampling block, as Rosetta's base U-Net and
  BigGAN: one `PixelShuffleUp` / `PixelShuffleDown` is applied to both the shortcut and
  the main branch (after its first norm and activation), with the same weights.
  """

  def __init__(self, cin: int, cout: int, cond_dim: int, rngs: nnx.Rngs, *, dtype: Dtype,
               dropout: float = 0.0, residual_scaling: str = "none", groups: int = 32,
               resample: str | None = None):
    if residual_scaling not in RESIDUAL_SCALINGS:
      raise ValueError(f"residual_scaling {residual_scaling!r}: choose one of "
                       f"{RESIDUAL_SCALINGS}.")
    if resample not in (None, "up", "down"):
      raise ValueError(f"resample {resample!r}: choose None, 'up' or 'down'.")
    self.resample = (PixelShuffleUp(cin, rngs, dtype=dtype) if resample == "up" else
                     PixelShuffleDown(cin, rngs, dtype=dtype) if resample == "down" else None)
    self.norm1 = group_norm(cin, rngs, dtype=dtype, groups=groups)
    self.conv1 = conv(cin, cout, 3, rngs, dtype=dtype)
    self.cond = dense(cond_dim, 2 * cout, rngs, dtype=dtype, names=("embed", "mlp"))
    self.norm2 = group_norm(cout, rngs, dtype=dtype, groups=groups)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.conv2 = conv(cout, cout, 3, rngs, dtype=dtype, zero=True)
    self.skip = conv(cin, cout, 1, rngs, dtype=dtype) \
        if cin != cout or residual_scaling == "shortcut" else None
    self.residual_scaling = residual_scaling
    self.dtype = dtype

  def __call__(self, x: Array, cond: Array) -> Array:
    h = self.norm1.silu(x).astype(self.dtype)
    if self.resample is not None:
      h, x = self.resample(h), self.resample(x)
    h = self.conv1(h)
    scale, shift = jnp.split(self.cond(jax.nn.silu(cond)), 2, axis=-1)
    h = self.conv2(self.drop(self.norm2.silu(h, scale, shift).astype(self.dtype)))
    skip = self.skip(x) if self.skip is not None else x
    if self.residual_scaling == "sum":
      return ((h + skip) * _INV_SQRT2).astype(self.dtype)
    if self.residual_scaling == "shortcut":
      return (h + skip * _INV_SQRT2).astype(self.dtype)
    return (h + skip).astype(self.dtype)


def attention(q: Array, k: Array, v: Array, mask: Array | None = None, *,
              implementation: str | None = None) -> Array:
  """Multi-head attention on [B, T, H, D] tensors; mask [B, S] (True = attend).

  implementation: None lets `jax.nn.dot_product_attention` pick (cuDNN's fused kernel on
  GPUs where it applies), "xla" forces its XLA path, "plain" is an explicit softmax
  reference kept for testing and for backends without the fused op.
  """
  if implementation == "plain":
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    if mask is not None:
      logits = jnp.where(mask[:, None, None, :], logits, -1e30)
    return jnp.einsum("bhts,bshd->bthd", jax.nn.softmax(logits, -1).astype(v.dtype), v)
  bias_mask = None if mask is None else mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=bias_mask, implementation=implementation)


class Attention(nnx.Module):
  """Self-attention over pixels, optionally also attending to text tokens.

  With `text_dim`, keys/values are the pixels' own plus the text tokens' (Imagen's
  combined self/cross attention) plus one learned null token, so an example whose text
  is entirely masked (dropped for classifier-free guidance) still has keys to attend to.
  With `self_attend=False` only text (and the null token) is attended: cross-attention.
  """

  def __init__(self, ch: int, rngs: nnx.Rngs, *, dtype: Dtype, head_dim: int = 64,
               text_dim: int | None = None, self_attend: bool = True,
               implementation: str | None = None):
    self.heads = max(ch // head_dim, 1)
    self.head_dim = ch // self.heads
    self.norm = group_norm(ch, rngs, dtype=dtype)
    self.q = dense(ch, ch, rngs, dtype=dtype, names=("embed", "heads"), use_bias=False)
    self.kv = dense(ch, 2 * ch, rngs, dtype=dtype, names=("embed", "heads"), use_bias=False) \
        if self_attend else None
    if text_dim is not None:
      self.text_norm = layer_norm(text_dim, rngs)
      self.text_kv = dense(text_dim, 2 * ch, rngs, dtype=dtype, names=("embed", "heads"),
                           use_bias=False)
      self.null_kv = nnx.Param(jax.random.normal(rngs.params(), (2, ch)) * 0.02,
                               out_sharding=(None, "heads"))
    else:
      self.text_kv = None
    self.out = dense(ch, ch, rngs, dtype=dtype, names=("heads", "embed"), zero=True)
    self.dtype, self.implementation = dtype, implementation

  def __call__(self, x: Array, text: Array | None = None, text_mask: Array | None = None) -> Array:
    b, hgt, wid, ch = x.shape
    h = self.norm(x).astype(self.dtype).reshape(b, hgt * wid, ch)
    split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim)
    q = split(self.q(h))
    keys, values, masks = [], [], []
    if self.kv is not None:
      k, v = jnp.split(self.kv(h), 2, axis=-1)
      keys.append(k), values.append(v), masks.append(jnp.ones((b, hgt * wid), bool))
    if self.text_kv is not None:
      if text is None:
        raise ValueError("this attention layer was built with text_dim: pass text tokens.")
      k, v = jnp.split(self.text_kv(self.text_norm(text).astype(self.dtype)), 2, axis=-1)
      null = jnp.broadcast_to(self.null_kv[...].astype(self.dtype)[:, None, None, :], (2, b, 1, ch))
      keys += [k, null[0]]
      values += [v, null[1]]
      masks += [text_mask if text_mask is not None else jnp.ones(text.shape[:2], bool),
                jnp.ones((b, 1), bool)]
    k, v = split(jnp.concatenate(keys, 1)), split(jnp.concatenate(values, 1))
    out = attention(q, k, v, jnp.concatenate(masks, 1), implementation=self.implementation)
    return x + self.out(out.reshape(b, hgt * wid, ch)).reshape(x.shape).astype(x.dtype)


class AttentionPool(nnx.Module):
  """Pools text tokens [B, L, D] into one vector [B, out_dim] with a learned query,
  respecting the mask (plus a learned null token for fully masked text)."""

  def __init__(self, text_dim: int, out_dim: int, rngs: nnx.Rngs, *, dtype: Dtype,
               heads: int = 8):
    self.heads = heads if text_dim % heads == 0 else 1
    self.norm = layer_norm(text_dim, rngs)
    self.query = nnx.Param(jax.random.normal(rngs.params(), (1, 1, text_dim)) * 0.02,
                           out_sharding=(None, None, "embed"))
    self.null = nnx.Param(jnp.zeros((1, 1, text_dim)), out_sharding=(None, None, "embed"))
    self.kv = dense(text_dim, 2 * text_dim, rngs, dtype=dtype, names=("embed", "heads"))
    self.proj = dense(text_dim, out_dim, rngs, dtype=dtype, names=("embed", "mlp"))
    self.dtype = dtype

  def __call__(self, text: Array, mask: Array) -> Array:
    b, _, d = text.shape
    tokens = jnp.concatenate([jnp.broadcast_to(self.null[...], (b, 1, d)),
                              self.norm(text)], 1).astype(self.dtype)
    mask = jnp.concatenate([jnp.ones((b, 1), bool), mask], 1)
    k, v = jnp.split(self.kv(tokens), 2, axis=-1)
    split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads)
    q = jnp.broadcast_to(self.query[...].astype(self.dtype), (b, 1, d))
    pooled = attention(split(q), split(k), split(v), mask, implementation="plain")
    return self.proj(pooled.reshape(b, d))


class Downsample(nnx.Module):
  """A 3x3 convolution with stride `stride` (2 halves the resolution, 1 keeps it)."""

  def __init__(self, cin: int, cout: int, rngs: nnx.Rngs, *, dtype: Dtype, stride: int = 2):
    self.conv = conv(cin, cout, 3, rngs, dtype=dtype, stride=stride)

  def __call__(self, x: Array) -> Array:
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour upsampling by `factor` (1: none), then a 3x3 convolution."""

  def __init__(self, cin: int, cout: int, rngs: nnx.Rngs, *, dtype: Dtype, factor: int = 2):
    self.conv = conv(cin, cout, 3, rngs, dtype=dtype)
    self.factor = factor

  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    f = self.factor
    if f > 1:
      x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, f, w, f, c)).reshape(
          b, f * h, f * w, c)
    return self.conv(x)


def pixel_unshuffle(x: Array, f: int = 2) -> Array:
  """[B, H, W, C] -> [B, H/f, W/f, f*f*C]; channel (i*f + j)*C + c holds pixel (i, j)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def pixel_shuffle(x: Array, f: int = 2) -> Array:
  """The inverse of `pixel_unshuffle`: [B, H, W, f*f*C] -> [B, f*H, f*W, C]."""
  b, h, w, c = x.shape
  c //= f * f
  x = x.reshape(b, h, w, f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c)


class PixelShuffleDown(nnx.Module):
  """Halves the resolution losslessly (space-to-depth), then a 1x1 conv back to `ch`
  channels: Rosetta's 'shuffle' downsampling (SP-conv, arXiv:2208.03641)."""

  def __init__(self, ch: int, rngs: nnx.Rngs, *, dtype: Dtype):
    self.conv = conv(4 * ch, ch, 1, rngs, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    return self.conv(pixel_unshuffle(x))


class PixelShuffleUp(nnx.Module):
  """Doubles the resolution: 1x1 conv to 4x the channels, GroupNorm, SiLU, depth-to-space
  (Rosetta's 'shuffle' upsampling). The conv starts ICNR-initialised (Aitken et al. 2017):
  the four sub-pixels of an output pixel get the same weights, so a fresh layer upsamples
  like nearest neighbour instead of imprinting a checkerboard."""

  def __init__(self, ch: int, rngs: nnx.Rngs, *, dtype: Dtype):
    self.conv = conv(ch, 4 * ch, 1, rngs, dtype=dtype)
    k = self.conv.kernel[...]
    # Output channel (i*2 + j)*ch + c is sub-pixel (i, j) of channel c: tile, not repeat.
    self.conv.kernel[...] = jnp.tile(k[..., :ch], (1, 1, 1, 4))
    self.norm = group_norm(4 * ch, rngs, dtype=dtype)
    self.dtype = dtype

  def __call__(self, x: Array) -> Array:
    return pixel_shuffle(self.norm.silu(self.conv(x)).astype(self.dtype))


class TextProjection(nnx.Module):
  """LayerNorm and one Dense from the encoder's width to `dim`, computed once per call of
  the network and read by every attention layer (Rosetta's `text_enc_projection`), in
  place of a projection from the full encoder width in each layer."""

  def __init__(self, text_dim: int, dim: int, rngs: nnx.Rngs, *, dtype: Dtype):
    self.norm = layer_norm(text_dim, rngs)
    self.proj = dense(text_dim, dim, rngs, dtype=dtype, names=("embed", "mlp"))

  def __call__(self, text: Array) -> Array:
    return self.proj(self.norm(text).astype(self.proj.dtype)).astype(jnp.float32)


def maybe_remat(remat: bool, stateful: bool, layer: nnx.Module, *args: Array) -> Array:
  """layer(*args), optionally rematerialised.

  Rematerialisation recomputes the layer's activations in the backward pass instead of
  storing them: the memory of a 1024^2 stage is dominated by full-resolution ones. It is
  jax.checkpoint on an explicit split/merge. Only with dropout (`stateful`) is the RNG
  state written back, so dropout keys advance as without remat; otherwise nothing is
  written, which keeps the module usable under a plain `jax.grad` of a merged module,
  where writing to variables of the enclosing trace is an error.
  """
  if not remat:
    return layer(*args)
  graphdef, state = nnx.split(layer)

  def run(state, *args):
    m = nnx.merge(graphdef, state)
    return m(*args), (nnx.state(m, nnx.RngState) if stateful else None)

  out, rng_state = jax.checkpoint(run)(state, *args)
  if stateful:
    nnx.update(layer, rng_state)
  return out
