r"""Study A: noise-schedule ablation with ground truth, on the Gaussian-mixture testbed.

  python experiments/sweep.py experiments/gmm_schedules.py:ring all --jobs 2
  python experiments/sweep.py experiments/gmm_schedules.py:64d all --jobs 2

configs/gmm_denoiser.py trains a log-SNR-conditioned MLP on a Gaussian mixture under each
arm's objective and scores it against the mixture's exact denoiser: the excess MSE over
E[x0 | x_t] at each log-SNR (where the objective spends the network's capacity), and the
sliced W2 of its samples to fresh data under one sampler shared by every arm (against
the noise floor of two data draws). Arms follow the image study's list (issue 15):

  imagen          cosine, eps target, eps-MSE weighting (Imagen)
  v               cosine, v target, v-MSE weighting (Salimans & Ho)
  shifted_cosine  cosine shifted by 2 log(64/128) = -1.39 in log-SNR, eps (simple
                  diffusion's shift, as for a 128 px image on a 64 px base; the mixture
                  has no resolution, so this is the shift's direction at a fixed size)
  edm             EDM's log-normal training distribution and weighting, v target
  min_snr5        cosine, eps target, min-SNR-5 weighting (Hang et al.)
  sigmoid         cosine, eps target, sigmoid(2 - lambda) weighting (Kingma & Gao)
  sigmoid_laplace Laplace(0, 1) training distribution, sigmoid weighting

Variants: ring (2-D, 8 modes), 64d (random 64-D mixture of 4 anisotropic modes), smoke
(two arms, two seeds, a few hundred steps: the harness's end-to-end test).
"""

from __future__ import annotations

from typing import Any

import schedule_arms  # experiments/, on sys.path when sweep.py loads a sweep

ARMS = schedule_arms.arms(64)


def get_sweep(variant: str | None = None) -> dict[str, Any]:
  variant = variant or "ring"
  if variant not in ("ring", "64d", "smoke"):
    raise ValueError(f"Unknown variant {variant!r} of experiments/gmm_schedules.py; choose "
                     "ring, 64d or smoke.")
  config = {"ring": "ring", "64d": "64d", "smoke": "smoke"}[variant]
  arms = ARMS if variant != "smoke" else {k: ARMS[k] for k in ("imagen", "edm")}
  return dict(
      name=f"gmm_schedules_{variant}",
      describe=(
          "Study A: a log-SNR-conditioned MLP trained on a Gaussian mixture under each "
          "arm's training distribution, target and weighting (equal steps and batch), "
          "scored against the mixture's exact denoiser. mean_log10_excess_mse: the mean "
          "over the evaluated log-SNR levels of log10 E||x0_hat - E[x0|x_t]||^2 / D "
          "(lower: closer to Bayes-optimal); sliced_w2: samples vs fresh data under one "
          "shared sampler (lower is better; the noise floor is what exact sampling scores)."),
      config=f"configs/gmm_denoiser.py:{config}",
      arms=arms,
      seeds=(0, 1) if variant == "smoke" else (0, 1, 2),
      seed_keys=("train.seed",),
      common={},  # every run evaluates with the config's eval section (same seed, N, sampler)
      modes=(("train", "metrics.json"),),
      results="metrics.json",
      # Not the final training loss: each arm weighs it differently, so it does not compare.
      metrics={"sliced_w2": "lower", "mean_log10_excess_mse": "lower"},
      floors={"sliced_w2": "sliced_w2_noise_floor"},
      curve=("logsnr_levels", "excess_mse", "excess MSE over E[x0|x_t] (per dim)"),
      reference="imagen",
  )
