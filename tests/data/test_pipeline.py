"""The grain pipeline: shapes, exact low-res and crop alignment, shuffling, sharding, resume.

Fake sources are lists of dicts whose images carry their record index in the red channel
(and seeded noise elsewhere), so every test can tell which record landed where.
"""

import json
import os

import ml_collections
import numpy as np
import pytest
from absl import flags

from imagen_jax.data import pipeline as pl


def fake_source(n=40, size=32, bytes_captions=False):
  records = []
  for i in range(n):
    img = np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img[..., 0] = i
    cap = f"caption {i} \u00e9"
    records.append({"image": img, "caption": cap.encode() if bytes_captions else cap,
                    "id": str(i)})
  return records


def indices(batch):
  # Record index from the red channel (constant per image, so any downsample keeps it).
  red = np.rint((batch["image"][..., 0] + 1) * 127.5).astype(int)
  assert (red == red[:, :1, :1]).all()
  return red[:, 0, 0]


def take(ds, k):
  it = iter(ds)
  return [next(it) for _ in range(k)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
      assert x[k].dtype == y[k].dtype


KW = dict(process_index=0, process_count=1)


# --------------------------------------------------------------------------------- helpers

def test_to_float_range():
  x = np.array([0, 127, 255], np.uint8)
  np.testing.assert_allclose(pl.to_float(x), [-1, 127 / 127.5 - 1, 1], rtol=0, atol=1e-7)
  assert pl.to_float(x).dtype == np.float32


@pytest.mark.parametrize("factor", [2, 4, 16, 32])
def test_downsample_is_box_mean(factor):
  x = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  want = x.reshape(64 // factor, factor, 64 // factor, factor, 3).astype(np.float64).mean((1, 3))
  got = pl.downsample(x, factor)
  assert got.dtype == np.float32 and got.shape == (64 // factor, 64 // factor, 3)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert pl.downsample(np.full((8, 8, 3), 255, np.uint8), 4).max() == 255  # no overflow
  with pytest.raises(ValueError, match="divide"):
    pl.downsample(x, 3)


def test_downsample_of_crop_is_crop_of_downsample():
  x = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  lo = pl.downsample(x, 4)
  for y, xx in [(0, 0), (8, 20), (32, 48)]:
    np.testing.assert_array_equal(pl.downsample(x[y:y + 16, xx:xx + 16], 4),
                                  lo[y // 4:y // 4 + 4, xx // 4:xx // 4 + 4])


def test_aligned_crop_lines_up():
  hi = np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  lo = pl.downsample(hi, 4)
  seen = set()
  for s in range(20):
    h, l = pl.aligned_crop(hi, lo, 16, 4, np.random.default_rng(s))
    assert h.shape == (16, 16, 3) and l.shape == (4, 4, 3)
    np.testing.assert_array_equal(l, pl.downsample(h, 4))
    y, x = pl.crop_position(np.random.default_rng(s), 64, 16, 4)
    assert y % 4 == 0 and x % 4 == 0 and 0 <= y <= 48 and 0 <= x <= 48
    np.testing.assert_array_equal(h, hi[y:y + 16, x:x + 16])
    seen.add((y, x))
  assert len(seen) > 10  # positions actually vary
  with pytest.raises(ValueError, match="multiple"):
    pl.aligned_crop(hi, lo, 18, 4, np.random.default_rng(0))


def test_resize_to_rounds_box_mean_and_handles_odd_ratios():
  x = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  r = pl.resize_to(x, 8)
  assert r.dtype == np.uint8
  np.testing.assert_array_equal(r, np.rint(pl.downsample(x, 4)).astype(np.uint8))
  odd = pl.resize_to(x, 24)  # 32 -> 24: PIL BOX
  assert odd.shape == (24, 24, 3) and odd.dtype == np.uint8
  assert abs(float(odd.mean()) - float(x.mean())) < 2


# ------------------------------------------------------------------------------ stage output

def test_base_shapes_dtypes_range():
  src = fake_source(size=16)
  (b,) = take(pl.base_pipeline(src, resolution=16, batch_size=8, seed=0, **KW), 1)
  assert set(b) == {"image", "caption", "index"}
  assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
  assert b["image"].min() >= -1 and b["image"].max() <= 1
  assert b["caption"].shape == (8,) and b["caption"].dtype.kind == "U"
  np.testing.assert_array_equal(indices(b), b["index"])
  for i, cap, img in zip(b["index"], b["caption"], b["image"]):
    assert cap == f"caption {i} \u00e9"
    np.testing.assert_array_equal(img, pl.to_float(src[i]["image"]))


def test_base_downsamples_a_larger_source():
  src = fake_source(size=32)
  (b,) = take(pl.base_pipeline(src, resolution=8, batch_size=4, seed=0, **KW), 1)
  assert b["image"].shape == (4, 8, 8, 3)
  for i, img in zip(b["index"], b["image"]):
    np.testing.assert_array_equal(img, pl.to_float(pl.resize_to(src[i]["image"], 8)))


def test_sr_whole_images_lowres_is_downsample():
  src = fake_source(size=32)
  (b,) = take(pl.sr_pipeline(src, low_resolution=8, resolution=32, batch_size=4, seed=0,
                             **KW), 1)
  assert b["image"].shape == (4, 32, 32, 3) and b["lowres"].shape == (4, 8, 8, 3)
  assert b["lowres"].dtype == np.float32 and np.abs(b["lowres"]).max() <= 1
  for i, hi, lo in zip(b["index"], b["image"], b["lowres"]):
    np.testing.assert_array_equal(hi, pl.to_float(src[i]["image"]))
    np.testing.assert_array_equal(lo, pl.to_float(pl.downsample(src[i]["image"], 4)))


def test_sr_crops_line_up_and_follow_example_rng():
  src = fake_source(n=16, size=32)
  ds = pl.sr_pipeline(src, low_resolution=8, resolution=32, crop=16, batch_size=4, seed=5,
                      num_epochs=2, **KW)
  batches = list(ds)
  assert len(batches) == 8
  crops = {}
  for step, b in enumerate(batches):
    assert b["image"].shape == (4, 16, 16, 3) and b["lowres"].shape == (4, 4, 4, 3)
    epoch = step // 4
    for i, hi, lo in zip(b["index"], b["image"], b["lowres"]):
      full = src[i]["image"]
      want_hi, want_lo = pl.aligned_crop(full, pl.downsample(full, 4), 16, 4,
                                         pl.example_rng(5, epoch, i))
      np.testing.assert_array_equal(hi, pl.to_float(want_hi))
      np.testing.assert_array_equal(lo, pl.to_float(want_lo))
      crops.setdefault(int(i), []).append(hi)
  # The crop is redrawn each epoch (equal crops for all 16 records would mean it is not).
  assert sum(not np.array_equal(*c) for c in crops.values()) > 8


def test_sr_source_larger_than_resolution():
  src = fake_source(n=8, size=64)
  (b,) = take(pl.sr_pipeline(src, low_resolution=8, resolution=32, batch_size=4, seed=0,
                             **KW), 1)
  for i, hi, lo in zip(b["index"], b["image"], b["lowres"]):
    ref = pl.resize_to(src[i]["image"], 32)
    np.testing.assert_array_equal(hi, pl.to_float(ref))
    np.testing.assert_array_equal(lo, pl.to_float(pl.downsample(ref, 4)))


def test_png_bytes_images_are_decoded():
  import io
  from PIL import Image
  src = fake_source(n=4, size=16)
  for r in src:
    buf = io.BytesIO()
    Image.fromarray(r["image"]).save(buf, "PNG")
    r["image"] = buf.getvalue()
  (b,) = take(pl.base_pipeline(src, resolution=16, batch_size=4, seed=0, **KW), 1)
  assert sorted(indices(b)) == [0, 1, 2, 3]


# ------------------------------------------------------------------- order and determinism

def test_same_seed_same_batches_other_seed_other_order():
  src = fake_source(size=8)
  mk = lambda seed: take(pl.base_pipeline(src, resolution=8, batch_size=8, seed=seed, **KW), 3)
  a, b, c = mk(1), mk(1), mk(2)
  assert_same(a, b)
  assert not np.array_equal(np.concatenate([x["index"] for x in a]),
                            np.concatenate([x["index"] for x in c]))


def test_epochs_cover_every_record_once_and_reshuffle():
  src = fake_source(n=40, size=8)
  ds = pl.base_pipeline(src, resolution=8, batch_size=8, seed=3, num_epochs=3, **KW)
  order = np.concatenate([indices(b) for b in ds])
  assert len(order) == 120
  epochs = order.reshape(3, 40)
  for e in epochs:
    assert sorted(e) == list(range(40))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(40))


def test_no_shuffle_and_partial_last_batch():
  src = fake_source(n=10, size=8)
  ds = pl.base_pipeline(src, resolution=8, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                        drop_remainder=False, **KW)
  batches = list(ds)
  assert [len(b["index"]) for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate([b["index"] for b in batches]), np.arange(10))
  dropped = pl.base_pipeline(src, resolution=8, batch_size=4, seed=0, num_epochs=1, **KW)
  assert len(list(dropped)) == 2


@pytest.mark.parametrize("n", [40, 41])
def test_two_processes_get_disjoint_equal_shards(n):
  src = fake_source(n=n, size=8)
  shards = []
  for p in range(2):
    ds = pl.base_pipeline(src, resolution=8, batch_size=8, seed=7, num_epochs=1,
                          process_index=p, process_count=2)
    batches = list(ds)
    assert len(batches) == pl.steps_per_epoch(n, 8, 2) == 5
    assert all(b["image"].shape[0] == 4 for b in batches)
    shards.append(np.concatenate([indices(b) for b in batches]))
  assert not set(shards[0]) & set(shards[1])
  union = set(shards[0]) | set(shards[1])
  assert len(union) == 40 and union <= set(range(n))  # n=41: one record left out this epoch


# ------------------------------------------------------------------------------ checkpoint

class RecordingText:
  """An in-memory `text` source; remembers the process and the captions it was called with."""

  def __init__(self):
    self.calls = []

  def encode(self, captions):
    self.calls.append((os.getpid(), list(captions)))
    emb = np.zeros((len(captions), 6, 4), np.float32)
    mask = np.zeros((len(captions), 6), bool)
    for i, c in enumerate(captions):
      n = min(len(c.split()), 6)
      emb[i, :n] = len(c)
      mask[i, :n] = True
    return emb, mask


@pytest.mark.parametrize("workers", [0, 2])
def test_restored_iterator_replays_the_same_batches(workers):
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  src = fake_source(n=24, size=32, bytes_captions=True)
  text = RecordingText()
  mk = lambda: pl.sr_pipeline(src, low_resolution=8, resolution=32, crop=16, batch_size=4,
                              seed=11, worker_count=workers, text=text, **KW)
  it = iter(mk())
  k, m = 7, 6  # crosses the epoch boundary at step 6
  for _ in range(k):
    next(it)
  state = it.get_state()
  state = json.loads(json.dumps(state))  # what a checkpoint stores
  want = [next(it) for _ in range(m)]
  if workers:
    it.close()
  it2 = iter(mk())
  it2.set_state(state)
  got = [next(it2) for _ in range(m)]
  if workers:
    it2.close()
  assert_same(want, got)
  assert all(pid == os.getpid() for pid, _ in text.calls)  # text joined in the main process
  assert set(want[0]) == {"image", "lowres", "caption", "index", "text", "text_mask"}


def test_worker_count_does_not_change_batches():
  flags.FLAGS.mark_as_parsed()
  # Batches are formed before the work is split over processes, and crops are keyed by
  # (seed, epoch, record), so the worker count changes nothing, across epochs too.
  src = fake_source(n=12, size=32)
  mk = lambda w: pl.sr_pipeline(src, low_resolution=8, resolution=32, crop=16, batch_size=4,
                                seed=2, num_epochs=2, worker_count=w, **KW)
  want = list(mk(0))
  assert len(want) == 6
  assert_same(want, list(mk(2)))


# -------------------------------------------------------------------------------- text join

def test_text_join_decodes_bytes_captions():
  src = fake_source(n=8, size=8, bytes_captions=True)
  text = RecordingText()
  (b,) = take(pl.base_pipeline(src, resolution=8, batch_size=4, seed=0, text=text, **KW), 1)
  assert b["caption"].dtype.kind == "U"
  assert text.calls[0][1] == [f"caption {i} \u00e9" for i in b["index"]]
  assert b["text"].shape == (4, 6, 4) and b["text"].dtype == np.float32
  assert b["text_mask"].shape == (4, 6) and b["text_mask"].dtype == bool
  np.testing.assert_array_equal(b["text_mask"].sum(1), 3)
  np.testing.assert_array_equal(b["text"][:, 0, 0], [len(c) for c in b["caption"]])


def test_text_join_with_embedding_cache_interface():
  class Bad:
    def encode(self, captions):
      return np.zeros((len(captions), 4)), np.zeros((len(captions), 4), bool)
  src = fake_source(n=4, size=8)
  with pytest.raises(pl.PipelineError, match=r"expected \[B,L,D\]"):
    take(pl.base_pipeline(src, resolution=8, batch_size=4, seed=0, text=Bad(), **KW), 1)


# ----------------------------------------------------------------------------------- config

def test_make_pipeline_reads_config_keys():
  src = fake_source(n=8, size=32)
  cfg = ml_collections.ConfigDict(dict(low_resolution=8, resolution=32, crop=16))
  (b,) = take(pl.make_pipeline(cfg, src, stage="sr", batch_size=4, seed=0, **KW), 1)
  assert b["image"].shape == (4, 16, 16, 3) and b["lowres"].shape == (4, 4, 4, 3)
  (b,) = take(pl.make_pipeline({"resolution": 16}, src, stage="base", batch_size=4, seed=0,
                               **KW), 1)
  assert b["image"].shape == (4, 16, 16, 3)
  with pytest.raises(pl.PipelineError, match="stage"):
    pl.make_pipeline(cfg, src, stage="sr2", batch_size=4, seed=0)
  with pytest.raises(pl.PipelineError, match="low_resolution"):
    pl.make_pipeline({"resolution": 32}, src, stage="sr", batch_size=4, seed=0, **KW)


# ----------------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, match", [
    (dict(resolution=64), "smaller than resolution=64"),
    (dict(low_resolution=8, resolution=32, crop=18), "multiple of the SR factor 4"),
    (dict(low_resolution=8, resolution=32, crop=64), "at most resolution=32"),
    (dict(low_resolution=12, resolution=32), "divide resolution=32"),
    (dict(resolution=32, batch_size=6, process_count=4, process_index=0),
     "not divisible by the 4 processes"),
    (dict(resolution=32, process_index=2, process_count=2), "outside"),
    (dict(resolution=32, seed=-1), "seed"),
    (dict(resolution=32, num_epochs=1, batch_size=64), "fill no batch"),
])
def test_invalid_configurations_are_named(kwargs, match):
  args = dict(batch_size=4, seed=0, process_index=0, process_count=1)
  args.update(kwargs)
  build = pl.sr_pipeline if "low_resolution" in args else pl.base_pipeline
  with pytest.raises(pl.PipelineError, match=match):
    build(fake_source(n=8, size=32), **args)


def test_empty_source_and_bad_records():
  with pytest.raises(pl.PipelineError, match="empty"):
    pl.base_pipeline([], resolution=8, batch_size=4, seed=0, **KW)
  with pytest.raises(pl.PipelineError, match="square RGB"):
    pl.base_pipeline([{"image": np.zeros((8, 8, 4), np.uint8), "caption": "x"}],
                     resolution=8, batch_size=1, seed=0, **KW)
  # A later record smaller than the first fails when it is read, naming the record.
  src = fake_source(n=4, size=16) + [{"image": np.zeros((8, 8, 3), np.uint8), "caption": "s"}]
  ds = pl.base_pipeline(src, resolution=16, batch_size=5, seed=0, shuffle=False, **KW)
  with pytest.raises(pl.PipelineError, match="Record 4: image is 8px"):
    take(ds, 1)
