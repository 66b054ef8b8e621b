"""CLIP score: preprocessing vs CLIPImageProcessor, the score vs torchmetrics, the scorer.

Golden values (tests/fixtures/eval/clip_golden.npz) come from scripts/make_clip_fixtures.py:
transformers' CLIPImageProcessor (PIL backend, Pillow 13.0.0) pixel values of four uint8
images of odd sizes, and torchmetrics' clip_score with the tiny random CLIP. Measured:
pixel values equal bit for bit, pair scores within 1.3e-5 (of values up to 32).
"""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from imagen_jax.errors import UserError
from imagen_jax.eval import clip_score as cs
from imagen_jax.eval.nets.clip_tokenizer import TokenizerFileError

FIX = "tests/fixtures/eval"
TINY = f"{FIX}/clip_tiny"


@pytest.fixture(scope="module")
def golden():
  with np.load(f"{FIX}/clip_golden.npz") as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def images(golden):
  return [golden[f"image_{i}"] for i in range(4)]


@pytest.fixture(scope="module")
def scorer():
  # batch 3 for 4 pairs: the last batch is padded.
  return cs.ClipScorer.from_spec(TINY, batch_size=3, progress=False)


def test_preprocess_matches_clip_image_processor(images, golden):
  # Sizes 20x27 (upscaled), 75x50 (downscaled), 32x32 (untouched), 45x100 (wide crop).
  out = cs.preprocess(images, 32)
  assert out.shape == (4, 32, 32, 3) and out.dtype == np.float32
  # Same PIL bicubic, crop offsets, float64 rescale and float32 normalisation as
  # transformers' PIL backend: measured exactly equal.
  np.testing.assert_array_equal(out, golden["pixel_values"])
  # A uniform [N, H, W, 3] array, and PIL images, go the same way.
  np.testing.assert_array_equal(cs.preprocess(np.stack([images[2]] * 2), 32)[1], out[2])
  np.testing.assert_array_equal(cs.preprocess([Image.fromarray(images[1])], 32)[0], out[1])


