"""Training logs: grid layout and value mapping, MFU, exact per-bucket averaging with one
device transfer, metrics.jsonl (strict JSON, resume purge/append), TensorBoard events read
back, sample PNGs, captions and the loss plot."""

from __future__ import annotations

import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from imagen_jax import images as images_lib
from imagen_jax.train import logging as log_lib
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import plots


def read_events(tb_dir: str) -> list:
  """Every Event in the TFRecord files under tb_dir (tensorboardX's own protos)."""
  from tensorboardX.proto import event_pb2

  events = []
  for name in sorted(os.listdir(tb_dir)):
    with open(os.path.join(tb_dir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
      pos += 12 + length + 4  # length, its crc, payload, payload crc
  return events


def scalar_events(tb_dir: str) -> dict[str, list[tuple[int, float]]]:
  out: dict[str, list[tuple[int, float]]] = {}
  for e in read_events(tb_dir):
    for v in e.summary.value:
      if v.HasField("simple_value"):
        out.setdefault(v.tag, []).append((e.step, v.simple_value))
  return out


# --- pure helpers ----------------------------------------------------------------------


def test_image_grid_layout_and_values():
  imgs = np.zeros((3, 2, 2, 3), np.float32)
  imgs[0] = -1.0
  imgs[1] = 1.0
  imgs[2] = 0.0
  g = images_lib.image_grid(imgs, ncols=2, pad=1, pad_value=7)
  assert g.dtype == np.uint8 and g.shape == (1 + 2 * 3, 1 + 2 * 3, 3)
  np.testing.assert_array_equal(g[1:3, 1:3], 0)      # -1 -> 0
  np.testing.assert_array_equal(g[1:3, 4:6], 255)    # +1 -> 255
  np.testing.assert_array_equal(g[4:6, 1:3], 128)    # 0 -> 127.5 rounded
  np.testing.assert_array_equal(g[4:6, 4:6], 7)      # the empty fourth cell is padding
  assert (g[0] == 7).all() and (g[:, 0] == 7).all() and (g[3] == 7).all()


def test_image_grid_uint8_default_columns_clip_and_upscale():
  u = np.arange(5 * 3 * 3 * 3, dtype=np.uint8).reshape(5, 3, 3, 3)
  g = images_lib.image_grid(u, pad=0)                   # ncols = ceil(sqrt(5)) = 3
  assert g.shape == (2 * 3, 3 * 3, 3)
  np.testing.assert_array_equal(g[3:6, 0:3], u[3])   # row-major: the 4th image starts row 2
  big = images_lib.image_grid(np.full((1, 2, 2, 1), 5.0), pad=0, upscale=3)
  assert big.shape == (6, 6, 3) and (big == 255).all()  # out of range clipped; gray -> RGB
  with pytest.raises(ValueError, match="image_grid"):
    images_lib.image_grid(np.zeros((2, 4, 4)))


def test_mfu_arithmetic():
  # 2 TFLOP per step in 0.5 s is 4 TFLOP/s; against 8 devices x 1 TFLOP/s: 50%.
  assert metrics_lib.mfu(2e12, 0.5, 8 * 1e12) == pytest.approx(0.5)


def test_caption_strip_adds_a_legend():
  grid = images_lib.image_grid(np.zeros((4, 8, 8, 3)), pad=1)
  out = images_lib.caption_strip(grid, ["grinning face, twemoji style", "red apple"])
  assert out.dtype == np.uint8 and out.shape[0] > grid.shape[0]
  assert out.shape[1] > grid.shape[1]                # widened for the long caption
  np.testing.assert_array_equal(out[:grid.shape[0], :grid.shape[1]], grid)
  assert (out[grid.shape[0]:] < 128).any()           # some text was drawn


# --- accumulator -----------------------------------------------------------------------


def _step(loss, sums, counts, *, grad_norm=1.0, lr=1e-3, skipped=0, bad=0):
  return {"loss": jnp.float32(loss), "grad_norm": jnp.float32(grad_norm),
          "lr": jnp.float32(lr), "skipped": jnp.int32(skipped), "bad_steps": jnp.int32(bad),
          "loss_sum_per_bucket": jnp.asarray(sums, jnp.float32),
          "count_per_bucket": jnp.asarray(counts, jnp.int32)}


def test_accumulator_exact_bucket_means_one_transfer(monkeypatch):
  acc = metrics_lib.MetricAccumulator(peak_flops=4e12, images_per_step=8, flops_per_step=1e12,
                                  bucket_edges=[-20, -5, 0, 5, 20])
  acc.add(_step(0.5, [2.0, 0.0, 3.0, 0.0], [1, 0, 3, 0], grad_norm=1.0, lr=1e-3))
  acc.add(_step(0.7, [4.0, 0.0, 1.0, 0.0], [3, 0, 1, 0], grad_norm=3.0, lr=2e-3))
  # A skipped step (non-finite loss): left out of every mean, counted in `skipped`.
  acc.add(_step(math.nan, [1e9, 1e9, 0.0, 0.0], [1, 1, 0, 0], grad_norm=math.inf,
                lr=3e-3, skipped=1, bad=1))
  calls = []
  real_get = jax.device_get
  monkeypatch.setattr(metrics_lib.jax, "device_get", lambda x: calls.append(1) or real_get(x))
  r = acc.result(seconds=3.0)
  assert len(calls) == 1
  assert r["loss"] == pytest.approx(0.6)
  assert r["loss/bucket_-20_-5"] == pytest.approx(6.0 / 4)
  assert r["loss/bucket_0_5"] == pytest.approx(4.0 / 4)
  assert "loss/bucket_-5_0" not in r and "loss/bucket_5_20" not in r  # empty: omitted
  assert r["grad_norm"] == pytest.approx(2.0)
  assert r["lr"] == pytest.approx(3e-3)              # the last step's
  assert r["skipped"] == 1 and r["bad_steps"] == 1
  assert r["seconds_per_step"] == pytest.approx(1.0)
  assert r["images_per_s"] == pytest.approx(8.0)
  assert r["flops_per_s"] == pytest.approx(1e12)
  assert r["mfu"] == pytest.approx(0.25)
  assert len(acc) == 0                               # starts over
  r2 = acc.result(seconds=1.0)
  assert r2 == {}


def test_accumulator_edges_from_metrics_or_index():
  acc = metrics_lib.MetricAccumulator()
  m = _step(1.0, [2.0, 6.0], [1, 2])
  acc.add({**m, "bucket_edges": jnp.array([-10.0, 0.0, 10.0])})
  r = acc.result(seconds=1.0)
  assert r["loss/bucket_-10_0"] == 2.0 and r["loss/bucket_0_10"] == 3.0
  assert "mfu" not in r and "images_per_s" not in r  # no peak / batch size given
  acc.add(m)
  assert set(k for k in acc.result() if "bucket" in k) == {"loss/bucket_0", "loss/bucket_1"}


# --- logger ----------------------------------------------------------------------------


def test_jsonl_strict_nonfinite_and_resume(tmp_path):
  wd = str(tmp_path)
  with log_lib.MetricLogger(wd, total_steps=30, progress=False) as lg:
    lg.scalars(10, {"loss": 1.5, "skipped": 0})
    lg.scalars(20, {"loss": float("nan"), "grad_norm": float("inf"), "skipped": 2})
    lg.scalars(30, {"loss": 0.9})
  path = os.path.join(wd, "metrics.jsonl")
  lines = open(path).read().splitlines()
  recs = [json.loads(line) for line in lines]        # strict: no bare NaN tokens
  assert "NaN" not in lines[1].replace('"NaN"', "")
  assert recs[1]["loss"] == "NaN" and recs[1]["grad_norm"] == "Infinity"
  assert recs[0]["skipped"] == 0 and isinstance(recs[0]["skipped"], int)
  # Resume from a checkpoint at step 20: the interrupted run's step 30 is dropped, and
  # the new instance appends to the same file.
  with log_lib.MetricLogger(wd, total_steps=40, initial=20, progress=False) as lg:
    lg.scalars(30, {"loss": 0.8})
    lg.scalars(40, {"loss": 0.7})
  recs = [json.loads(line) for line in open(path)]
  assert [r["step"] for r in recs] == [10, 20, 30, 40]
  assert recs[2]["loss"] == 0.8
  back = log_lib.read_metrics(path)
  assert math.isnan(back[1]["loss"]) and back[1]["grad_norm"] == math.inf


def test_tensorboard_events_image_png_and_text(tmp_path, capsys):
  wd = str(tmp_path)
  lg = log_lib.MetricLogger(wd, total_steps=10, initial=0)
  lg.scalars(5, {"loss": 0.25, "loss/bucket_-5_0": 0.5, "mfu": 0.1})
  grid = images_lib.image_grid(np.zeros((4, 4, 4, 3)), pad=1)
  png = lg.image(5, "ema_samples", grid)
  lg.text(5, "prompts", "a cat")
  lg.close()
  err = capsys.readouterr()
  assert "step 5 | loss 0.25" in err.out + err.err and "mfu 10.00%" in err.out + err.err
  assert png == os.path.join(wd, "samples", "ema_samples_0000005.png")
  np.testing.assert_array_equal(np.asarray(Image.open(png)), grid)
  tb = os.path.join(wd, "tensorboard")
  s = scalar_events(tb)
  assert s["loss"] == [(5, 0.25)] and s["loss/bucket_-5_0"] == [(5, 0.5)]
  tags = {v.tag for e in read_events(tb) for v in e.summary.value}
  assert "ema_samples" in tags and any("prompts" in t for t in tags)


def test_non_main_process_writes_nothing(tmp_path):
  wd = str(tmp_path / "w")
  lg = log_lib.MetricLogger(wd, is_main=False, total_steps=10)
  lg.scalars(1, {"loss": 1.0})
  assert lg.image(1, "x", np.zeros((2, 2, 3), np.uint8)) is None
  lg.close()
  assert not os.path.exists(wd)


def test_plot_metrics_writes_png(tmp_path):
  wd = str(tmp_path)
  with log_lib.MetricLogger(wd, progress=False, console=False) as lg:
    for step in range(5, 55, 5):
      lg.scalars(step, {"loss": 1.0 / step, "grad_norm": 2.0,
                        "loss/bucket_-20_0": 2.0 / step, "loss/bucket_0_20": 0.5 / step})
    lg.scalars(55, {"loss": float("nan")})          # non-finite points are skipped
  out = plots.plot_metrics(os.path.join(wd, "metrics.jsonl"), str(tmp_path / "loss.png"))
  assert out == str(tmp_path / "loss.png")
  im = Image.open(out)
  assert im.format == "PNG" and im.size[0] > 600
  assert plots.plot_metrics(str(tmp_path / "missing.jsonl"), str(tmp_path / "x.png")) is None
