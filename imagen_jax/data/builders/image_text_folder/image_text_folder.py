"""TFDS builder `image_text_folder`: a user's own captioned images (COCO, CC-style), TF-free.

  builder = make_builder("/data/my_photos", 64, "/data/tfds")
  builder.download_and_prepare()
  ds = builder.as_data_source("train")  # ds[i]: image uint8 [64, 64, 3], caption, id (bytes)

Layouts, (a), (b) and (d) detected in the source folder or in each split sub-folder:
  a) caption files: each image has a `.txt` of the same stem beside it (`cats/cat.jpg` +
     `cats/cat.txt`), at any depth. The caption is the file's text, stripped.
  b) a manifest (Hugging Face imagefolder convention): `metadata.jsonl`, one JSON object per
     line, or `metadata.csv` with a header row; the columns are `file_name` (or `image`), a path
     relative to the folder, and `caption` (or `text`). An image may sit on several rows, and a
     JSONL caption may be a list (COCO's five captions): one example per caption. When a folder
     holds a manifest, its .txt files are ignored.
  c) MS-COCO captions, at the top of source_dir only: COCO's annotations_trainval<year>.zip
     and val<year>.zip (and/or train<year>.zip) unzipped side by side, year 2014 or 2017:
     `annotations/captions_val2014.json` + `val2014/` become "validation",
     `annotations/captions_train2014.json` + `train2014/` become "train"; either may be absent
     (FID-30K needs only val). One example per annotation (~5 per image), as a manifest row
     with a list of captions; an annotation file whose image folder is missing is an error.
     Both years at once are refused: 2017 re-splits 2014's images (train2017 holds most of
     val2014), so mixing them could put an image on both sides. Other files are ignored.
  d) webdataset shards (LAION, COYO, img2dataset's output): `*.tar` files at any depth, each
     sample `KEY.jpg` (png, webp...) + `KEY.txt`, or `KEY.json` with a "caption" or "text"
     field (imagen_jax/data/webdataset.py). id: "SHARD/MEMBER", e.g. "00000.tar/000001.jpg".
     A folder with shards holds nothing else (no manifest, no loose images).
Split sub-folders `train/`, `validation/` (or `valid/`, `val/`) and `test/` at the top of
source_dir become those splits, each in layout a, b or d. Without them everything is "train".
`test_fraction` > 0 moves that fraction of "train" to "test" by a hash of the id: an image
lands on the same side whatever else is in the folder, and all its captions stay together.
In layout c it splits COCO's train the same way (validation stays whole: it is the split
FID is measured on); with no train annotations it is an error, not silently ignored.

Features: image (PNG, R x R x 3), caption, id (the image's path relative to source_dir, with
"/", e.g. "val2014/COCO_val2014_000000000042.jpg"). An image with several captions gives
several examples with one id; TFDS keys add "#n". Examples are written in sorted id order
(layout d: by shard, then id; shuffling is the input pipeline's job), so a build is
reproducible from the folder alone.

Apache Beam: `make_builder(..., beam=True)` gives ImageTextFolderBeam, the same dataset built
by a Beam pipeline (DirectRunner on this machine; Dataflow, Spark or Flink through
`beam_download_config("--runner=...")`): the same examples in the same order, the same skip
counts. Layout d is the one that scales: its shards are read by the workers.

Nothing in the data stops a build halfway: each item in SKIP_REASONS is skipped and counted.
The counts land in `builder.info.metadata["skipped"]` (every reason, zeros included), up to
five example ids per reason in `metadata["skipped_examples"]`, and an absl warning. Image
reasons count image files (one broken image with five captions is one), caption and row
reasons count captions and manifest rows (COCO: annotations; its missing_file counts images;
webdataset: samples; unreadable_shard: shards).
Only a missing folder, an ambiguous layout, a COCO captions file that is not COCO's JSON, or
a split left with no usable example is an error.

Images (`load_image`): EXIF orientation applied; an embedded ICC profile converted to sRGB;
16-bit greyscale scaled to 8 bits (Pillow's own convert would clip it); any mode to RGB, with
transparency composited on `background` (white). Resampling is Pillow's LANCZOS, which
filters with the full kernel width when shrinking (no aliasing), with reducing_gap=3: a box
pre-reduction by an integer factor while the image is over 3x the target (Pillow: "in most
cases indistinguishable" from exact resampling; 4.5x faster on a 5120x2880 photo, max error 2).
JPEGs over 3x the target are likewise decoded at 1/2, 1/4 or 1/8 scale by libjpeg (what
Image.thumbnail does): 1.6x faster at 64-256 px on the wallpaper photos, >= 41.7 dB PSNR
against a full decode. "center_crop" (Imagen) maps the central square straight to R x R in one
resampling; "pad" scales the longer side to R and centres it on `background`.
Decompression bombs: images over PIL.Image.MAX_IMAGE_PIXELS (89.5 MP unless the caller raised
it) are skipped as too_large before any pixel is decoded; we do not raise the limit, since no
stage needs more than a 1024 px crop. Pillow may still print its DecompressionBombWarning for
such a file once; silencing it per image is not thread-safe.
"""

from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
from typing import Any, Callable, Iterable, Iterator, Sequence

from absl import logging
import numpy as np
from PIL import Image, ImageOps
import tensorflow_datasets as tfds

from imagen_jax.data import webdataset

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFESTS = ("metadata.jsonl", "metadata.csv")
FILE_KEYS = ("file_name", "image")
CAPTION_KEYS = ("caption", "text")
# COCO: annotations/captions_<split><year>.json beside the image folder <split><year>/.
COCO_ANNOTATIONS = re.compile(r"captions_(train|val)(2014|2017)\.json")
COCO_SPLITS = {"train": "train", "val": "validation"}
SPLIT_DIRS = {"train": "train", "validation": "validation", "valid": "validation",
              "val": "validation", "test": "test"}
