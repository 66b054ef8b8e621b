"""Reading webdataset tar shards: the format LAION, COYO and img2dataset output ship in.

A shard is a plain tar whose members are grouped into samples by key: the member's path up to
the first "." of its base name (`00/000123.jpg` and `00/000123.txt` are sample `00/000123`,
extensions "jpg" and "txt"). A sample here is one image (jpg, jpeg, png, webp, ... as
`image_suffixes`) and a caption, from `KEY.txt` (the file's text) or else from `KEY.json`
(its "caption" or "text" field; img2dataset writes both, with the same caption). Other members
(`.cls`, `.npy`, parquet sidecars) are ignored.

`read_shard` lists a shard's samples without decoding any image: the images stay inside the
tar as (offset, size), read back later by `read_member`, so a scan reads headers and captions
only (on a local disk, the image bytes are seeked over). What cannot become a sample is
returned as (reason, name) with the reasons of image_text_folder's SKIP_REASONS:
  missing_caption     an image with neither KEY.txt nor KEY.json
  missing_file        a caption (.txt or .json) whose sample has no image
  unreadable_caption  a .txt that is not UTF-8
  bad_manifest_row    a .json that is not a JSON object with a string "caption"/"text"
  unreadable_shard    a tar that is not a tar or ends early (the samples listed before the
                      damage are kept; a cut-off last image then fails as unreadable_image)
Empty captions are returned as they are (the builder counts them as empty_caption).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from typing import Iterable, NamedTuple

SHARD_SUFFIX = ".tar"
CAPTION_KEYS = ("caption", "text")


class Member(NamedTuple):
  """Where a member's bytes lie inside its tar (tar members are stored uncompressed)."""
  offset: int
  size: int


@dataclasses.dataclass(frozen=True)
class Sample:
  """One image of a shard and its caption (possibly empty: the caller decides)."""
  name: str        # the image member's path inside the tar, e.g. "00/000123.jpg"
  member: Member
  caption: str


def split_key(name: str) -> tuple[str, str]:
  """Member path -> (sample key, lower-case extension), webdataset's rule: the first "." of
  the base name ends the key ("a/x.seg.png" -> ("a/x", "seg.png"))."""
  folder, base = os.path.split(name)
  stem, dot, ext = base.partition(".")
  return (os.path.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def shard_files(folder: str) -> list[str]:
  """The *.tar shards under `folder` at any depth, sorted; hidden files and folders skipped."""
  found = []
  for root, dirs, files in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    found += [os.path.join(root, f) for f in files
              if not f.startswith(".") and f.lower().endswith(SHARD_SUFFIX)]
  return sorted(found)


def _json_caption(data: bytes) -> str | None:
  try:
    row = json.loads(data.decode("utf-8-sig"))
  except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
    return None
  if not isinstance(row, dict):
    return None
  caption = next((row[k] for k in CAPTION_KEYS if row.get(k) is not None), None)
  return caption if isinstance(caption, str) else None


def read_shard(path: str, image_suffixes: Iterable[str]
               ) -> tuple[list[Sample], list[tuple[str, str]]]:
  """(samples in tar order, skipped (reason, member name)) of the shard at `path`.

  `image_suffixes`: extensions without the dot ("jpg", "png"). Captions are stripped.
  """
  image_suffixes = frozenset(s.lower().lstrip(".") for s in image_suffixes)
  images: dict[str, tuple[str, Member]] = {}  # key -> first image member of that key
  texts: dict[str, tuple[str, bytes]] = {}    # key -> (member name, .txt bytes)
  jsons: dict[str, tuple[str, bytes]] = {}
  skips: list[tuple[str, str]] = []
  order: dict[str, None] = {}  # keys in the order their first member appears
  try:
    with tarfile.open(path, "r:") as tar:  # "r:": shards are uncompressed; offsets need it
      for info in tar:
        if not info.isfile():
          continue
        key, ext = split_key(info.name)
        if os.path.basename(key).startswith("."):
          continue  # macOS "._x" resource forks and other hidden files
        order.setdefault(key)
        if ext in image_suffixes:
          images.setdefault(key, (info.name, Member(info.offset_data, info.size)))
        elif ext in ("txt", "json"):
          # Captions are small: read them now, while the tar is positioned on them.
          (texts if ext == "txt" else jsons).setdefault(
              key, (info.name, tar.extractfile(info).read()))
  except (tarfile.TarError, OSError, EOFError) as e:
    skips.append(("unreadable_shard", f"{type(e).__name__}: {e}"))
  samples = []
  for key in order:
    image = images.get(key)
    if key in texts:
      name, data = texts[key]
      try:
        caption = data.decode("utf-8-sig").strip()
      except UnicodeDecodeError:
        skips.append(("unreadable_caption", (image or (name,))[0]))
        continue
    elif key in jsons:
      name, data = jsons[key]
      caption = _json_caption(data)
      if caption is None:
        skips.append(("bad_manifest_row", name))
        continue
      caption = caption.strip()
    elif image is not None:
      skips.append(("missing_caption", image[0]))
      continue
    else:
      continue  # neither image nor caption (e.g. only .cls): not a captioned-image sample
    if image is None:
      skips.append(("missing_file", name))
      continue
    samples.append(Sample(image[0], image[1], caption))
  return samples, skips


def read_member(path: str, member: Member) -> bytes:
  """The bytes of a member `read_shard` listed; short if the shard was cut off there."""
  with open(path, "rb") as f:
    f.seek(member.offset)
    return f.read(member.size)
