"""`--mode=build_data`: prepare the config's dataset (TFDS, array_record) and report it.

  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=build_data

Builds `data.dataset` at `data.resolution` into `data.data_dir` (skipped when already built:
TFDS never overwrites a prepared dataset), then prints where it is, the examples per split
and what the builder skipped. Writes WORKDIR/build_data.json with the same summary. The
SR configs read their own resolution (256 or 1024): build each stage's dataset with its
config.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from imagen_jax.data import datasets


MODE = "build_data"
KINDS = ("base", "sr")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  builder = datasets.make_builder(config.data)
  already = datasets.is_built(builder)
  start = time.perf_counter()
  if not already:
    print(f"building {builder.info.full_name} into {datasets.data_dir(config.data)} ...")
    builder.download_and_prepare()
  seconds = time.perf_counter() - start
  info = builder.info
  summary = {
      "dataset": info.full_name, "path": builder.data_dir, "already_built": already,
      "build_s": None if already else seconds,
      "splits": {name: int(split.num_examples) for name, split in info.splits.items()},
      "bytes": int(sum(split.num_bytes for split in info.splits.values())),
      "metadata": dict(info.metadata or {}),
  }
  with open(os.path.join(workdir, "build_data.json"), "w") as f:
    json.dump(summary, f, indent=2, default=str)
    f.write("\n")
  splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
  how = "already built" if already else f"built in {seconds:.0f} s"
  print(f"{info.full_name}: {how} at {builder.data_dir} ({splits} examples, "
        f"{summary['bytes'] / 2**20:.1f} MiB)")
  skipped = {k: v for k, v in summary["metadata"].items() if "skip" in k and v}
  if skipped:
    print(f"  skipped: {skipped}")
  return summary
