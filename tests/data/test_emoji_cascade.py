"""emoji_cascade builder: small real builds read back without TF, resolutions that line up,
a split held out by concept, enumeration totals, and render failures that are skipped."""

import collections
import io
import os

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data.builders.emoji_cascade import emoji_cascade as ec

LIMIT = 12  # drawings per style per split: 48 renders per build


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)  # data_source gives bytes


def _read_all(builder, split):
  source = builder.as_data_source(split)
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """The same small slice at 64 and at 256 px."""
  root = tmp_path_factory.mktemp("tfds")
  out = {}
  for res in (64, 256):
    b = ec.make_builder(res, root, limit=LIMIT)
    b.download_and_prepare()
    out[res] = b
  return out


@pytest.fixture(scope="module")
def everything():
  return ec.enumerate_drawings()


def test_small_build_reads_back_without_tf(built):
  b = built[64]
  assert b.builder_config.name == "64px_limit12"
  assert b.info.file_format.value == "array_record"
  ids = []
  for split in ("train", "test"):
    examples = _read_all(b, split)
    assert len(examples) == 2 * LIMIT  # both styles have far more than LIMIT per split
    for ex in examples:
      img = ex["image"]
      assert img.shape == (64, 64, 3) and img.dtype == np.uint8
      assert img.min() < 200  # a drawing, not a blank white canvas
      style, caption = _text(ex["style"]), _text(ex["caption"])
      assert style in ec.STYLES
      assert caption.endswith(f", {style} style") and len(caption) > len(f", {style} style")
      assert _text(ex["id"]).startswith(style + "/")
      assert ec.is_test_concept(_text(ex["concept"])) == (split == "test")
      ids.append(_text(ex["id"]))
  assert len(ids) == len(set(ids))
  # Reopening from disk restores the skip counts written with the dataset info.
  meta = ec.make_builder(64, b.data_dir_root, limit=LIMIT).info.metadata
  assert meta["skipped_private_use"]["openmoji"] > 300
  assert meta["skipped_render_failed"] == {"train": {}, "test": {}}


def test_256_downsampled_matches_64_render(built):
  # Tolerance 4/255 mean abs: both are cairo renders of one vector drawing, so a 4x4 box
  # filter of the 256 px image differs from cairo's own 64 px antialiasing only along
  # edges. Measured over 400 drawings of both styles: median 0.35, worst 2.9 (the thin
  # stripes of a US flag); two different drawings differ by 36 or more.
  small = {_text(e["id"]): e["image"] for e in _read_all(built[64], "train")}
  large = {_text(e["id"]): e["image"] for e in _read_all(built[256], "train")}
  assert small.keys() == large.keys()
  diffs = {}
  for i, img in large.items():
    box = img.astype(np.float64).reshape(64, 4, 64, 4, 3).mean(axis=(1, 3))
    diffs[i] = np.abs(box - small[i]).mean()
  print("mean abs diff 256->64 vs 64, worst:", max(diffs.values()))
  assert max(diffs.values()) < 4.0
  a, b = sorted(small)[:2]
  assert np.abs(small[a].astype(float) - small[b]).mean() > 4.0  # the check can fail


def test_split_holds_out_whole_concepts(everything):
  by_split = everything.by_split()
  train = {d.concept for d in by_split["train"]}
  test = {d.concept for d in by_split["test"]}
  assert not train & test
  frac = len(by_split["test"]) / len(everything.drawings)
  print(f"test: {len(by_split['test'])} images ({frac:.1%}), {len(test)} concepts; "
        f"train: {len(by_split['train'])} images, {len(train)} concepts")
  assert 0.05 < frac < 0.15
  assert 0.05 < len(test) / len(train | test) < 0.15
  # Skin-tone variants share the concept of the toneless drawing of the same style.
  by_key = {(d.style, _strip_tones(d.id)): d for d in everything.drawings}
  checked = 0
  for d in everything.drawings:
    base = by_key.get((d.style, _strip_tones(d.id)))
    if base is not None and base is not d and _strip_tones(d.id):  # not a swatch itself
      assert d.concept == base.concept, (d.id, d.name, base.id, base.name)
      assert d.split == base.split
      checked += 1
  assert checked > 3000  # both styles draw ~1.7k skin-tone variants each


def _strip_tones(drawing_id: str) -> str:
  parts = drawing_id.split("/")[1].split("-")
  return "-".join(p for p in parts if p not in {"1f3fb", "1f3fc", "1f3fd", "1f3fe", "1f3ff"})


def test_concept_and_split_functions():
  assert ec.concept_of("waving hand: medium skin tone") == "waving hand"
  assert ec.concept_of("people holding hands: light skin tone, dark skin tone") == (
      "people holding hands")
  assert ec.concept_of("man: light skin tone, red hair") == "man: red hair"
  assert ec.concept_of("kiss: woman, man, dark skin tone") == "kiss: woman, man"
  assert ec.concept_of("flag: japan") == "flag: japan"
  assert ec.concept_of("light skin tone") == "light skin tone"  # the swatch itself
  assert ec.is_test_concept("waving hand") == ec.is_test_concept("waving hand")
  hits = sum(ec.is_test_concept(f"concept {i}") for i in range(2000))
  assert 150 < hits < 250  # about 1 in TEST_BUCKETS


