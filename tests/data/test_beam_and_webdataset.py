"""image_text_folder through Apache Beam (DirectRunner, in-process) and its webdataset layout:
a folder set and a tar set of the same tiny images, each with a corrupt image, an empty caption
and unpaired files, give the same examples (ids, captions, PNG bytes, order) and the same skip
counts with and without Beam; shards are read once even when test_fraction splits them."""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from imagen_jax import config_files
from imagen_jax.config_checks import ConfigError, validate
from imagen_jax.data import webdataset
from imagen_jax.data.builders import image_text_folder as itf
from imagen_jax.jobs import build_data

REPO = pathlib.Path(__file__).resolve().parents[2]
RES = 8
# In-process DirectRunner: one worker, no subprocesses (tests stay fast and deterministic).
IN_PROCESS = "--runner=DirectRunner --direct_num_workers=1 --direct_running_mode=in_memory"
FORMATS = ("PNG", "JPEG", "WEBP")


def _image_bytes(i: int) -> tuple[bytes, str]:
  """A small noisy image of a size and format fixed by i: (file bytes, extension)."""
  rng = np.random.default_rng(i)
  pixels = rng.integers(0, 256, (10 + i % 5, 12 + i % 3, 3), dtype=np.uint8)
  fmt = FORMATS[i % len(FORMATS)]
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format=fmt)
  return buf.getvalue(), {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}[fmt]


# Good samples per split: (stem, caption). Same images, same captions in both sets.
GOOD = {"train": [(f"t{i:02d}", f"a thing number {i}") for i in range(18)],
        "validation": [(f"v{i:02d}", f"a held-out thing {i}") for i in range(6)]}
IMAGE_OF = {stem: 100 * (split == "validation") + i
            for split, items in GOOD.items() for i, (stem, _) in enumerate(items)}


def _write(path: pathlib.Path, data: bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)


def _make_folder_set(root: pathlib.Path) -> None:
  """Layout a: split folders of image + same-stem .txt, and the bad items of each kind."""
  for split, items in GOOD.items():
    for stem, caption in items:
      data, ext = _image_bytes(IMAGE_OF[stem])
      _write(root / split / (stem + ext), data)
      _write(root / split / (stem + ".txt"), caption.encode())
  _write(root / "train" / "corrupt.jpg", b"\xff\xd8 not really a jpeg")
  _write(root / "train" / "corrupt.txt", b"a broken picture")
  _write(root / "train" / "blank.png", _image_bytes(50)[0])
  _write(root / "train" / "blank.txt", b"  \n ")
  _write(root / "validation" / "lonely.png", _image_bytes(51)[0])  # no caption


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _make_tar_set(root: pathlib.Path) -> None:
  """Layout d: train/ in two shards, validation/ in one; captions as .txt, as .json "caption"
  or "text", or both (.txt wins); and the bad samples of each kind."""
  shards = {"train/00000.tar": GOOD["train"][:10], "train/00001.tar": GOOD["train"][10:],
            "validation/00000.tar": GOOD["validation"]}
  for name, items in shards.items():
    (root / name).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / name, "w") as tar:
      for i, (stem, caption) in enumerate(items):
        data, ext = _image_bytes(IMAGE_OF[stem])
        _add(tar, stem + ext, data)
        if i % 3 == 0:
          _add(tar, stem + ".txt", caption.encode())
        elif i % 3 == 1:
          _add(tar, stem + ".json", json.dumps({"caption": caption, "url": "x"}).encode())
        else:
          _add(tar, stem + ".json", json.dumps({"text": caption}).encode())
        if i == 4:  # img2dataset writes both; the .txt is the caption
          _add(tar, stem + ".txt", caption.encode())
          _add(tar, stem + ".cls", b"7")  # ignored
      if name == "train/00001.tar":
        _add(tar, "corrupt.jpg", b"\xff\xd8 not really a jpeg")
        _add(tar, "corrupt.txt", b"a broken picture")
        _add(tar, "blank.png", _image_bytes(50)[0])
        _add(tar, "blank.txt", b"  \n ")
        _add(tar, "orphan.txt", b"a caption without its image")
        _add(tar, "nocaption.png", _image_bytes(52)[0])
        _add(tar, "meta.png", _image_bytes(53)[0])
        _add(tar, "meta.json", json.dumps({"url": "no caption field"}).encode())
      if name == "validation/00000.tar":
        _add(tar, "lonely.png", _image_bytes(51)[0])


