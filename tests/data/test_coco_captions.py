"""image_text_folder layout c: an unzipped MS-COCO captions folder builds, skips and fails clearly."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from imagen_jax.data.builders import image_text_folder as itf

VAL_JSON = "annotations/captions_val2014.json"
TRAIN_JSON = "annotations/captions_train2014.json"
COLOURS = {1: (200, 30, 30), 2: (30, 200, 30), 3: (30, 30, 200), 11: (200, 200, 30),
           12: (30, 200, 200), 13: (200, 30, 200), 14: (120, 120, 120)}


def _file_name(split, image_id):
  return f"COCO_{split}2014_{image_id:012d}.jpg"


def _rel(split, image_id):
  return f"{split}2014/{_file_name(split, image_id)}"


def _write_json(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(data if isinstance(data, str) else json.dumps(data))


def _coco_split(src, split, image_ids, annotations, absent=()):
  """captions_<split>2014.json listing `image_ids`, and their JPEGs except those in `absent`."""
  for i in image_ids:
    if i not in absent:
      path = os.path.join(src, f"{split}2014", _file_name(split, i))
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.new("RGB", (40, 30), COLOURS.get(i, (0, 0, 0))).save(path, quality=95)
  images = [{"id": i, "file_name": _file_name(split, i), "width": 40, "height": 30}
            for i in image_ids]
  rows = [{"id": 100 + n, "image_id": i, "caption": c} for n, (i, c) in enumerate(annotations)]
  _write_json(os.path.join(src, f"annotations/captions_{split}2014.json"),
              {"info": {}, "licenses": [], "images": images, "annotations": rows})


# Validation: image 2's captions come first and are interleaved with image 1's, image 4's file
# is absent, 99 is not an image, one caption is empty and one is not a string.
VAL_ANNOTATIONS = [
    (2, "A green square."), (1, "  A red box on a table.\n"), (2, "Something green"),
    (1, "A red thing."), (99, "An image that is not listed."), (4, "Its file is gone."),
    (2, "   "), (3, "Blue."), (1, "Red, once more."), (3, 5), (4, "Still gone."),
]
VAL_WANT = [(_rel("val", 1), "A red box on a table."), (_rel("val", 1), "A red thing."),
            (_rel("val", 1), "Red, once more."), (_rel("val", 2), "A green square."),
            (_rel("val", 2), "Something green"), (_rel("val", 3), "Blue.")]
TRAIN_IDS = (11, 12, 13, 14)
TRAIN_ANNOTATIONS = [(i, f"train image {i} caption {n}") for n in range(2) for i in TRAIN_IDS]


def _coco(src, train=True):
  _coco_split(src, "val", (1, 2, 3, 4), VAL_ANNOTATIONS, absent=(4,))
  if train:
    _coco_split(src, "train", TRAIN_IDS, TRAIN_ANNOTATIONS)
  return src


def _build(src, res, data_dir, **kw):
  builder = itf.make_builder(str(src), res, str(data_dir), **kw)
  builder.download_and_prepare()
  return builder


def _rows(builder, split):
  ds = builder.as_data_source(split)
  rows = [ds[i] for i in range(len(ds))]
  for r in rows:
    r["caption"], r["id"] = r["caption"].decode(), r["id"].decode()
  return rows


def _fails(src, tmp_path, error, match, **kw):
  with pytest.raises(error, match=match):
    itf.make_builder(str(src), 16, str(tmp_path / "tfds"), **kw).download_and_prepare()


def test_coco_folder_builds_one_example_per_caption(tmp_path):
  builder = _build(_coco(tmp_path / "coco"), 16, tmp_path / "tfds")
  assert builder.builder_config.name == "coco_16px_center_crop"
  assert sorted(builder.info.splits) == ["train", "validation"]
  assert builder.info.metadata["layouts"] == {"train": TRAIN_JSON, "validation": VAL_JSON}

  val = _rows(builder, "validation")
  # Sorted by id, each image's captions in file order, stripped; unusable ones left out.
  assert [(r["id"], r["caption"]) for r in val] == VAL_WANT
  for r in val:  # each caption carries its own image
    assert r["image"].shape == (16, 16, 3) and r["image"].dtype == np.uint8
    image_id = int(r["id"].rsplit("_", 1)[1].split(".")[0])
    np.testing.assert_allclose(r["image"][8, 8], COLOURS[image_id], atol=8)
  first = [r["image"] for r in val if r["id"] == _rel("val", 1)]
  assert len(first) == 3 and all((im == first[0]).all() for im in first)

  train = _rows(builder, "train")
  assert len(train) == len(TRAIN_ANNOTATIONS)
  assert [r["id"] for r in train] == sorted(_rel("train", i) for i, _ in TRAIN_ANNOTATIONS)

  skipped = builder.info.metadata["skipped"]
  assert skipped == {**{r: 0 for r in itf.SKIP_REASONS}, "bad_manifest_row": 2,
                     "missing_file": 1, "empty_caption": 1}
  examples = builder.info.metadata["skipped_examples"]
  assert examples["bad_manifest_row"] == [f"{VAL_JSON}:annotations[4]",
                                          f"{VAL_JSON}:annotations[9]"]
  assert examples["missing_file"] == [_rel("val", 4)]  # one image, however many captions
  assert examples["empty_caption"] == [_rel("val", 2)]


def test_val_only_and_test_fraction(tmp_path):
  val_only = _coco(tmp_path / "val_only", train=False)
  builder = _build(val_only, 16, tmp_path / "tfds")
  assert list(builder.info.splits) == ["validation"]
  assert [(r["id"], r["caption"]) for r in _rows(builder, "validation")] == VAL_WANT
  # Nothing to hold out from: an error, not a silently missing "test" split.
  _fails(val_only, tmp_path, ValueError, "test_fraction=0.5 .*captions_train", test_fraction=0.5)

  # With train annotations, test_fraction splits train by image and leaves validation whole.
  src = _coco(tmp_path / "both")
  ids = sorted(_rel("train", i) for i in TRAIN_IDS)
  fractions = sorted(itf.held_out_fraction(i) for i in ids)
  builder = _build(src, 16, tmp_path / "tfds", test_fraction=(fractions[0] + fractions[1]) / 2)
  train, test = _rows(builder, "train"), _rows(builder, "test")
  assert len(test) == 2 and test[0]["id"] == test[1]["id"]  # both captions of one image
  assert sorted({r["id"] for r in train + test}) == ids
  assert len(builder.as_data_source("validation")) == len(VAL_WANT)


def test_coco_errors_are_clear(tmp_path):
  not_json = _coco(tmp_path / "not_json", train=False)
  _write_json(not_json / VAL_JSON, '{"images": [')  # a half-extracted zip
  _fails(not_json, tmp_path, ValueError, r"captions_val2014\.json is not JSON.*\"annotations\"")
  no_lists = _coco(tmp_path / "no_lists", train=False)
  _write_json(no_lists / VAL_JSON, {"images": [], "annotation": []})
  _fails(no_lists, tmp_path, ValueError,
         r"captions_val2014\.json lacks an \"images\" or \"annotations\" list; expected COCO")

  no_images = _coco(tmp_path / "no_images")
  os.rename(no_images / "train2014", tmp_path / "elsewhere")
  _fails(no_images, tmp_path, FileNotFoundError,
         r"captions_train2014\.json is there but .*unzip train2014\.zip into .*no_images")

  two_years = _coco(tmp_path / "two_years", train=False)
  _write_json(two_years / "annotations/captions_val2017.json", {"images": [], "annotations": []})
  _fails(two_years, tmp_path, ValueError,
         r"two years \(captions_val2014\.json, captions_val2017\.json\); keep one")

  with_splits = _coco(tmp_path / "with_splits", train=False)
  os.makedirs(with_splits / "train")
  _fails(with_splits, tmp_path, ValueError, "COCO caption annotations and train/: two layouts")


def test_manifest_folders_still_build(tmp_path):
  # Other COCO annotation files (instances_*) do not make a folder a COCO captions folder.
  src = tmp_path / "mine"
  _write_json(src / "annotations" / "instances_val2014.json", {"images": [], "annotations": []})
  os.makedirs(src / "images")
  Image.new("RGB", (40, 30), COLOURS[1]).save(src / "images" / "a.png")
  (src / "metadata.jsonl").write_text(
      json.dumps({"file_name": "images/a.png", "caption": ["red", " also red "]}) + "\n")
  builder = _build(src, 8, tmp_path / "tfds")
  assert builder.info.metadata["layouts"] == {"train": "metadata.jsonl"}
  assert [(r["id"], r["caption"]) for r in _rows(builder, "train")] == [
      ("images/a.png", "red"), ("images/a.png", "also red")]
