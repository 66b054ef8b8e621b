"""The Imagen base U-Net (Saharia et al. 2022, appendix): a DDPM-style U-Net with text.

Layout, for `channel_mult` (m0, m1, ...) and `num_res_blocks` n:

  conv_in -> per level: n x [ResBlock (+ Attention if the resolution is in
  attn_resolutions)], then Downsample (not after the last level)
  -> middle: ResBlock, Attention, ResBlock
  -> per level, deepest first: n+1 x [concat skip, ResBlock (+ Attention)], then Upsample
  -> GroupNorm, SiLU, conv_out (zero-initialised).

Attention layers at the chosen resolutions attend over the pixels and the text tokens
together (Imagen's combined self/cross attention, `layers.Attention` with `text_dim`).
Text reaches them in one of two ways (`text_proj_dim`): 0, each attention layer has its
own LayerNorm and key/value projection from the encoder's full width (4096 for T5-XXL);
or > 0, the tokens are projected once (`layers.TextProjection`: LayerNorm + Dense to
text_proj_dim) and every layer projects from that, as NVIDIA's JAX Imagen does
(`text_enc_projection`, `attn_cond_dim`). At paper scale the per-layer projections from
4096-d are over a tenth of the network, which is how Rosetta's 512 x (1,2,3,4) x 3 base
lands at 2B with the shared projection and well above it without.

Resampling (`resample`): "conv" (the default) downsamples with a stride-2 3x3 conv and
upsamples with nearest + 3x3 conv, as the DDPM U-Net; "shuffle" uses resampling ResBlocks
whose shortcut and main branch go through one pixel-(un)shuffle layer, as Rosetta's base
U-Net (`upsample_mode = downsample_mode = 'shuffle'`) and BigGAN's resampling blocks.
Every ResBlock gets one conditioning vector per example:
cond = CondMLP(log-SNR) + AttentionPool(text, text_mask), i.e. the pooled text is added
to the noise-level embedding, as in Imagen.

Classifier-free guidance: the trainer drops the text of an example by setting its whole
`text_mask` row to False (the token values are then irrelevant). That input is well
defined because every text-reading layer has a learned null token that is never masked:
AttentionPool pools its null vector, and each Attention attends to its null key/value
(besides the pixels). The unconditional prediction at sampling time is the same call with
an all-False mask.

Flax NNX (not linen), as DESIGN.md asks; nothing here needs linen.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import config_schema
from imagen_jax.models import layers

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESAMPLE = ("conv", "shuffle")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of the base U-Net; `from_dict` builds one from a config section."""

  channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]  # feature-map sizes (pixels per side) with attention
  text_dim: int
  image_size: int = 64  # input side length; places attention (level l is image_size/2^l)
  in_channels: int = 3
  out_channels: int = 3
  cond_dim: int | None = None  # None: 4 * channels
  head_dim: int = 64
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; params are always float32
  remat: bool = False  # recompute res/attention blocks in the backward pass
  attention_impl: str | None = None  # None | "xla" | "plain" (see layers.attention)
  text_proj_dim: int = 0  # 0: per-layer text projections; > 0: one shared projection
  resample: str = "conv"  # "conv" | "shuffle" (see the module docstring)

  def __post_init__(self):
    # Tuples, not lists, so the frozen config stays hashable (ConfigDicts give lists).
    object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
    object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
    if self.dtype not in DTYPES:
      raise ValueError(f"UNetConfig.dtype={self.dtype!r}; choose one of {tuple(DTYPES)}.")
    if self.attention_impl not in (None, "xla", "plain"):
      raise ValueError(f"UNetConfig.attention_impl={self.attention_impl!r}; "
                       "choose None, 'xla' or 'plain'.")
    if self.resample not in RESAMPLE:
      raise ValueError(f"UNetConfig.resample={self.resample!r}; choose one of {RESAMPLE}.")
    if self.text_proj_dim < 0:
      raise ValueError(f"UNetConfig.text_proj_dim={self.text_proj_dim}: 0 (per-layer "
                       "projections) or the width of the shared text projection.")
    sizes = [self.image_size // 2**lvl for lvl in range(len(self.channel_mult))]
    if not set(self.attn_resolutions) <= set(sizes):
      raise ValueError(f"UNetConfig.attn_resolutions={self.attn_resolutions} must be among "
                       f"the feature-map sizes {sizes} (image_size={self.image_size}).")
    # layers.Attention uses max(c // head_dim, 1) heads of equal width (the middle block
    # always attends, at the last level's width).
    attended = {self.channels * m for m, size in zip(self.channel_mult, sizes)
                if size in self.attn_resolutions} | {self.channels * self.channel_mult[-1]}
    for c in sorted(attended):
      if c % max(c // self.head_dim, 1):
        raise ValueError(f"UNetConfig: attention width {c} does not split into heads of "
                         f"about head_dim={self.head_dim}; use a multiple of it.")

  @property
  def cond_features(self) -> int:
    return self.cond_dim or 4 * self.channels

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> UNetConfig:
    """Builds the config from a mapping (e.g. `config.model`); `name` is ignored, any
    other unknown key is an error naming the valid ones."""
    d = {k: v for k, v in config_schema.as_dict(d).items() if k != "name"}
    return config_schema.from_mapping(cls, d)


class UNet(nnx.Module):
  """Predicts eps (or x0, v: the trainer decides) from x_t [B,H,W,C], log-SNR [B],
  text tokens [B,L,text_dim] and text_mask [B,L] (True = real token)."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = DTYPES[cfg.dtype]
    ch, cond, mults = cfg.channels, cfg.cond_features, cfg.channel_mult
    res = lambda cin, cout, resample=None: layers.ResBlock(
        cin, cout, cond, rngs, dtype=dt, dropout=cfg.dropout, resample=resample)
    # With a shared projection, attention layers read tokens of text_proj_dim.
    self.text_proj = layers.TextProjection(cfg.text_dim, cfg.text_proj_dim, rngs, dtype=dt) \
        if cfg.text_proj_dim else None
    attn_text_dim = cfg.text_proj_dim or cfg.text_dim
    attn = lambda c: layers.Attention(c, rngs, dtype=dt, head_dim=cfg.head_dim,
                                      text_dim=attn_text_dim, implementation=cfg.attention_impl)
    shuffle = cfg.resample == "shuffle"
    # Which levels attend is fixed here from image_size (level l works at image_size / 2^l).
    has_attn = [cfg.image_size // 2**lvl in cfg.attn_resolutions for lvl in range(len(mults))]

    self.time_mlp = layers.CondMLP(ch, cond, rngs, dtype=dt)
    self.text_pool = layers.AttentionPool(cfg.text_dim, cond, rngs, dtype=dt)
    self.conv_in = layers.conv(cfg.in_channels, ch, 3, rngs, dtype=dt)

    # Encoder; `skips` records the channels of every activation the decoder concatenates.
    skips, cur = [ch], ch
    down_res, down_attn, downsample = [], [], []
    for lvl, mult in enumerate(mults):
      blocks = []
      for _ in range(cfg.num_res_blocks):
        blocks.append(res(cur, ch * mult))
        cur = ch * mult
        skips.append(cur)
      down_res.append(nnx.List(blocks))
      down_attn.append(nnx.List([attn(cur) for _ in blocks] if has_attn[lvl] else []))
      if lvl < len(mults) - 1:
        downsample.append(res(cur, cur, "down") if shuffle else
                          layers.Downsample(cur, cur, rngs, dtype=dt))
        skips.append(cur)
    self.down_res, self.down_attn = nnx.List(down_res), nnx.List(down_attn)
    self.downsample = nnx.List(downsample)

    self.mid_res1, self.mid_attn, self.mid_res2 = res(cur, cur), attn(cur), res(cur, cur)

    # Decoder, deepest level first; one more block per level than the encoder, so every
    # saved skip (including conv_in's and each downsample's) is consumed once.
    up_res, up_attn, upsample = [], [], []
    for lvl in reversed(range(len(mults))):
      blocks = []
      for _ in range(cfg.num_res_blocks + 1):
        blocks.append(res(cur + skips.pop(), ch * mults[lvl]))
        cur = ch * mults[lvl]
      up_res.append(nnx.List(blocks))
      up_attn.append(nnx.List([attn(cur) for _ in blocks] if has_attn[lvl] else []))
      if lvl > 0:
        upsample.append(res(cur, cur, "up") if shuffle else
                        layers.Upsample(cur, cur, rngs, dtype=dt))
    self.up_res, self.up_attn = nnx.List(up_res), nnx.List(up_attn)
    self.upsample = nnx.List(upsample)

    self.norm_out = layers.group_norm(cur, rngs, dtype=dt)
    # Zero init: a fresh network predicts 0, the mean of eps.
    self.conv_out = layers.conv(cur, cfg.out_channels, 3, rngs, dtype=dt, zero=True)

  def _run(self, block: nnx.Module, *args: Array) -> Array:
    # Only ResBlocks hold dropout RNG state; see layers.maybe_remat.
    stateful = self.cfg.dropout > 0 and isinstance(block, layers.ResBlock)
    return layers.maybe_remat(self.cfg.remat, stateful, block, *args)

  def _resample(self, layer: nnx.Module, h: Array, cond: Array) -> Array:
    # A resampling ResBlock ("shuffle") takes the conditioning; a plain conv does not.
    if isinstance(layer, layers.ResBlock):
      return self._run(layer, h, cond)
    return layer(h)

  def __call__(self, x: Array, logsnr: Array, text: Array, text_mask: Array) -> Array:
    tm = text_mask.astype(bool)
    cond = self.time_mlp(logsnr) + self.text_pool(text, tm)
    if self.text_proj is not None:
      text = self.text_proj(text)
    h = self.conv_in(x.astype(DTYPES[self.cfg.dtype]))
    skips = [h]
    for lvl, blocks in enumerate(self.down_res):
      for i, block in enumerate(blocks):
        h = self._run(block, h, cond)
        if len(self.down_attn[lvl]):
          h = self._run(self.down_attn[lvl][i], h, text, tm)
        skips.append(h)
      if lvl < len(self.downsample):
        h = self._resample(self.downsample[lvl], h, cond)
        skips.append(h)

    h = self._run(self.mid_res1, h, cond)
    h = self._run(self.mid_attn, h, text, tm)
    h = self._run(self.mid_res2, h, cond)

    for j, blocks in enumerate(self.up_res):
      for i, block in enumerate(blocks):
        h = self._run(block, jnp.concatenate([h, skips.pop()], axis=-1), cond)
        if len(self.up_attn[j]):
          h = self._run(self.up_attn[j][i], h, text, tm)
      if j < len(self.upsample):
        h = self._resample(self.upsample[j], h, cond)
    h = self.norm_out.silu(h).astype(h.dtype)
    return self.conv_out(h).astype(jnp.float32)