def _build(src, data_dir, beam: bool, **kw):
  builder = itf.make_builder(str(src), RES, str(data_dir), beam=beam, **kw)
  config = itf.beam_download_config(IN_PROCESS) if beam else None
  builder.download_and_prepare(download_config=config)
  return builder


def _rows(builder, split):
  """[(id, caption, PNG bytes)] of a split, in record order."""
  ds = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
  return [(ds[i]["id"].decode(), ds[i]["caption"].decode(), bytes(ds[i]["image"]))
          for i in range(len(ds))]


def _skipped(builder):
  meta = builder.info.metadata
  return meta["skipped"], {r: sorted(v) for r, v in meta["skipped_examples"].items()}


def _assert_same_dataset(plain, beam):
  assert list(plain.info.splits) == list(beam.info.splits)
  for split in plain.info.splits:
    assert _rows(plain, split) == _rows(beam, split), split  # exact: ids, order, bytes
  assert _skipped(plain) == _skipped(beam)
  assert plain.info.metadata["layouts"] == beam.info.metadata["layouts"]


def _zero(**counts):
  return {**{r: 0 for r in itf.SKIP_REASONS}, **counts}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sets")
  _make_folder_set(root / "folder")
  _make_tar_set(root / "tars")
  return root


@pytest.fixture(scope="module")
def folder_builds(sets):
  return (_build(sets / "folder", sets / "tfds_plain", beam=False),
          _build(sets / "folder", sets / "tfds_beam", beam=True))


@pytest.fixture(scope="module")
def tar_builds(sets):
  return (_build(sets / "tars", sets / "tfds_plain", beam=False),
          _build(sets / "tars", sets / "tfds_beam", beam=True))


def test_folder_layout_same_with_and_without_beam(folder_builds):
  plain, beam = folder_builds
  assert isinstance(beam, itf.ImageTextFolderBeam) and not isinstance(plain, itf.ImageTextFolderBeam)
  _assert_same_dataset(plain, beam)
  assert _skipped(beam) == (
      _zero(missing_caption=1, empty_caption=1, unreadable_image=1),
      {**{r: [] for r in itf.SKIP_REASONS}, "missing_caption": ["validation/lonely.png"],
       "empty_caption": ["train/blank.png"], "unreadable_image": ["train/corrupt.jpg"]})
  assert [r[0] for r in _rows(beam, "train")] == sorted(
      f"train/{s}{_image_bytes(IMAGE_OF[s])[1]}" for s, _ in GOOD["train"])
  assert not any(p.name.startswith("beam_") for p in pathlib.Path(beam.data_dir).iterdir())


def test_webdataset_layout_same_with_and_without_beam(tar_builds):
  plain, beam = tar_builds
  _assert_same_dataset(plain, beam)
  assert plain.info.metadata["layouts"] == {"train": "webdataset", "validation": "webdataset"}
  counts, examples = _skipped(beam)
  assert counts == _zero(missing_caption=2, missing_file=1, empty_caption=1,
                         unreadable_image=1, bad_manifest_row=1)
  assert examples["missing_caption"] == ["train/00001.tar/nocaption.png",
                                         "validation/00000.tar/lonely.png"]
  assert examples["missing_file"] == ["train/00001.tar/orphan.txt"]
  assert examples["bad_manifest_row"] == ["train/00001.tar/meta.json"]
  assert examples["unreadable_image"] == ["train/00001.tar/corrupt.jpg"]
  # Every good sample, by shard then id, with its caption from .txt / .json caption / text.
  for split, shard_items in (("train", [("train/00000.tar", GOOD["train"][:10]),
                                        ("train/00001.tar", GOOD["train"][10:])]),
                             ("validation", [("validation/00000.tar", GOOD["validation"])])):
    want = [(f"{shard}/{stem}{_image_bytes(IMAGE_OF[stem])[1]}", caption)
            for shard, items in shard_items for stem, caption in sorted(items)]
    assert [(i, c) for i, c, _ in _rows(beam, split)] == want


