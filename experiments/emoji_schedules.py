r"""Study B: noise-schedule ablation of the image base stage on the emoji data.

  python experiments/sweep.py experiments/emoji_schedules.py:cpu16 all          # the study
  python experiments/sweep.py experiments/emoji_schedules.py:cpu all            # 32 px, 1250 steps
  python experiments/sweep.py experiments/emoji_schedules.py:quick all          # smoke run
  python experiments/sweep.py experiments/emoji_schedules.py:pod list           # cluster

Every arm trains the base stage from scratch with equal steps, batch and seed, then
--mode=eval (imagen_jax/jobs/eval_stage.py) scores the same checkpoints of every arm
with the same held-out captions, noise, sampler (DPM-Solver++(2M)), guidance weight and N:
FID with a bootstrap interval, KID, the offline alignment score, and a grid of fixed
prompts. Arms (the list of issue 15, as in Study A, experiments/gmm_schedules.py):

  imagen          cosine, eps target, eps-MSE weighting (Imagen)
  v               cosine, v target, v-MSE weighting (Salimans & Ho)
  shifted_cosine  cosine shifted by 2 log(R / 2R) = -1.39 in log-SNR (simple diffusion's
                  resolution shift, as for an image twice the stage's size), eps
  edm             EDM's log-normal training distribution and weighting, v target
  min_snr5        cosine, eps target, min-SNR-5 weighting (Hang et al.)
  sigmoid         cosine, eps target, sigmoid(2 - lambda) weighting (Kingma & Gao)

Variants:
  cpu16  configs/base64.py:study16: 16x16, the demo network's blocks on three levels,
         8000 steps of batch 8 with a cosine lr decay, the checkpoints of steps 2000, 4000
         and 8000 evaluated at 200 samples; the captions are encoded once (the sweep's
         `prepare`: --mode=precompute into ROOT/text_cache) instead of at every step.
         About 2.5 hours on the 2-core development CPU (AMD EPYC, AVX2) with --jobs 2:
         each pair of arms trains in ~39 minutes (two runs share the cores at ~29 img/s
         each) and evaluates in ~9 (the reference features and alignment model are
         built once, in `prepare`)
  cpu    configs/base64.py:study: 32x32, the demo network (2.2M parameters), 1250 steps
         of batch 32, the checkpoints of steps 250, 750 and 1250 evaluated at 200
         samples, captions encoded at every step: about two hours with --jobs 2 (the
         first run of the study, on record in results/emoji_schedules_cpu)
  quick  cpu16 for 60 steps and 16 samples: that the pipeline runs, in minutes
  pod    configs/base64.py:500m (64x64, 549M parameters, T5-XXL), 3 seeds, for a cluster:
         pass T5's path with --config.data.text_encoder through `common` below and the
         data_dir of a built dataset
"""

from __future__ import annotations

from typing import Any

import schedule_arms  # experiments/, on sys.path when sweep.py loads a sweep

VARIANTS = ("cpu16", "cpu", "quick", "pod")


def get_sweep(variant: str | None = None) -> dict[str, Any]:
  variant = variant or "cpu16"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of experiments/emoji_schedules.py; "
                     f"choose one of {VARIANTS}.")
  resolution = {"pod": 64, "cpu": 32}.get(variant, 16)
  arms = schedule_arms.arms(resolution, ("imagen", "v", "shifted_cosine", "edm", "min_snr5",
                                          "sigmoid"))
  common: dict[str, Any] = {
      # One cache of reference features and alignment model for every arm.
      "eval.cache_dir": "{root}/eval_cache",
  }
  # Before the arms (the sweep's `prepare`, once): the evaluation's reference features and
  # alignment model, which arms evaluated at once would each compute (and array tasks race
  # to write); and every caption encoded into a cache the arms read: on the CPU, encoding
  # each batch's captions with MiniLM cost ~0.4 s a step. The 32 px study on record
  # encoded at every step and stays so, to reproduce as recorded.
  prepare: tuple[tuple[str, str], ...] = (("eval_reference", "eval_reference.json"),)
  if variant != "cpu":
    common["data.embedding_cache"] = "{root}/text_cache"
    prepare = (("precompute", "precompute.json"),) + prepare
  if variant == "quick":
    arms = {k: arms[k] for k in ("imagen", "v")}
    common.update({"train.steps": 60, "ckpt.every": 30, "log.every": 10, "eval.steps": (),
                   "optim.warmup_steps": 10,
                   "log.sample_every": 0, "eval.num_images": 16, "eval.bootstrap": 20,
                   "eval.kid_subsets": 10, "eval.reference_limit": 64,
                   "eval.alignment.train_limit": 64, "eval.alignment.steps": 50,
                   "eval.alignment.candidates": 16})
  if variant == "pod":
    common.update({"train.steps": 500_000, "train.batch_size": 2048, "ckpt.every": 50_000,
                   "ckpt.keep": 100, "eval.steps": (), "eval.num_images": 30_000, "eval.batch_size": 256,
                   "eval.kid_subset_size": 1000, "eval.alignment.train_limit": 0})
  return dict(
      name=f"emoji_schedules_{variant}",
      describe=(
          f"Study B: the {resolution}x{resolution} base stage trained on emoji_cascade "
          "under each arm's training distribution, target and weighting (equal steps, "
          "batch and seed), every arm's checkpoints scored with the same held-out "
          "captions, noise, sampler and guidance. fid: FID of the last checkpoint's "
          "samples against the held-out split, [95% bootstrap interval over samples]; "
          "kid: KID (unbiased in N) with a conservative interval (+-1.96 subset std); "
          "alignment: the offline alignment score of samples and captions (not CLIP)."),
      config={"pod": "configs/base64.py:500m",
              "cpu": "configs/base64.py:study"}.get(variant, "configs/base64.py:study16"),
      prepare=prepare,
      arms=arms,
      seeds=(0, 1, 2) if variant == "pod" else (0,),
      seed_keys=("train.seed",),
      common=common,
      modes=(("train", "train_summary.json"), ("eval", "eval/results.json")),
      results="eval/results.json",
      metrics={"fid": "lower", "kid": "lower", "alignment": "higher"},
      intervals={"fid": ("fid_low", "fid_high"), "kid": ("kid_low", "kid_high")},
      floors={"fid": "fid_floor"},
      curve=("steps", "fid_curve", "FID (held-out captions)", "fid_curve_low",
             "fid_curve_high"),
      grid="grid",
      buckets="loss_by_logsnr",
      reference="imagen",
  )
