"""grain input pipelines per cascade stage: random-access source -> shuffled, sharded batches.

  base_pipeline(source, resolution=64, ...)     {"image" [B,R,R,3], "caption" [B], "index" [B]}
  sr_pipeline(source, low_resolution=64, resolution=256, crop=None, ...)
                                                + "lowres" [B,c,c,3]
  make_pipeline(config.data, source, stage="base"|"sr", ...)
                                                reads data.resolution, data.low_resolution,
                                                data.crop

`source` is anything with len() and __getitem__ returning {"image": uint8 [S,S,3] (or PNG /
JPEG bytes), "caption": str or bytes, ...}: `tfds.data_source(...)`, a builder's
`as_data_source(split)`, or a list of dicts. Images are float32 in [-1, 1], NHWC. With a
`text` object (an EmbeddingCache or a TextEncoder) batches also get "text" [B,L,D] float32
and "text_mask" [B,L] bool.

Order of operations (all on grain's MapDataset, so every step is a pure function of an
index and the iterator state is just a position):

  range(N) -> shuffle(seed) -> repeat(num_epochs) -> blocks of B/P -> [p::P] -> load block
  -> to_iter_dataset -> [mp_prefetch(worker_count)] -> [text]

- Shuffling is global and redone every epoch (grain folds the epoch into the seed). The
  record stream is cut into global batches of B, and process p of P loads rows
  [p B/P, (p+1) B/P) of each: the shards are disjoint, every process yields the same
  number of steps, and the assembled global batch is row for row the one-process batch
  (so a multi-host run trains exactly like a single-host one). Batches run on across
  epoch boundaries.
- Batching happens before the worker split, so a batch's contents do not depend on
  worker_count, and a state saved with one worker count replays the same batches.
- Random crops use `example_rng(seed, epoch, record index)`: the same record in the same
  epoch gets the same crop whatever the process count, and a restored iterator repeats it.
- Text is joined per batch in the main process, after the workers: a jax TextEncoder must
  not run in forked / spawned workers (each would grab the accelerator), and an
  EmbeddingCache lookup is cheap enough there too. One code path for both.

Downsampling is a box (area) filter at integer factors: each low-res pixel is the mean of
its factor x factor block, summed exactly in integers for uint8 input. That is anti-aliased
(unlike nearest or bilinear without antialias), and it makes crops line up exactly:
downsample(hi)[y/f : y/f + c/f] == downsample(hi[y : y + c]) for y a multiple of f. The
low-res conditioning is kept unquantized (float) since at sampling time it is the previous
stage's continuous output; a source image larger than the stage's resolution is reduced to
it and rounded to uint8, like a stored image of that size (non-integer ratios use PIL's
BOX resize, also area-averaging).

The iterator is grain's: `it = iter(ds)`; `it.get_state()` returns a small JSON-serializable
dict (a batch position, plus per-worker positions with worker_count > 0); `set_state` on a
fresh iterator of the same pipeline resumes with the very same batches. Call `it.close()`
to stop worker processes early. With worker_count > 0, absl flags must be parsed (run under
absl.app.run, or flags.FLAGS.mark_as_parsed()), since grain's workers read them.
"""

from __future__ import annotations

import io
from typing import Any, Protocol, Sequence

import grain
import numpy as np

from imagen_jax.errors import UserError

STAGES = ("base", "sr")


class PipelineError(UserError, ValueError):
  """A pipeline setting that cannot work with this source or these options."""


class TextSource(Protocol):
  def encode(self, captions: list[str]) -> tuple[Any, Any]: ...


# ----------------------------------------------------------------------------- pure helpers