def test_preprocess_converts_like_transformers(images):
  rgb = images[1]
  gray = rgb[..., 0]
  np.testing.assert_array_equal(cs.resize_crop(gray, 32),
                                cs.resize_crop(np.repeat(gray[..., None], 3, -1), 32))
  # RGBA: composited over white (emoji images have transparent backgrounds).
  alpha = np.zeros(rgb.shape[:2] + (1,), np.uint8)
  alpha[:, : rgb.shape[1] // 2] = 255
  crop = cs.resize_crop(np.concatenate([rgb, alpha], -1), 32)
  ref = cs.resize_crop(np.where(alpha == 255, rgb, 255).astype(np.uint8), 32)
  np.testing.assert_array_equal(crop, ref)
  pil = cs.resize_crop(Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"), 32)
  np.testing.assert_array_equal(pil, ref)
  with pytest.raises(TypeError, match=r"uint8 images .* np\.round\(\(x \+ 1\) \* 127\.5\)"):
    cs.preprocess(np.zeros((1, 8, 8, 3), np.float32), 32)
  with pytest.raises(ValueError, match=r"one image of shape \(75, 50, 3\).*images\[None\]"):
    cs.preprocess(rgb, 32)


def test_score_matches_torchmetrics(golden):
  emb_i = np.random.default_rng(0).normal(size=(4, 16))
  pairs = cs.pair_scores(emb_i, emb_i * 3.0)
  np.testing.assert_allclose(pairs, 100.0, rtol=1e-12)  # scale-free cosine
  # Golden: torchmetrics' clip_score (and its per-pair 100 cos) on the fixture pairs.
  assert cs.score_from_pairs(golden["score_pairs"]) == pytest.approx(
      float(golden["clip_score"]), abs=1e-5)
  # torchmetrics clamps the mean, not each pair; clamp_each gives the per-pair variant.
  assert cs.score_from_pairs([30.0, -10.0]) == pytest.approx(10.0)
  assert cs.score_from_pairs([30.0, -10.0], clamp_each=True) == pytest.approx(15.0)
  assert cs.score_from_pairs([-30.0, 10.0]) == 0.0
  with pytest.raises(ValueError, match="at least one image"):
    cs.score_from_pairs([])
  with pytest.raises(ValueError, match="same N and D"):
    cs.pair_scores(np.ones((2, 4)), np.ones((3, 4)))


def test_scorer_end_to_end_matches_torchmetrics(scorer, images, golden):
  prompts = [str(p) for p in golden["score_captions"]]
  pairs = scorer.pair_scores(images, prompts)
  # float32 CLIP vs torch float32: measured 1.3e-5 on scores up to 32 (100 x cosine).
  np.testing.assert_allclose(pairs, golden["score_pairs"], rtol=0, atol=2e-4)
  score = scorer.score(images, prompts)
  assert 0 <= score <= 100
  assert score == pytest.approx(float(golden["clip_score"]), abs=2e-4)
  # Same images in another order and batch split: same embeddings row for row.
  emb = scorer.image_embeddings(images[::-1])
  np.testing.assert_allclose(emb[::-1], scorer.image_embeddings(images), rtol=0, atol=1e-5)
  assert scorer.text_embeddings([]).shape == (0, 16)
  with pytest.raises(ValueError, match="4 images but 3 prompts"):
    scorer.pair_scores(images, prompts[:3])


def test_clip_score_from_a_spec_and_an_openai_file(scorer, images, golden, tmp_path):
  prompts = [str(p) for p in golden["score_captions"]]
  assert cs.clip_score(images, prompts, scorer) == pytest.approx(float(golden["clip_score"]),
                                                                 abs=2e-4)
  # An OpenAI .pt needs its BPE file beside it (or tokenizer=); the merges alone define
  # CLIP's vocabulary.
  shutil.copy(f"{FIX}/clip_tiny_openai.pt", tmp_path / "ViT-tiny.pt")
  with pytest.raises(cs.ClipNotFoundError, match="bpe_simple_vocab_16e6.txt.gz"):
    cs.load_clip(tmp_path / "ViT-tiny.pt")
  shutil.copy(f"{TINY}/merges.txt", tmp_path / "merges.txt")
  model, tok = cs.load_clip(tmp_path / "ViT-tiny.pt")
  assert model.cfg.vision.image_size == 32 and tok.vocab_size == 669
  model, tok = cs.load_clip(f"{FIX}/clip_tiny_openai.pt", tokenizer=TINY)
  assert tok.pad_id == 668


def test_load_clip_errors_name_the_fix(tmp_path):
  with pytest.raises(cs.ClipNotFoundError) as e:
    cs.load_clip(tmp_path / "nothing")
  msg = str(e.value)
  assert "CLIP weights not found at" in msg and "nothing" in msg
  assert "download openai/clip-vit-large-patch14" in msg and "merges.txt" in msg
  assert isinstance(e.value, UserError)
  with pytest.raises(cs.ClipNotFoundError, match="ViT-L/14 weights are not bundled"):
    cs.load_clip("ViT-L/14")
  # Weights without tokenizer files, and a tokenizer of another vocabulary size.
  for name in ("config.json", "model.safetensors"):
    shutil.copy(f"{TINY}/{name}", tmp_path / name)
  with pytest.raises(TokenizerFileError, match="needs vocab.json and merges.txt"):
    cs.load_clip(tmp_path)
  vocab = json.load(open(f"{TINY}/vocab.json", encoding="utf-8"))
  (tmp_path / "vocab.json").write_text(json.dumps(dict(list(vocab.items())[:-3] + [
      ("<|startoftext|>", 666), ("<|endoftext|>", 667)])))
  lines = open(f"{TINY}/merges.txt", encoding="utf-8").read().split("\n")
  (tmp_path / "merges.txt").write_text("\n".join(lines[:-2]) + "\n")
  with pytest.raises(TokenizerFileError, match="668 tokens but the CLIP model"):
    cs.load_clip(tmp_path)