RESIZE_MODES = ("center_crop", "pad")
WHITE = (255, 255, 255)
MAX_EXAMPLE_IDS = 5

SKIP_REASONS = {
    "missing_caption": ("layout a: no .txt of the same stem beside the image; layout d: a "
                        "sample with an image but neither KEY.txt nor KEY.json"),
    "empty_caption": "the caption is empty or only whitespace",
    "unreadable_caption": "the caption file is not UTF-8 text",
    "bad_manifest_row": ("a manifest row that is not JSON, lacks file_name/caption, has a "
                         "non-string caption, or names a path outside its folder; a COCO "
                         "annotation whose image_id is not in \"images\" (or whose entry "
                         "there lacks a plain file_name) or whose caption is not a string; "
                         "a webdataset KEY.json (without KEY.txt) that is not a JSON object "
                         "with a string caption or text"),
    "missing_file": ("a manifest row or COCO image entry naming a file that does not exist; "
                     "a webdataset caption (KEY.txt or KEY.json) whose sample has no image"),
    "unreadable_shard": ("a webdataset .tar that is not a tar or ends early (one per shard; "
                         "the samples listed before the damage are kept)"),
    "unreadable_image": "a corrupt, truncated, zero-byte or non-image file",
    "too_large": "more pixels than PIL.Image.MAX_IMAGE_PIXELS (decompression-bomb guard)",
    "too_small": "shorter side below the config's min_size",
    "outside_splits": "an image next to the split folders instead of inside one",
}

LAYOUT_HELP = (
    "Expected images with a caption file of the same stem (cat.jpg + cat.txt, any depth), or a "
    "metadata.jsonl / metadata.csv manifest with file_name and caption columns (paths relative "
    "to the folder); or webdataset .tar shards (KEY.jpg + KEY.txt or KEY.json per sample); "
    "optionally inside train/, validation/ and test/ sub-folders. Or MS-COCO "
    "unzipped as is: annotations/captions_val2014.json beside val2014/ (and/or train, 2017).")


class UnusableImageError(ValueError):
  """An image that cannot become a training example; `reason` is a key of SKIP_REASONS."""

  def __init__(self, reason: str, path: str, detail: str):
    super().__init__(f"{path}: {reason}: {detail}")
    self.reason = reason
    self.path = path


# ---------------------------------------------------------------------------------------
# Images.


def _upright(im: Image.Image) -> Image.Image:
  try:
    if im.getexif().get(0x0112, 1) == 1:
      return im  # Upright already; exif_transpose would still copy the pixels.
    return ImageOps.exif_transpose(im)
  except Exception:  # pylint: disable=broad-except
    return im  # Malformed EXIF: the pixels are still good, only their orientation is unknown.


def _to_srgb(im: Image.Image) -> Image.Image:
  """Converts RGB / RGBA / CMYK with an embedded ICC profile (Display P3, Adobe RGB) to sRGB."""
  icc = im.info.get("icc_profile")
  if not icc or im.mode not in ("RGB", "RGBA", "CMYK"):
    return im
  try:
    from PIL import ImageCms  # pylint: disable=g-import-not-at-top
    src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    mode = "RGBA" if im.mode == "RGBA" else "RGB"
    return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode=mode)
  except Exception:  # pylint: disable=broad-except
    return im  # A broken profile: the raw values are the best guess left.


def _rgb_or_rgba(im: Image.Image) -> Image.Image:
  """Any Pillow mode -> 8-bit sRGB, "RGBA" if it has transparency, else "RGB"."""
  if im.mode.startswith("I;16") or im.mode == "I":
    # Pillow's convert clips these at 255 rather than scaling. Mode "I" is how older Pillow
    # opened 16-bit PNGs; if its values fit 8 bits it already is 8-bit data.
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or a.max(initial=0) > 255:
      a = a / 257.0
    im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
  im = _to_srgb(im)
  if im.mode in ("RGBA", "LA", "La", "RGBa", "PA") or "transparency" in im.info:
    return im.convert("RGBA")
  return im.convert("RGB")


def _flatten(im: Image.Image, background: Sequence[int]) -> Image.Image:
  if im.mode != "RGBA":
    return im
  canvas = Image.new("RGBA", im.size, (*background, 255))
  return Image.alpha_composite(canvas, im).convert("RGB")


def to_rgb(im: Image.Image, background: Sequence[int] = WHITE) -> Image.Image:
  """Any Pillow mode -> 8-bit sRGB RGB, transparency composited on `background`."""
  return _flatten(_rgb_or_rgba(im), background)


