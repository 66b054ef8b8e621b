"""Text-image evaluators, chosen by name (`eval.text_metric`), big_vision's `type=` style.

An evaluator scores samples against the prompts they were drawn from, and the real
held-out pairs (its ceiling). Each takes one `Context` (what the evaluation already has:
the eval config section, the stage's data config, the cache folder, Inception features
and captions of the train and held-out splits) and implements

  name                                  the metric's key in results
  score(features, images, prompts)      {name: value, ...} for generated samples
  ceiling(context)                      the same on the real held-out pairs
  protocol()                            what identifies the metric in results files
                                        (e.g. the CLIP model and its weights' SHA-1)

A new metric registers a factory in EVALUATORS; the eval jobs never name one. "auto"
(the default) keeps the historical choice: CLIP score when eval.clip names CLIP weights,
else the offline alignment score.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from imagen_jax import config_schema
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

  def score(self, features: np.ndarray | None, images: np.ndarray | None,
            prompts: Sequence[str]) -> dict[str, float]: ...

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

  def score(self, features, images, prompts: Sequence[str]) -> dict[str, float]:
    del images
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

  def score(self, features, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    del features
    return {"clip_score": float(self.scorer.score(images, list(prompts)))}

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


def text_evaluator(ctx: Context) -> Evaluator:
  """The evaluator eval.text_metric names ("auto": clip_score with eval.clip, else
  alignment)."""
  name = ctx.ec.get("text_metric", "auto")
  if name == "auto":
    name = "clip_score" if ctx.ec.clip else "alignment"
  if name not in EVALUATORS:
    raise UserError(f"eval.text_metric={name!r}: no such evaluator; choose one of {CHOICES}.")
  return EVALUATORS[name](ctx)


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
