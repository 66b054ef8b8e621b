"""Text-image evaluators, chosen by name (`eval.text_metric`), big_vision's `type=` style.

An evaluator scores samples against the prompts they were drawn from, and the real
held-out pairs (its ceiling). Each takes one `Context` (what the evaluation already has:
the eval config section, the stage's data config, the cache folder, Inception features
and captions of the train and held-out splits) and implements

  name                                  the metric's key in results
  image_features(images)                what score needs of the samples beyond their
                                        Inception features (CLIP image embeddings), or
                                        None; computed per process on its share
  score(features, images, prompts, *, image_features=None)
                                        {name: value, ...} for generated samples
  ceiling(context)                      the same on the real held-out pairs
  protocol()                            what identifies the metric in results files
                                        (e.g. the CLIP model and its weights' SHA-1)

A new metric registers a factory in EVALUATORS; the eval jobs never name one. "auto"
(the default) keeps the historical choice: CLIP score when eval.clip names CLIP weights,
else the offline alignment score.

Multi-host evaluation (imagen_jax/multihost.py): every process samples its share of the
captions (`generate_share`) and computes its share's features (`share_features`); the
features are gathered in caption order and process 0 scores them. Only process 0 builds
a scoring evaluator (`text_evaluator(..., scoring=False)` elsewhere).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np

from imagen_jax import config_schema
from imagen_jax import multihost
from imagen_jax.errors import UserError
from imagen_jax.eval import alignment as align_lib
from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import references
from imagen_jax.eval import weights as weights_lib

# The CLIP models a T2I CLIP score is reported with; ViT-L/14 is the protocol's default
# (torchmetrics' CLIPScore and most text-to-image papers), "any" accepts any CLIP (tests,
# custom models) and names it by its shapes.
CLIP_MODELS = ("ViT-L/14", "ViT-B/32", "ViT-B/16", "any")


@dataclasses.dataclass
class Context:
  ec: Any                    # the config's eval section
  data_cfg: Any              # the stage's data section (its held-out split, resolution)
  cache_dir: str
  train_feats: np.ndarray | None  # None: the dataset has no train split
  train_caps: list[str]
  ref_feats: np.ndarray
  ref_caps: list[str]


def load_context(ec: Any, data_cfg: Any, cache_dir: str) -> Context:
  """The Context of an evaluation: Inception features and captions of the held-out split
  (eval.reference_limit of it) and of the train split (eval.alignment.train_limit; None
  and [] when the dataset was built without one), read from cache_dir when there
  (imagen_jax/eval/references.py)."""
  inception = ec.inception or None
  ref_feats, ref_caps = references.split_features(
      data_cfg, data_cfg.eval_split, ec.reference_limit, cache_dir, inception=inception,
      batch_size=ec.batch_size, resize=ec.fid_resize)
  train_feats, train_caps = None, []
  if references.has_split(data_cfg, data_cfg.train_split):  # COCO's val alone has none
    train_feats, train_caps = references.split_features(
        data_cfg, data_cfg.train_split, ec.alignment.train_limit, cache_dir,
        inception=inception, batch_size=ec.batch_size, resize=ec.fid_resize)
  return Context(ec=ec, data_cfg=data_cfg, cache_dir=cache_dir, train_feats=train_feats,
                 train_caps=train_caps, ref_feats=ref_feats, ref_caps=ref_caps)


class Evaluator(Protocol):
  name: str

  def image_features(self, images: np.ndarray) -> np.ndarray | None: ...

  def score(self, features: np.ndarray | None, images: np.ndarray | None,
            prompts: Sequence[str], *,
            image_features: np.ndarray | None = None) -> dict[str, float]: ...

  def ceiling(self, ctx: Context) -> dict[str, float]: ...

  def protocol(self) -> dict[str, Any]: ...


class AlignmentScorer:
  """The offline score: a contrastive model over Inception + MiniLM features, trained on
  the train split (imagen_jax/eval/alignment.py); not CLIP score."""

  name = "alignment"

  def __init__(self, ctx: Context):
    ac, data_cfg = ctx.ec.alignment, ctx.data_cfg
    if ctx.train_feats is None:
      raise UserError(
          f"The offline alignment score trains on the {data_cfg.train_split!r} split, which "
          f"{data_cfg.dataset} was built without. Fix: build that split too, or score with "
          "CLIP: --config.eval.text_metric=clip_score --config.eval.clip=/path/to/clip.")
    self.candidates, self.seed = int(ac.candidates), int(ac.seed)
    self._text_cache: dict[str, np.ndarray] = {}
    key = align_lib.cache_key(kind="alignment", dataset=data_cfg.dataset,
                              resolution=int(data_cfg.resolution),
                              train=[len(ctx.train_caps), ctx.train_caps[:3]],
                              settings=ac.to_dict(), inception=ctx.ec.inception or "default",
                              resize=ctx.ec.fid_resize)
    path = os.path.join(ctx.cache_dir, f"alignment-{key}.npz")
    if os.path.isfile(path):
      self.model = align_lib.AlignmentModel.load(path)
    else:
      self.model = align_lib.train(
          ctx.train_feats, self.text(ctx.train_caps), dim=int(ac.dim), steps=int(ac.steps),
          batch_size=int(ac.batch_size), lr=float(ac.lr),
          weight_decay=float(ac.weight_decay), seed=int(ac.seed),
          meta={"dataset": data_cfg.dataset, "resolution": int(data_cfg.resolution)})
      self.model.save(path)
    self.path = path
    self.pool_caps = list(ctx.ref_caps)
    self.pool_feats = self.text(self.pool_caps)

  def text(self, captions: Sequence[str]) -> np.ndarray:
    missing = sorted({c for c in captions if c not in self._text_cache})
    if missing:
      for c, f in zip(missing, align_lib.text_features(missing)):
        self._text_cache[c] = f
    return np.stack([self._text_cache[c] for c in captions])

  def image_features(self, images: np.ndarray) -> None:
    del images  # scores Inception features alone

  def score(self, features, images, prompts: Sequence[str], *,
            image_features: np.ndarray | None = None) -> dict[str, float]:
    del images, image_features
    return align_lib.summary(self.model, features, self.text(prompts), list(prompts),
                             candidates=self.candidates, seed=self.seed,
                             pool_text_features=self.pool_feats, pool_captions=self.pool_caps)

  def ceiling(self, ctx: Context) -> dict[str, float]:
    return self.score(ctx.ref_feats, None, ctx.ref_caps)

  def protocol(self) -> dict[str, Any]:
    return {"text_metric": self.name, "alignment_model": os.path.basename(self.path)}


class ClipScorer:
  """CLIP score (torchmetrics' definition) with user-supplied CLIP weights (eval.clip)."""

  name = "clip_score"

  def __init__(self, ctx: Context):
    from imagen_jax.eval import clip_score  # pylint: disable=g-import-not-at-top
    if not ctx.ec.clip:
      raise UserError("eval.text_metric='clip_score' needs CLIP weights. Fix: pass "
                       "--config.eval.clip=/path/to/clip (a Hugging Face CLIP directory).")
    self.scorer = clip_score.ClipScorer.from_spec(ctx.ec.clip)
    self.model = self.scorer.model_name
    wanted = ctx.ec.get("clip_model", "ViT-L/14")
    if wanted != "any" and self.model != wanted:
      raise UserError(
          f"eval.clip ({ctx.ec.clip}) holds a {self.model} CLIP, but eval.clip_model is "
          f"{wanted!r}: CLIP scores of different models are not comparable. Fix: pass the "
          f"{wanted} weights, or --config.eval.clip_model='{self.model}' to report "
          f"{self.model} scores (one of {CLIP_MODELS}; 'any' for another CLIP).")
    self.weights = clip_score.weights_file(ctx.ec.clip)

  def image_features(self, images: np.ndarray) -> np.ndarray:
    return self.scorer.image_embeddings(images)

  def score(self, features, images: np.ndarray | None, prompts: Sequence[str], *,
            image_features: np.ndarray | None = None) -> dict[str, float]:
    """CLIP score of images (or of their `image_features`, given) and prompts."""
    from imagen_jax.eval import clip_score  # pylint: disable=g-import-not-at-top
    del features
    if image_features is None:
      return {"clip_score": float(self.scorer.score(images, list(prompts)))}
    pairs = clip_score.pair_scores(image_features, self.scorer.text_embeddings(list(prompts)))
    return {"clip_score": clip_score.score_from_pairs(pairs)}

  def ceiling(self, ctx: Context) -> dict[str, float]:
    images = references.real_images(ctx.data_cfg, ctx.data_cfg.eval_split,
                                    ctx.ec.reference_limit)
    return self.score(None, images, ctx.ref_caps)

  def protocol(self) -> dict[str, Any]:
    return {"text_metric": self.name, "clip_model": self.model,
            "clip_weights": os.path.basename(self.weights),
            "clip_sha1": weights_lib.file_sha1(self.weights)}


EVALUATORS: dict[str, Callable[[Context], Evaluator]] = {
    "alignment": AlignmentScorer,
    "clip_score": ClipScorer,
}
CHOICES = ("auto", *EVALUATORS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoringSettings:
  """The keys both eval jobs share (their sections add the rest): num_images held-out
  captions sampled from `seed` in batches of batch_size, scored against reference_limit
  (0 = all) held-out images by FID (Inception weights `inception`, "" = the default
  file; images resized to 299 by fid_resize, fid.RESIZE_MODES) and by `text_metric`
  (CHOICES; "auto" = CLIP score when `clip` names CLIP weights, which must be a
  `clip_model` CLIP, else the offline alignment score trained as `alignment` says);
  features and the alignment model are cached in cache_dir ("" = under the workdir);
  grids show grid_size samples."""

  num_images: int
  seed: int
  batch_size: int
  reference_limit: int
  clip: str
  inception: str
  cache_dir: str
  grid_size: int
  text_metric: str
  fid_resize: str
  clip_model: str
  alignment: align_lib.AlignmentSettings = config_schema.section(align_lib.AlignmentSettings)

  def check(self, c: config_schema.Checker) -> None:
    c.integer("num_images", minimum=2)
    c.integer("seed")
    c.integer("batch_size", minimum=1)
    c.integer("grid_size", minimum=1)
    limit = c.integer("reference_limit")
    if limit < 0 or limit == 1:
      raise c.error("reference_limit", "must be 0 (all) or >= 2 (covariances)")
    for name in ("clip", "inception", "cache_dir"):
      c.string(name)
    c.one_of("text_metric", CHOICES)
    c.one_of("fid_resize", fid_lib.RESIZE_MODES)
    c.one_of("clip_model", CLIP_MODELS)


def text_evaluator(ctx: Context, *, scoring: bool = True) -> Evaluator:
  """The evaluator eval.text_metric names ("auto": clip_score with eval.clip, else
  alignment). scoring=False (processes other than 0 of a multi-host evaluation): only its
  `image_features` will be called, so one that has none (alignment, which would train or
  load a model) is not built."""
  name = ctx.ec.get("text_metric", "auto")
  if name == "auto":
    name = "clip_score" if ctx.ec.clip else "alignment"
  if name not in EVALUATORS:
    raise UserError(f"eval.text_metric={name!r}: no such evaluator; choose one of {CHOICES}.")
  if not scoring and name == "alignment":
    return _NoImageFeatures(name)
  return EVALUATORS[name](ctx)


class _NoImageFeatures:
  """Stands in for an evaluator that scores Inception features alone, on processes that
  only contribute features."""

  def __init__(self, name: str):
    self.name = name

  def image_features(self, images: np.ndarray) -> None:
    del images


# Multi-host: each process samples and featurises its share. ------------------------------

def local_mesh(mesh_cfg: Any) -> jax.sharding.Mesh:
  """The config's mesh over this process's devices: every process of a multi-host
  evaluation samples its own captions with its own copy of the stage, no collectives
  between them (in one process: the config's mesh, as before)."""
  from imagen_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  return sharding_lib.mesh_from_config(mesh_cfg, devices=jax.local_devices())


def generate_share(cascade: Any, prompts: Sequence[str], *, out_dir: str, grid_size: int,
                   progress: bool = True, **kw: Any) -> tuple[Any, slice]:
  """(this process's samples, the slice of `prompts` they are): Cascade.generate on this
  process's share of the prompts (multihost.share), keyed by each prompt's index in the
  whole list (start_index), so image i is the one a single process draws.

  Every process writes its own PNGs under out_dir; process 0, once all have, the grids
  of the first grid_size images and settings.json for all the prompts, as one process
  would. In one process this is cascade.generate(prompts, out_dir=out_dir, ...).
  """
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  prompts = [str(p) for p in prompts]
  if multihost.process_count() == 1:
    return cascade.generate(prompts, out_dir=out_dir, grid_size=grid_size,
                            progress=progress, **kw), slice(0, len(prompts))
  part = multihost.share(len(prompts))
  main = multihost.is_main()
  if part.stop > part.start:
    out = cascade.generate(prompts[part], start_index=part.start, progress=progress and main,
                           **kw)
    _save_pngs(out.images, out_dir, part.start)
  else:  # more processes than prompts
    stages = cascade.stages[:kw.get("num_stages") or len(cascade.stages)]
    out = cascade_lib.CascadeOutput(
        prompts=[], images=[np.zeros((0, s.resolution, s.resolution, 3), np.uint8)
                            for s in stages], settings={}, seconds=[0.0] * len(stages))
  # The first grid_size images, from whichever processes drew them (a collective, so also
  # the point after which every share's PNGs are on disk).
  heads = [multihost.gather(imgs[:max(0, min(part.stop, grid_size) - part.start)])
           for imgs in out.images]
  if main:  # process 0's share is never empty (multihost.share)
    record = dict(out.settings, prompts=prompts, start_index=0,
                  processes=multihost.process_count())
    # Rewrites the first grid_size PNGs (same bytes) along with the grids and settings.json.
    cascade_lib.save_outputs(cascade_lib.CascadeOutput(
        prompts=prompts, images=heads, settings=record, seconds=out.seconds),
        out_dir, grid_size=grid_size)
  return out, part


def _save_pngs(images: Sequence[np.ndarray], out_dir: str, start: int) -> None:
  """Each stage's images as out_dir/stage{k}_{R}px/{start + i:05d}.png (save_outputs'
  names), without the grid and settings.json that describe all the prompts."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for k, imgs in enumerate(images):
    sub = os.path.join(out_dir, f"stage{k}_{imgs.shape[1]}px")
    os.makedirs(sub, exist_ok=True)
    for i, img in enumerate(imgs):
      Image.fromarray(img).save(os.path.join(sub, f"{start + i:05d}.png"))


def share_features(ctx: Context, scorer: Evaluator, images: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray | None]:
  """(Inception features, the scorer's image features or None) of every process's
  images, gathered in caption order; `images` are this process's share."""
  ec = ctx.ec
  feats = fid_lib.inception_features(images, batch_size=int(ec.batch_size),
                                     weights=ec.inception or None, resize=ec.fid_resize,
                                     progress=multihost.is_main())
  extra = scorer.image_features(images)
  return multihost.gather(feats), None if extra is None else multihost.gather(extra)


def protocol(ctx: Context, scorer: Evaluator, *, num_images: int) -> dict[str, Any]:
  """The fields that decide whether two evaluations' numbers are comparable, recorded in
  every results file: sample and reference counts, the FID resize convention and the
  Inception weights (file and SHA-1), and the text metric with its model."""
  ec = ctx.ec
  inception = weights_lib.inception_weights_path(ec.inception or None)
  return {"num_images": int(num_images), "reference_images": int(len(ctx.ref_feats)),
          "reference_split": str(ctx.data_cfg.eval_split),
          "fid_resize": str(ec.fid_resize), "inception_weights": os.path.basename(inception),
          "inception_sha1": weights_lib.file_sha1(inception), **scorer.protocol()}


def protocol_markdown(fields: dict[str, Any]) -> str:
  """One line of markdown listing the protocol fields, for results.md and report.md."""
  return "Protocol: " + "; ".join(f"{k} `{v}`" for k, v in fields.items()) + "."


def metric_label(fields: dict[str, Any]) -> str:
  """The text metric's name for a table header or axis: CLIP score names its model."""
  if fields.get("text_metric") == "clip_score":
    return f"CLIP score ({fields.get('clip_model', '?')})"
  return str(fields.get("text_metric", "alignment"))
