"""image_text_folder: both layouts build and read back TF-free, geometry, skips, splits, errors."""

import csv
import io
import json
import os

import numpy as np
from PIL import Image
import pytest

from imagen_jax.data.builders import image_text_folder as itf

RED, BLUE, GREEN, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)


def _save(path, im, **kw):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, **kw)
  return path


def _caption(image_path, text):
  with open(os.path.splitext(image_path)[0] + ".txt", "w", encoding="utf-8") as f:
    f.write(text)


def _mixed_images(folder):
  """Images of several modes and sizes; returns {relative path: expected centre pixel or None}."""
  p8 = Image.new("P", (64, 48))
  p8.putpalette([0, 0, 0, 10, 120, 250] + [0] * 762)
  p8.paste(1, (0, 0, 64, 48))
  images = {
      "photo.jpg": (Image.new("RGB", (300, 200), (30, 160, 90)), None),  # JPEG: no exact pixels
      "nested/deeper/clear.png": (Image.new("RGBA", (50, 80), (0, 0, 255, 0)), WHITE),
      "grey.png": (Image.new("L", (40, 70), 100), (100, 100, 100)),
      "palette.png": (p8, (10, 120, 250)),
      "deep16.png": (Image.fromarray(np.full((30, 30), 32896, np.uint16)), (128, 128, 128)),
      "print.jpg": (Image.new("CMYK", (40, 40), (0, 0, 0, 0)), None),
  }
  for rel, (im, _) in images.items():
    _save(os.path.join(folder, rel), im)
  return {rel: px for rel, (_, px) in images.items()}


def _build(src, res, data_dir, **kw):
  builder = itf.make_builder(str(src), res, str(data_dir), **kw)
  builder.download_and_prepare()
  return builder


def _rows(builder, split="train"):
  ds = builder.as_data_source(split)
  rows = [ds[i] for i in range(len(ds))]
  for r in rows:
    r["caption"], r["id"] = r["caption"].decode(), r["id"].decode()
  return rows


def _check_images(rows, res):
  for r in rows:
    assert r["image"].shape == (res, res, 3) and r["image"].dtype == np.uint8


def test_caption_files_layout_reads_back(tmp_path):
  src = tmp_path / "my photos"
  expected = _mixed_images(src)
  for i, rel in enumerate(expected):
    _caption(os.path.join(src, rel), f"  caption {i}\n\n")
  builder = _build(src, 16, tmp_path / "tfds")
  assert builder.builder_config.name == "my_photos_16px_center_crop"
  rows = _rows(builder)
  _check_images(rows, 16)
  assert [r["id"] for r in rows] == sorted(expected)  # sorted, "/"-separated relative paths
  captions = {rel: f"caption {i}" for i, rel in enumerate(expected)}
  assert {r["id"]: r["caption"] for r in rows} == captions
  for r in rows:
    if expected[r["id"]] is not None:  # modes converted, alpha on white, 16 bits scaled
      np.testing.assert_allclose(r["image"][8, 8], expected[r["id"]], atol=1)
  assert builder.info.metadata["layouts"] == {"train": "caption_files"}
  assert sum(builder.info.metadata["skipped"].values()) == 0
  # A second builder reads the prepared copy, metadata included, without the source folder.
  os.rename(src, tmp_path / "moved")
  again = itf.make_builder(str(src), 16, str(tmp_path / "tfds"))
  assert again.is_prepared() and len(again.as_data_source("train")) == len(expected)
  assert again.info.metadata["layouts"] == {"train": "caption_files"}


@pytest.mark.parametrize("manifest", ["metadata.jsonl", "metadata.csv"])
def test_manifest_layouts(tmp_path, manifest):
  src = tmp_path / "coco"
  _mixed_images(src / "images")
  rows = [("images/photo.jpg", "a photo, with a comma"), ("images/grey.png", " grey  "),
          ("images/photo.jpg", "the same photo again"),
          ("images/nested/deeper/clear.png", "nothing to see")]
  if manifest.endswith(".jsonl"):
    lines = [json.dumps({"file_name": f, "caption": c}) for f, c in rows]
    lines.append(json.dumps({"image": "images/palette.png", "text": ["blue", "very blue"]}))
    (src / manifest).write_text("\n".join(lines) + "\n\n", encoding="utf-8")
  else:
    rows.append(("images/palette.png", "blue"))
    with open(src / manifest, "w", newline="", encoding="utf-8") as f:
      w = csv.writer(f)
      w.writerow(["file_name", "caption", "other"])
      w.writerows([(fn, c, "x") for fn, c in rows])
  builder = _build(src, 8, tmp_path / "tfds")
  got = _rows(builder)
  _check_images(got, 8)
  # Sorted by id, the captions of one image in manifest order; unlisted images are unused.
  want = [("images/grey.png", "grey"), ("images/nested/deeper/clear.png", "nothing to see"),
          ("images/palette.png", "blue")]
  if manifest.endswith(".jsonl"):
    want.append(("images/palette.png", "very blue"))
  want += [("images/photo.jpg", "a photo, with a comma"),
           ("images/photo.jpg", "the same photo again")]
  assert [(r["id"], r["caption"]) for r in got] == want
  assert builder.info.metadata["layouts"] == {"train": manifest}
  two = [r for r in got if r["id"] == "images/photo.jpg"]
  np.testing.assert_array_equal(two[0]["image"], two[1]["image"])


