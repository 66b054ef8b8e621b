"""The dataset a config's `data` section names: its TFDS builder, splits and captions.

Keys read (see configs/base64.py):
  data.dataset      "emoji_cascade" (embedded, offline) or "image_text_folder" (your own)
  data.data_dir     TFDS data directory; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  data.resolution   the stored image size (each stage reads its own: 64, 256, 1024)
  data.limit        emoji_cascade only: at most this many drawings per style and split (0 = all)
  data.source_dir   image_text_folder only: the folder of images and captions
  data.resize       image_text_folder only: "center_crop" or "pad"
  data.train_split / data.eval_split
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

from absl import logging as absl_logging

from imagen_jax import config_schema
from imagen_jax.errors import UserError

DATASETS = ("emoji_cascade", "image_text_folder")
RESIZE_MODES = ("center_crop", "pad")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ImageDataSettings:
  """The image keys of a stage's config.data: the dataset (built by --mode=build_data into
  data_dir, "" = $TFDS_DATA_DIR or ~/tensorflow_datasets) at `resolution`, and for SR
  stages low_resolution (the input's) and crop (training crops, None = whole images);
  limit caps drawings per style in each split (0 = all); source_dir and resize are for
  "image_text_folder"; workers: grain worker processes (0 = in the main process)."""

  dataset: str
  data_dir: str
  resolution: int
  limit: int
  source_dir: str
  resize: str
  train_split: str
  eval_split: str
  workers: int
  low_resolution: int | None = None
  crop: int | None = None

  def check(self, c: config_schema.Checker) -> None:
    dataset = c.one_of("dataset", DATASETS)
    c.string("data_dir")
    resolution = c.integer("resolution", minimum=8)
    if self.low_resolution is not None:
      low = c.integer("low_resolution", minimum=1)
      if resolution % low:
        raise c.error("low_resolution", f"must divide {c.key('resolution')}={resolution}")
      crop = self.crop
      if crop is not None:
        factor = resolution // low
        if not (config_schema.is_int(crop) and 0 < crop <= resolution and crop % factor == 0):
          raise c.error("crop", f"must be None or a multiple of {factor} (the SR factor) no "
                                f"larger than {c.key('resolution')}={resolution}")
    c.integer("limit", minimum=0, why="(0 = every drawing)")
    c.one_of("resize", RESIZE_MODES)
    for name in ("train_split", "eval_split"):
      if not (isinstance(getattr(self, name), str) and getattr(self, name)):
        raise c.error(name, "must name a split", fix=f"pass {c.flag(name)}=train")
    c.integer("workers", minimum=0)
    if dataset == "image_text_folder":
      source = self.source_dir
      if not source or not os.path.isdir(source):
        raise c.error("source_dir", "image_text_folder needs an existing folder",
                      fix=f"pass {c.flag('source_dir')}=/path/to/images (images with "
                          "same-stem .txt captions, or a metadata.jsonl/csv manifest)")


class DatasetNotBuiltError(UserError, FileNotFoundError):
  """The dataset a config names has not been prepared in data_dir yet."""


def data_dir(data) -> str:
  return data.data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def make_builder(data, resolution: int | None = None):
  """The TFDS builder of the config's dataset at `resolution` (default data.resolution)."""
  # TFDS warns "Using custom data configuration" for every config object we pass (all of
  # ours: resolution and limit are parameters); that is expected, not worth a warning.
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    return _make_builder(data, resolution)
  finally:
    absl_logging.set_verbosity(verbosity)


def _make_builder(data, resolution: int | None):
  resolution = int(resolution or data.resolution)
  if data.dataset == "emoji_cascade":
    from imagen_jax.data.builders.emoji_cascade import emoji_cascade  # pylint: disable=g-import-not-at-top
    return emoji_cascade.make_builder(resolution, data_dir(data), limit=data.limit or None)
  if data.dataset == "image_text_folder":
    from imagen_jax.data.builders.image_text_folder import image_text_folder  # pylint: disable=g-import-not-at-top
    if not data.source_dir:
      raise UserError("data.dataset='image_text_folder' needs data.source_dir: pass "
                      "--config.data.source_dir=/path/to/your/images.")
    return image_text_folder.make_builder(data.source_dir, resolution, data_dir(data),
                                          resize=data.resize)
  raise UserError(f"data.dataset={data.dataset!r} is not a dataset; choose one of {DATASETS}.")


def is_built(builder) -> bool:
  return os.path.isfile(os.path.join(builder.data_dir, "dataset_info.json"))


def _require_built(builder, data) -> None:
  if not is_built(builder):
    raise DatasetNotBuiltError(
        f"Dataset {builder.info.full_name} is not built in {data_dir(data)}. Fix: run "
        "`python launch.py --mode=build_data` with the same --config (and "
        "--config.data.data_dir) first.")


def data_source(data, split: str, resolution: int | None = None, *,
                decode_images: bool = True):
  """Random-access records {"image", "caption", ...} of a built split (no TensorFlow).
  With decode_images=False, "image" stays PNG bytes (cheap when only captions are read)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = make_builder(data, resolution)
  _require_built(builder, data)
  if split not in builder.info.splits:
    raise UserError(f"Dataset {builder.info.full_name} has no split {split!r}; it has "
                    f"{sorted(builder.info.splits)}.")
  decoders = None if decode_images else {"image": tfds.decode.SkipDecoding()}
  return builder.as_data_source(split=split, decoders=decoders)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def captions(data, splits: Iterable[str]) -> list[str]:
  """Every caption of the given splits, in record order (duplicates kept)."""
  out: list[str] = []
  for split in splits:
    source = data_source(data, split, decode_images=False)
    for i in range(len(source)):
      out.append(_text(source[i]["caption"]))
  return out