def to_float(image: np.ndarray) -> np.ndarray:
  """Pixels in [0, 255] (uint8, or float from `downsample`) -> float32 in [-1, 1]."""
  return np.asarray(image, np.float32) / np.float32(127.5) - np.float32(1.0)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
  """Box-filter (area) downsampling of [H, W, C] by an integer factor -> float32, same units.

  Each output pixel is the mean of a factor x factor block. For uint8 input the block sums
  are exact integers, so the result does not depend on memory layout (a crop's downsample
  equals the crop of the downsample, bit for bit).
  """
  image = np.asarray(image)
  factor = int(factor)
  h, w = image.shape[:2]
  if factor < 1 or h % factor or w % factor:
    raise ValueError(f"downsample: factor {factor} must be >= 1 and divide the image size "
                     f"{h}x{w}.")
  if factor == 1:
    return image.astype(np.float32)
  if image.dtype == np.uint8:
    acc = np.uint16 if factor * factor * 255 < 2**16 else np.uint32
  else:
    acc = np.float32
  blocks = image.reshape(h // factor, factor, w // factor, factor, *image.shape[2:])
  total = np.zeros((h // factor, w // factor, *image.shape[2:]), acc)
  # A loop of whole-array adds beats sum(axis=(1, 3)) 5-8x, and fixes the summation order.
  for i in range(factor):
    for j in range(factor):
      total += blocks[:, i, :, j]
  return total.astype(np.float32) / np.float32(factor * factor)


def resize_to(image: np.ndarray, size: int) -> np.ndarray:
  """Reduce a square uint8 [S, S, 3] image to [size, size, 3] uint8, anti-aliased.

  Integer ratios: `downsample` then round (exact box mean). Others: PIL's BOX resize.
  """
  s = image.shape[0]
  if s == size:
    return image
  if s < size:
    raise ValueError(f"resize_to: cannot enlarge {s}px to {size}px.")
  if s % size == 0:
    return np.rint(downsample(image, s // size)).astype(np.uint8)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BOX))


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The per-example generator for random augmentation (crop positions)."""
  return np.random.default_rng((int(seed), int(epoch), int(index)))


def crop_position(rng: np.random.Generator, size: int, crop: int,
                  factor: int) -> tuple[int, int]:
  """A uniformly random (y, x) top-left corner of a crop x crop window in a size x size
  image, both multiples of `factor`, so the window maps onto whole low-res pixels."""
  slots = (size - crop) // factor + 1
  y, x = rng.integers(0, slots, size=2)
  return int(y) * factor, int(x) * factor


def aligned_crop(hi: np.ndarray, lo: np.ndarray, crop: int, factor: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A random crop x crop window of `hi` and the matching (crop/factor)^2 window of `lo`.

  `lo` is `hi` downsampled by `factor`; the window starts at a multiple of `factor` in `hi`
  and at that position / factor in `lo`, so lo_crop == downsample(hi_crop) for a box filter.
  """
  if crop % factor:
    raise ValueError(f"aligned_crop: crop {crop} is not a multiple of the factor {factor}.")
  if hi.shape[0] != lo.shape[0] * factor or hi.shape[1] != lo.shape[1] * factor:
    raise ValueError(f"aligned_crop: hi {hi.shape[:2]} is not lo {lo.shape[:2]} x {factor}.")
  y, x = crop_position(rng, hi.shape[0], crop, factor)
  c = crop // factor
  return (hi[y:y + crop, x:x + crop],
          lo[y // factor:y // factor + c, x // factor:x // factor + c])


def steps_per_epoch(num_records: int, batch_size: int, process_count: int = 1) -> int:
  """Global batches one epoch fills: each process reads num_records // process_count
  records per epoch, in batches of batch_size // process_count (batches run on across
  epoch boundaries when num_epochs > 1)."""
  return (num_records // process_count) // (batch_size // process_count)


# ----------------------------------------------------------------------- per-example loading

def _decode_image(image: Any, index: int) -> np.ndarray:
  if isinstance(image, (bytes, bytearray, memoryview)):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    image = Image.open(io.BytesIO(bytes(image))).convert("RGB")
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
    raise PipelineError(f"Record {index}: image has shape {image.shape}, expected square RGB "
                        "[S, S, 3]. Fix: have the dataset builder center-crop and drop alpha.")
  if image.dtype != np.uint8:
    raise PipelineError(f"Record {index}: image dtype is {image.dtype}, expected uint8.")
  return image


def _decode_caption(caption: Any) -> str:
  if isinstance(caption, np.ndarray):
    caption = caption.item()
  if isinstance(caption, (bytes, bytearray)):
    return bytes(caption).decode("utf-8")
  return str(caption)


class _Example:
  """(position in this process's stream, record index) -> one example dict.

  A picklable class, not a closure: grain sends it to worker processes.
  """

  def __init__(self, source, *, resolution: int, low_resolution: int | None,
               crop: int | None, seed: int, per_epoch: int):
    self.source, self.resolution, self.low_resolution = source, resolution, low_resolution
    self.crop, self.seed, self.per_epoch = crop, seed, per_epoch

  def __call__(self, position: int, index: Any) -> dict[str, np.ndarray]:
    index = int(index)
    record = self.source[index]
    for key in ("image", "caption"):
      if key not in record:
        raise PipelineError(f"Record {index} has no {key!r} (keys: {sorted(record)}). The "
                            "pipeline needs {'image': uint8 [S,S,3], 'caption': str}.")
    image = _decode_image(record["image"], index)
    if image.shape[0] < self.resolution:
      raise PipelineError(
          f"Record {index}: image is {image.shape[0]}px, smaller than data.resolution="
          f"{self.resolution}. Fix: use the dataset config of at least that size.")
    hi = resize_to(image, self.resolution)
    out = {"caption": np.str_(_decode_caption(record["caption"])),
           "index": np.int64(index)}
    if self.low_resolution is None:
      out["image"] = to_float(hi)
      return out
    factor = self.resolution // self.low_resolution
    if self.crop is not None:
      epoch = position // self.per_epoch
      y, x = crop_position(example_rng(self.seed, epoch, index), self.resolution, self.crop,
                           factor)
      hi = hi[y:y + self.crop, x:x + self.crop]
    # Downsampling the crop equals cropping the downsample (exact box sums), at 1/crop^2 cost.
    out["image"] = to_float(hi)
    out["lowres"] = to_float(downsample(hi, factor))
    return out


class _Block:
  """(block position in this process's stream, record indices) -> one local batch.

  The stream position of a record (what fixes its epoch, hence its crop) is computed in
  the shared stream, so crops do not depend on the process count either.
  """

  def __init__(self, example: _Example, *, local_batch: int, process_index: int,
               process_count: int):
    self.example, self.local_batch = example, local_batch
    self.process_index, self.process_count = process_index, process_count

  def __call__(self, block: int, indices: Any) -> dict[str, np.ndarray]:
    first = (block * self.process_count + self.process_index) * self.local_batch
    rows = [self.example(first + j, index) for j, index in enumerate(np.asarray(indices))]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _Finish:
  """Main-process batch step: plain numpy arrays (workers hand over shared-memory views),
  then the text embeddings."""

  def __init__(self, text: TextSource | None):
    self.text = text

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    batch = {k: np.asarray(v) for k, v in batch.items()}
    if self.text is not None:
      captions = [str(c) for c in batch["caption"]]
      emb, mask = self.text.encode(captions)
      emb, mask = np.asarray(emb, np.float32), np.asarray(mask, bool)
      if emb.ndim != 3 or mask.shape != emb.shape[:2] or emb.shape[0] != len(captions):
        raise PipelineError(f"text.encode returned embeddings {emb.shape} and mask "
                            f"{mask.shape} for {len(captions)} captions; expected [B,L,D] "
                            "and [B,L].")
      batch["text"], batch["text_mask"] = emb, mask
    return batch


# ------------------------------------------------------------------------------- pipelines

def _positive(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise PipelineError(f"{name}={value!r}: must be a positive integer.")
  return int(value)


def _first_image_size(source, index: int = 0) -> int:
  record = source[index]
  if "image" not in record:
    raise PipelineError(f"Record {index} has no 'image' (keys: {sorted(record)}).")
  return _decode_image(record["image"], index).shape[0]


def _build(source, *, resolution: int, low_resolution: int | None, crop: int | None,
           batch_size: int, seed: int, shuffle: bool, num_epochs: int | None,
           drop_remainder: bool, worker_count: int, worker_buffer_size: int,
           read_threads: int, process_index: int | None, process_count: int | None,
           text: TextSource | None) -> grain.IterDataset:
  resolution = _positive("resolution", resolution)
  batch_size = _positive("batch_size", batch_size)
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise PipelineError(f"seed={seed!r}: must be an integer in [0, 2**32).")
  if num_epochs is not None:
    num_epochs = _positive("num_epochs", num_epochs)
  if worker_count < 0:
    raise PipelineError(f"worker_count={worker_count}: must be >= 0 (0 = main process).")
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_count = _positive("process_count", process_count)
  if not 0 <= process_index < process_count:
    raise PipelineError(f"process_index={process_index} is outside [0, {process_count}).")
  if batch_size % process_count:
    raise PipelineError(
        f"batch_size={batch_size} (global) is not divisible by the {process_count} processes; "
        f"each process loads batch_size // process_count examples per step. Fix: use a "
        f"multiple of {process_count}.")
  local_batch = batch_size // process_count

  if low_resolution is not None:
    low_resolution = _positive("low_resolution", low_resolution)
    if low_resolution >= resolution or resolution % low_resolution:
      raise PipelineError(f"low_resolution={low_resolution} must be smaller than and divide "
                          f"resolution={resolution} (an integer super-resolution factor).")
    factor = resolution // low_resolution
    if crop is not None:
      crop = _positive("crop", crop)
      if crop > resolution or crop % factor:
        raise PipelineError(
            f"crop={crop} must be a multiple of the SR factor {factor} (= {resolution} / "
            f"{low_resolution}) and at most resolution={resolution}, so the high-res crop maps "
            f"onto whole low-res pixels. Fix: e.g. crop={min(resolution, 4 * factor)}, or None.")
  elif crop is not None:
    raise PipelineError("crop applies to super-resolution stages only; the base stage trains "
                        "on whole images. Fix: set crop=None.")

  n = len(source)
  if n == 0:
    raise PipelineError("The data source is empty (len 0). Fix: check the split name and that "
                        "the dataset was built (launch.py --mode=build_data).")
  size = _first_image_size(source)
  if size < resolution:
    raise PipelineError(
        f"Source images are {size}px, smaller than resolution={resolution}: this stage needs "
        f"images of at least {resolution}px (larger ones are downsampled). Fix: use the "
        f"dataset built at {resolution}px or more.")
  if num_epochs is not None and drop_remainder and n * num_epochs < batch_size:
    raise PipelineError(
        f"{num_epochs} epoch(s) of {n} records fill no batch of {batch_size}. Fix: "
        "a smaller batch_size, more epochs, or drop_remainder=False.")

  # One stream of records for all processes (reshuffled every epoch, batches running on
  # across epochs), cut into blocks of local_batch; process p takes blocks p, p + P, ...
  # So global batch k is the same records in the same row order whatever the process
  # count, and a 2-process run sees exactly the batches of a 1-process run.
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds.repeat(num_epochs)
  ds = ds.batch(local_batch, drop_remainder=drop_remainder)
  ds = ds[process_index::process_count]
  ds = ds.map_with_index(_Block(_Example(source, resolution=resolution,
                                         low_resolution=low_resolution, crop=crop,
                                         seed=int(seed), per_epoch=n),
                                local_batch=local_batch, process_index=process_index,
                                process_count=process_count))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                               prefetch_buffer_size=2 * read_threads))
  if worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return it_ds.map(_Finish(text))


def base_pipeline(source, *, resolution: int, batch_size: int, seed: int,
                  shuffle: bool = True, num_epochs: int | None = None,
                  drop_remainder: bool = True, worker_count: int = 0,
                  worker_buffer_size: int = 2, read_threads: int = 1,
                  process_index: int | None = None, process_count: int | None = None,
                  text: TextSource | None = None) -> grain.IterDataset:
  """Base stage: batches {"image" float32 [b,R,R,3] in [-1,1], "caption" str [b],
  "index" int64 [b] (record indices)} (+ "text", "text_mask" with `text`).

  b = batch_size // process_count: batch_size is global. Sources larger than `resolution`
  are reduced to it. num_epochs=None repeats forever; worker_count processes decode in
  parallel (read_threads threads each, or in the main process with worker_count=0), holding
  worker_buffer_size batches each. process_index / process_count default to jax's.
  """
  return _build(source, resolution=resolution, low_resolution=None, crop=None,
                batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                drop_remainder=drop_remainder, worker_count=worker_count,
                worker_buffer_size=worker_buffer_size, read_threads=read_threads,
                process_index=process_index, process_count=process_count, text=text)


def sr_pipeline(source, *, low_resolution: int, resolution: int, crop: int | None = None,
                batch_size: int, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, drop_remainder: bool = True,
                worker_count: int = 0, worker_buffer_size: int = 2, read_threads: int = 1,
                process_index: int | None = None, process_count: int | None = None,
                text: TextSource | None = None) -> grain.IterDataset:
  """Super-resolution stage: batches {"image" float32 [b,C,C,3], "lowres" float32
  [b,c,c,3], "caption", "index"} (+ "text", "text_mask"), all images in [-1,1].

  Without crop, C = resolution and c = low_resolution. With crop, C = crop at a random
  position (a multiple of f = resolution / low_resolution) and c = crop / f: the matching
  window of the low-res image. "lowres" is always downsample("image" pixels, f), a box
  filter. Other arguments as in `base_pipeline`.
  """
  if low_resolution is None:
    raise PipelineError("sr_pipeline needs low_resolution (e.g. 64 for 64->256).")
  return _build(source, resolution=resolution, low_resolution=low_resolution, crop=crop,
                batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                drop_remainder=drop_remainder, worker_count=worker_count,
                worker_buffer_size=worker_buffer_size, read_threads=read_threads,
                process_index=process_index, process_count=process_count, text=text)


def _cfg_get(cfg, key: str, default: Any = None) -> Any:
  if hasattr(cfg, "get"):
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def make_pipeline(data_cfg, source, *, stage: str, batch_size: int, seed: int,
                  **kwargs) -> grain.IterDataset:
  """The pipeline of a config's stage: "base" reads data.resolution; "sr" also reads
  data.low_resolution and data.crop (None = whole images). kwargs go to the stage's
  pipeline (shuffle, num_epochs, worker_count, text, ...)."""
  if stage not in STAGES:
    raise PipelineError(f"stage={stage!r}: choose one of {STAGES} (the config's `kind`).")
  resolution = _cfg_get(data_cfg, "resolution")
  if resolution is None:
    raise PipelineError("The data config has no `resolution`.")
  if stage == "base":
    return base_pipeline(source, resolution=resolution, batch_size=batch_size, seed=seed,
                         **kwargs)
  low = _cfg_get(data_cfg, "low_resolution")
  if low is None:
    raise PipelineError("stage='sr' needs data.low_resolution in the config.")
  return sr_pipeline(source, low_resolution=low, resolution=resolution,
                     crop=_cfg_get(data_cfg, "crop"), batch_size=batch_size, seed=seed,
                     **kwargs)
