"""Measuring samples on the Gaussian-mixture testbed (imagen_jax/diffusion/testbed.py):
the mixture and sampler options of a config, sliced W2 and moment errors against fresh
data with their noise floors, strict-JSON metrics and the 2-D scatter plot. Shared by the
testbed's two jobs (imagen_jax/jobs/testbed_sample.py, testbed_train.py)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import config_schema
from imagen_jax.diffusion import samplers, testbed

MIXTURES = ("ring", "random")


@dataclasses.dataclass(frozen=True)
class MixtureSettings:
  """config.data of the testbed's configs: "ring" uses num_modes, radius and std (dim must
  be 2); "random" uses dim, num_modes and seed."""

  mixture: str
  dim: int
  num_modes: int
  radius: float
  std: float
  seed: int

  def check(self, c: config_schema.Checker) -> None:
    mixture = c.one_of("mixture", MIXTURES)
    c.integer("num_modes", minimum=1)
    dim = c.integer("dim", minimum=1)
    if mixture == "ring":
      if dim != 2:
        raise c.error("dim", "the ring mixture is 2-D",
                      fix=f"pass {c.flag('dim')}=2, or {c.flag('mixture')}=random for a "
                          "mixture of any dimension")
      c.number("radius", low=0.0, strict=True)
      c.number("std", low=0.0, strict=True)
    else:
      c.integer("seed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SampleEvalSettings:
  """config.eval of the testbed: num_samples (>= 2, for covariances) drawn from `seed`,
  scored by sliced W2 over num_projections random directions."""

  num_samples: int
  seed: int
  num_projections: int

  def check(self, c: config_schema.Checker) -> None:
    c.integer("num_samples", minimum=2)
    c.integer("seed")
    c.integer("num_projections", minimum=1)


def build_mixture(data: ml_collections.ConfigDict) -> testbed.GaussianMixture:
  """The mixture described by the config's `data` section."""
  if data.mixture == "ring":
    return testbed.ring_mixture(num_modes=data.num_modes, radius=data.radius, std=data.std)
  return testbed.random_mixture(dim=data.dim, num_modes=data.num_modes, seed=data.seed)


def sampler_options(sampler: ml_collections.ConfigDict) -> dict[str, Any]:
  """The method options `samplers.sample` takes for `sampler.method`; the config holds
  every method's options (locked configs cannot gain keys), most of them unused."""
  return {k: sampler[k] for k in samplers.METHOD_KWARGS[sampler.method]}


def measure(gmm: testbed.GaussianMixture, x: jax.Array, data_key: jax.Array,
             data2_key: jax.Array, proj_key: jax.Array, num_projections: int) -> dict:
  """Distances of samples `x` to a data draw, and of a second, independent data draw of the
  same size to it (the noise floor: what exact sampling would score)."""
  # Jitted: run eagerly, the draws' and moments' many small ops would each compile.
  draw = jax.jit(lambda key: gmm.sample(key, x.shape[0]))
  moments = jax.jit(lambda a: testbed.moment_errors(a, gmm))
  data, data2 = draw(data_key), draw(data2_key)
  sw = lambda a: testbed.sliced_wasserstein(a, data, proj_key, num_projections)
  mean_err, cov_err = moments(x)
  floor_mean_err, floor_cov_err = moments(data2)
  return {"data": data, "sliced_w2": sw(x), "sliced_w2_noise_floor": sw(data2),
          "mean_err": mean_err, "cov_rel_err": cov_err,
          "mean_err_noise_floor": floor_mean_err, "cov_rel_err_noise_floor": floor_cov_err}


def finite_json(obj: Any) -> Any:
  if isinstance(obj, float) and not math.isfinite(obj):
    return str(obj)
  if isinstance(obj, dict):
    return {k: finite_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [finite_json(v) for v in obj]
  return obj


def scatter_plot(data: np.ndarray, samples: np.ndarray, metrics: dict[str, Any], path: str) -> None:
  # Figure + Agg canvas, not pyplot: no global state and no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(9, 4.5))
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2, sharex=True, sharey=True)
  titles = ("data", f"{metrics['method']}, {metrics['steps']} steps "
                    f"(sliced W2 {metrics['sliced_w2']:.3f})")
  for ax, pts, title in zip(axes, (data, samples), titles):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, linewidths=0)
    ax.set_title(title)
    ax.set_aspect("equal")
  fig.suptitle(f"{metrics['schedule']} schedule, {metrics['num_samples']} points")
  fig.savefig(path, dpi=110)
