r"""The cascade of trained stages: sampling from text, and its evaluation.

  python launch.py --config=configs/cascade.py:demo --workdir=runs/demo/cascade --mode=sample \
      --prompt="rocket, twemoji style" --prompt="red apple, openmoji style"
  python launch.py --config=configs/cascade.py:demo --workdir=runs/demo/eval --mode=eval

`stages` lists the stages' training workdirs (or checkpoints directories), base first; each
stage brings the config it was trained with (sampler, steps, guidance, thresholding,
noise augmentation, text encoder), and `stage0`, `stage1`, ... (one per stage) override
any of those (unset = the stage's own value), e.g. --config.stage1.steps=8
--config.stage2.aug_t=0.1.
An SR stage's noise-augmentation level is given by at most one of aug_t (a time of the
stage's augmentation schedule), aug_logsnr or aug_sigma (the std of the noise added to
the low-res input); settings.json records all three.

--mode=sample runs `sample.prompts` (or --prompt, or --prompts_file with one prompt per line)
through the first `sample.num_stages` stages (0 = all) and writes PNGs, captioned grids and
settings.json (see imagen_jax/cascade.py).

--mode=eval (imagen_jax/jobs/eval_cascade.py) follows Imagen's Figure 4 protocol at small scale:
for each weight in eval.guidance_weights it samples eval.num_images held-out captions
through stages 0..eval.fid_stage, and measures FID against that stage's held-out images
and text-image alignment: CLIP score when eval.clip names CLIP weights, else the offline
alignment score (imagen_jax/eval/alignment.py). With eval.aug_levels set (and fid_stage
>= 1) it also sweeps the SR stages' sampling augmentation level, every level at every
weight (Imagen swept 0.1-0.3): eval.aug_level_kind says whether the levels are times t,
log-SNRs or sigmas. It writes results.csv, results.md (one row per weight and level),
the FID-vs-alignment plot, a sample grid per row and report.md.

Variants (after the colon):
  demo     what `make demo` evaluates: the three runs/demo stages (64 -> 256 -> 1024)
  shipped  the 32 px base stage the repo ships (assets/emoji32_base.npz, trained by the
           noise-schedule study's recipe for longer; assets/README.md says how), sampled
           by `make demo` from the study's eight fixed prompts
  emoji    the emoji research configs' workdirs (runs/base64, runs/sr256, runs/sr1024)
  coco     zero-shot COCO FID-30K as Imagen reports it: 30,000 captions of distinct
           MS-COCO val2014 images (one caption per image, fixed seed) sampled through the
           base and 64->256 stages at guidance 1.35 (base) and 8.0 (SR), FID at 256 px
           against every val2014 image center-cropped to 256 px (statistics cached), CLIP
           score with ViT-L/14. Needs the COCO folder built first (README, Evaluation) and
           --config.eval.source_dir=/path/to/coco --config.eval.clip=/path/to/clip
  imagen_sweeps  Imagen's guidance grid (configs/common.py) swept at the base stage and,
           separately, at the 64->256 stage, both scored at 256 px: two Pareto curves
  imagen_aug     the base grid at each SR sampling augmentation level t in
           (0, 0.1, 0.2, 0.3): one Pareto curve per level
  smoke    for tests: stage paths are given with --config.stages
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from configs import common

VARIANTS = ("demo", "shipped", "emoji", "coco", "imagen_sweeps", "imagen_aug", "smoke")

# The base stage the repo ships, relative to the repository root (where launch.py runs).
SHIPPED_BASE = "assets/emoji32_base.npz"


def _overrides() -> ml_collections.ConfigDict:
  # Unset (None) keeps the stage's own value; see imagen_jax.cascade.StageSettings.
  return ml_collections.ConfigDict(dict(
      sampler=placeholder(str), steps=placeholder(int), guidance=placeholder(float),
      thresholding=placeholder(str), aug_t=placeholder(float),
      aug_logsnr=placeholder(float), aug_sigma=placeholder(float)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "demo"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/cascade.py; choose one of {VARIANTS}.")

  c = ml_collections.ConfigDict()
  c.kind = "cascade"
  c.variant = variant
  c.stages = ("runs/base64", "runs/sr256", "runs/sr1024")
  c.weights = "ema"  # "ema" (the slowest-decaying EMA) or "params"
  c.mesh = dict(data=-1, fsdp=1, tensor=1)

  # batch_size is per sampling call, rounded up to a multiple of the device count.
  c.sample = dict(prompts=("grinning face, twemoji style", "red apple, openmoji style",
                           "rocket, twemoji style", "cat face, openmoji style"),
                  prompts_file="", seed=0, batch_size=8, num_stages=0)

  # Evaluation: a guidance sweep of the stage-0 weight. num_images held-out captions are
  # sampled per weight; FID compares stage fid_stage's samples with reference_limit
  # (0 = all) held-out images of that stage's dataset (data_dir "" = the stage's own).
  # clip: a Hugging Face CLIP directory for CLIP score; "" uses the offline alignment
  # score, trained on alignment.train_limit (0 = all) training pairs. text_metric: the
  # evaluator by name (imagen_jax/eval/evaluators.py); "auto" = clip_score with clip set. cascade_samples:
  # also run sample.prompts through every stage for report.md. aug_levels: the SR stages'
  # sampling augmentation levels to sweep (() = each stage's own; needs fid_stage >= 1),
  # every SR stage up to fid_stage sampled at each, given as aug_level_kind "t" (a time
  # of each stage's augmentation schedule), "logsnr" or "sigma"; it replaces
  # stageK.aug_* for those stages. sr_guidance_weights: a second sweep, of the SR stages'
  # guidance (base at its own; needs fid_stage >= 1); the plot draws one curve per sweep.
  # The reference data is stage fid_stage's own unless dataset / source_dir / data_dir /
  # train_split / eval_split ("" = the stage's) say otherwise (the coco variant).
  # fid_resize: "pytorch_fid" or "clean_fid" (imagen_jax/eval/fid.py); clip_model: the CLIP
  # eval.clip must hold ("ViT-L/14", "ViT-B/32", "ViT-B/16"; "any" for another).
  c.eval = dict(guidance_weights=(1.0, 3.0, 5.0), aug_levels=(), aug_level_kind="t",
                sr_guidance_weights=(), num_images=1000, seed=1234, fid_stage=0,
                batch_size=64, reference_limit=0, data_dir="", dataset="", source_dir="",
                train_split="", eval_split="", clip="", inception="",
                text_metric="auto", fid_resize="pytorch_fid", clip_model="ViT-L/14",
                grid_size=16, cascade_samples=True, cache_dir="",
                alignment=dict(train_limit=0, dim=256, steps=1500, batch_size=512, lr=1e-3,
                               weight_decay=1e-4, candidates=100, seed=0))

  if variant == "demo":
    c.stages = ("runs/demo/base64", "runs/demo/sr256", "runs/demo/sr1024")
    # The demo stages train for about a hundred steps, where an EMA of decay 0.99 is
    # still about half the initialisation: sample the trained weights themselves.
    c.weights = "params"
    c.eval.update(guidance_weights=(1.0, 3.0), num_images=48, reference_limit=200,
                  alignment=dict(train_limit=400, dim=128, steps=600, batch_size=256,
                                 lr=1e-3, weight_decay=1e-4, candidates=100, seed=0))
  elif variant == "shipped":
    c.stages = (SHIPPED_BASE,)
    # Four samples of each prompt (each its own noise), none picked by hand.
    c.sample.update(prompts=tuple(p for p in common.GRID_PROMPTS for _ in range(4)),
                    batch_size=8)
  elif variant == "coco":
    c.stages = ("runs/base64", "runs/sr256")
    c.sample.update(num_stages=2)
    c.eval.update(guidance_weights=(1.35,), fid_stage=1, num_images=30000, seed=2014,
                  reference_limit=0, dataset="image_text_folder", eval_split="validation",
                  train_split="train", text_metric="clip_score", clip_model="ViT-L/14",
                  cascade_samples=False)
  elif variant in ("imagen_sweeps", "imagen_aug"):
    c.stages = ("runs/base64", "runs/sr256")
    c.sample.update(num_stages=2)
    c.eval.update(guidance_weights=common.IMAGEN_GUIDANCE_GRID, fid_stage=1,
                  cascade_samples=False)
    if variant == "imagen_sweeps":
      c.eval.sr_guidance_weights = common.IMAGEN_GUIDANCE_GRID
    else:
      c.eval.aug_levels = (0.0, 0.1, 0.2, 0.3)
  elif variant == "smoke":
    c.stages = ()
    c.sample.update(batch_size=4)
    c.eval.update(guidance_weights=(1.0, 3.0), num_images=8, reference_limit=8,
                  batch_size=8, grid_size=4,
                  alignment=dict(train_limit=16, dim=8, steps=20, batch_size=16, lr=1e-2,
                                 weight_decay=0.0, candidates=4, seed=0))
  # One override section per stage (at least three, so that tests and the command line
  # can set stage0..stage2 of a variant that gives its stages with --config.stages); a
  # longer cascade lists its stages in a variant, which gives it stage3, stage4, ...
  for k in range(max(3, len(c.stages))):
    c[f"stage{k}"] = _overrides()
  if variant == "coco":
    # The weights Imagen reports for its zero-shot COCO FID-30K; both are stage settings,
    # so --config.stage0.guidance / --config.stage1.guidance change them.
    c.stage0.guidance, c.stage1.guidance = 1.35, 8.0
  return c