@pytest.mark.parametrize("emoji_name, cps, want", [
    (":waving_hand_medium_skin_tone:", [0x1F44B, 0x1F3FD], "waving hand: medium skin tone"),
    (":people_holding_hands_light_skin_tone_dark_skin_tone:",
     [0x1F9D1, 0x1F3FB, 0x200D, 0x1F91D, 0x200D, 0x1F9D1, 0x1F3FF],
     "people holding hands: light skin tone, dark skin tone"),
    (":man_light_skin_tone_red_hair:", [0x1F468, 0x1F3FB, 0x200D, 0x1F9B0],
     "man: light skin tone, red hair"),
    (":person_beard:", [0x1F9D4], "person: beard"),
    (":family_man_woman_girl:", [0x1F468, 0x200D, 0x1F469, 0x200D, 0x1F467],
     "family: man, woman, girl"),
    (":kiss_light_skin_tone:", [0x1F48F, 0x1F3FB], "kiss: light skin tone"),
    (":kiss_mark:", [0x1F48B], "kiss mark"),
    (":Japan:", [0x1F1EF, 0x1F1F5], "flag: japan"),
    (":England:", [0x1F3F4, 0xE0067, 0xE0062, 0xE0065, 0xE006E, 0xE0067, 0xE007F],
     "flag: england"),
    (":keycap_#:", [0x23, 0xFE0F, 0x20E3], "keycap: #"),
    (":grinning_face_with_smiling_eyes:", [0x1F601], "grinning face with smiling eyes"),
    (":red_hair:", [0x1F9B0], "red hair"),
    (":medium-light_skin_tone:", [0x1F3FC], "medium-light skin tone"),
])
def test_cldr_name_restores_punctuation(emoji_name, cps, want):
  assert ec.cldr_name(emoji_name, cps) == want


def test_enumeration_totals(everything):
  usable = collections.Counter(d.style for d in everything.drawings)
  print("files", everything.files, "usable", dict(usable), "private use",
        everything.skipped_private_use, "no CLDR name", everything.skipped_no_name)
  assert usable["twemoji"] > 3900 and usable["openmoji"] > 3900
  assert everything.skipped_private_use["openmoji"] > 300  # OpenMoji's extras
  for s in ec.STYLES:
    assert (usable[s] + everything.skipped_private_use[s] + everything.skipped_no_name[s]
            == everything.files[s])
  ids = [d.id for d in everything.drawings]
  assert len(ids) == len(set(ids))
  order = [(ec.STYLES.index(d.style), os.path.basename(d.path)) for d in everything.drawings]
  assert order == sorted(order)  # sorted by file: the same examples on every build
  assert ec.enumerate_drawings(["twemoji"]).drawings == [
      d for d in everything.drawings if d.style == "twemoji"]


def test_failed_render_is_skipped_and_counted(tmp_path, monkeypatch):
  real = ec.render_png
  seen = []

  def flaky(path, resolution):
    seen.append(path)
    if len(seen) == 2:
      raise RuntimeError("simulated cairo failure")
    return real(path, resolution)

  monkeypatch.setattr(ec, "render_png", flaky)
  b = ec.make_builder(64, tmp_path, limit=3, styles=["twemoji"])
  b.download_and_prepare()
  counts = {s: len(b.as_data_source(s)) for s in ("train", "test")}
  assert sorted(counts.values()) == [2, 3]  # one of the 6 renders failed
  failed = b.info.metadata["skipped_render_failed"]
  assert sum(len(ids) for split in failed.values() for ids in split.values()) == 1
  reopened = ec.make_builder(64, tmp_path, limit=3, styles=["twemoji"])
  assert reopened.info.metadata["skipped_render_failed"] == failed


def test_process_pool_renders_the_same_bytes(monkeypatch):
  paths = [d.path for d in ec.spread(ec.enumerate_drawings(["openmoji"]).drawings, 4)]
  serial = list(ec._render_all(paths, 64, workers=1))
  monkeypatch.setattr(ec, "POOL_MIN_IMAGES", 1)
  pooled = list(ec._render_all(paths, 64, workers=2))
  assert pooled == serial and all(png is not None for png, _ in serial)
  with Image.open(io.BytesIO(serial[0][0])) as im:
    assert im.mode == "RGB" and im.size == (64, 64)


def test_config_names_and_errors(tmp_path):
  assert [c.name for c in ec.EmojiCascade.BUILDER_CONFIGS] == ["64px", "256px", "1024px"]
  full = ec.make_builder(1024, tmp_path)
  assert full.builder_config is ec.EmojiCascade.builder_configs["1024px"]
  assert full.builder_config.limit is None
  assert ec.make_builder(64, tmp_path, limit=20).builder_config.name == "64px_limit20"
  assert ec.config_name(256, None, ["twemoji"]) == "256px_twemoji"
  with pytest.raises(ValueError, match="styles"):
    ec.make_builder(64, tmp_path, styles=["noto"])
  with pytest.raises(ValueError, match="limit"):
    ec.make_builder(64, tmp_path, limit=0)
  with pytest.raises(ValueError, match="resolution"):
    ec.make_builder(64.0, tmp_path)