def _two_colour_strip():
  """200x100: green | red | blue | green; the central square is red | blue."""
  a = np.zeros((100, 200, 3), np.uint8)
  a[:, :50], a[:, 50:100], a[:, 100:150], a[:, 150:] = GREEN, RED, BLUE, GREEN
  return Image.fromarray(a)


def test_center_crop_keeps_the_central_square(tmp_path):
  path = _save(str(tmp_path / "strip.png"), _two_colour_strip())
  out = np.asarray(itf.load_image(path, 32, resize="center_crop")).astype(int)
  assert out.shape == (32, 32, 3)
  np.testing.assert_allclose(out[:, 1:15], np.broadcast_to(RED, (32, 14, 3)), atol=2)
  np.testing.assert_allclose(out[:, 17:31], np.broadcast_to(BLUE, (32, 14, 3)), atol=2)
  assert out[..., 1].max() <= 20  # the green margins were cropped (only filter tails remain)


def test_pad_letterboxes_on_white_or_a_colour(tmp_path):
  path = _save(str(tmp_path / "strip.png"), _two_colour_strip())
  out = np.asarray(itf.load_image(path, 32, resize="pad")).astype(int)
  # 200x100 -> 32x16, centred: 8 white rows above and below, all four bands inside.
  assert (out[:8] == 255).all() and (out[24:] == 255).all()
  np.testing.assert_allclose(out[8:24, 1:7], np.broadcast_to(GREEN, (16, 6, 3)), atol=2)
  np.testing.assert_allclose(out[8:24, 9:15], np.broadcast_to(RED, (16, 6, 3)), atol=2)
  np.testing.assert_allclose(out[8:24, 17:23], np.broadcast_to(BLUE, (16, 6, 3)), atol=2)
  grey = np.asarray(itf.load_image(path, 32, resize="pad", background=(9, 9, 9)))
  assert (grey[:8] == 9).all() and (grey[24:] == 9).all()


def test_exif_orientation_is_applied(tmp_path):
  a = np.zeros((20, 40, 3), np.uint8)
  a[:, :20], a[:, 20:] = RED, BLUE
  exif = Image.Exif()
  exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
  path = _save(str(tmp_path / "phone.png"), Image.fromarray(a), exif=exif)
  out = np.asarray(itf.load_image(path, 16, resize="pad")).astype(int)
  assert (out[:, :4] == 255).all() and (out[:, 12:] == 255).all()  # bands left and right
  np.testing.assert_allclose(out[1:7, 5:11], np.broadcast_to(RED, (6, 6, 3)), atol=2)
  np.testing.assert_allclose(out[9:15, 5:11], np.broadcast_to(BLUE, (6, 6, 3)), atol=2)


