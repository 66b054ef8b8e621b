"""photos: captions from names, size filter, de-duplication, the folder it writes builds.

Synthetic trees in tmp_path mimic the Debian layouts; nothing here needs the packages.
"""

import json
import os

from PIL import Image
import pytest

from imagen_jax.data import photos
from imagen_jax.data.builders.image_text_folder import make_builder


def _image(path, size):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, (90, 120, 150)).save(path)
  return path


@pytest.mark.parametrize("path, caption", [
    ("/usr/share/backgrounds/mate/nature/YellowFlower.jpg", "yellow flower"),
    ("/usr/share/backgrounds/mate/abstract/Elephants_3840x2160.jpg", "elephants"),
    ("/usr/share/backgrounds/mate/desktop/MATE-Stripes-Dark.png", "mate stripes dark"),
    ("/usr/share/wallpapers/summer_1am/contents/images/2560x1600.jpg", "summer 1am"),
    ("/usr/share/wallpapers/ColdRipple/contents/images_dark/5120x2880.jpg", "cold ripple, dark"),
    ("/photos/2048x1536.jpg", "photos"),
])
def test_captions_from_names(path, caption):
  assert photos.caption_from_path(path) == caption


def test_plasma_metadata_name_wins(tmp_path):
  package = tmp_path / "BytheWater"
  os.makedirs(package / "contents" / "images")
  (package / "metadata.json").write_text(json.dumps({"KPlugin": {"Name": "By the Water"}}))
  assert photos.caption_from_path(package / "contents/images/2560x1600.jpg") == "by the water"


def _tree(root):
  """Two roots' worth of wallpapers: sizes around the limit, links, a non-image, a scene twice."""
  mate, plasma = root / "backgrounds" / "nature", root / "wallpapers"
  big = _image(str(plasma / "Kite/contents/images/130x100.jpg"), (130, 100))
  os.symlink(big, plasma / "Kite/contents/images/64x48.jpg")  # a link: the same photo
  _image(str(mate / "Dune.jpg"), (160, 100))
  _image(str(mate / "Dune_320x200.jpg"), (320, 200))  # the same scene, larger: kept instead
  _image(str(mate / "Small.jpg"), (300, 99))  # shorter side under the limit
  _image(str(root / "backgrounds" / "abstract" / "Dune.png"), (100, 100))  # another "dune"
  (mate / "Broken.jpg").write_bytes(b"not a jpeg")
  (mate / "Notes.txt").write_text("not an image")
  return [str(root / "backgrounds"), str(plasma), str(root / "absent")]


def test_find_photos_filters_sizes_and_links(tmp_path):
  found = photos.find_photos(_tree(tmp_path), min_side=100)
  assert [p.relative_to(tmp_path).as_posix() for p in found] == [
      "backgrounds/abstract/Dune.png", "backgrounds/nature/Dune.jpg",
      "backgrounds/nature/Dune_320x200.jpg", "wallpapers/Kite/contents/images/130x100.jpg"]


def test_photo_folder_builds_with_image_text_folder(tmp_path):
  roots = _tree(tmp_path / "share")
  dest = photos.photo_folder(tmp_path / "out", roots=roots, min_side=100)
  names = sorted(os.listdir(dest))
  assert names == ["dune.png", "dune.txt", "dune_2.jpg", "dune_2.txt", "kite.jpg", "kite.txt"]
  assert os.path.realpath(os.path.join(dest, "dune_2.jpg")).endswith("Dune_320x200.jpg")
  assert open(os.path.join(dest, "kite.txt")).read() == "kite\n"
  assert photos.photo_folder(dest, roots=roots, min_side=100) == dest  # again: no-op
  with pytest.raises(FileExistsError, match="not empty"):
    photos.photo_folder(dest, roots=roots[:1], min_side=100)
  builder = make_builder(dest, 16, str(tmp_path / "tfds"))
  builder.download_and_prepare()
  ds = builder.as_data_source("train")
  assert [ds[i]["caption"] for i in range(len(ds))] == [b"dune", b"dune", b"kite"]


def test_photo_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install"):
    photos.photo_folder(tmp_path / "out", roots=[str(tmp_path / "none")])
  with pytest.raises(ValueError, match="captions_from"):
    photos.photo_folder(tmp_path / "out", captions_from="exif")
  copied = photos.photo_folder(tmp_path / "copy", lambda p: "a photo", copy=True,
                               roots=_tree(tmp_path / "share"), min_side=100)
  assert not any(os.path.islink(os.path.join(copied, n)) for n in os.listdir(copied))
