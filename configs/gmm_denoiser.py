r"""A network denoiser trained on the analytic Gaussian-mixture testbed, scored against the
exact one: noise-schedule ablations with ground truth.

  python launch.py --config=configs/gmm_denoiser.py:ring --workdir=/tmp/gmmd --mode=train

Trains imagen_jax/models/mlp.py's log-SNR-conditioned MLP on fresh draws of a Gaussian
mixture under a training noise distribution (diffusion.schedule), prediction target and
loss weighting, then measures (imagen_jax/jobs/testbed_train.py):
  - its excess MSE over the Bayes-optimal denoiser at each log-SNR of eval.logsnr_levels,
    E||x0_hat_net - E[x0 | x_t]||^2 / D (the testbed's E[x0 | x_t] is closed-form);
  - the sliced W2 of its samples to fresh data, with the noise floor of two data draws,
    under one fixed sampler (eval.sampler, on its own schedule, the same for every arm).

Variants (after the colon):
  ring   2-D, 8 modes on a circle (the default)
  64d    random 64-D mixture of 4 anisotropic, rotated modes
  smoke  the ring with a tiny network and a few hundred steps, seconds on CPU (tests)

Ablation axes are plain overrides, e.g.
  --config.diffusion.schedule=edm --config.diffusion.weighting=edm
  --config.diffusion.target=v --config.diffusion.weighting=v
  --config.diffusion.weighting=min_snr --config.diffusion.weighting_kw="{'gamma': 5.0}"
experiments/gmm_schedules.py runs the study over such arms and seeds.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("ring", "64d", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "ring"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/gmm_denoiser.py; choose one "
                     f"of {VARIANTS}.")
  c = ml_collections.ConfigDict()
  c.kind = "gmm_denoiser"  # selects the job in launch.py and the checks in config_checks.py
  c.variant = variant

  # The mixture, as in configs/gmm.py: "ring" uses num_modes, radius, std (dim 2);
  # "random" uses dim, num_modes, seed.
  c.data = dict(mixture="ring", dim=2, num_modes=8, radius=1.0, std=0.1, seed=0)

  c.model = dict(width=128, depth=3, feat_dim=64)

  # The training objective: noise levels lambda = schedule.logsnr(t), t ~ U[0, 1]
  # (antithetic), the network predicts `target`, the loss is weighting(lambda) x eps-MSE.
  c.diffusion = dict(schedule="cosine", schedule_kw=ml_collections.ConfigDict(),
                     target="eps", weighting="eps",
                     weighting_kw=ml_collections.ConfigDict())

  # Adam with linear warm-up then cosine decay to 0; every step draws a fresh batch.
  c.train = dict(steps=5000, batch_size=256, lr=1e-3, warmup_steps=200, seed=0,
                 log_every=100)

  c.eval = dict(
      num_samples=8192, seed=1234, num_projections=256,
      # Levels at which the excess MSE over the exact denoiser is measured.
      logsnr_levels=tuple(float(v) for v in range(-12, 13, 2)),
      # One sampler for every arm: its own schedule, so a training-distribution arm
      # (e.g. EDM's log-normal) does not move the sampling grid.
      sampler=dict(schedule="cosine", schedule_kw=ml_collections.ConfigDict(),
                   method="dpmpp_2m", steps=20, grid="logsnr", rho=7.0,
                   eta=0.0, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0))

  if variant == "64d":
    c.data.update(mixture="random", dim=64, num_modes=4)
    c.model.update(width=256)
    c.eval.num_samples = 4096
  elif variant == "smoke":
    c.model.update(width=32, depth=1, feat_dim=16)
    c.train.update(steps=200, batch_size=256, warmup_steps=20, log_every=50)
    c.eval.update(num_samples=512, num_projections=32, logsnr_levels=(-6.0, 0.0, 6.0))
    c.eval.sampler.update(steps=8)
  return c
