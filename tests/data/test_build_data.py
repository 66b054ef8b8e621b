"""The data path end to end on the smoke configs: launch.py --mode=build_data builds a small
emoji_cascade slice, precompute encodes its captions, and the grain pipelines of every
stage read it back."""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np
import pytest

from imagen_jax import config_files
from imagen_jax.data import datasets, pipeline
from imagen_jax.text import cache

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from test_launch import assert_user_error, launch  # pylint: disable=g-import-not-at-top,wrong-import-position


def smoke(name: str, data_dir: pathlib.Path):
  cfg = config_files.load(REPO / "configs" / f"{name}.py", "smoke")
  cfg.data.data_dir = str(data_dir)
  return cfg


@pytest.fixture(scope="module")
def built(smoke_data):
  """(data_dir, {"base64"|"sr256": (workdir, proc of the build run)}): built once per
  session by conftest's smoke_data (the trainer tests train on the same datasets)."""
  return smoke_data


def test_build_data_reports_where_and_what(built, tmp_path):
  data_dir, runs = built
  workdir, proc = runs["base64"]
  summary = json.loads((workdir / "build_data.json").read_text())
  assert summary["path"].startswith(str(data_dir)) and str(data_dir) in proc.stdout
  # limit=4: at most 4 drawings per style in each split, two styles.
  assert summary["splits"] == {"train": 8, "test": 8}
  # A second run finds it built and leaves it alone.
  again = launch("--config=configs/base64.py:smoke", f"--workdir={tmp_path}",
                 "--mode=build_data", f"--config.data.data_dir={data_dir}")
  assert again.returncode == 0 and "already built" in again.stdout


def test_pipelines_read_the_built_data(built):
  data_dir, _ = built
  base = smoke("base64", data_dir)
  source = datasets.data_source(base.data, "train")
  batch = next(iter(pipeline.make_pipeline(base.data, source, stage="base", batch_size=2,
                                           seed=0)))
  assert batch["image"].shape == (2, 16, 16, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() < batch["image"].max() <= 1.0
  assert all(c.endswith("style") for c in batch["caption"])

  sr = smoke("sr256", data_dir)
  source = datasets.data_source(sr.data, "train")
  batch = next(iter(pipeline.make_pipeline(sr.data, source, stage="sr", batch_size=2, seed=0)))
  assert batch["image"].shape == (2, 32, 32, 3) and batch["lowres"].shape == (2, 8, 8, 3)


def test_precompute_encodes_the_dataset_captions(built, tmp_path):
  data_dir, _ = built
  workdir = tmp_path / "precompute"
  proc = launch("--config=configs/base64.py:smoke", f"--workdir={workdir}",
                "--mode=precompute", f"--config.data.data_dir={data_dir}")
  assert proc.returncode == 0, proc.stderr
  cfg = smoke("base64", data_dir)
  captions = datasets.captions(cfg.data, ("train", "test"))
  assert len(captions) == 16 and all(captions)
  c = cache.EmbeddingCache.open(workdir / "text_cache", expect={"spec": "random-t5:tiny"})
  assert not c.missing(captions)


def test_folder_dataset_needs_a_source_dir(tmp_path):
  assert_user_error(
      launch("--config=configs/base64.py:smoke", f"--workdir={tmp_path}", "--mode=build_data",
             "--config.data.dataset=image_text_folder"),
      "data.source_dir", "--config.data.source_dir=")
