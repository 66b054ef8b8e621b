"""An offline text-image alignment score: a small contrastive model over frozen features.

This is NOT CLIP score. No CLIP weights can be had offline, so to still measure whether
samples match their prompts we train a tiny CLIP-like model on the embedded dataset's
train split, over features we do have:

  image side: Inception-v3 pool3 features (2048-d, the FID network, imagen_jax.eval.fid),
              standardised, then a 2-layer MLP to `dim`;
  text side:  MiniLM-L6 sentence embeddings (384-d, mean-pooled and L2-normalised, the
              offline text encoder imagen_jax.text ships), then a linear map to `dim`;

trained with CLIP's symmetric InfoNCE loss and a learned temperature. It reports

  * R-precision (AttnGAN's protocol): for each image, is its own caption the most
    similar among `candidates` captions (itself + candidates-1 others drawn at random,
    excluding identical captions)? Chance is 1/candidates.
  * the alignment score: 100 * max(cos(image, text), 0) averaged over pairs, CLIP score's
    formula on this model's embeddings. Its scale is this model's, not CLIP's: compare it
    across runs evaluated with the same alignment model, never with published CLIP scores.

Measured on real held-out pairs, both are the ceiling a generator can reach under this
model; measured on samples and their prompts, they rank guidance weights and checkpoints.
The model only knows what the training captions describe (for the emoji data: the
concept and the drawing style), and Inception features see a 64x64 drawing upsampled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from imagen_jax import config_schema

TEXT_ENCODER = "minilm"


@dataclasses.dataclass(frozen=True)
class AlignmentSettings:
  """eval.alignment: the offline alignment model's training, on train_limit (0 = the whole
  train split) caption-image pairs; scores rank each image's caption among `candidates`."""

  train_limit: int
  dim: int
  steps: int
  batch_size: int
  lr: float
  weight_decay: float
  candidates: int
  seed: int

  def check(self, c: config_schema.Checker) -> None:
    c.integer("train_limit", minimum=0, why="(0 = the whole train split)")
    for name in ("dim", "steps", "batch_size"):
      c.integer(name, minimum=1)
    c.integer("candidates", minimum=2)
    c.number("lr", low=0.0, strict=True)
    c.number("weight_decay", low=0.0)
    c.integer("seed")


def text_features(captions: Sequence[str], encoder: Any = None, *,
                  batch_size: int = 256) -> np.ndarray:
  """MiniLM sentence embeddings [N, 384] (mean-pooled over real tokens, L2-normalised)."""
  from imagen_jax import text as text_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.text import bert  # pylint: disable=g-import-not-at-top
  encoder = encoder or text_lib.load_text_encoder(TEXT_ENCODER, max_len=64,
                                                  batch_size=batch_size)
  out = []
  for i in range(0, len(captions), batch_size):
    emb, mask = encoder.encode(list(captions[i:i + batch_size]))
    out.append(np.asarray(bert.mean_pool(jnp.asarray(emb), jnp.asarray(mask), normalize=True)))
  return np.concatenate(out, 0).astype(np.float32) if out else np.zeros((0, 384), np.float32)


