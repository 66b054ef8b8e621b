r"""Samplers and schedules on an analytic Gaussian mixture, with its exact denoiser.

  python launch.py --config=configs/gmm.py:ring --workdir=/tmp/gmm --mode=sample

No network is involved: the Bayes-optimal denoiser of a Gaussian mixture is closed-form,
so the gap between samples and data is the sampler's discretisation error alone (see
imagen_jax/diffusion/testbed.py). Compare it with `sw_noise_floor` in metrics.json, the
distance between two data draws of the same size.

Variants (after the colon):
  ring   2-D, 8 modes on a circle; also writes a scatter plot (the default)
  64d    random 64-D mixture of 4 anisotropic, rotated modes
  smoke  tiny ring run for tests: a few hundred samples, 8 DDIM steps, seconds on CPU

Every option below can be overridden, e.g.
  --config.diffusion.sampler.method=heun --config.diffusion.sampler.steps=18
  --config.diffusion.schedule=edm --config.diffusion.schedule_kw="{'sigma_max': 40.0}"
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("ring", "64d", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "ring"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/gmm.py; choose one of {VARIANTS}.")

  c = ml_collections.ConfigDict()
  c.kind = "gmm"  # selects the job in launch.py and the checks in config_checks.py
  c.variant = variant

  # data: "ring" uses num_modes, radius, std (dim must be 2); "random" uses dim,
  # num_modes, seed.
  c.data = dict(mixture="ring", dim=2, num_modes=8, radius=1.0, std=0.1, seed=0)

  c.diffusion = dict(
      schedule="cosine",
      # Keyword arguments of get_schedule(schedule, ...); replace the whole dict from the
      # command line with --config.diffusion.schedule_kw="{'logsnr_min': -20.0}".
      schedule_kw=ml_collections.ConfigDict(),
      sampler=dict(
          # DPM-Solver++ wants steps uniform in log-SNR: on the cosine schedule's own t
          # spacing its first and last steps are too long (benchmarks/results/samplers.md).
          method="dpmpp_2m", steps=20, grid="logsnr", rho=7.0,
          # Method options, passed only to the methods that take them (METHOD_KWARGS).
          eta=0.0,                                                  # ddim
          s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0,  # heun
      ),
  )

  c.eval = dict(num_samples=10_000, seed=0, num_projections=256)

  if variant == "64d":
    c.data.update(mixture="random", dim=64, num_modes=4)
    c.eval.num_samples = 4096
  elif variant == "smoke":
    c.diffusion.sampler.update(method="ddim", steps=8)
    c.eval.update(num_samples=256, num_projections=64)
  return c
