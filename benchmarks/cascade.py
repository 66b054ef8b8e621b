r"""Cascade sampling time per image per stage, and Inception (FID) feature throughput.

  python benchmarks/cascade.py [--stages runs/demo/base64,runs/demo/sr256,runs/demo/sr1024] \
      [--images 8] [--batch 8] [--inception_images 96]

Uses trained stage workdirs (`make demo` leaves them under runs/demo/). Each stage is
timed on its own: a first call compiles (reported separately), then `--images` images in
batches of `--batch`, with each stage's own sampler, steps and guidance (its config).
Writes benchmarks/results/cascade.md and .csv. Sampling time does not depend on the
weights' values, only on the networks, steps, batch and guidance (a weight of 0 or 1
takes one network pass per step, any other weight two).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
import numpy as np

from imagen_jax import cascade as cascade_lib
from imagen_jax.eval import fid

import machine

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def time_stage(cascade, k: int, prompts: list[str], lowres: np.ndarray | None,
               batch: int) -> tuple[float, float, np.ndarray]:
  """(compile + first batch seconds, seconds per image after it, the images)."""
  stage = cascade.stages[k]
  settings = stage.settings()
  fn = cascade._sample_fn(k, settings)  # pylint: disable=protected-access
  emb, mask = cascade.encode(prompts, stage)
  keys = jax.random.split(jax.random.key(0), len(prompts))
  low = None if lowres is None else lowres.astype(np.float32) / 127.5 - 1.0

  def run(rows):
    x = fn(stage.params, emb[rows], mask[rows], keys[rows],
           lowres=None if low is None else low[rows], guidance_scale=settings["guidance"])
    return np.asarray(jax.device_get(x))

  began = time.perf_counter()
  run(np.arange(batch) % len(prompts))
  first = time.perf_counter() - began
  began = time.perf_counter()
  outs = [run(np.arange(i, i + batch) % len(prompts)) for i in range(0, len(prompts), batch)]
  per_image = (time.perf_counter() - began) / (len(outs) * batch)
  images = np.concatenate(outs, 0)[:len(prompts)]
  return first, per_image, (np.clip(images, -1, 1) * 127.5 + 127.5).round().astype(np.uint8)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--stages", default="runs/demo/base64,runs/demo/sr256,runs/demo/sr1024")
  p.add_argument("--images", type=int, default=8)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--inception_images", type=int, default=96)
  p.add_argument("--out", default=os.path.join(RESULTS, "cascade"))
  args = p.parse_args()
  load_before = machine.load()

  cascade = cascade_lib.Cascade.from_workdirs(args.stages.split(","))
  prompts = [f"prompt {i}, twemoji style" for i in range(args.images)]
  rows, lowres = [], None
  for k, stage in enumerate(cascade.stages):
    batch = min(args.batch, args.images)
    first, per_image, lowres = time_stage(cascade, k, prompts, lowres, batch)
    s = stage.settings()
    rows.append(dict(stage=k, resolution=stage.resolution, sampler=s["sampler"],
                     steps=s["steps"], guidance=s["guidance"], batch=batch,
                     first_call_s=round(first, 2), seconds_per_image=round(per_image, 3)))
    print(rows[-1])

  n = args.inception_images
  images = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
  began = time.perf_counter()
  fid.inception_features(images[:32], batch_size=32, progress=False)
  inc_first = time.perf_counter() - began
  began = time.perf_counter()
  fid.inception_features(images, batch_size=32, progress=False)
  inc_rate = n / (time.perf_counter() - began)

  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + ".csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  cols = list(rows[0])
  lines = ["# Cascade sampling time per image, per stage", "",
           machine.provenance(machine.command("cascade.py", sys.argv[1:]), load_before),
           "first_call_s includes compilation; seconds_per_image is measured after it.", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
  lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
  lines += ["", f"Inception pool3 features (64x64 inputs resized to 299, float32, batch 32): "
            f"{inc_rate:.2f} images/s after a first call of {inc_first:.1f} s "
            "(weights load + compilation).", ""]
  with open(args.out + ".md", "w") as f:
    f.write("\n".join(lines))
  print("\n".join(lines))


if __name__ == "__main__":
  main()