@dataclasses.dataclass
class AlignmentModel:
  """Frozen-feature projections; `params` is a dict of numpy arrays."""
  params: dict[str, np.ndarray]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def embed_images(self, image_features: np.ndarray) -> np.ndarray:
    return np.asarray(_embed_images(_jnp(self.params), jnp.asarray(image_features)))

  def embed_texts(self, text_features_: np.ndarray) -> np.ndarray:
    return np.asarray(_embed_texts(_jnp(self.params), jnp.asarray(text_features_)))

  def save(self, path: str) -> None:
    """One .npz (written to a temporary name, then renamed: never a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.npz"
    np.savez(tmp, meta=np.array(json.dumps(self.meta)), **self.params)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "AlignmentModel":
    with np.load(path) as z:
      meta = json.loads(str(z["meta"]))
      params = {k: z[k] for k in z.files if k != "meta"}
    return cls(params, meta)


def _jnp(params):
  return {k: jnp.asarray(v) for k, v in params.items()}


def _normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit
def _embed_images(p, f):
  h = (f - p["img_mean"]) / p["img_scale"]
  h = jax.nn.gelu(h @ p["img_w1"] + p["img_b1"])
  return _normalize(h @ p["img_w2"] + p["img_b2"])


@jax.jit
def _embed_texts(p, f):
  return _normalize(f @ p["txt_w"] + p["txt_b"])


def _init(rng, image_features: np.ndarray, text_dim: int, dim: int) -> dict[str, jax.Array]:
  d_img = image_features.shape[1]
  hidden = 2 * dim
  k1, k2, k3 = jax.random.split(rng, 3)
  mean = image_features.mean(0)
  scale = image_features.std() + 1e-6  # one scale keeps the features' relative sizes
  glorot = jax.nn.initializers.glorot_normal()
  return {"img_mean": jnp.asarray(mean), "img_scale": jnp.asarray(scale, jnp.float32),
          "img_w1": glorot(k1, (d_img, hidden)), "img_b1": jnp.zeros(hidden),
          "img_w2": glorot(k2, (hidden, dim)), "img_b2": jnp.zeros(dim),
          "txt_w": glorot(k3, (text_dim, dim)), "txt_b": jnp.zeros(dim),
          "log_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}


_FROZEN = ("img_mean", "img_scale")


def _loss(p, img, txt):
  """CLIP's symmetric cross-entropy over the batch's similarity matrix."""
  a, b = _embed_images(p, img), _embed_texts(p, txt)
  logits = jnp.exp(jnp.minimum(p["log_scale"], np.log(100.0))) * a @ b.T
  labels = jnp.arange(a.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean() +
                optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean())


def train(image_features: np.ndarray, text_feats: np.ndarray, *, dim: int = 256,
          steps: int = 1500, batch_size: int = 512, lr: float = 1e-3,
          weight_decay: float = 1e-4, seed: int = 0, progress: bool = True,
          meta: dict[str, Any] | None = None) -> AlignmentModel:
  """Fits the projections on paired features [N, 2048] / [N, 384] (row i with row i)."""
  n = len(image_features)
  if n < 2 or len(text_feats) != n:
    raise ValueError(f"need >= 2 paired rows, got {n} image and {len(text_feats)} text rows.")
  batch = min(batch_size, n)
  rng = jax.random.key(seed)
  params = _init(rng, np.asarray(image_features, np.float32), text_feats.shape[1], dim)
  mask = {k: k not in _FROZEN for k in params}
  tx = optax.masked(optax.adamw(lr, weight_decay=weight_decay), mask)
  opt = tx.init(params)
  img_all = jnp.asarray(image_features, jnp.float32)
  txt_all = jnp.asarray(text_feats, jnp.float32)

  @jax.jit
  def step(params, opt, key):
    idx = jax.random.permutation(key, n)[:batch]
    loss, grads = jax.value_and_grad(_loss)(params, img_all[idx], txt_all[idx])
    grads = {k: (g if mask[k] else jnp.zeros_like(g)) for k, g in grads.items()}
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  losses = []
  for i in tqdm(range(steps), disable=not progress, desc="alignment model", unit="step"):
    params, opt, loss = step(params, opt, jax.random.fold_in(rng, i))
    if i % 50 == 0 or i == steps - 1:
      losses.append(float(loss))
  info = dict(meta or {}, dim=dim, steps=steps, batch_size=batch, lr=lr,
              weight_decay=weight_decay, seed=seed, train_pairs=n,
              first_loss=losses[0], last_loss=losses[-1])
  return AlignmentModel({k: np.asarray(v) for k, v in params.items()}, info)


def cosine_scores(model: AlignmentModel, image_features: np.ndarray,
                  text_feats: np.ndarray) -> np.ndarray:
  """Per pair 100 * max(cos, 0) (CLIP score's formula on this model's embeddings)."""
  a, b = model.embed_images(image_features), model.embed_texts(text_feats)
  return 100.0 * np.maximum((a * b).sum(-1), 0.0)


def r_precision(model: AlignmentModel, image_features: np.ndarray, text_feats: np.ndarray,
                captions: Sequence[str], *, candidates: int = 100, seed: int = 0,
                pool_text_features: np.ndarray | None = None,
                pool_captions: Sequence[str] | None = None) -> float:
  """Top-1 accuracy of each image's own caption among `candidates` captions.

  Distractors are drawn (seeded) from the pool, by default the evaluated captions
  themselves, skipping captions identical to the true one. With fewer distinct captions
  than `candidates`, all of them are used.
  """
  pool_f = text_feats if pool_text_features is None else pool_text_features
  pool_c = list(captions if pool_captions is None else pool_captions)
  a = model.embed_images(image_features)
  own = model.embed_texts(text_feats)
  pool = model.embed_texts(pool_f)
  rs = np.random.default_rng(seed)
  pool_c_arr = np.asarray(pool_c, dtype=object)
  hits = 0
  for i, cap in enumerate(captions):
    others = np.flatnonzero(pool_c_arr != cap)
    k = min(candidates - 1, len(others))
    pick = rs.choice(others, size=k, replace=False)
    sims = pool[pick] @ a[i]
    hits += int((a[i] @ own[i]) > sims.max(initial=-np.inf))
  return hits / max(1, len(captions))


def summary(model: AlignmentModel, image_features: np.ndarray, text_feats: np.ndarray,
            captions: Sequence[str], *, candidates: int = 100, seed: int = 0,
            pool_text_features: np.ndarray | None = None,
            pool_captions: Sequence[str] | None = None) -> dict[str, float]:
  """{"alignment": mean cosine score, "r_precision": ..., "candidates": ...}."""
  pool = len(set(pool_captions if pool_captions is not None else captions))
  return {"alignment": float(cosine_scores(model, image_features, text_feats).mean()),
          "r_precision": r_precision(model, image_features, text_feats, captions,
                                     candidates=candidates, seed=seed,
                                     pool_text_features=pool_text_features,
                                     pool_captions=pool_captions),
          "candidates": min(candidates, pool)}


def cache_key(**parts: Any) -> str:
  """A short stable hash of the settings an alignment model (or feature set) depends on."""
  blob = json.dumps(parts, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:16]
