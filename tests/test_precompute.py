"""launch.py --mode=precompute end to end (subprocesses, smoke configs with a tiny random T5):
the cache it writes is what the trainer's text source reads, reruns add nothing, and a
cache from another encoder is refused with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imagen_jax import config_files, text
from imagen_jax.text import cache
from test_launch import REPO, assert_user_error, launch  # pylint: disable=g-bad-import-order

CAPTIONS = ["a red cat", "grinning face", "a very small lighthouse", "an owl at night"]
# Precompute also encodes the config's sample-grid prompts (4 in the smoke config).
N_PROMPTS = 4


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
  root = tmp_path_factory.mktemp("precompute")
  captions = root / "captions.txt"
  captions.write_text("\n".join(CAPTIONS + ["", CAPTIONS[0]]) + "\n")  # blank + duplicate
  workdir = root / "run"
  proc = launch("--config=configs/base64.py:smoke", f"--workdir={workdir}",
                "--mode=precompute", f"--config.data.captions_file={captions}")
  assert proc.returncode == 0, proc.stderr
  return root, workdir, captions, proc


def test_precompute_writes_a_cache_the_trainer_reads(precomputed):
  _, workdir, _, proc = precomputed
  summary = json.loads((workdir / "precompute.json").read_text())
  assert summary["added"] == len(CAPTIONS) + N_PROMPTS
  assert summary["encoder"]["spec"] == "random-t5:tiny"
  assert f"{len(CAPTIONS) + N_PROMPTS} caption(s) added" in proc.stdout
  # What training does: the text source of the config with the cache set.
  cfg = config_files.load(REPO / "configs/base64.py", "smoke")
  cfg.data.embedding_cache = str(workdir / "text_cache")
  source = text.text_source(cfg.data)
  assert isinstance(source, cache.EmbeddingCache)
  emb, mask = source.encode(CAPTIONS)
  want, want_mask = text.encoder_from_config(cfg.data).encode(CAPTIONS)
  np.testing.assert_array_equal(mask, want_mask)
  np.testing.assert_allclose(emb, want, atol=1e-6)  # same model, another process


def test_rerun_adds_nothing(precomputed):
  _, workdir, captions, _ = precomputed
  proc = launch("--config=configs/base64.py:smoke", f"--workdir={workdir}",
                "--mode=precompute", f"--config.data.captions_file={captions}")
  assert proc.returncode == 0, proc.stderr
  assert "0 caption(s) added" in proc.stdout
  assert f"{len(CAPTIONS) + N_PROMPTS} already cached" in proc.stdout


def test_cache_of_another_encoder_is_refused(precomputed):
  root, workdir, captions, _ = precomputed
  proc = launch("--config=configs/base64.py:smoke", f"--workdir={root / 'other'}",
                "--mode=precompute", f"--config.data.captions_file={captions}",
                f"--config.data.embedding_cache={workdir / 'text_cache'}",
                "--config.data.max_text_len=12")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr and "max_len: cache 8 vs wanted 12" in proc.stderr
  assert len(cache.EmbeddingCache.open(workdir / "text_cache")) == len(CAPTIONS) + N_PROMPTS


def test_precompute_config_errors(tmp_path):
  # No caption file and no dataset built in data_dir: says which mode to run first.
  assert_user_error(
      launch("--config=configs/base64.py:smoke", f"--workdir={tmp_path}", "--mode=precompute",
             f"--config.data.data_dir={tmp_path / 'tfds'}"),
      "is not built", "--mode=build_data")
  assert_user_error(
      launch("--config=configs/base64.py:smoke", f"--workdir={tmp_path}", "--mode=precompute",
             f"--config.data.captions_file={tmp_path / 'nope.txt'}"),
      "data.captions_file", "no such file")
  captions = tmp_path / "c.txt"
  captions.write_text("a cat\n")
  assert_user_error(
      launch("--config=configs/base64.py:smoke", f"--workdir={tmp_path}", "--mode=precompute",
             f"--config.data.captions_file={captions}", "--config.data.text_encoder=minilm"),
      "model.text_dim=32", "384-d", "--config.model.text_dim=384")
  assert_user_error(
      launch("--config=configs/base64.py:smoke", f"--workdir={tmp_path}", "--mode=precompute",
             f"--config.data.captions_file={captions}",
             "--config.data.text_encoder=t5:/no/such/dir"),
      "does not exist")
