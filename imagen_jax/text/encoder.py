"""`TextEncoder`: a tokenizer and a frozen network behind one `encode(texts)` call.

The network (T5 or BERT) is split into graph and state once and applied through one
`jax.jit`; captions go through in batches of `batch_size` rows, and a call with fewer
captions (the last batch, or a training batch of 8 captions) is padded with empty rows only
up to the next power of two, so at most log2(batch_size) batch shapes get compiled and a
training run, whose calls all have its batch size, compiles one. (Padding every call to
`batch_size` made encoding 8 captions cost as much as 64: 0.4-0.6 s per training step of
MiniLM on a 2-core CPU, benchmarks/results/train_loop.md.) With a mesh, the weights are
placed by their logical axis names (FSDP for T5-XXL) and each batch is split over the
mesh's data axes.

Outputs are zero at padding positions: the U-Net masks them anyway, and zeros make the
embedding cache and equality tests independent of what a model computes for pads.

Each batch runs at the shortest power-of-two length (>= 8) that holds its longest caption,
not at max_len: real tokens never attend to padding, so their embeddings are the same
(tests/text/test_encoder.py checks it), and short captions cost a fraction of the time.
At most log2(max_len) lengths get compiled.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax import sharding
from imagen_jax.text.tokenize import Tokenizer, Tokens


def bucket_length(mask: np.ndarray, max_len: int, minimum: int = 8) -> int:
  """The power of two (>= minimum, capped at max_len) reaching past the last position
  where any row of `mask` [B, L] has a real token."""
  last = np.where(mask.any(0))[0]
  need = int(last[-1]) + 1 if len(last) else 1
  length = max(minimum, 1 << (need - 1).bit_length())
  return min(length, max_len)


class TextEncoder:
  """encode(list[str]) -> (embeddings [B, max_len, dim] float32, mask [B, max_len] bool)."""

  def __init__(self, spec: str, tokenizer: Tokenizer, model: nnx.Module, *, max_len: int,
               dim: int, dtype: str = "float32", batch_size: int = 64,
               mesh: jax.sharding.Mesh | None = None,
               rules: Sequence[tuple[str, str | None]] = sharding.DEFAULT_RULES):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1.")
    self.spec, self.tokenizer, self.max_len, self.dim = spec, tokenizer, int(max_len), int(dim)
    self.dtype, self.mesh = dtype, mesh
    graphdef, state = nnx.split(model)
    if mesh is not None:
      # Batches must split evenly over the batch axes.
      per = sharding.batch_split(mesh)
      batch_size = -(-batch_size // per) * per
      state = sharding.shard_state(state, mesh, rules)
      self._batch_sharding = sharding.batch_sharding(mesh)
    else:
      self._batch_sharding = None
    self.batch_size = batch_size
    self._rows_multiple = sharding.batch_split(mesh) if mesh is not None else 1
    self._state = state

    def apply(state, ids, mask):
      emb = nnx.merge(graphdef, state)(ids, mask)
      return jnp.where(mask[..., None], emb.astype(jnp.float32), 0.0)
    self._apply = jax.jit(apply)

  def describe(self) -> dict[str, Any]:
    """What determines the embeddings; the cache stores it and refuses a different one."""
    return {"spec": self.spec, "max_len": self.max_len, "dim": self.dim, "dtype": self.dtype,
            "tokenizer": type(self.tokenizer).__name__}

  def tokenize(self, texts: Sequence[str]) -> Tokens:
    return self.tokenizer(texts, self.max_len)

  def padded_rows(self, n: int) -> int:
    """Rows of the batch that encodes n (<= batch_size) captions: the power of two >= n,
    a multiple of the mesh's batch split, at most batch_size."""
    rows = 1 << (max(n, 1) - 1).bit_length()
    rows = -(-rows // self._rows_multiple) * self._rows_multiple
    return min(rows, self.batch_size)

  def encode_tokens(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Embeddings [B, L, dim] float32 of already tokenized ids [B, L] and mask [B, L]."""
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    out = np.zeros(ids.shape + (self.dim,), np.float32)
    bs = self.batch_size
    for start in range(0, len(ids), bs):
      n = min(bs, len(ids) - start)
      length = bucket_length(mask[start:start + n], ids.shape[1])
      rows = self.padded_rows(n)
      b_ids = np.zeros((rows, length), np.int32)
      b_mask = np.zeros((rows, length), bool)
      b_ids[:n], b_mask[:n] = ids[start:start + n, :length], mask[start:start + n, :length]
      if self._batch_sharding is not None:
        b_ids = jax.device_put(b_ids, self._batch_sharding)
        b_mask = jax.device_put(b_mask, self._batch_sharding)
      out[start:start + n, :length] = np.asarray(self._apply(self._state, b_ids, b_mask))[:n]
    return out

  def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize and encode captions: (embeddings [B, max_len, dim] float32, mask [B, max_len])."""
    tokens = self.tokenize(texts)
    return self.encode_tokens(tokens.ids, tokens.mask), tokens.mask
