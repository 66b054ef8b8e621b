"""A PyTorch port of our base U-Net (imagen_jax/models/unet.py), for benchmarks/vs_torch.py.

  python benchmarks/vs_torch.py --check    # parity with the JAX model (params, outputs)

Torch is never a runtime or CI dependency: install it into .venv by hand with
`pip install torch==2.13.0` (never torchvision). This file imports nothing of ours.

The port is exact, not approximate: the same modules with the same parameter names
(so `load_jax_params` copies an `nnx.State` path by path), the same parameter count, and
the same function. Details that make it exact:

  GroupNorm   min(32, gcd) groups as `layers.group_norm`, eps 1e-6 (flax's default,
              not torch's 1e-5); LayerNorm eps 1e-6 too.
  stride-2    flax's padding="SAME" on an even size pads 0 before and 1 after (XLA's
  conv        SAME: total pad (out - 1) * s + k - in = 1, low = total // 2); torch's
              padding=1 pads 1 on both sides and samples other pixels. `Downsample`
              pads (0, 1) explicitly and convolves unpadded.
  attention   keys/values are [pixels, text tokens, one learned null token]; heads of
              head_dim = ch // max(ch // head_dim, 1); AttentionPool's query is a raw
              parameter (no projection) and its null token is not layer-normed.
  layouts     flax kernels are HWIO (conv) and (in, out) (dense); torch's are OIHW and
              (out, in). Activations are NCHW; `channels_last` only changes strides.

Only the default options are ported: resample="conv", residual_scaling "none", float32
compute, no remat; `text_proj_dim` > 0 (the shared text projection) is ported as well.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6  # flax's GroupNorm / LayerNorm epsilon


@dataclasses.dataclass(frozen=True)
class TorchUNetConfig:
  """The fields of imagen_jax.models.unet.UNetConfig this port reads."""

  channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attn_resolutions: tuple[int, ...]
  text_dim: int
  image_size: int = 64
  in_channels: int = 3
  out_channels: int = 3
  cond_dim: int | None = None
  head_dim: int = 64
  dropout: float = 0.0
  text_proj_dim: int = 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TorchUNetConfig":
    """From a config's `model` section; refuses options the port does not implement."""
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    if d.pop("name", "unet") != "unet":
      raise ValueError("torch_unet ports the base U-Net (model.name='unet') only.")
    unsupported = {"dtype": "float32", "remat": False, "resample": "conv"}
    for k, ok in unsupported.items():
      if d.pop(k, ok) != ok:
        raise ValueError(f"torch_unet: model.{k} must be {ok!r} (not ported).")
    d.pop("attention_impl", None)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"torch_unet: unknown model key(s) {unknown}.")
    d["channel_mult"] = tuple(d["channel_mult"])
    d["attn_resolutions"] = tuple(d["attn_resolutions"])
    return cls(**d)

  @property
  def cond_features(self) -> int:
    return self.cond_dim or 4 * self.channels


def group_norm(ch: int, groups: int = 32) -> nn.GroupNorm:
  return nn.GroupNorm(math.gcd(groups, ch), ch, eps=EPS)


def conv(cin: int, cout: int, k: int, *, zero: bool = False, padding: int | None = None
         ) -> nn.Conv2d:
  c = nn.Conv2d(cin, cout, k, padding=k // 2 if padding is None else padding)
  if zero:
    nn.init.zeros_(c.weight)
    nn.init.zeros_(c.bias)
  return c


def dense(cin: int, cout: int, *, zero: bool = False, bias: bool = True) -> nn.Linear:
  lin = nn.Linear(cin, cout, bias=bias)
  if zero:
    nn.init.zeros_(lin.weight)
    if bias:
      nn.init.zeros_(lin.bias)
  return lin


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
  """`t` in the memory format of `ref` (NCHW or channels_last)."""
  fmt = torch.channels_last if (ref.dim() == 4 and not ref.is_contiguous()
                                and ref.is_contiguous(memory_format=torch.channels_last)) \
      else torch.contiguous_format
  return t.contiguous(memory_format=fmt)


def logsnr_embedding(logsnr: torch.Tensor, dim: int, max_period: float = 10_000.0
                     ) -> torch.Tensor:
  """layers.logsnr_embedding: sin/cos features of 25 * log-SNR, [B] -> [B, dim]."""
  x = logsnr.float() * (1000.0 / 40.0)
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                         device=x.device) / half)
  args = x[:, None] * freqs[None]
  return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class CondMLP(nn.Module):
  """layers.CondMLP: log-SNR features -> Dense -> SiLU -> Dense."""

  def __init__(self, feat_dim: int, cond_dim: int):
    super().__init__()
    self.feat_dim = feat_dim
    self.fc1, self.fc2 = dense(feat_dim, cond_dim), dense(cond_dim, cond_dim)

  def forward(self, logsnr: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.silu(self.fc1(logsnr_embedding(logsnr, self.feat_dim))))


