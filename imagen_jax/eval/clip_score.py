"""CLIP score: how well images match their prompts, as torchmetrics computes it.

For N (image, prompt) pairs, with e_I and e_T CLIP's image and text embeddings:

  pair score  100 * cos(e_I, e_T)                       (`pair_scores`)
  CLIP score  max(mean over pairs of the pair scores, 0) (`clip_score`)

That is what torchmetrics' `clip_score` / `CLIPScore.compute` return: the clamp at 0 comes
after the mean, although its docstring writes it per pair. With real CLIP models the
cosine of an image and a caption is almost never negative (typically 0.15-0.35), so the
two agree; `clamp_each=True` gives the per-pair variant, mean(max(100 cos, 0)).

Images go through CLIP's preprocessing as transformers' CLIPImageProcessor does it:
shortest side resized to the model's image size with PIL bicubic, center crop, x/255,
normalised with OpenAI's mean and std. This equals transformers' PIL backend
(CLIPImageProcessorPil, what it uses without torchvision) bit for bit. Its torchvision
backend (the default where torchvision is installed, so what most torchmetrics users ran)
resizes with torch's antialiased bicubic instead, which differs from PIL by up to 5 of 255
levels on noisy images (measured by scripts/make_clip_fixtures.py); scores from the two
are close but not identical.

Prompts are tokenized to 77 tokens keeping the end-of-text token (transformers'
truncation=True, OpenAI's clip.tokenize(truncate=True)). torchmetrics instead pads to the
longest prompt and slices longer ones at 77, which drops that token and pools a caption
over 75 words at an arbitrary word: only such long prompts score differently here.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from imagen_jax.errors import UserError
from imagen_jax.eval.nets import clip as clip_lib
from imagen_jax.eval.nets.clip_tokenizer import CLIPTokenizer, TokenizerFileError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HF_DOWNLOAD = ("download openai/clip-vit-large-patch14 from Hugging Face (config.json, "
               "model.safetensors, vocab.json, merges.txt) and pass its directory")


class ClipNotFoundError(UserError, FileNotFoundError):
  """No CLIP weights (or tokenizer) where the user pointed."""


# ------------------------------------------------------------------------ preprocessing

def _to_rgb(image: Any) -> np.ndarray:
  """One image -> HWC uint8 RGB, as transformers' convert_to_rgb (alpha over white)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      rgba = image.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise TypeError(f"CLIP preprocessing takes uint8 images (0-255), got {a.dtype}; convert "
                    "model outputs in [-1, 1] with np.round((x + 1) * 127.5).clip(0, 255)"
                    ".astype(np.uint8).")
  if a.ndim == 2:
    a = a[..., None]
  if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"An image of shape {a.shape} is not HW, HWC with 1, 3 or 4 channels.")
  if a.shape[-1] == 1:
    return np.repeat(a, 3, axis=-1)
  if a.shape[-1] == 4:
    alpha = a[..., 3:4] / 255
    return np.round(alpha * a[..., :3] + (1 - alpha) * 255).astype(np.uint8)
  return a


def resize_crop(image: Any, size: int) -> np.ndarray:
  """Shortest side to `size` (PIL bicubic, long side rounded down as transformers does),
  then the central size x size crop: HWC uint8."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  a = _to_rgb(image)
  h, w = a.shape[:2]
  nh, nw = (int(size * h / w), size) if w <= h else (size, int(size * w / h))
  if (nh, nw) != (h, w):
    a = np.asarray(Image.fromarray(a).resize((nw, nh), Image.BICUBIC))
  top, left = (nh - size) // 2, (nw - size) // 2
  return a[top:top + size, left:left + size]


def normalize(crops: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> CLIP's input: x/255 (computed in float64 like transformers, then
  float32) minus OpenAI's mean, over its std."""
  x = (np.asarray(crops).astype(np.float64) * (1 / 255)).astype(np.float32)
  return (x - np.asarray(OPENAI_MEAN, np.float32)) / np.asarray(OPENAI_STD, np.float32)


def preprocess(images: Any, image_size: int) -> np.ndarray:
  """uint8 images (an [N, H, W, C] array, or a list of HWC arrays / PIL images of any
  sizes) -> CLIP pixel values [N, image_size, image_size, 3] float32."""
  if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] in (1, 3, 4):
    raise ValueError(f"Got one image of shape {images.shape}; pass a batch: images[None].")
  crops = [resize_crop(im, image_size) for im in images]
  if not crops:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  return normalize(np.stack(crops))


