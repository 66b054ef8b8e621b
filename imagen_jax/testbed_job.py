"""The `--mode=sample` job for `kind = "gmm"` configs: a sampler on the analytic testbed.

Builds a Gaussian mixture and a schedule, samples with the mixture's exact denoiser (so
the only error is the sampler's discretisation), and compares the samples with fresh
data. Writes into the workdir, overwriting only these files:

  samples.npz    samples and the reference data draw, [num_samples, dim] float32 each
  metrics.json   sliced W2 and its noise floor, moment errors, NFE, timings, the config
  scatter.png    2-D mixtures only: data and samples side by side

The noise floor is the sliced W2 between two independent data draws of the same size:
a sampler cannot be told apart from exact sampling once it reaches it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax.diffusion import samplers, schedules, testbed


def build_mixture(data: ml_collections.ConfigDict) -> testbed.GaussianMixture:
  """The mixture described by the config's `data` section."""
  if data.mixture == "ring":
    return testbed.ring_mixture(num_modes=data.num_modes, radius=data.radius, std=data.std)
  return testbed.random_mixture(dim=data.dim, num_modes=data.num_modes, seed=data.seed)


def sampler_options(sampler: ml_collections.ConfigDict) -> dict[str, Any]:
  """The method options `samplers.sample` takes for `sampler.method`; the config holds
  every method's options (locked configs cannot gain keys), most of them unused."""
  return {k: sampler[k] for k in samplers.METHOD_KWARGS[sampler.method]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Samples, measures, writes the outputs to `workdir`; returns the metrics."""
  os.makedirs(workdir, exist_ok=True)
  gmm = build_mixture(config.data)
  schedule = schedules.from_config(config.diffusion)
  sc = config.diffusion.sampler
  options = sampler_options(sc)
  n = config.eval.num_samples
  sample_key, data_key, data2_key, proj_key = jax.random.split(
      jax.random.key(config.eval.seed), 4)

  # One jitted call for the whole loop: its compile time is reported apart from the run.
  fn = jax.jit(lambda key: samplers.sample(
      gmm.denoise, schedule, key, (n, gmm.dim), method=sc.method, steps=sc.steps,
      grid=sc.grid, rho=sc.rho, **options))
  start = time.perf_counter()
  compiled = fn.lower(sample_key).compile()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(sample_key))
  sample_s = time.perf_counter() - start

  measured = measure(gmm, out.x, data_key, data2_key, proj_key, config.eval.num_projections)
  data = measured.pop("data")
  measured = {k: float(v) for k, v in measured.items()}
  metrics = {
      "kind": config.kind, "variant": config.get("variant"),
      "mixture": config.data.mixture, "dim": gmm.dim, "num_modes": config.data.num_modes,
      "schedule": config.diffusion.schedule,
      "schedule_kw": config.diffusion.schedule_kw.to_dict(),
      "method": sc.method, "steps": sc.steps, "grid": sc.grid, "rho": sc.rho,
      "sampler_options": options, "nfe": int(out.nfe), "num_samples": n,
      **measured,
      "compile_s": compile_s, "sample_s": sample_s, "backend": jax.default_backend(),
      "config": config.to_dict(),
  }

  paths = {"samples": os.path.join(workdir, "samples.npz"),
           "metrics": os.path.join(workdir, "metrics.json")}
  np.savez(paths["samples"], samples=np.asarray(out.x, np.float32),
           data=np.asarray(data, np.float32))
  with open(paths["metrics"], "w") as f:
    # Strict JSON: non-finite floats (s_tmax = inf, a diverged metric) become strings.
    json.dump(finite_json(metrics), f, indent=2, allow_nan=False)
    f.write("\n")
  if gmm.dim == 2:
    paths["scatter"] = os.path.join(workdir, "scatter.png")
    scatter_plot(np.asarray(data), np.asarray(out.x), metrics, paths["scatter"])

  print(f"gmm {metrics['mixture']} (dim {gmm.dim}, {metrics['num_modes']} modes), "
        f"{metrics['schedule']} schedule, {sc.method} {sc.steps} steps on grid "
        f"{sc.grid!r}: NFE {metrics['nfe']}, {n} samples")
  m = metrics
  print(f"  sliced W2 {m['sliced_w2']:.4f} (noise floor {m['sliced_w2_noise_floor']:.4f}); "
        f"mean err {m['mean_err']:.4f} (floor {m['mean_err_noise_floor']:.4f}); "
        f"cov rel err {m['cov_rel_err']:.4f} (floor {m['cov_rel_err_noise_floor']:.4f})")
  print(f"  compile {compile_s:.2f} s, sampling {sample_s:.3f} s on {metrics['backend']}")
  for path in paths.values():
    print(f"  wrote {path}")
  return metrics


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