class ResBlock(nn.Module):
  """layers.ResBlock (residual_scaling "none", no resampling)."""

  def __init__(self, cin: int, cout: int, cond_dim: int, *, dropout: float = 0.0):
    super().__init__()
    self.norm1 = group_norm(cin)
    self.conv1 = conv(cin, cout, 3)
    self.cond = dense(cond_dim, 2 * cout)
    self.norm2 = group_norm(cout)
    self.drop = nn.Dropout(dropout)
    self.conv2 = conv(cout, cout, 3, zero=True)
    self.skip = conv(cin, cout, 1) if cin != cout else None

  def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.cond(F.silu(cond))[:, :, None, None].chunk(2, dim=1)
    h = self.norm2(h) * (1.0 + scale) + shift
    h = self.conv2(self.drop(F.silu(h)))
    return h + (self.skip(x) if self.skip is not None else x)


class Attention(nn.Module):
  """layers.Attention with text: keys/values = pixels + text tokens + a null token."""

  def __init__(self, ch: int, *, head_dim: int = 64, text_dim: int | None = None):
    super().__init__()
    self.heads = max(ch // head_dim, 1)
    self.head_dim = ch // self.heads
    self.norm = group_norm(ch)
    self.q = dense(ch, ch, bias=False)
    self.kv = dense(ch, 2 * ch, bias=False)
    if text_dim is not None:
      self.text_norm = nn.LayerNorm(text_dim, eps=EPS)
      self.text_kv = dense(text_dim, 2 * ch, bias=False)
      self.null_kv = nn.Parameter(torch.randn(2, ch) * 0.02)
    else:
      self.text_kv = None
    self.out = dense(ch, ch, zero=True)

  def forward(self, x: torch.Tensor, text: torch.Tensor | None = None,
              text_mask: torch.Tensor | None = None) -> torch.Tensor:
    b, ch, hgt, wid = x.shape
    # [B, C, H, W] -> [B, HW, C]: a view when x is channels_last, a copy when NCHW.
    h = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, ch)
    q = self.q(h)
    k, v = self.kv(h).chunk(2, dim=-1)
    keys, values = [k], [v]
    mask = None
    if self.text_kv is not None:
      tk, tv = self.text_kv(self.text_norm(text)).chunk(2, dim=-1)
      null = self.null_kv[:, None, None, :].expand(2, b, 1, ch)
      keys += [tk, null[0]]
      values += [tv, null[1]]
      tm = text_mask if text_mask is not None else torch.ones(text.shape[:2], dtype=torch.bool,
                                                              device=x.device)
      ones = lambda n: torch.ones(b, n, dtype=torch.bool, device=x.device)
      mask = torch.cat([ones(hgt * wid), tm.bool(), ones(1)], dim=1)[:, None, None, :]
    split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(torch.cat(keys, 1)),
                                         split(torch.cat(values, 1)), attn_mask=mask)
    out = self.out(out.transpose(1, 2).reshape(b, hgt * wid, ch))
    return x + _like(out.reshape(b, hgt, wid, ch).permute(0, 3, 1, 2), x)


