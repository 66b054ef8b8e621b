"""Image helpers shared by sampling, evaluation and the training log: float or uint8
images to uint8, tiling them into one grid, and a caption strip under a grid.

Pure numpy + PIL, no JAX: inference (imagen_jax/cascade.py), the eval jobs and the
trainer's sample grids all use these, and none of them imports the others for it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np


def to_uint8(images: Any) -> np.ndarray:
  """uint8 images from uint8 ones, or from floats in [-1, 1] (clipped, rounded)."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  x = (np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
  return np.round(x).astype(np.uint8)


def image_grid(images: Any, ncols: int | None = None, pad: int = 2, pad_value: int = 0,
               upscale: int = 1) -> np.ndarray:
  """Tiles [N, H, W, C] images (float in [-1, 1] or uint8; C = 1 or 3) into one uint8
  [H', W', 3] image, row-major, `pad` pixels of `pad_value` around and between tiles.

  ncols defaults to ceil(sqrt(N)); upscale repeats pixels (nearest) so that 16x16
  samples are visible in TensorBoard.
  """
  x = to_uint8(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"image_grid wants [N, H, W, 1 or 3] images, got shape {x.shape}.")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if upscale > 1:
    x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, _ = x.shape
  ncols = max(1, min(n, ncols or math.ceil(math.sqrt(n))))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), 3), pad_value, np.uint8)
  for i in range(n):
    r, c = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def caption_strip(grid: np.ndarray, captions: Sequence[str], *, font_size: int = 11,
                  background: int = 255) -> np.ndarray:
  """The grid with a legend below it, one line per caption numbered in the grid's
  row-major order ("1: ...", "2: ..."); the canvas widens to fit the longest line.

  A legend rather than per-tile labels: at 16-64 px a tile holds too few characters.
  """
  from PIL import Image, ImageDraw, ImageFont

  try:
    font = ImageFont.load_default(size=font_size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    font = ImageFont.load_default()
  lines = [f"{i + 1}: {c}" for i, c in enumerate(captions)]
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  boxes = [probe.textbbox((0, 0), s, font=font) for s in lines] or [(0, 0, 0, 0)]
  line_h = max(b[3] - b[1] for b in boxes) + 3
  text_w = max(b[2] for b in boxes) + 8
  h, w = grid.shape[:2]
  canvas = Image.new("RGB", (max(w, text_w), h + line_h * len(lines) + 6), (background,) * 3)
  canvas.paste(Image.fromarray(np.asarray(grid, np.uint8)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  ink = (0, 0, 0) if background > 127 else (255, 255, 255)
  for i, s in enumerate(lines):
    draw.text((4, h + 3 + i * line_h), s, fill=ink, font=font)
  return np.asarray(canvas)
