"""Imagen's Efficient U-Net for the super-resolution stages (Flax NNX).

Saharia et al. (2022), appendix B.1 and Figs. A.28-A.31: compared with the base U-Net it
puts more residual blocks (and so more parameters) at low resolution, where they are
cheap; scales skip connections by 1/sqrt(2); and reverses the order of resampling and
convolution: a DBlock strides *before* its blocks and a UBlock upsamples *after* them, so
no block runs at the input resolution. Text enters through cross-attention at the lowest
level(s) and through the pooled text added to the conditioning vector.

Layout with L levels; level i has `channels * channel_mult[i]` channels and strides by
`strides[i]` (2 by default, as every DBlock of the paper and of NVIDIA's JAX Imagen;
Rosetta's 5-level configs keep the last level at the resolution of the one above, stride
1), so it runs at 1/prod(strides[:i+1]) of the input and inputs must be divisible by
prod(strides):

  concat(x_t, resize(lowres)) -> conv_in (full resolution, channels * channel_mult[0])
  down level i: 3x3 conv with stride strides[i] -> num_res_blocks[i] ResBlocks -> [attention]
                (its output is the skip of level i)
  up level i:   [concat skip i, except at the bottom, where it is the same tensor]
                -> num_res_blocks[i] ResBlocks -> [attention]
                -> nearest x strides[i] + 3x3 conv to the width of the level above
  GroupNorm -> SiLU -> conv_out (zero-initialised), back at full resolution

Rosetta upsamples with a stride-2 3x3 transposed conv; nearest + conv has the same reach
and parameters and does not imprint a checkerboard (Odena et al. 2016).

Conditioning vector: CondMLP(log-SNR) + CondMLP(augmentation log-SNR of the low-res
image) + AttentionPool(text), applied in every ResBlock as scale/shift.

The low-res image is upsampled with `jax.image.resize(..., "bicubic")` (Keys cubic,
a = -0.5, as in TF/PIL and NVIDIA's JAX Imagen): smoother than nearest, sharper than
bilinear, and cheap. Upsampling a crop of the low-res image differs from cropping an
upsampled one only within 2 low-res pixels of the crop's edge (the cubic kernel's
reach), so training on matched crops is consistent with full-image sampling. The network
is fully convolutional (attention is over whatever pixels there are), so it runs at any
size divisible by prod(strides).

Attention after a level's blocks (on both paths): text cross-attention where the level
is in `cross_attn_levels`, pixel self-attention where it is in `self_attn_levels`, and
one fused layer (keys: pixels + text tokens + a learned null token) where it is in both.

Skip scaling (`skip_scaling`). The paper says only "scaling the skip connections by
1/sqrt(2)", citing Song et al. (2021), and the field reads it three ways:
  "sum"       (h + shortcut) / sqrt(2) at the end of every ResBlock: the default. It is
              the cited work's `skip_rescale` (NCSN++, and SR3 by the same authors), and
              it keeps the residual stream's variance constant down the 8-block levels,
              which is what the paper says the scaling is for (faster convergence with
              many blocks at low resolution).
  "shortcut"  h + conv1x1(shortcut) / sqrt(2), a 1x1 conv in every block: NVIDIA's JAX
              Imagen (Rosetta, `EfficientResBlock`).
  "unet"      the encoder features concatenated into the decoder (the U-Net's long skips)
              times 1/sqrt(2), blocks unscaled: imagen-pytorch (`skip_connect_scale`).
  "none"      no scaling anywhere.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import config_schema
from imagen_jax.models import layers as L

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_ATTN_IMPLS = (None, "xla", "plain")
SKIP_SCALINGS = ("sum", "shortcut", "unet", "none")


@dataclasses.dataclass(frozen=True)
class EfficientUNetConfig:
  """Hyperparameters of an Efficient U-Net; levels are indexed from full resolution."""

  in_channels: int = 3
  out_channels: int = 3
  channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 4, 8)
  num_res_blocks: tuple[int, ...] = (2, 4, 8, 8)
  cross_attn_levels: tuple[int, ...] = (3,)  # text cross-attention after these levels' blocks
  self_attn_levels: tuple[int, ...] = ()     # pixel self-attention (fused with text if both)
  strides: tuple[int, ...] = ()  # per level, 1 or 2; () = 2 at every level (the paper's)
  skip_scaling: str = "sum"      # where the 1/sqrt(2) goes: see the module docstring
  text_dim: int = 4096
  cond_dim: int = 512
  head_dim: int = 64
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; params are always float32
  remat: bool = False     # layers.maybe_remat around every ResBlock and attention layer
  attention_impl: str | None = None  # None | "xla" | "plain" (see layers.attention)

  def __post_init__(self):
    # ConfigDict and JSON hand over lists; freeze them so the config stays hashable.
    for f in ("channel_mult", "num_res_blocks", "cross_attn_levels", "self_attn_levels",
              "strides"):
      object.__setattr__(self, f, tuple(int(v) for v in getattr(self, f)))
    n = len(self.channel_mult)
    if n == 0 or len(self.num_res_blocks) != n:
      raise ValueError(f"num_res_blocks {self.num_res_blocks} needs one entry per level of "
                       f"channel_mult {self.channel_mult}.")
    if self.strides and (len(self.strides) != n or set(self.strides) - {1, 2}):
      raise ValueError(f"strides {self.strides}: one stride per level of channel_mult "
                       f"{self.channel_mult}, each 1 or 2 (or () for 2 at every level).")
    if self.skip_scaling not in SKIP_SCALINGS:
      raise ValueError(f"skip_scaling {self.skip_scaling!r}: choose one of {SKIP_SCALINGS}.")
    for f in ("cross_attn_levels", "self_attn_levels"):
      bad = [i for i in getattr(self, f) if not 0 <= i < n]
      if bad:
        raise ValueError(f"{f} {getattr(self, f)}: levels {bad} are outside 0..{n - 1}.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"dtype {self.dtype!r}: choose one of {sorted(_DTYPES)}.")
    if self.attention_impl not in _ATTN_IMPLS:
      raise ValueError(f"attention_impl {self.attention_impl!r}: choose one of {_ATTN_IMPLS}.")
    if min(self.num_res_blocks) < 1:
      raise ValueError(f"num_res_blocks {self.num_res_blocks}: every level needs a block.")
    attended = set(self.cross_attn_levels) | set(self.self_attn_levels)
    for c in sorted({self.level_channels[i] for i in attended}):
      if c % max(c // self.head_dim, 1):
        raise ValueError(f"attention width {c} does not split into heads of about "
                         f"head_dim={self.head_dim}; use a multiple of it.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> EfficientUNetConfig:
    """Builds a config from a dict or ConfigDict (a `model` config section).

    `name` is accepted (it selects the network) if it says "efficient_unet"; any other
    unknown key is an error rather than silently ignored.
    """
    d = config_schema.as_dict(d)
    name = d.pop("name", "efficient_unet")
    if name != "efficient_unet":
      raise ValueError(f"model.name {name!r}: EfficientUNetConfig builds 'efficient_unet'.")
    return config_schema.from_mapping(cls, d)

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(self.channels * m for m in self.channel_mult)

  @property
  def level_strides(self) -> tuple[int, ...]:
    return self.strides or (2,) * len(self.channel_mult)

  @property
  def level_sizes(self) -> tuple[int, ...]:
    """How many times smaller than the input each level runs."""
    return tuple(math.prod(self.level_strides[:i + 1]) for i in range(len(self.channel_mult)))

  @property
  def size_multiple(self) -> int:
    """Input height and width must be multiples of this."""
    return math.prod(self.level_strides)


class _Level(nnx.Module):
  """One level of one path: down: strided conv -> ResBlocks -> [attention];
  up: ResBlocks -> [attention] -> upsample + conv to the width of the level above."""

  def __init__(self, cfg: EfficientUNetConfig, level: int, cin: int, *, up: bool,
               rngs: nnx.Rngs):
    dt = _DTYPES[cfg.dtype]
    chs = cfg.level_channels
    ch, stride = chs[level], cfg.level_strides[level]
    self.remat, self.stateful = cfg.remat, cfg.dropout > 0
    self.down = None if up else L.Downsample(cin, ch, rngs, dtype=dt, stride=stride)
    if self.down is not None:
      cin = ch
    scaling = {"sum": "sum", "shortcut": "shortcut"}.get(cfg.skip_scaling, "none")
    blocks = []
    for _ in range(cfg.num_res_blocks[level]):
      blocks.append(L.ResBlock(cin, ch, cfg.cond_dim, rngs, dtype=dt, dropout=cfg.dropout,
                               residual_scaling=scaling))
      cin = ch
    self.blocks = nnx.List(blocks)
    cross, self_attn = level in cfg.cross_attn_levels, level in cfg.self_attn_levels
    self.attn = L.Attention(ch, rngs, dtype=dt, head_dim=cfg.head_dim,
                            text_dim=cfg.text_dim if cross else None, self_attend=self_attn,
                            implementation=cfg.attention_impl) if cross or self_attn else None
    # Level 0 returns to conv_in's width (channels * channel_mult[0]) at full resolution.
    self.up = L.Upsample(ch, chs[max(level - 1, 0)], rngs, dtype=dt, factor=stride) \
        if up else None

  def __call__(self, h: Array, cond: Array, text: Array, text_mask: Array) -> Array:
    if self.down is not None:
      h = self.down(h)
    for blk in self.blocks:
      h = L.maybe_remat(self.remat, self.stateful, blk, h, cond)
    if self.attn is not None:
      h = L.maybe_remat(self.remat, False, self.attn, h, text, text_mask)
    if self.up is not None:
      h = self.up(h)
    return h


class EfficientUNet(nnx.Module):
  """Super-resolution denoiser: (x_t, log-SNR, text, low-res image, its aug level) -> pred."""

  def __init__(self, cfg: EfficientUNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = _DTYPES[cfg.dtype]
    chs = cfg.level_channels
    n = len(chs)
    self.time_mlp = L.CondMLP(cfg.channels, cfg.cond_dim, rngs, dtype=dt)
    self.aug_mlp = L.CondMLP(cfg.channels, cfg.cond_dim, rngs, dtype=dt)
    self.text_pool = L.AttentionPool(cfg.text_dim, cfg.cond_dim, rngs, dtype=dt)
    self.conv_in = L.conv(2 * cfg.in_channels, chs[0], 3, rngs, dtype=dt)
    self.down = nnx.List([_Level(cfg, i, chs[max(i - 1, 0)], up=False, rngs=rngs)
                          for i in range(n)])
    self.skip_scale = _INV_SQRT2 if cfg.skip_scaling == "unet" else None
    # The bottom up-level continues from the bottom down-level (no skip to concatenate);
    # above it, the input is the upsampled features plus the skip of the same width.
    self.up = nnx.List([_Level(cfg, i, chs[i] if i == n - 1 else 2 * chs[i], up=True,
                               rngs=rngs) for i in range(n)])
    self.norm_out = L.group_norm(chs[0], rngs, dtype=dt)
    # Zero init: the untrained network predicts 0 (the mean of eps), a stable start.
    self.conv_out = L.conv(chs[0], cfg.out_channels, 3, rngs, dtype=dt, zero=True)
    self.dtype = dt

  def __call__(self, x: Array, logsnr: Array, text: Array, text_mask: Array, lowres: Array,
               aug_logsnr: Array) -> Array:
    """x [B,H,W,C] noisy image; logsnr [B]; text [B,T,D], text_mask [B,T] bool (all
    False drops the text for classifier-free guidance); lowres [B,h,w,C] in [-1,1] (any
    size; resized to H x W); aug_logsnr [B] noise-augmentation level of lowres.
    Returns the prediction, shape of x, float32."""
    b, hgt, wid, _ = x.shape
    m = self.cfg.size_multiple
    if hgt % m or wid % m:
      raise ValueError(f"image size {hgt}x{wid} must be divisible by {m} "
                       f"(the product of the levels' strides {self.cfg.level_strides}).")
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), (b,))
    aug_logsnr = jnp.broadcast_to(jnp.asarray(aug_logsnr, jnp.float32), (b,))
    text_mask = jnp.asarray(text_mask, bool)
    up_lowres = jax.image.resize(lowres.astype(jnp.float32), (b, hgt, wid, lowres.shape[-1]),
                                 "bicubic")
    h = jnp.concatenate([x.astype(jnp.float32), up_lowres], -1).astype(self.dtype)

    cond = (self.time_mlp(logsnr).astype(jnp.float32) + self.aug_mlp(aug_logsnr)
            + self.text_pool(text, text_mask)).astype(self.dtype)
    text = text.astype(jnp.float32)

    h = self.conv_in(h)
    skips = []
    for level in self.down:
      h = level(h, cond, text, text_mask)
      skips.append(h)
    skips.pop()  # the bottom level's output is h itself
    for i, level in reversed(list(enumerate(self.up))):
      if i < len(self.up) - 1:
        skip = skips.pop()
        if self.skip_scale is not None:
          skip = (skip * self.skip_scale).astype(skip.dtype)
        h = jnp.concatenate([h, skip], -1)
      h = level(h, cond, text, text_mask)
    h = self.norm_out.silu(h).astype(self.dtype)
    return self.conv_out(h).astype(jnp.float32)