class AttentionPool(nn.Module):
  """layers.AttentionPool: a learned query attends over [null, LayerNorm(text)]."""

  def __init__(self, text_dim: int, out_dim: int, *, heads: int = 8):
    super().__init__()
    self.heads = heads if text_dim % heads == 0 else 1
    self.norm = nn.LayerNorm(text_dim, eps=EPS)
    self.query = nn.Parameter(torch.randn(1, 1, text_dim) * 0.02)
    self.null = nn.Parameter(torch.zeros(1, 1, text_dim))
    self.kv = dense(text_dim, 2 * text_dim)
    self.proj = dense(text_dim, out_dim)

  def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, _, d = text.shape
    tokens = torch.cat([self.null.expand(b, 1, d), self.norm(text)], dim=1)
    mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=text.device), mask.bool()], 1)
    k, v = self.kv(tokens).chunk(2, dim=-1)
    split = lambda t: t.reshape(b, t.shape[1], self.heads, d // self.heads).transpose(1, 2)
    q = self.query.expand(b, 1, d)
    pooled = F.scaled_dot_product_attention(split(q), split(k), split(v),
                                            attn_mask=mask[:, None, None, :])
    return self.proj(pooled.transpose(1, 2).reshape(b, d))


class Downsample(nn.Module):
  """layers.Downsample: stride-2 3x3 conv with flax's SAME padding, (0, 1) per side."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=0)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
  """layers.Upsample: nearest-neighbour x2, then a 3x3 conv."""

  def __init__(self, cin: int, cout: int):
    super().__init__()
    self.conv = conv(cin, cout, 3)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TextProjection(nn.Module):
  """layers.TextProjection: LayerNorm + Dense, once per call."""

  def __init__(self, text_dim: int, dim: int):
    super().__init__()
    self.norm, self.proj = nn.LayerNorm(text_dim, eps=EPS), dense(text_dim, dim)

  def forward(self, text: torch.Tensor) -> torch.Tensor:
    return self.proj(self.norm(text))


class UNet(nn.Module):
  """unet.UNet: (x_t [B,C,H,W], log-SNR [B], text [B,L,D], text_mask [B,L]) -> [B,C,H,W].

  Submodule names equal the JAX model's attribute names, so parameter paths match.
  """

  def __init__(self, cfg: TorchUNetConfig):
    super().__init__()
    self.cfg = cfg
    ch, cond, mults = cfg.channels, cfg.cond_features, cfg.channel_mult
    res = lambda cin, cout: ResBlock(cin, cout, cond, dropout=cfg.dropout)
    self.text_proj = TextProjection(cfg.text_dim, cfg.text_proj_dim) \
        if cfg.text_proj_dim else None
    attn = lambda c: Attention(c, head_dim=cfg.head_dim,
                               text_dim=cfg.text_proj_dim or cfg.text_dim)
    has_attn = [cfg.image_size // 2**lvl in cfg.attn_resolutions for lvl in range(len(mults))]

    self.time_mlp = CondMLP(ch, cond)
    self.text_pool = AttentionPool(cfg.text_dim, cond)
    self.conv_in = conv(cfg.in_channels, ch, 3)

    skips, cur = [ch], ch
    self.down_res, self.down_attn, self.downsample = (nn.ModuleList() for _ in range(3))
    for lvl, mult in enumerate(mults):
      blocks = nn.ModuleList()
      for _ in range(cfg.num_res_blocks):
        blocks.append(res(cur, ch * mult))
        cur = ch * mult
        skips.append(cur)
      self.down_res.append(blocks)
      self.down_attn.append(nn.ModuleList([attn(cur) for _ in blocks] if has_attn[lvl] else []))
      if lvl < len(mults) - 1:
        self.downsample.append(Downsample(cur, cur))
        skips.append(cur)

    self.mid_res1, self.mid_attn, self.mid_res2 = res(cur, cur), attn(cur), res(cur, cur)

    self.up_res, self.up_attn, self.upsample = (nn.ModuleList() for _ in range(3))
    for lvl in reversed(range(len(mults))):
      blocks = nn.ModuleList()
      for _ in range(cfg.num_res_blocks + 1):
        blocks.append(res(cur + skips.pop(), ch * mults[lvl]))
        cur = ch * mults[lvl]
      self.up_res.append(blocks)
      self.up_attn.append(nn.ModuleList([attn(cur) for _ in blocks] if has_attn[lvl] else []))
      if lvl > 0:
        self.upsample.append(Upsample(cur, cur))

    self.norm_out = group_norm(cur)
    self.conv_out = conv(cur, cfg.out_channels, 3, zero=True)

  def forward(self, x: torch.Tensor, logsnr: torch.Tensor, text: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
    tm = text_mask.bool()
    cond = self.time_mlp(logsnr) + self.text_pool(text, tm)
    if self.text_proj is not None:
      text = self.text_proj(text)
    h = self.conv_in(x)
    skips = [h]
    for lvl, blocks in enumerate(self.down_res):
      for i, block in enumerate(blocks):
        h = block(h, cond)
        if len(self.down_attn[lvl]):
          h = self.down_attn[lvl][i](h, text, tm)
        skips.append(h)
      if lvl < len(self.downsample):
        h = self.downsample[lvl](h)
        skips.append(h)

    h = self.mid_res2(self.mid_attn(self.mid_res1(h, cond), text, tm), cond)

    for j, blocks in enumerate(self.up_res):
      for i, block in enumerate(blocks):
        h = block(torch.cat([h, skips.pop()], dim=1), cond)
        if len(self.up_attn[j]):
          h = self.up_attn[j][i](h, text, tm)
      if j < len(self.upsample):
        h = self.upsample[j](h)
    return self.conv_out(F.silu(self.norm_out(h)))


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


# JAX params -> torch ----------------------------------------------------------------------


def _flatten(tree: Mapping[Any, Any], prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def torch_name(path: tuple) -> str:
  """A flax param path -> torch name: ('down_res', 0, 0, 'conv1', 'kernel') ->
  'down_res.0.0.conv1.weight' (kernel and scale are torch's weight)."""
  *mods, leaf = (str(p) for p in path)
  leaf = {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
  return ".".join(mods + [leaf])


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  """flax layout -> torch layout: conv kernels HWIO -> OIHW, dense (in, out) -> (out, in)."""
  if path[-1] == "kernel":
    return value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
  return value


def load_jax_params(model: nn.Module, params: Mapping[Any, Any]) -> None:
  """Copies a pure dict of our params (`nnx.to_pure_dict(nnx.state(m, nnx.Param))`)
  into `model`; every torch parameter must be set exactly once, with the same shape."""
  flat = _flatten(params)
  named = dict(model.named_parameters())
  missing = sorted(set(named) - {torch_name(p) for p in flat})
  extra = sorted({torch_name(p) for p in flat} - set(named))
  if missing or extra:
    raise ValueError(f"Param names differ: torch-only {missing[:8]}, jax-only {extra[:8]}.")
  with torch.no_grad():
    for path, value in flat.items():
      target = named[torch_name(path)]
      src = torch.tensor(np.ascontiguousarray(to_torch_layout(path, np.asarray(value))))
      if src.shape != target.shape:
        raise ValueError(f"{torch_name(path)}: jax {tuple(src.shape)} vs torch "
                         f"{tuple(target.shape)}.")
      target.copy_(src)