def fit_square(im: Image.Image, resolution: int, resize: str = "center_crop",
               background: Sequence[int] = WHITE) -> Image.Image:
  """RGB or RGBA image -> RGB `resolution` square, "center_crop" or "pad" (module docstring).

  Transparency is composited after resampling: Pillow resamples RGBA premultiplied, so the
  result matches compositing first (up to 8-bit rounding), on far fewer pixels.
  """
  w, h = im.size
  r = int(resolution)
  if resize == "center_crop":
    s = min(w, h)
    # Crop and resize in one resampling; a fractional box keeps odd margins exactly centred.
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    out = im.resize((r, r), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
  elif resize == "pad":
    scale = r / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    out = Image.new(im.mode, (r, r), (*background, 255)[:len(im.mode)])
    out.paste(im.resize((nw, nh), Image.Resampling.LANCZOS, reducing_gap=3.0),
              ((r - nw) // 2, (r - nh) // 2))
  else:
    raise ValueError(f"resize={resize!r} is not one of {RESIZE_MODES}.")
  return _flatten(out, background)


def load_image(path: str | os.PathLike, resolution: int, *, resize: str = "center_crop",
               background: Sequence[int] = WHITE, min_size: int = 0,
               data: bytes | None = None) -> Image.Image:
  """The image file at `path` as an RGB `resolution` square; UnusableImageError if it cannot be.

  `data`: the file's bytes when they do not lie at `path` (a member of a tar shard); `path`
  then only names the image in errors.
  """
  path = os.fspath(path)
  try:
    with Image.open(path if data is None else io.BytesIO(data)) as im:
      w, h = im.size  # Header only: nothing is decoded yet.
      limit = Image.MAX_IMAGE_PIXELS
      if limit and w * h > limit:
        raise UnusableImageError("too_large", path, f"{w}x{h} is over {limit} pixels")
      if min(w, h) < min_size:
        raise UnusableImageError("too_small", path, f"{w}x{h}, min_size={min_size}")
      if im.format == "JPEG":
        # Let libjpeg downscale by 1/2, 1/4 or 1/8 while decoding, keeping at least 3x the
        # pixels the crop needs (the same margin as reducing_gap): decoding is most of the work.
        need = 3 * int(resolution) / (min(w, h) if resize == "center_crop" else max(w, h))
        if need < 1:
          im.draft(None, (math.ceil(w * need), math.ceil(h * need)))
      im.load()  # Truncated or corrupt data fails here, not later.
      im = _rgb_or_rgba(_upright(im))
  except UnusableImageError:
    raise
  except Image.DecompressionBombError as e:
    raise UnusableImageError("too_large", path, str(e)) from e
  except Exception as e:  # pylint: disable=broad-except
    # Pillow raises OSError, SyntaxError, ValueError, EOFError... depending on the codec.
    raise UnusableImageError("unreadable_image", path, f"{type(e).__name__}: {e}") from e
  return fit_square(im, resolution, resize, background)


# ---------------------------------------------------------------------------------------
# Scanning a folder.


@dataclasses.dataclass(frozen=True)
class _Example:
  id: str       # path relative to source_dir, "/"-separated
  n: int        # caption number of this image (manifests may list an image more than once)
  path: str     # the image file, or the .tar shard holding it (layout d)
  caption: str
  member: webdataset.Member | None = None  # layout d: where the image lies in the shard

  @property
  def key(self) -> str:
    return f"{self.id}#{self.n}"

  @property
  def image(self) -> tuple[str, webdataset.Member | None]:
    """Where the image's bytes are: examples of one image share it (decoded once)."""
    return self.path, self.member


def _order(e: _Example) -> tuple[str, str, int]:
  """Write order: by id (and caption number); layout d by shard first, so that a Beam worker
  can number one shard's examples without seeing the others (ImageTextFolderBeam)."""
  return (e.path if e.member is not None else "", e.id, e.n)


_Splits = dict[str, list[_Example]]


class _Skips:
  """Counts of skipped items by reason, with a few example ids each."""

  def __init__(self):
    self.counts = {r: 0 for r in SKIP_REASONS}
    self.examples: dict[str, list[str]] = {r: [] for r in SKIP_REASONS}

  def add(self, reason: str, item: str) -> None:
    self.counts[reason] += 1
    if len(self.examples[reason]) < MAX_EXAMPLE_IDS:
      self.examples[reason].append(item)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def merge(self, counts: dict[str, int], examples: dict[str, list[str]]) -> None:
    """Adds counts (and example ids) gathered elsewhere, e.g. by Beam workers."""
    for r, n in counts.items():
      self.counts[r] += n
      room = MAX_EXAMPLE_IDS - len(self.examples[r])
      self.examples[r] += list(examples.get(r, []))[:max(room, 0)]

  def summary(self) -> str:
    return "; ".join(f"{r}: {n} (e.g. {', '.join(self.examples[r])})"
                     for r, n in self.counts.items() if n) or "nothing skipped"


def _rel_id(path: str, source_dir: str) -> str:
  return os.path.relpath(path, source_dir).replace(os.sep, "/")


def _image_files(folder: str, exclude_top: Iterable[str] = ()) -> list[str]:
  """Image files under `folder`, sorted, hidden files and folders skipped."""
  exclude_top = set(exclude_top)
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                     and not (root == folder and d in exclude_top))
    found += [os.path.join(root, f) for f in files
              if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
  return sorted(found)


def _read_text(path: str) -> str:
  with open(path, encoding="utf-8-sig") as f:  # -sig: Windows editors prepend a BOM.
    return f.read().strip()


def _scan_caption_files(folder: str, source_dir: str, skips: _Skips) -> list[_Example]:
  examples = []
  for path in _image_files(folder):
    rel = _rel_id(path, source_dir)
    stem = os.path.splitext(path)[0]
    txt = next((stem + e for e in (".txt", ".TXT") if os.path.isfile(stem + e)), None)
    if txt is None:
      skips.add("missing_caption", rel)
      continue
    try:
      caption = _read_text(txt)
    except (UnicodeDecodeError, OSError):
      skips.add("unreadable_caption", rel)
      continue
    if not caption:
      skips.add("empty_caption", rel)
      continue
    examples.append(_Example(rel, 0, path, caption))
  return examples


def _manifest_rows(path: str) -> Iterator[tuple[int, Any]]:
  """(line number, row) pairs; a row is a dict, or None where a JSONL line is not JSON."""
  if path.endswith(".jsonl"):
    with open(path, encoding="utf-8-sig") as f:
      for i, line in enumerate(f, 1):
        if line.strip():
          try:
            yield i, json.loads(line)
          except json.JSONDecodeError:
            yield i, None
    return
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.DictReader(f)
    columns = reader.fieldnames or []
    if not (set(FILE_KEYS) & set(columns) and set(CAPTION_KEYS) & set(columns)):
      raise ValueError(f"{path} has columns {columns}; it needs a file_name (or image) column "
                       "and a caption (or text) column in its header row.")
    for row in reader:
      yield reader.line_num, row


def _scan_manifest(folder: str, manifest: str, source_dir: str,
                   skips: _Skips) -> list[_Example]:
  path = os.path.join(folder, manifest)
  where = _rel_id(path, source_dir)
  examples = []
  seen = collections.Counter()
  for line, row in _manifest_rows(path):
    name = caption = None
    if isinstance(row, dict):
      name = next((row[k] for k in FILE_KEYS if isinstance(row.get(k), str) and row[k]), None)
      caption = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
    captions = caption if isinstance(caption, list) else [caption]
    rel_in_folder = os.path.normpath(name) if name else ""
    if (not name or caption is None or not all(isinstance(c, str) for c in captions)
        or os.path.isabs(rel_in_folder) or rel_in_folder.split(os.sep)[0] == ".."):
      skips.add("bad_manifest_row", f"{where}:{line}")
      continue
    image = os.path.join(folder, rel_in_folder)
    rel = _rel_id(image, source_dir)
    if not os.path.isfile(image):
      skips.add("missing_file", rel)
      continue
    _add_captions(examples, seen, rel, image, captions, skips)
  return examples


def _add_captions(examples: list[_Example], seen: collections.Counter, rel: str, path: str,
                  captions: Iterable[str], skips: _Skips,
                  member: webdataset.Member | None = None) -> None:
  """Appends one example per non-empty caption of `path`, numbered on from seen[rel]."""
  for c in captions:
    if not c.strip():
      skips.add("empty_caption", rel)
      continue
    examples.append(_Example(rel, seen[rel], path, c.strip(), member))
    seen[rel] += 1


# Layout d: the image suffixes a shard's samples may use (webdataset writes no leading dot).
_SHARD_IMAGE_SUFFIXES = tuple(e.lstrip(".") for e in sorted(IMAGE_EXTENSIONS))


def _shard_examples(shard: str, source_dir: str, skips: _Skips) -> list[_Example]:
  """Layout d: the examples of one .tar shard; ids are "SHARD/MEMBER" ("00000.tar/0001.jpg")."""
  rel = _rel_id(shard, source_dir)
  samples, bad = webdataset.read_shard(shard, _SHARD_IMAGE_SUFFIXES)
  for reason, name in bad:
    skips.add(reason, rel if reason == "unreadable_shard" else f"{rel}/{name}")
  examples: list[_Example] = []
  seen = collections.Counter()
  for s in samples:
    _add_captions(examples, seen, f"{rel}/{s.name}", shard, [s.caption], skips, s.member)
  return examples


def _scan_folder(folder: str, source_dir: str, skips: _Skips,
                 shards: list[str] | None = None) -> tuple[str, list[_Example]]:
  """(layout, examples) of one folder: .tar shards if it has any, else a manifest if it has
  one, else caption files. With `shards` (a Beam build), a folder of shards is not read here:
  its shard paths are appended to `shards` and its examples left to the workers."""
  manifests = [m for m in MANIFESTS if os.path.isfile(os.path.join(folder, m))]
  if len(manifests) > 1:
    raise ValueError(f"{folder} holds both {' and '.join(manifests)}; keep one manifest.")
  tars = webdataset.shard_files(folder)
  if tars:
    loose = _image_files(folder)
    if manifests or loose:
      other = manifests[0] if manifests else f"image files ({_rel_id(loose[0], source_dir)})"
      raise ValueError(f"{folder} holds webdataset .tar shards and {other}: two layouts in one "
                       "folder. Give the shards a folder of their own (or a split folder).")
    if shards is not None:
      shards.extend(tars)
      return "webdataset", []
    examples = []
    for tar in tars:
      examples += _shard_examples(tar, source_dir, skips)
    return "webdataset", examples
  if manifests:
    return manifests[0], _scan_manifest(folder, manifests[0], source_dir, skips)
  return "caption_files", _scan_caption_files(folder, source_dir, skips)


def _coco_annotations(src: str) -> dict[str, tuple[str, str]]:
  """{split: (captions json, image folder)} of a COCO folder (layout c); {} if it is not one."""
  folder = os.path.join(src, "annotations")
  if not os.path.isdir(folder):
    return {}
  found = [m for m in map(COCO_ANNOTATIONS.fullmatch, sorted(os.listdir(folder)))
           if m and os.path.isfile(os.path.join(folder, m[0]))]
  if len({m[2] for m in found}) > 1:
    raise ValueError(
        f"{folder} holds captions of two years ({', '.join(m[0] for m in found)}); keep one "
        "year's files there. 2017 re-splits 2014's images (train2017 holds most of val2014), "
        "so mixing years could put one image in two splits.")
  return {COCO_SPLITS[m[1]]: (os.path.join(folder, m[0]), os.path.join(src, m[1] + m[2]))
          for m in found}


def _coco_json(path: str) -> tuple[list[Any], list[Any]]:
  """The "images" and "annotations" lists of a COCO captions file; ValueError if malformed."""
  expected = ('expected COCO captions as in annotations_trainval2014.zip: {"images": [{"id", '
              '"file_name"}, ...], "annotations": [{"image_id", "caption"}, ...]}')
  try:
    with open(path, encoding="utf-8-sig") as f:
      data = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: e.g. a half-extracted zip.
    raise ValueError(f"{path} is not JSON ({e}); {expected}.") from e
  if not (isinstance(data, dict) and isinstance(data.get("images"), list)
          and isinstance(data.get("annotations"), list)):
    raise ValueError(f'{path} lacks an "images" or "annotations" list; {expected}.')
  return data["images"], data["annotations"]


def _is_coco_id(value: Any) -> bool:
  return isinstance(value, (int, str)) and not isinstance(value, bool)  # hashable, JSON-typed


def _scan_coco(annotations: str, image_dir: str, source_dir: str,
               skips: _Skips) -> list[_Example]:
  """Layout c: one example per annotation, like a manifest row listing an image's captions."""
  where = _rel_id(annotations, source_dir)
  images, rows = _coco_json(annotations)
  files: dict[int | str, str] = {}  # image id -> path; entries without a plain name left out
  for im in images:
    name = im.get("file_name") if isinstance(im, dict) else None
    if isinstance(name, str) and name and _is_coco_id(im.get("id")):
      name = os.path.normpath(name)
      if not os.path.isabs(name) and name.split(os.sep)[0] != "..":
        files[im["id"]] = os.path.join(image_dir, name)
  captions: dict[int | str, list[str]] = collections.defaultdict(list)  # in file order
  for i, row in enumerate(rows):
    image_id = row.get("image_id") if isinstance(row, dict) else None
    caption = row.get("caption") if isinstance(row, dict) else None
    if not (_is_coco_id(image_id) and image_id in files and isinstance(caption, str)):
      skips.add("bad_manifest_row", f"{where}:annotations[{i}]")
      continue
    captions[image_id].append(caption)
  examples: list[_Example] = []
  seen = collections.Counter()
  for image_id, texts in captions.items():
    path = files[image_id]
    rel = _rel_id(path, source_dir)
    if not os.path.isfile(path):
      skips.add("missing_file", rel)  # once per image, however many captions it has
      continue
    _add_captions(examples, seen, rel, path, texts, skips)
  return examples


def held_out_fraction(image_id: str) -> float:
  """A uniform number in [0, 1) fixed by the id; ids below test_fraction go to "test"."""
  digest = hashlib.sha256(image_id.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def _plan(cfg: ImageTextFolderConfig, shards: dict[str, list[str]] | None = None
          ) -> tuple[_Splits, dict[str, str], _Skips]:
  """Scans source_dir: (examples per split, layout per split, scan-time skips).

  With `shards` (a Beam build), folders of .tar shards are listed into shards[split] instead
  of read; their splits (and "test", when test_fraction takes it from such a "train") are
  then left empty here, for the workers to fill.
  """
  src = cfg.source_dir
  lister = (lambda split: None) if shards is None else (
      lambda split: shards.setdefault(split, []))
  if not os.path.isdir(src):
    raise FileNotFoundError(f"Image folder {src!r} does not exist or is not a folder. "
                            + LAYOUT_HELP)
  split_dirs: dict[str, str] = {}
  for name in sorted(os.listdir(src)):
    split = SPLIT_DIRS.get(name.lower())
    if split and os.path.isdir(os.path.join(src, name)):
      if split in split_dirs:
        raise ValueError(f"{src} has two folders for split {split!r}: "
                         f"{os.path.basename(split_dirs[split])}/ and {name}/; merge them.")
      split_dirs[split] = os.path.join(src, name)

  coco = _coco_annotations(src)
  origins = {**split_dirs, **{s: ann for s, (ann, _) in coco.items()}}  # for error messages
  root_manifests = [m for m in MANIFESTS if os.path.isfile(os.path.join(src, m))]

  skips = _Skips()
  splits: dict[str, list[_Example]] = {}
  layouts: dict[str, str] = {}
  if coco:
    others = [os.path.basename(d) + "/" for d in split_dirs.values()] + root_manifests
    if others:
      raise ValueError(f"{src} holds COCO caption annotations and {', '.join(others)}: two "
                       "layouts in one folder. Give the COCO files (annotations/, train2014/, "
                       "val2014/...) a folder of their own.")
    if cfg.test_fraction and "train" not in coco:
      raise ValueError(f"test_fraction={cfg.test_fraction} holds out part of COCO's train, but "
                       f"{src}/annotations has no captions_train*.json; use test_fraction=0 "
                       "(validation is COCO's own held-out split).")
    for ann, images in coco.values():  # All folders first: fail before parsing big files.
      if not os.path.isdir(images):
        name = os.path.basename(images)
        raise FileNotFoundError(
            f"{ann} is there but its images are not: unzip {name}.zip into {src} so that "
            f"{images}/ holds them, or move {os.path.basename(ann)} away to drop that split.")
    for split, (ann, images) in sorted(coco.items()):
      layouts[split] = _rel_id(ann, src)
      splits[split] = _scan_coco(ann, images, src, skips)
  elif split_dirs:
    if root_manifests:
      raise ValueError(f"{src} has split folders and a top-level {root_manifests[0]}; put one "
                       "manifest inside each split folder, paths relative to it.")
    if cfg.test_fraction and "test" in split_dirs:
      raise ValueError(f"{src} has a test/ folder and test_fraction={cfg.test_fraction}; use "
                       "one of them (test_fraction=0 keeps the folder's split).")
    top = {os.path.basename(d) for d in split_dirs.values()}
    outside = _image_files(src, exclude_top=top) + [
        t for t in webdataset.shard_files(src) if _rel_id(t, src).split("/")[0] not in top]
    for path in sorted(outside):
      skips.add("outside_splits", _rel_id(path, src))
    for split, folder in sorted(split_dirs.items()):
      layouts[split], splits[split] = _scan_folder(folder, src, skips, lister(split))
  else:
    layouts["train"], splits["train"] = _scan_folder(src, src, skips, lister("train"))

  lazy = {split for split, tars in (shards or {}).items() if tars}
  if cfg.test_fraction and "train" in lazy:
    lazy.add("test")
    splits["test"], layouts["test"] = [], layouts["train"]
  if not any(splits.values()) and not lazy:
    raise ValueError(f"No usable image + caption pairs in {src} ({skips.summary()}). "
                     f"{LAYOUT_HELP}")
  if cfg.test_fraction and splits.get("train"):
    train = splits["train"]
    splits["test"] = [e for e in train if held_out_fraction(e.id) < cfg.test_fraction]
    splits["train"] = [e for e in train if held_out_fraction(e.id) >= cfg.test_fraction]
    layouts["test"] = layouts["train"]
  for split, examples in splits.items():
    if not examples and split not in lazy:
      where = (f"test_fraction={cfg.test_fraction} of {len(splits['train'])} train examples"
               if split == "test" and cfg.test_fraction else origins.get(split, src))
      raise ValueError(f"Split {split!r} has no usable examples ({where}; {skips.summary()}). "
                       "Add images, or drop the split. " + LAYOUT_HELP)
    examples.sort(key=_order)
  return splits, layouts, skips


# ---------------------------------------------------------------------------------------
# The builder.


@dataclasses.dataclass(eq=False)
class ImageTextFolderConfig(tfds.core.BuilderConfig):
  """What to build from which folder; `make_builder` derives a name that encodes it all.

  source_dir: the folder (absolute path). resolution: R of the R x R x 3 output.
  resize: "center_crop" or "pad". background: RGB for padding and transparent pixels.
  test_fraction: share of train held out as "test" (0: none). min_size: images whose shorter
  side is below this are skipped (0: keep all; e.g. 1024 keeps upsampled images out of SR data).
  """
  source_dir: str = ""
  resolution: int = 64
  resize: str = "center_crop"
  background: tuple[int, int, int] = WHITE
  test_fraction: float = 0.0
  min_size: int = 0

  def __post_init__(self):
    if int(self.resolution) < 1:
      raise ValueError(f"resolution={self.resolution}; use a positive size such as 64.")
    if self.resize not in RESIZE_MODES:
      raise ValueError(f"resize={self.resize!r}; use one of {RESIZE_MODES}.")
    bg = tuple(int(c) for c in self.background)
    if len(bg) != 3 or not all(0 <= c <= 255 for c in bg):
      raise ValueError(f"background={self.background!r}; use an RGB triple of 0..255 ints.")
    if not 0.0 <= float(self.test_fraction) < 1.0:
      raise ValueError(f"test_fraction={self.test_fraction}; use a value in [0, 1).")
    if int(self.min_size) < 0:
      raise ValueError(f"min_size={self.min_size}; use 0 (keep all) or a positive size.")
    self.resolution, self.background = int(self.resolution), bg
    self.test_fraction, self.min_size = float(self.test_fraction), int(self.min_size)


def config_name(source_dir: str, resolution: int, resize: str = "center_crop", *,
                name: str | None = None, background: Sequence[int] = WHITE,
                test_fraction: float = 0.0, min_size: int = 0) -> str:
  """Config name, e.g. "coco_64px_center_crop": different settings never share a directory."""
  base = name or os.path.basename(os.path.abspath(source_dir))
  parts = [re.sub(r"[^A-Za-z0-9_.+-]+", "_", base).strip("_.") or "folder",
           f"{int(resolution)}px", resize]
  if tuple(background) != WHITE:
    parts.append("bg" + "".join(f"{int(c):02x}" for c in background))
  if test_fraction:
    parts.append("test" + f"{float(test_fraction):g}".replace(".", "p"))
  if min_size:
    parts.append(f"min{int(min_size)}")
  return "_".join(parts)


class ImageTextFolder(tfds.core.GeneratorBasedBuilder):
  """A folder of captioned images; see the module docstring for layouts and skips."""

  name = "image_text_folder"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Caption-file and manifest layouts, center_crop / pad."}
  # Decoding and resizing run in threads: Pillow releases the GIL in codecs and resize.
  num_workers: int | None = None

  def __init__(self, *, file_format: str = "array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    if not isinstance(cfg, ImageTextFolderConfig):
      raise ValueError("image_text_folder needs an ImageTextFolderConfig; build it with "
                       "make_builder(source_dir, resolution, data_dir).")
    r = cfg.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description=(f"Captioned images from {cfg.source_dir}, {r}x{r} RGB ({cfg.resize}). "
                     "Skipped items by reason: metadata['skipped']."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(r, r, 3), encoding_format="png"),
            "caption": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    splits, layouts, skips = _plan(self.builder_config)
    self._start(layouts, skips)
    self._unfinished = set(splits)
    return {split: self._generate_examples(examples, split)
            for split, examples in splits.items()}

  def _start(self, layouts: dict[str, str], skips: _Skips) -> None:
    """Records the config, the layouts and the scan-time skips in the metadata."""
    cfg = self.builder_config
    self._skips = skips
    self.info.metadata.update({
        "config": {"source_dir": cfg.source_dir, "resolution": cfg.resolution,
                   "resize": cfg.resize, "background": list(cfg.background),
                   "test_fraction": cfg.test_fraction, "min_size": cfg.min_size},
        "layouts": layouts,
    })
    self._record_skips()

  def _record_skips(self) -> None:
    self.info.metadata["skipped"] = dict(self._skips.counts)
    self.info.metadata["skipped_examples"] = {r: list(v) for r, v in self._skips.examples.items()}

  def _warn_skips(self) -> None:
    if self._skips.total:
      logging.warning("image_text_folder %s: skipped %d items: %s. Reasons: metadata['skipped'].",
                      self.builder_config.source_dir, self._skips.total, self._skips.summary())

  def _generate_examples(self, examples: list[_Example], split: str):
    # Examples are sorted by id, so the captions of one image are adjacent: decode it once.
    groups = [list(g) for _, g in itertools.groupby(examples, key=lambda e: e.image)]
    image = _ImageSpec.of(self.builder_config)
    written = 0
    for group, png in _ordered_map(image.encode, [g[0] for g in groups], groups,
                                   self.num_workers or min(8, os.cpu_count() or 1)):
      if isinstance(png, UnusableImageError):
        self._skips.add(png.reason, group[0].id)
        continue
      for e in group:
        yield e.key, {"image": png, "caption": e.caption, "id": e.id}
        written += 1
    self._record_skips()
    if not written:
      raise ValueError(f"Split {split!r} of {self.builder_config.source_dir} has no readable "
                       f"image ({self._skips.summary()}).")
    self._unfinished.discard(split)
    if not self._unfinished:
      self._warn_skips()


@dataclasses.dataclass(frozen=True)
class _ImageSpec:
  """How to turn a source image into the stored PNG; small and picklable, for Beam workers."""
  resolution: int
  resize: str
  background: tuple[int, int, int]
  min_size: int

  @classmethod
  def of(cls, cfg: ImageTextFolderConfig) -> "_ImageSpec":
    return cls(cfg.resolution, cfg.resize, tuple(cfg.background), cfg.min_size)

  def encode(self, e: _Example) -> bytes | UnusableImageError:
    """The PNG of e's image, or the UnusableImageError that says why there is none."""
    try:
      data = None if e.member is None else webdataset.read_member(e.path, e.member)
      im = load_image(e.path if data is None else e.id, self.resolution, resize=self.resize,
                      background=self.background, min_size=self.min_size, data=data)
    except UnusableImageError as err:
      return err
    except OSError as err:  # the shard vanished or cannot be read any more
      return UnusableImageError("unreadable_image", e.id, str(err))
    buf = io.BytesIO()
    # zlib level 1: on 1024 px photos 3.7x faster to write than the default 6 for 13% more
    # bytes; reading is as fast.
    im.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------
# The same builder on Apache Beam.

_SKIPS_TAG = "skipped"            # the Beam output of skip records (never a split name)
_SKIPS_FILE = "beam_skipped.json"  # workers' skip counts, read back after the pipeline
_SHARD_BITS = 32                   # layout d keys: shard rank << 32 | example rank in shard


class ImageTextFolderBeam(ImageTextFolder, skip_registration=True):
  """`image_text_folder` built by an Apache Beam pipeline: the same name, config, data
  directory and examples (ids, captions, PNG bytes, order) as ImageTextFolder, and the same
  skip counts. Build with `download_and_prepare(download_config=beam_download_config(...))`.

  What runs where: the launching process scans layouts a-c (as ImageTextFolder does) and
  hands the image list to the pipeline, whose workers decode and resize; for layout d it only
  lists the .tar shards, and each worker reads whole shards (scan, captions, images). So the
  web-scale layout is d: a-c put every example's path and caption into the pipeline itself.
  Workers must see source_dir at the same path (a shared mount on a cluster).
  """

  name = "image_text_folder"  # the same dataset: TFDS derives the name from the class if unset

  def _split_generators(self, dl_manager, pipeline):  # pylint: disable=arguments-differ
    # A `pipeline` argument makes TFDS hand over its Beam pipeline (one for all splits), so
    # that a shard is read once even when test_fraction takes "test" out of its "train".
    import apache_beam as beam  # pylint: disable=g-import-not-at-top
    del dl_manager
    cfg = self.builder_config
    shards: dict[str, list[str]] = {}
    splits, layouts, skips = _plan(cfg, shards)
    self._start(layouts, skips)
    work: list[tuple[Any, ...]] = []
    for split, examples in sorted(splits.items()):
      first = 0  # keys are ints (TFDS' Beam writer orders unshuffled splits by key)
      for _, group in itertools.groupby(examples, key=lambda e: e.image):
        group = list(group)
        work.append(("images", split, first, group))
        first += len(group)
    for split, tars in sorted(shards.items()):
      work += [("shard", split, rank, tar) for rank, tar in enumerate(tars)]
    names = list(splits)  # the order ImageTextFolder lists them in
    self._skips_path = os.fspath(self.data_path / _SKIPS_FILE)
    out = (pipeline
           | "ListWork" >> beam.Create(work)
           | "Spread" >> beam.Reshuffle()  # else a runner may keep all of Create's work on one worker
           | "Encode" >> beam.FlatMap(_beam_work, _ImageSpec.of(cfg), cfg.source_dir,
                                      cfg.test_fraction).with_outputs(_SKIPS_TAG, *names))
    _ = (out[_SKIPS_TAG]
         | "CountSkips" >> beam.CombineGlobally(_merge_skips)
         | "WriteSkips" >> beam.Map(_write_json, self._skips_path))
    return {split: out[split] for split in names}

  def _process_pipeline_result(self, pipeline_result) -> None:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(self._skips_path)
    found = json.loads(path.read_text())
    path.unlink()  # not a file of the dataset
    self._skips.merge({r: n for r, (n, _) in found.items()},
                      {r: ids for r, (_, ids) in found.items()})
    self._record_skips()
    self._warn_skips()


def _beam_work(item: tuple[Any, ...], image: _ImageSpec, source_dir: str,
               test_fraction: float) -> Iterator[Any]:
  """One unit of Beam work -> TaggedOutput(split, (int key, example)) for each example, and
  TaggedOutput(_SKIPS_TAG, {reason: [count, example ids]}) for what was skipped."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  kind, split, rank, what = item
  skips = _Skips()
  if kind == "images":  # one image (layouts a-c) and its captions; keys rank, rank + 1, ...
    keyed = {split: [(rank + i, e) for i, e in enumerate(what)]}
  else:  # a whole .tar shard (layout d)
    examples = sorted(_shard_examples(what, source_dir, skips), key=_order)
    parts = {split: examples}
    if split == "train" and test_fraction:  # the same rule as _plan's, applied per shard
      parts = {"train": [e for e in examples if held_out_fraction(e.id) >= test_fraction],
               "test": [e for e in examples if held_out_fraction(e.id) < test_fraction]}
    keyed = {s: [((rank << _SHARD_BITS) | i, e) for i, e in enumerate(part)]
             for s, part in parts.items()}
  for s, pairs in keyed.items():
    for _, group in itertools.groupby(pairs, key=lambda p: p[1].image):
      group = list(group)
      png = image.encode(group[0][1])
      if isinstance(png, UnusableImageError):
        skips.add(png.reason, group[0][1].id)
        continue
      for key, e in group:
        yield pvalue.TaggedOutput(s, (key, {"image": png, "caption": e.caption, "id": e.id}))
  for reason, n in skips.counts.items():
    if n:
      yield pvalue.TaggedOutput(_SKIPS_TAG, {reason: [n, skips.examples[reason]]})


def _merge_skips(parts: Iterable[dict[str, list[Any]]]) -> dict[str, list[Any]]:
  """Beam's combiner of skip records {reason: [count, ids]}: one such dict, counts summed, the
  smallest ids kept so that the result does not depend on the workers' order. Its output is a
  valid input, as CombineGlobally needs of a plain function (it re-combines partial results)."""
  merged: dict[str, list[Any]] = {}
  for part in parts:
    for reason, (n, ids) in part.items():
      count, kept = merged.get(reason, (0, []))
      merged[reason] = [count + n, sorted(set(kept) | set(ids))[:MAX_EXAMPLE_IDS]]
  return merged


def _write_json(value: Any, path: str) -> None:
  from etils import epath  # pylint: disable=g-import-not-at-top
  epath.Path(path).write_text(json.dumps(value))


def beam_download_config(options: str = "") -> tfds.download.DownloadConfig:
  """DownloadConfig for ImageTextFolderBeam from Beam's command-line flags, e.g.
  "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp". With no
  --runner: Beam's DirectRunner on this machine, one process per core."""
  import shlex  # pylint: disable=g-import-not-at-top
  from apache_beam.options import pipeline_options  # pylint: disable=g-import-not-at-top
  flags = shlex.split(options)
  if not any(f.startswith("--runner") for f in flags):
    flags = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
             "--direct_num_workers=0", *flags]  # 0: one worker per core
  return tfds.download.DownloadConfig(
      beam_options=pipeline_options.PipelineOptions(flags))


def _ordered_map(fn: Callable[[Any], Any], args: Sequence[Any], tags: Sequence[Any],
                 workers: int) -> Iterator[tuple[Any, Any]]:
  """(tag, fn(arg)) in input order, at most a few calls ahead of the consumer."""
  window = 4 * workers
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = collections.deque()
    for arg, tag in zip(args, tags):
      pending.append((tag, pool.submit(fn, arg)))
      if len(pending) >= window:
        tag0, future = pending.popleft()
        yield tag0, future.result()
    while pending:
      tag0, future = pending.popleft()
      yield tag0, future.result()


def make_builder(source_dir: str | os.PathLike, resolution: int, data_dir: str | os.PathLike, *,
                 resize: str = "center_crop", test_fraction: float = 0.0,
                 name: str | None = None, background: Sequence[int] = WHITE,
                 min_size: int = 0, beam: bool = False) -> ImageTextFolder:
  """Builder for `source_dir` at `resolution`, stored under `data_dir`.

  The config name (see `config_name`) encodes every setting; `name` replaces the folder's
  base name in it. Call `download_and_prepare()` to build (once; delete `builder.data_dir` to
  rebuild after the folder changed) and `as_data_source(split)` to read. `beam`: an
  ImageTextFolderBeam, built with download_and_prepare(download_config=beam_download_config())
  (the same dataset: either builder reads what the other built).
  """
  source_dir = os.path.abspath(os.fspath(source_dir))
  config = ImageTextFolderConfig(
      name=config_name(source_dir, resolution, resize, name=name, background=background,
                       test_fraction=test_fraction, min_size=min_size),
      description=f"{source_dir} at {resolution}px ({resize})",
      source_dir=source_dir, resolution=resolution, resize=resize,
      background=tuple(background), test_fraction=test_fraction, min_size=min_size)
  builder = (ImageTextFolderBeam if beam else ImageTextFolder)(
      config=config, data_dir=os.fspath(data_dir))
  if builder.is_prepared():
    built_from = builder.info.metadata.get("config", {}).get("source_dir")
    if built_from and built_from != source_dir:
      raise ValueError(f"{builder.data_dir} was built from {built_from}, not {source_dir}; "
                       "pass name=... to keep both, or delete that directory to rebuild.")
  return builder


def as_beam(builder: ImageTextFolder) -> ImageTextFolderBeam:
  """The Beam twin of `builder`: the same config and data directory, built by Beam."""
  if isinstance(builder, ImageTextFolderBeam):
    return builder
  return ImageTextFolderBeam(config=builder.builder_config,
                             data_dir=os.fspath(builder.data_dir_root))
