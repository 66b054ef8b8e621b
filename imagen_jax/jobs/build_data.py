"""`--mode=build_data`: prepare the config's dataset (TFDS, array_record) and report it.

  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=build_data

Builds `data.dataset` at `data.resolution` into `data.data_dir` (skipped when already built:
TFDS never overwrites a prepared dataset), then prints where it is, the examples per split
and what the builder skipped. Writes WORKDIR/build_data.json with the same summary. The
SR configs read their own resolution (256 or 1024): build each stage's dataset with its
config.

With --config.data.beam=True (image_text_folder only) the build is an Apache Beam pipeline
(the same dataset, examples and skip counts), run by the runner data.beam_options names:

  python launch.py --config=configs/base64.py --workdir=/tmp/b --mode=build_data \
    --config.data.dataset=image_text_folder --config.data.source_dir=/mnt/laion/shards \
    --config.data.data_dir=gs://BUCKET/tfds --config.data.beam=True \
    --config.data.beam_options="--runner=DataflowRunner --project=P --region=R \
      --temp_location=gs://BUCKET/tmp --requirements_file=requirements.txt \
      --extra_package=dist/imagen_jax-0.1.0-py3-none-any.whl"

("" = DirectRunner on this machine, one process per core). The workers import imagen_jax
(the wheel: `pip wheel --no-deps -w dist .`) and read source_dir at the same path (a shared
mount); README.md, section Data, says more.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from absl import logging as absl_logging
import ml_collections

from imagen_jax.data import datasets


MODE = "build_data"
KINDS = ("base", "sr")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  builder = datasets.make_builder(config.data)
  beam = bool(config.data.get("beam", False))
  options = str(config.data.get("beam_options", "")) if beam else None
  if beam:
    builder = _beam_twin(builder)
  already = datasets.is_built(builder)
  start = time.perf_counter()
  if not already:
    how = f" with Beam ({options or 'DirectRunner, one process per core'})" if beam else ""
    print(f"building {builder.info.full_name} into {datasets.data_dir(config.data)}{how} ...")
    kwargs = {}
    if beam:
      from imagen_jax.data.builders.image_text_folder import image_text_folder  # pylint: disable=g-import-not-at-top
      kwargs["download_config"] = image_text_folder.beam_download_config(options)
    builder.download_and_prepare(**kwargs)
  seconds = time.perf_counter() - start
  info = builder.info
  summary = {
      "dataset": info.full_name, "path": builder.data_dir, "already_built": already,
      "build_s": None if already else seconds,
      "beam_options": None if already else options,
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


def _beam_twin(builder):
  """The Beam builder of the same dataset (config, data directory)."""
  from imagen_jax.data.builders.image_text_folder import image_text_folder  # pylint: disable=g-import-not-at-top
  # As datasets.make_builder: TFDS warns about every custom config object; that is expected.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    return image_text_folder.as_beam(builder)
  finally:
    absl_logging.set_verbosity(verbosity)
