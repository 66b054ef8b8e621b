r"""Input pipeline throughput per cascade stage (examples/s after warm-up) on this CPU.

  python benchmarks/data.py                                  # synthetic PNG source
  python benchmarks/data.py --tfds emoji_cascade/64px --data_dir ~/tensorflow_datasets

Stages: base 64 (from a 64px source), SR 64->256 on whole images (256px source), SR
256->1024 on 256x256 crops (1024px source), each with worker_count 0 and 2. The default
source is synthetic: emoji-like images (flat shapes on white) stored as PNG bytes and
decoded per example, as a TFDS `data_source` decodes its Image feature, so no dataset needs
building. With --tfds the one dataset is read with `tfds.data_source` and the stages its
images are large enough for are run. Timing starts after warm-up batches (worker start-up
excluded) and covers iteration only: no text join, no device transfer. Writes
benchmarks/results/data.{md,csv} and prints the table.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

from imagen_jax.data import pipeline as pl

import machine

_TFDS = flags.DEFINE_string("tfds", None, "NAME/CONFIG (or NAME:CONFIG) of a built TFDS "
                            "dataset to read instead of the synthetic source.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir for --tfds.")
_SPLIT = flags.DEFINE_string("split", "train", "split for --tfds.")
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "worker_count values to time.")
_SECONDS = flags.DEFINE_float("seconds", 8.0, "minimum timed seconds per row.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"), "output directory.")

# (stage name, source px, pipeline kwargs, global batch). Batches are small enough for this
# machine and large enough that per-batch overhead does not dominate.
STAGES = (
    ("base 64", 64, dict(resolution=64), 64),
    ("SR 64->256", 256, dict(low_resolution=64, resolution=256), 32),
    ("SR 256->1024, 256 crops", 1024, dict(low_resolution=256, resolution=1024, crop=256), 16),
)
WARMUP_BATCHES = 3


def emoji_like(size: int, rng: np.random.Generator) -> np.ndarray:
  """A white square with a few flat-coloured discs and boxes, like a rendered emoji."""
  img = np.full((size, size, 3), 255, np.uint8)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for _ in range(rng.integers(3, 7)):
    color = rng.integers(0, 256, 3, dtype=np.uint8)
    cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.35)
    if rng.random() < 0.5:
      inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    else:
      inside = (abs(yy - cy) < r) & (abs(xx - cx) < r * 0.6)
    img[inside] = color
  return img


class PngSource:
  """Random access over `unique` PNG-encoded images repeated to length n; decodes on read."""

  def __init__(self, size: int, n: int = 100_000, unique: int = 32, seed: int = 0):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng(seed)
    self.n, self.pngs = n, []
    for _ in range(unique):
      buf = io.BytesIO()
      Image.fromarray(emoji_like(size, rng)).save(buf, "PNG")
      self.pngs.append(buf.getvalue())

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict:
    from PIL import Image  # pylint: disable=g-import-not-at-top
    png = self.pngs[i % len(self.pngs)]
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    return {"image": image, "caption": f"emoji number {i}".encode(), "id": str(i)}


def tfds_source():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:  # registers our builders, so tfds finds their code (not needed for prepared data)
    import imagen_jax.data.builders  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  name = _TFDS.value.replace(":", "/")
  return tfds.data_source(name, split=_SPLIT.value, data_dir=_DATA_DIR.value), name


def time_stage(source, kwargs: dict, batch: int, workers: int) -> dict:
  build = pl.sr_pipeline if "low_resolution" in kwargs else pl.base_pipeline
  ds = build(source, batch_size=batch, seed=0, worker_count=workers, process_index=0,
             process_count=1, **kwargs)
  it = iter(ds)
  start = time.perf_counter()
  for _ in range(WARMUP_BATCHES):
    next(it)
  warmup = time.perf_counter() - start
  n, start = 0, time.perf_counter()
  while True:
    next(it)
    n += 1
    sec = time.perf_counter() - start
    if sec >= _SECONDS.value and n >= 5:
      break
  if workers:
    it.close()
  return {"examples_per_s": n * batch / sec, "ms_per_batch": 1000 * sec / n,
          "batches": n, "warmup_s": warmup}


def write(rows: list[dict], source_desc: str, load: tuple[float, ...]) -> None:
  os.makedirs(_OUT.value, exist_ok=True)
  command = "python benchmarks/data.py " + " ".join(sys.argv[1:])
  lines = ["# Input pipeline throughput", "",
           machine.provenance(command.strip(), load[0]) + f" Source: {source_desc}.",
           "Examples/s of the iterator after warm-up (worker start-up excluded), no text join, "
           "no device transfer.", "",
           "| stage | source px | image | lowres | batch | workers | examples/s | ms/batch | "
           "warm-up s |",
           "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['stage']} | {r['source_px']} | {r['image']} | {r['lowres']} | {r['batch']} | "
            f"{r['workers']} | {r['examples_per_s']:.0f} | {r['ms_per_batch']:.0f} | "
            f"{r['warmup_s']:.1f} |" for r in rows]
  with open(os.path.join(_OUT.value, "data.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(_OUT.value, "data.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, ["stage", "source_px", "image", "lowres", "batch", "workers",
                           "examples_per_s", "ms_per_batch", "batches", "warmup_s"])
    w.writeheader()
    for r in rows:
      w.writerow({k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()})
  print("\n".join(lines))


def main(argv) -> None:
  del argv
  tfds_src, source_desc = None, "synthetic emoji-like PNGs decoded per example (Pillow)"
  if _TFDS.value:
    tfds_src, name = tfds_source()
    size = pl._first_image_size(tfds_src)  # pylint: disable=protected-access
    source_desc = f"tfds.data_source({name!r}, split={_SPLIT.value!r}), {size}px"
  load, rows = os.getloadavg(), []
  for stage, px, kwargs, batch in STAGES:
    if tfds_src is not None:
      if size < kwargs["resolution"]:
        print(f"skip {stage}: {size}px images are smaller than {kwargs['resolution']}px")
        continue
      source, px = tfds_src, size
    else:
      source = PngSource(px)
    hi = kwargs.get("crop") or kwargs["resolution"]
    lo = "-" if "low_resolution" not in kwargs else (
        f"{hi * kwargs['low_resolution'] // kwargs['resolution']}px")
    for workers in map(int, _WORKERS.value):
      r = time_stage(source, kwargs, batch, workers)
      rows.append({"stage": stage, "source_px": px, "image": f"{hi}px", "lowres": lo,
                   "batch": batch, "workers": workers, **r})
      print(f"  {stage} workers={workers}: {r['examples_per_s']:.0f} examples/s "
            f"({r['ms_per_batch']:.0f} ms/batch)", flush=True)
  write(rows, source_desc, load)


if __name__ == "__main__":
  app.run(main)
