"""Embedding cache: exact round trip, unpadded storage, incremental parts, refusals."""

import json
import os

import numpy as np
import pytest

from imagen_jax import text
from imagen_jax.text import cache

CAPTIONS = [f"caption number {i} " + "word " * (i % 5) for i in range(23)] + ["", "ünïcode 😀"]


@pytest.fixture(scope="module")
def tiny():
  return text.load_text_encoder("random-t5:tiny", max_len=24, batch_size=8)


def test_round_trip_is_exact_in_float32(tiny, tmp_path):
  summary = cache.write(tmp_path / "c", tiny, CAPTIONS, rows_per_shard=100, progress=False)
  assert summary["added"] == len(CAPTIONS) and summary["total"] == len(CAPTIONS)
  c = cache.EmbeddingCache.open(tmp_path / "c", tiny)
  # Encoded in the same batches as write() used, so bit for bit the same computation.
  want, want_mask = tiny.encode(CAPTIONS)
  emb, mask = c.lookup(CAPTIONS[::-1])
  np.testing.assert_array_equal(mask, want_mask[::-1])
  np.testing.assert_array_equal(emb, want[::-1])
  # Only real tokens are stored, over several shards (rows_per_shard=100).
  meta = json.loads((tmp_path / "c" / "meta.json").read_text())
  assert meta["parts"][0]["tokens"] == int(want_mask.sum()) < want_mask.size
  assert meta["parts"][0]["num_shards"] > 1


def test_float16_storage_is_close(tiny, tmp_path):
  cache.write(tmp_path / "c", tiny, CAPTIONS, dtype="float16", progress=False)
  emb, mask = cache.EmbeddingCache.open(tmp_path / "c").lookup(CAPTIONS)
  want, _ = tiny.encode(CAPTIONS)
  # float16 rounds to 11 significant bits: relative error <= 2^-11 per value.
  np.testing.assert_allclose(emb, want, rtol=2 ** -11, atol=1e-7)


def test_rerun_adds_only_missing_captions(tiny, tmp_path):
  path = tmp_path / "c"
  cache.write(path, tiny, CAPTIONS[:10], progress=False)
  again = cache.write(path, tiny, CAPTIONS[:10], progress=False)
  assert again["added"] == 0 and again["already_cached"] == 10
  more = cache.write(path, tiny, CAPTIONS, progress=False)
  assert more["added"] == len(CAPTIONS) - 10 and more["total"] == len(CAPTIONS)
  assert sorted(p.name for p in path.iterdir() if p.is_dir()) == ["part-00000", "part-00001"]
  emb, _ = cache.EmbeddingCache.open(path).lookup(CAPTIONS)
  # Other batch compositions than write() used: equal up to float32 rounding.
  np.testing.assert_allclose(emb, tiny.encode(CAPTIONS)[0], atol=1e-5)


def test_refuses_another_encoder(tiny, tmp_path):
  cache.write(tmp_path / "c", tiny, CAPTIONS[:3], progress=False)
  other_len = text.load_text_encoder("random-t5:tiny", max_len=16)
  with pytest.raises(cache.CacheError, match="max_len: cache 24 vs wanted 16"):
    cache.EmbeddingCache.open(tmp_path / "c", other_len)
  with pytest.raises(cache.CacheError, match="another text encoder"):
    cache.write(tmp_path / "c", other_len, CAPTIONS, progress=False)
  with pytest.raises(cache.CacheError, match="spec"):
    cache.EmbeddingCache.open(tmp_path / "c", expect={"spec": "minilm"})
  # Same spec and length, different weights (another seed): caught by the probe captions.
  reseeded = text.load_text_encoder("random-t5:tiny", max_len=24, seed=1)
  with pytest.raises(cache.CacheError, match="different weights"):
    cache.EmbeddingCache.open(tmp_path / "c", reseeded)


def test_interrupted_write_leaves_cache_intact(tiny, tmp_path, monkeypatch):
  path = tmp_path / "c"
  cache.write(path, tiny, CAPTIONS[:5], progress=False)
  before = sorted(str(p.relative_to(path)) for p in path.rglob("*"))

  calls = {"n": 0}
  real = tiny.encode

  def failing(texts):
    calls["n"] += 1
    if calls["n"] > 1:
      raise KeyboardInterrupt
    return real(texts)
  monkeypatch.setattr(tiny, "encode", failing)
  with pytest.raises(KeyboardInterrupt):
    cache.write(path, tiny, CAPTIONS, progress=False, batch_size=4)
  monkeypatch.undo()
  assert sorted(str(p.relative_to(path)) for p in path.rglob("*")) == before
  assert len(cache.EmbeddingCache.open(path, tiny)) == 5


def test_missing_caption_and_missing_cache_errors(tiny, tmp_path):
  cache.write(tmp_path / "c", tiny, CAPTIONS[:2], progress=False)
  with pytest.raises(cache.CacheError, match="rerun --mode=precompute"):
    cache.EmbeddingCache.open(tmp_path / "c").lookup(["never encoded"])
  with pytest.raises(cache.CacheError, match="No embedding cache"):
    cache.EmbeddingCache.open(tmp_path / "nothing")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "results.txt").write_text("keep me")
  with pytest.raises(cache.CacheError, match="not empty"):
    cache.write(tmp_path / "busy", tiny, CAPTIONS[:2], progress=False)
  assert (tmp_path / "busy" / "results.txt").read_text() == "keep me"
