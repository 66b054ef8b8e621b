"""Real photographs from Debian wallpaper packages, for super-resolution evaluation.

Optional and never a dependency: after

  apt-get install -y --no-install-recommends mate-backgrounds plasma-workspace-wallpapers

`find_photos()` lists the distinct images of at least 1024 px on the shorter side under
/usr/share/backgrounds and /usr/share/wallpapers, and `photo_folder(dest)` writes them as a
caption-files folder (image + same-stem .txt) that `image_text_folder` builds:

  builder = make_builder(photo_folder("/tmp/photos"), 1024, "/tmp/tfds")

Captions come from names (Plasma's metadata.json "Name", else the file or package name), so
they suit SR metrics (PSNR/SSIM on crops), not text-alignment scores. Some wallpapers are
digital art rather than photographs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import unicodedata
from pathlib import Path
from typing import Callable, Iterable

from PIL import Image

DEFAULT_ROOTS = ("/usr/share/backgrounds", "/usr/share/wallpapers")
PHOTO_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
MIN_SIDE = 1024
APT_HINT = ("apt-get install -y --no-install-recommends mate-backgrounds "
            "plasma-workspace-wallpapers")

# Plasma packages: <Name>/contents/images[_dark]/<W>x<H>.jpg, metadata.json beside contents/.
_RESOLUTION = re.compile(r"[_-]?\d+x\d+$")


def _size(path: Path) -> tuple[int, int] | None:
  try:
    with Image.open(path) as im:
      return im.size  # Header only.
  except Exception:  # pylint: disable=broad-except
    return None  # Not an image after all: not a photo.


def _words(name: str) -> str:
  """"YellowFlower" / "MATE-Stripes_dark" -> "yellow flower" / "mate stripes dark"."""
  name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", name)
  return " ".join(re.sub(r"[_\-.]+", " ", name).lower().split())


def _package_name(package: Path) -> str:
  try:
    name = json.loads((package / "metadata.json").read_text(encoding="utf-8"))["KPlugin"]["Name"]
    if isinstance(name, str) and name.strip():
      return " ".join(name.lower().split())
  except (OSError, ValueError, KeyError, TypeError):
    pass
  return _words(package.name)


def caption_from_path(path: str | os.PathLike) -> str:
  """A caption from a photo's path: its file name in words, or for a file named by its
  resolution (Plasma's 5120x2880.jpg), its package's name; "images_dark" adds ", dark"."""
  path = Path(path)
  caption = _words(_RESOLUTION.sub("", path.stem))
  if not caption:
    parts = path.parts
    if "contents" in parts:
      caption = _package_name(Path(*parts[:len(parts) - 1 - parts[::-1].index("contents")]))
    else:
      caption = _words(path.parent.name)
  if "images_dark" in path.parts:
    caption += ", dark"
  return caption or "a photo"


def find_photos(roots: Iterable[str | os.PathLike] = DEFAULT_ROOTS,
                min_side: int = MIN_SIDE) -> list[Path]:
  """JPEG / PNG / WebP files under `roots` with shorter side >= min_side, symlinks resolved,
  each file once, sorted. Missing roots are fine: the result is then empty."""
  found = set()
  for root in roots:
    for dirpath, _, files in os.walk(root):
      for f in files:
        path = Path(dirpath, f)
        if path.suffix.lower() in PHOTO_EXTENSIONS:
          real = path.resolve()  # Plasma links every screen size to one file.
          size = _size(real) if real.is_file() else None
          if size and min(size) >= min_side:
            found.add(real)
  return sorted(found)


def photo_folder(dest: str | os.PathLike, captions_from: str | Callable[[Path], str] = "file name",
                 *, roots: Iterable[str | os.PathLike] = DEFAULT_ROOTS, min_side: int = MIN_SIDE,
                 copy: bool = False) -> str:
  """Writes the photos under `roots` into `dest` as image + caption .txt pairs; returns dest.

  captions_from: "file name" (`caption_from_path`) or a function of the photo's path.
  Resolutions of one picture in one folder (Elephants.jpg, Elephants_3840x2160.jpg) are the
  same scene: only the largest is kept. Images are symlinked unless copy=True. Running it again
  on a folder it already wrote is a no-op; any other non-empty dest is refused.
  """
  if captions_from == "file name":
    captions_from = caption_from_path
  elif not callable(captions_from):
    raise ValueError(f"captions_from={captions_from!r}; use 'file name' or a function of the "
                     "photo's path.")
  photos = find_photos(roots, min_side)
  if not photos:
    raise FileNotFoundError(f"No images of >= {min_side} px under {list(map(str, roots))}; "
                            f"install some with: {APT_HINT}")
  # One picture per (folder, caption): the largest.
  best: dict[tuple[Path, str], tuple[int, Path]] = {}
  for p in photos:
    w, h = _size(p)
    key = (p.parent, captions_from(p))
    if key not in best or w * h > best[key][0]:
      best[key] = (w * h, p)
  plan: dict[str, tuple[Path, str]] = {}
  for (_, caption), (_, p) in sorted(best.items(), key=lambda kv: str(kv[1][1])):
    ascii_ = unicodedata.normalize("NFKD", caption).encode("ascii", "ignore").decode()
    stem = re.sub(r"[^a-z0-9]+", "_", ascii_.lower()).strip("_") or "photo"
    name, n = stem, 1
    while name + ".txt" in plan:
      n += 1
      name = f"{stem}_{n}"
    plan[name + ".txt"] = (p, caption)

  dest = Path(dest)
  want = sorted([n for n in plan] + [n[:-4] + plan[n][0].suffix.lower() for n in plan])
  if dest.is_dir() and any(dest.iterdir()):
    if sorted(os.listdir(dest)) == want:
      return str(dest)
    raise FileExistsError(f"{dest} is not empty and was not written by photo_folder with these "
                          "photos; delete it or pick another dest.")
  dest.mkdir(parents=True, exist_ok=True)
  for txt, (p, caption) in plan.items():
    image = dest / (txt[:-4] + p.suffix.lower())
    if copy:
      shutil.copyfile(p, image)
    else:
      image.symlink_to(p)
    (dest / txt).write_text(caption + "\n", encoding="utf-8")
  return str(dest)