def _swapped_icc():
  """A minimal ICC v2 RGB profile: sRGB's colorants with red and green exchanged, gamma 2.2."""
  import struct  # pylint: disable=g-import-not-at-top
  fixed = lambda *v: b"".join(struct.pack(">i", round(x * 65536)) for x in v)
  xyz = lambda *v: b"XYZ \0\0\0\0" + fixed(*v)
  curve = b"curv\0\0\0\0" + struct.pack(">IH", 1, round(2.2 * 256)) + b"\0\0"
  tags = [(b"wtpt", xyz(0.9642, 1.0, 0.8249)), (b"rXYZ", xyz(0.3851, 0.7169, 0.0971)),
          (b"gXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
          (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
  offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
  for sig, body in tags:
    table += sig + struct.pack(">II", offset + len(data), len(body))
    data += body
  size = offset + len(data)
  header = (struct.pack(">I", size) + b"\0" * 4 + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
            + b"\0" * 12 + b"acsp" + b"\0" * 28 + fixed(0.9642, 1.0, 0.8249) + b"\0" * 48)
  return header + struct.pack(">I", len(tags)) + table + data


def test_icc_profiles_are_converted_to_srgb(tmp_path):
  from PIL import ImageCms  # pylint: disable=g-import-not-at-top
  colour = (200, 60, 30)
  srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
  for name, icc in (("srgb", srgb), ("broken", b"not a profile")):
    path = _save(str(tmp_path / f"{name}.png"), Image.new("RGB", (8, 8), colour), icc_profile=icc)
    np.testing.assert_allclose(np.asarray(itf.load_image(path, 4))[0, 0], colour, atol=1)
  # Under a profile whose red is sRGB's green, the same values are a green colour.
  path = _save(str(tmp_path / "swapped.png"), Image.new("RGB", (8, 8), colour),
               icc_profile=_swapped_icc())
  np.testing.assert_allclose(np.asarray(itf.load_image(path, 4))[0, 0], (60, 200, 30), atol=8)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_items_are_skipped_and_counted(tmp_path, monkeypatch):
  src = tmp_path / "messy"
  train, test = src / "train", src / "test"
  good = {}
  for i in range(3):
    good[f"train/ok{i}.png"] = _save(str(train / f"ok{i}.png"), Image.new("RGB", (40, 30)))
    _caption(good[f"train/ok{i}.png"], f"good {i}")
  jpeg = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
      jpeg, "JPEG")
  bad = {
      "truncated.jpg": jpeg.getvalue()[:len(jpeg.getvalue()) // 2],
      "zero.jpg": b"",
      "notes.png": b"this is not a png at all",
  }
  for name, data in bad.items():
    (train / name).write_bytes(data)
    _caption(str(train / name), "a caption for a broken file")
  _caption(_save(str(train / "blank.png"), Image.new("RGB", (30, 30))), " \n\t ")
  _save(str(train / "uncaptioned.png"), Image.new("RGB", (30, 30)))
  _caption(_save(str(train / "latin1.png"), Image.new("RGB", (30, 30))), "")
  (train / "latin1.txt").write_bytes(b"caf\xe9")
  _caption(_save(str(train / "tiny.png"), Image.new("RGB", (10, 30))), "too small")
  _caption(_save(str(train / "huge.png"), Image.new("RGB", (110, 110))), "over the limit")
  _caption(_save(str(train / "bomb.png"), Image.new("RGB", (200, 200))), "over twice the limit")
  _save(str(src / "stray.png"), Image.new("RGB", (30, 30)))
  _save(str(test / "t.png"), Image.new("RGB", (30, 30)))
  (test / "metadata.jsonl").write_text("\n".join([
      json.dumps({"file_name": "t.png", "caption": "kept"}),
      json.dumps({"file_name": "gone.png", "caption": "the file is missing"}),
      json.dumps({"file_name": "t.png", "caption": "  "}),
      json.dumps({"path": "t.png", "caption": "wrong key"}),
      json.dumps({"file_name": "../train/ok0.png", "caption": "outside the folder"}),
      "{not json",
  ]))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)
  builder = _build(src, 16, tmp_path / "tfds", min_size=20)

  assert builder.info.metadata["skipped"] == {
      "missing_caption": 1, "empty_caption": 2, "unreadable_caption": 1,
      "bad_manifest_row": 3, "missing_file": 1, "unreadable_image": 3, "too_large": 2,
      "too_small": 1, "outside_splits": 1, "unreadable_shard": 0}
  examples = builder.info.metadata["skipped_examples"]
  assert sorted(examples["unreadable_image"]) == ["train/notes.png", "train/truncated.jpg",
                                                  "train/zero.jpg"]
  assert examples["missing_file"] == ["test/gone.png"]
  assert examples["bad_manifest_row"] == ["test/metadata.jsonl:4", "test/metadata.jsonl:5",
                                          "test/metadata.jsonl:6"]
  assert sorted(examples["too_large"]) == ["train/bomb.png", "train/huge.png"]
  assert examples["outside_splits"] == ["stray.png"]
  assert [r["id"] for r in _rows(builder, "train")] == sorted(good)
  assert [(r["id"], r["caption"]) for r in _rows(builder, "test")] == [("test/t.png", "kept")]


def test_split_folders(tmp_path):
  src = tmp_path / "split"
  for split, n in (("train", 3), ("validation", 2), ("test", 1)):
    for i in range(n):
      _caption(_save(str(src / split / f"{i}.png"), Image.new("RGB", (8, 8))), f"{split} {i}")
  builder = _build(src, 8, tmp_path / "tfds")
  assert {s: len(builder.as_data_source(s)) for s in ("train", "validation", "test")} == {
      "train": 3, "validation": 2, "test": 1}
  assert [r["caption"] for r in _rows(builder, "validation")] == ["validation 0", "validation 1"]
  with pytest.raises(ValueError, match="test/ folder and test_fraction"):
    itf.make_builder(str(src), 8, str(tmp_path / "tfds"), test_fraction=0.5).download_and_prepare()


def test_test_fraction_is_a_fixed_hash_of_the_id(tmp_path):
  src = tmp_path / "flat"
  def add(i):
    _caption(_save(str(src / f"img{i:02d}.png"), Image.new("RGB", (8, 8), (i, 0, 0))), f"n{i}")
  for i in range(40):
    add(i)
  first = _build(src, 8, tmp_path / "a", test_fraction=0.25)
  assert first.builder_config.name == "flat_8px_center_crop_test0p25"
  train, test = ([r["id"] for r in _rows(first, s)] for s in ("train", "test"))
  assert sorted(train + test) == [f"img{i:02d}.png" for i in range(40)]
  assert test == sorted(i for i in train + test if itf.held_out_fraction(i) < 0.25)
  assert 0 < len(test) < 20
  # More images later: the earlier ones stay on their side.
  for i in range(40, 60):
    add(i)
  later = _build(src, 8, tmp_path / "b", test_fraction=0.25)
  later_test = {r["id"] for r in _rows(later, "test")}
  assert set(test) <= later_test and not set(train) & later_test


def test_missing_folder_and_no_usable_examples_fail_clearly(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match="nowhere.*metadata.jsonl"):
    itf.make_builder(str(missing), 8, str(tmp_path / "tfds")).download_and_prepare()
  uncaptioned = tmp_path / "uncaptioned"
  _save(str(uncaptioned / "a.png"), Image.new("RGB", (8, 8)))
  with pytest.raises(ValueError, match=r"No usable .*uncaptioned.*missing_caption: 1.*cat\.txt"):
    itf.make_builder(str(uncaptioned), 8, str(tmp_path / "tfds")).download_and_prepare()
  broken = tmp_path / "broken"
  os.makedirs(broken)
  (broken / "a.jpg").write_bytes(b"")
  _caption(str(broken / "a.jpg"), "empty file")
  with pytest.raises(ValueError, match="no readable image.*unreadable_image: 1"):
    itf.make_builder(str(broken), 8, str(tmp_path / "tfds")).download_and_prepare()
  both = tmp_path / "both"
  os.makedirs(both)
  (both / "metadata.jsonl").write_text("")
  (both / "metadata.csv").write_text("file_name,caption\n")
  with pytest.raises(ValueError, match="keep one manifest"):
    itf.make_builder(str(both), 8, str(tmp_path / "tfds")).download_and_prepare()
  columns = tmp_path / "columns"
  os.makedirs(columns)
  (columns / "metadata.csv").write_text("path,label\na.png,cat\n")
  with pytest.raises(ValueError, match=r"columns \['path', 'label'\].*file_name"):
    itf.make_builder(str(columns), 8, str(tmp_path / "tfds")).download_and_prepare()
  few = tmp_path / "few"
  _caption(_save(str(few / "a.png"), Image.new("RGB", (8, 8))), "only one")
  with pytest.raises(ValueError, match="'test' has no usable examples.*test_fraction"):
    itf.make_builder(str(few), 8, str(tmp_path / "tfds"),
                     test_fraction=1e-9).download_and_prepare()


def test_names_keep_builds_apart(tmp_path):
  names = {itf.config_name("/x/coco", r, m, background=bg, test_fraction=f, min_size=s)
           for r in (64, 256) for m in ("center_crop", "pad") for bg in (WHITE, (0, 0, 0))
           for f in (0.0, 0.1) for s in (0, 1024)}
  assert len(names) == 32
  assert itf.config_name("/x/coco", 64, "pad", background=(0, 0, 0)) == "coco_64px_pad_bg000000"
  assert itf.config_name("/x/a b", 64, name="my/set") == "my_set_64px_center_crop"
  for bad in (dict(resize="squash"), dict(test_fraction=1.0), dict(background=(0, 0))):
    with pytest.raises(ValueError):
      itf.make_builder(str(tmp_path), 8, str(tmp_path / "tfds"), **bad)
  # Two folders with one base name: the second is refused, not silently served the first.
  for parent in ("a", "b"):
    _caption(_save(str(tmp_path / parent / "data" / "x.png"), Image.new("RGB", (8, 8))), "x")
  _build(tmp_path / "a" / "data", 8, tmp_path / "tfds")
  with pytest.raises(ValueError, match="was built from .*a/data.*name="):
    itf.make_builder(str(tmp_path / "b" / "data"), 8, str(tmp_path / "tfds"))
  assert itf.make_builder(str(tmp_path / "b" / "data"), 8, str(tmp_path / "tfds"), name="b")