def test_tars_hold_the_folders_images(folder_builds, tar_builds):
  """The same source files read from a tar or from disk give the same stored PNGs."""
  for split in ("train", "validation"):
    from_folder = collections.Counter((c, png) for _, c, png in _rows(folder_builds[0], split))
    from_tars = collections.Counter((c, png) for _, c, png in _rows(tar_builds[0], split))
    assert from_folder == from_tars and len(from_tars) == len(GOOD[split])


def test_test_fraction_splits_shards_once_with_beam(sets, tar_builds):
  plain = _build(sets / "tars", sets / "tfds_plain", beam=False, test_fraction=0.4)
  beam = _build(sets / "tars", sets / "tfds_beam", beam=True, test_fraction=0.4)
  _assert_same_dataset(plain, beam)
  assert len(_rows(beam, "test")) > 0 and len(_rows(beam, "train")) > 0
  # Each shard read once: the skips are those of the build without test_fraction.
  assert _skipped(beam)[0] == _skipped(tar_builds[0])[0]
  ids = {s: {i for i, _, _ in _rows(beam, s)} for s in ("train", "test")}
  assert not ids["train"] & ids["test"]
  assert all((itf.held_out_fraction(i) < 0.4) == (s == "test") for s in ids for i in ids[s])


def test_manifest_with_several_captions_same_with_beam(tmp_path):
  """Layout b: an image with several captions (one example each, decoded once), a row naming
  a missing file and a bad row; Beam numbers the examples as ImageTextFolder orders them."""
  src = tmp_path / "manifest"
  rows = []
  for i in range(6):
    data, ext = _image_bytes(i)
    _write(src / f"img{i}{ext}", data)
    rows.append({"file_name": f"img{i}{ext}",
                 "caption": [f"first of {i}", f"second of {i}", " "] if i % 2 else f"only {i}"})
  rows += [{"file_name": "gone.png", "caption": "x"}, {"caption": "no file"}]
  (src / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  plain = _build(src, tmp_path / "plain", beam=False)
  beam = _build(src, tmp_path / "beam", beam=True)
  _assert_same_dataset(plain, beam)
  assert len(_rows(beam, "train")) == 3 * 2 + 3
  assert _skipped(beam)[0] == _zero(empty_caption=3, missing_file=1, bad_manifest_row=1)


def test_read_shard_truncated_and_not_a_tar(tmp_path):
  good = tmp_path / "good.tar"
  with tarfile.open(good, "w") as tar:
    for i in range(3):
      _add(tar, f"dir/{i:03d}.seg.png", _image_bytes(i)[0])  # key "dir/000", ext "seg.png"
      _add(tar, f"dir/{i:03d}.txt", f" caption {i} ".encode())
      _add(tar, f"dir/{i:03d}.png", _image_bytes(i)[0])
  samples, skips = webdataset.read_shard(str(good), ["png"])
  assert [(s.name, s.caption) for s in samples] == [
      (f"dir/{i:03d}.png", f"caption {i}") for i in range(3)] and skips == []
  assert webdataset.read_member(str(good), samples[1].member) == _image_bytes(1)[0]
  assert webdataset.split_key("a/b.c/x.tar.gz") == ("a/b.c/x", "tar.gz")

  data = good.read_bytes()
  last = samples[-1].member
  cut = tmp_path / "cut.tar"
  cut.write_bytes(data[:last.offset + last.size // 2])  # the last image is cut off
  samples_cut, skips = webdataset.read_shard(str(cut), ["png"])
  assert [r for r, _ in skips] == ["unreadable_shard"]  # tarfile: "unexpected end of data"
  assert samples_cut == samples  # listed; the last one's bytes are short

  junk = tmp_path / "junk.tar"
  junk.write_bytes(b"this is not a tar file" * 40)
  samples_junk, skips = webdataset.read_shard(str(junk), ["png"])
  assert samples_junk == [] and [r for r, _ in skips] == ["unreadable_shard"]

  # A builder keeps the damaged shard's whole samples, counts the shard once and the cut
  # image as unreadable.
  src = tmp_path / "src"
  src.mkdir()
  os.replace(cut, src / "cut.tar")
  os.replace(good, src / "good.tar")
  builder = _build(src, tmp_path / "tfds", beam=False)
  assert builder.info.metadata["skipped"] == _zero(unreadable_shard=1, unreadable_image=1)
  assert builder.info.metadata["skipped_examples"]["unreadable_image"] == ["cut.tar/dir/002.png"]
  assert len(_rows(builder, "train")) == 5


def test_shards_beside_other_layouts_are_refused(tmp_path):
  src = tmp_path / "mixed"
  _write(src / "a.png", _image_bytes(0)[0])
  _write(src / "a.txt", b"caption")
  with tarfile.open(src / "0.tar", "w") as tar:
    _add(tar, "b.png", _image_bytes(1)[0])
    _add(tar, "b.txt", b"caption")
  with pytest.raises(ValueError, match="two layouts in one folder"):
    _build(src, tmp_path / "tfds", beam=False)


def test_beam_download_config_defaults_to_all_local_cores():
  options = itf.beam_download_config("").beam_options.get_all_options()
  assert options["runner"] == "DirectRunner"
  assert options["direct_running_mode"] == "multi_processing"
  assert options["direct_num_workers"] == 0  # Beam: one worker per core
  cluster = itf.beam_download_config("--runner=FlinkRunner --parallelism=4")
  assert cluster.beam_options.get_all_options()["runner"] == "FlinkRunner"


# Config keys and the build job --------------------------------------------------------


def _stage_config(source_dir: str, data_dir: str, **data):
  cfg = config_files.load(REPO / "configs" / "base64.py", "smoke")
  cfg.data.update(dataset="image_text_folder", source_dir=source_dir, data_dir=data_dir,
                  **data)
  return cfg


@pytest.mark.parametrize("data, key, fragment", [
    (dict(beam_options="--runner=DirectRunner"), "data.beam_options", "no Beam pipeline"),
    (dict(beam=True, beam_options="runner=DirectRunner"), "data.beam_options", "not a --flag"),
    (dict(beam=True, beam_options="--project='unclosed"), "data.beam_options", "cannot be split"),
    (dict(beam=True, dataset="emoji_cascade"), "data.beam", "only image_text_folder"),
    (dict(beam="yes"), "data.beam", "True or False"),
])
def test_beam_keys_are_checked(sets, tmp_path, data, key, fragment):
  cfg = _stage_config(str(sets / "tars"), str(tmp_path))
  cfg.data = dict(cfg.data.to_dict(), **data)  # a new dict: types may change
  with pytest.raises(ConfigError) as info:
    validate(cfg, "build_data")
  assert info.value.key == key and fragment in str(info.value)
  assert "Fix:" in str(info.value)


def test_build_data_job_builds_with_beam(sets, tar_builds, tmp_path, capsys):
  cfg = _stage_config(str(sets / "tars"), str(tmp_path / "tfds"), beam=True,
                      beam_options=IN_PROCESS, resolution=RES)
  validate(cfg, "build_data")
  summary = build_data.run(cfg, str(tmp_path / "work"))
  assert "with Beam (--runner=DirectRunner" in capsys.readouterr().out
  assert summary["beam_options"] == IN_PROCESS and not summary["already_built"]
  plain = tar_builds[0]
  assert summary["splits"] == {s: int(v.num_examples) for s, v in plain.info.splits.items()}
  assert summary["metadata"]["skipped"] == plain.info.metadata["skipped"]
  # The plain builder reads what Beam built (one dataset, one directory).
  reread = itf.make_builder(str(sets / "tars"), RES, str(tmp_path / "tfds"))
  assert reread.is_prepared() and _rows(reread, "train") == _rows(plain, "train")