# ------------------------------------------------------------------------ the score

def _unit(e: np.ndarray) -> np.ndarray:
  e = np.asarray(e, np.float64)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def pair_scores(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
  """100 * cosine similarity of each (image, text) pair: [N, D], [N, D] -> [N] float64."""
  image_embeds, text_embeds = np.asarray(image_embeds), np.asarray(text_embeds)
  if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
    raise ValueError(f"Image embeddings {image_embeds.shape} and text embeddings "
                     f"{text_embeds.shape} must both be [N, D] with the same N and D.")
  return 100 * (_unit(image_embeds) * _unit(text_embeds)).sum(-1)


def score_from_pairs(scores: np.ndarray, *, clamp_each: bool = False) -> float:
  """torchmetrics' reduction, max(mean(scores), 0); or mean(max(scores, 0))."""
  scores = np.asarray(scores, np.float64)
  if scores.size == 0:
    raise ValueError("CLIP score of no pairs is undefined; pass at least one image.")
  return float(np.maximum(scores, 0).mean() if clamp_each else max(scores.mean(), 0.0))


# ------------------------------------------------------------------------ loading

def _tokenizer_beside(path: str) -> CLIPTokenizer | None:
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isfile(os.path.join(folder, "merges.txt")):
    if os.path.isfile(os.path.join(folder, "vocab.json")):
      return CLIPTokenizer.from_dir(folder)
    return CLIPTokenizer.from_merges(os.path.join(folder, "merges.txt"))
  gz = os.path.join(folder, "bpe_simple_vocab_16e6.txt.gz")
  return CLIPTokenizer.from_merges(gz) if os.path.isfile(gz) else None


def load_tokenizer(spec: str | os.PathLike) -> CLIPTokenizer:
  """A CLIP tokenizer from a directory (vocab.json + merges.txt), a merges.txt, or OpenAI's
  bpe_simple_vocab_16e6.txt.gz."""
  spec = os.fspath(spec)
  if os.path.isdir(spec):
    return CLIPTokenizer.from_dir(spec)
  if os.path.isfile(spec):
    return CLIPTokenizer.from_merges(spec)
  raise ClipNotFoundError(f"CLIP tokenizer not found at {spec!r}; pass a directory with "
                          "vocab.json and merges.txt, or OpenAI's bpe_simple_vocab_16e6.txt.gz.")


def load_clip(spec: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
              dtype: str = "float32") -> tuple[clip_lib.CLIPModel, CLIPTokenizer]:
  """(model, tokenizer) from a Hugging Face CLIP directory (config.json, model.safetensors,
  vocab.json, merges.txt) or one of OpenAI's .pt files (ViT-B-32.pt, ...) with its BPE
  merges beside it (bpe_simple_vocab_16e6.txt.gz or merges.txt) or passed as `tokenizer`."""
  path = os.fspath(spec)
  if os.path.isdir(path):
    model = clip_lib.load_clip_hf(path, dtype=dtype)
    tok = load_tokenizer(tokenizer or path)
  elif os.path.isfile(path) and path.endswith((".pt", ".pth", ".bin")):
    model = clip_lib.load_clip_openai(path, dtype=dtype)
    tok = load_tokenizer(tokenizer) if tokenizer else _tokenizer_beside(path)
    if tok is None:
      raise ClipNotFoundError(
          f"No CLIP tokenizer beside {path}: put OpenAI's bpe_simple_vocab_16e6.txt.gz (from "
          "the openai/CLIP repository) or a Hugging Face CLIP's vocab.json + merges.txt in "
          "its folder, or pass tokenizer=PATH.")
  else:
    named = (f"CLIP {path} weights are not bundled (nothing can be downloaded here); "
             if path in clip_lib.CLIP_SIZES else f"CLIP weights not found at {path!r}; ")
    raise ClipNotFoundError(named + HF_DOWNLOAD + ", or pass OpenAI's ViT-L-14.pt with "
                            "bpe_simple_vocab_16e6.txt.gz beside it.")
  if tok.vocab_size != model.cfg.text.vocab_size:
    raise TokenizerFileError(
        f"The tokenizer has {tok.vocab_size} tokens but the CLIP model {path} embeds "
        f"{model.cfg.text.vocab_size}; use the vocab.json/merges.txt of the same checkpoint.")
  return model, tok


def weights_file(spec: str | os.PathLike) -> str:
  """The file holding a CLIP's weights (what its SHA-1 identifies): the .pt itself, or the
  safetensors / PyTorch file in a Hugging Face directory."""
  path = os.fspath(spec)
  if os.path.isdir(path):
    for name in ("model.safetensors", "pytorch_model.bin"):
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
  return path


# ------------------------------------------------------------------------ batched scorer

class ClipScorer:
  """CLIP embeddings and scores in fixed-size jitted batches (the last one padded), so a
  run compiles each encoder once whatever the number of images or prompts."""

  def __init__(self, model: clip_lib.CLIPModel, tokenizer: CLIPTokenizer, *,
               batch_size: int = 32, progress: bool = True):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1.")
    self.cfg, self.tokenizer = model.cfg, tokenizer
    self.batch_size, self.progress = int(batch_size), progress
    graphdef, self._state = nnx.split(model)
    self._images = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode_image(x))
    self._texts = jax.jit(lambda s, i, m: nnx.merge(graphdef, s).encode_text(i, m))

  @classmethod
  def from_spec(cls, spec: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                dtype: str = "float32", **kw: Any) -> "ClipScorer":
    """From a checkpoint directory or OpenAI .pt file (see `load_clip`)."""
    model, tok = load_clip(spec, tokenizer=tokenizer, dtype=dtype)
    return cls(model, tok, **kw)

  @property
  def model_name(self) -> str:
    """"ViT-L/14", "ViT-B/32", "ViT-B/16", or the shapes of another CLIP."""
    return clip_lib.describe(self.cfg)

  def _batches(self, n: int, what: str):
    starts = range(0, n, self.batch_size)
    if self.progress and n:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm(starts, desc=f"CLIP {what}", unit="batch", leave=False)
    return starts

  def image_embeddings(self, images: Any) -> np.ndarray:
    """uint8 images (see `preprocess`) -> unnormalised embeddings [N, D] float32."""
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[-1] in (1, 3, 4):
      raise ValueError(f"Got one image of shape {images.shape}; pass a batch: images[None].")
    images = images if isinstance(images, np.ndarray) else list(images)
    size, bs = self.cfg.vision.image_size, self.batch_size
    out = np.zeros((len(images), self.cfg.projection_dim), np.float32)
    for start in self._batches(len(images), "images"):
      chunk = preprocess(images[start:start + bs], size)
      n = len(chunk)
      batch = np.zeros((bs, size, size, 3), np.float32)
      batch[:n] = chunk
      out[start:start + n] = np.asarray(self._images(self._state, batch))[:n]
    return out

  def text_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> unnormalised embeddings [N, D] float32."""
    tokens = self.tokenizer(prompts, self.cfg.text.max_len)
    bs, length = self.batch_size, tokens.ids.shape[1]
    out = np.zeros((len(tokens.ids), self.cfg.projection_dim), np.float32)
    for start in self._batches(len(tokens.ids), "prompts"):
      n = min(bs, len(tokens.ids) - start)
      ids = np.full((bs, length), self.tokenizer.pad_id, np.int32)
      mask = np.zeros((bs, length), bool)
      ids[:n], mask[:n] = tokens.ids[start:start + n], tokens.mask[start:start + n]
      out[start:start + n] = np.asarray(self._texts(self._state, ids, mask))[:n]
    return out

  def pair_scores(self, images: Any, prompts: Sequence[str]) -> np.ndarray:
    """100 * cos(image i, prompt i) for every pair: [N] float64."""
    n_images = len(images)
    if n_images != len(prompts):
      raise ValueError(f"{n_images} images but {len(prompts)} prompts; CLIP score pairs "
                       "image i with prompt i.")
    return pair_scores(self.image_embeddings(images), self.text_embeddings(prompts))

  def score(self, images: Any, prompts: Sequence[str], *, clamp_each: bool = False) -> float:
    """CLIP score of the pairs (torchmetrics' definition; see the module docstring)."""
    return score_from_pairs(self.pair_scores(images, prompts), clamp_each=clamp_each)


def clip_score(images: Any, prompts: Sequence[str], scorer: ClipScorer | str | os.PathLike,
               *, clamp_each: bool = False, **kw: Any) -> float:
  """CLIP score of uint8 images against their prompts; `scorer` is a ClipScorer or the
  spec `load_clip` takes (a Hugging Face CLIP directory or an OpenAI .pt file), built with
  `kw` (batch_size, progress, dtype, tokenizer)."""
  if not isinstance(scorer, ClipScorer):
    scorer = ClipScorer.from_spec(scorer, **kw)
  return scorer.score(images, prompts, clamp_each=clamp_each)
