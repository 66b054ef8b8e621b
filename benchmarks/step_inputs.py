"""What the train-step benchmarks share: a config by FILE.py:VARIANT at a batch size, and
a synthetic batch of its shapes (the shapes a real batch has; random images and text
embeddings, as from the embedding cache). One seeded draw, so every benchmark times the
same batch."""

from __future__ import annotations

import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, batch: int):
  """configs/FILE.py:VARIANT with train.batch_size = batch."""
  from imagen_jax import config_files  # pylint: disable=g-import-not-at-top
  path, variant = spec.split(":")
  c = config_files.load(os.path.join(REPO, "configs", path), variant)
  c.train.batch_size = batch
  return c


def synthetic_batch(c, batch: int, rng: np.random.Generator | None = None) -> dict:
  """A host batch of config `c`'s training shapes (SR stages: their crop and low-res)."""
  rng = rng or np.random.default_rng(0)
  size = (c.data.crop or c.data.resolution) if c.kind == "sr" else c.data.resolution
  b = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
       "text": rng.standard_normal((batch, c.data.max_text_len, c.model.text_dim), np.float32),
       "text_mask": np.ones((batch, c.data.max_text_len), bool)}
  if c.kind == "sr":
    low = size * c.data.low_resolution // c.data.resolution
    b["lowres"] = rng.uniform(-1, 1, (batch, low, low, 3)).astype(np.float32)
  return b
