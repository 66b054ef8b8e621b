"""The `--mode=train` job for `kind = "gmm_denoiser"` configs: a network denoiser trained
on the analytic Gaussian-mixture testbed and scored against the exact one.

Every step draws a fresh batch from the mixture, so there is no dataset and no
overfitting: what differs between two runs is the objective (training noise
distribution, target, weighting) and the seed. After training the job measures

  excess MSE   E||x0_hat_net(x_t) - E[x0 | x_t]||^2 / D at each of eval.logsnr_levels,
               with E[x0 | x_t] the mixture's closed-form posterior mean: the part of
               the network's error that is its own (the Bayes error, E||x0 - E[x0|x_t]||^2
               / D, is reported beside it and is the same for every arm);
  sliced W2    of eval.num_samples samples (eval.sampler, the same for every arm) to a
               fresh data draw, with the noise floor of two independent data draws.

Writes into the workdir (the run is cheap, so there is no checkpoint: an interrupted run
starts over; metrics.json is written last and atomically, so its presence marks a
finished run):

  metrics.json   the metrics above, the loss curve, timings and the config
  samples.npz    samples and the reference data draw, [num_samples, dim] float32
  scatter.png    2-D mixtures: data and samples side by side
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from imagen_jax import config_schema, testbed_eval
from imagen_jax.diffusion import objectives, samplers, schedules
from imagen_jax.diffusion import settings as diffusion_settings
from imagen_jax.errors import UserError
from imagen_jax.models.mlp import MLPDenoiser


MODE = "train"
KINDS = ("gmm_denoiser",)


@dataclasses.dataclass(frozen=True)
class DenoiserModelSettings:
  """config.model: the MLP's width, depth and log-SNR feature width (sines and cosines)."""

  width: int
  depth: int
  feat_dim: int

  def check(self, c: config_schema.Checker) -> None:
    for name in ("width", "depth", "feat_dim"):
      c.integer(name, minimum=1)
    if self.feat_dim % 2:
      raise c.error("feat_dim", "must be even (sine and cosine features)")


@dataclasses.dataclass(frozen=True)
class DenoiserTrainSettings:
  """config.train: AdamW at lr after a linear warmup, fresh mixture batches every step."""

  steps: int
  batch_size: int
  lr: float
  warmup_steps: int
  seed: int
  log_every: int

  def check(self, c: config_schema.Checker) -> None:
    for name in ("steps", "batch_size", "log_every"):
      c.integer(name, minimum=1)
    c.integer("seed")
    c.number("lr", low=0.0, strict=True)
    c.integer("warmup_steps", minimum=0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DenoiserEvalSettings(testbed_eval.SampleEvalSettings):
  """config.eval: the testbed's sample scores, the excess MSE at logsnr_levels, and the
  sampler (with its own schedule) every arm is sampled with."""

  logsnr_levels: tuple[float, ...]
  sampler: diffusion_settings.ScheduledSampler = config_schema.section(
      diffusion_settings.ScheduledSampler)

  def check(self, c: config_schema.Checker) -> None:
    super().check(c)
    levels = self.logsnr_levels
    if not (isinstance(levels, (tuple, list)) and levels and
            all(config_schema.is_number(v) for v in levels)):
      raise c.error("logsnr_levels", "must be a non-empty tuple of log-SNRs",
                    fix=f"pass e.g. {c.flag('logsnr_levels')}='(-6.0, 0.0, 6.0)'")


def build_objective(config: ml_collections.ConfigDict):
  """(training schedule, weighting function) of the config's diffusion section."""
  d = config.diffusion
  schedule = schedules.from_config(d)
  return schedule, objectives.get_weighting(d.weighting, **d.weighting_kw.to_dict())


def init_model(config: ml_collections.ConfigDict, dim: int):
  """(graphdef, params) of the untrained MLP of the config's model section."""
  model = MLPDenoiser(dim, width=config.model.width, depth=config.model.depth,
                      feat_dim=config.model.feat_dim, rngs=nnx.Rngs(config.train.seed))
  return nnx.split(model, nnx.Param)


def train(config: ml_collections.ConfigDict, gmm, *, progress: bool = True):
  """Trains the MLP; returns (graphdef, params, loss curve [(step, mean loss)])."""
  tc, d = config.train, config.diffusion
  schedule, weighting = build_objective(config)
  graphdef, params = init_model(config, gmm.dim)
  warmup = max(tc.warmup_steps, 1)
  lr = optax.warmup_cosine_decay_schedule(0.0, tc.lr, warmup, max(tc.steps, warmup + 1))
  opt = optax.adam(lr)
  opt_state = opt.init(params)

  def loss_fn(p, key):
    x_key, l_key = jax.random.split(key)
    x0 = gmm.sample(x_key, tc.batch_size)
    net = nnx.merge(graphdef, p)
    per_example, _ = objectives.diffusion_loss(net, x0, l_key, schedule, target=d.target,
                                               weighting=weighting, antithetic=True)
    return jnp.mean(per_example)

  def one_step(carry, key):
    p, s = carry
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, s = opt.update(grads, s, p)
    return (optax.apply_updates(p, updates), s), loss

  # One compiled call runs `log_every` steps (a scan): a per-step Python call would cost
  # more than the step itself for a network this small.
  @jax.jit
  def chunk(p, s, keys):
    (p, s), losses = jax.lax.scan(one_step, (p, s), keys)
    return p, s, jnp.mean(losses)

  keys = jax.random.split(jax.random.key(tc.seed + 1), tc.steps)
  curve, done = [], 0
  with tqdm(total=tc.steps, desc="train", unit="step", disable=not progress) as bar:
    while done < tc.steps:
      n = min(tc.log_every, tc.steps - done)
      params, opt_state, loss = chunk(params, opt_state, keys[done:done + n])
      loss = float(loss)
      done += n
      if not math.isfinite(loss):
        raise UserError(f"The loss became {loss} by step {done} (objective "
                        f"{d.schedule}/{d.target}/{d.weighting}). Lower --config.train.lr "
                        f"(now {tc.lr}) or check the weighting, which may be unbounded at "
                        "the schedule's log-SNR range; nothing was written.")
      curve.append((done, loss))
      bar.update(n)
      bar.set_postfix(loss=f"{loss:.4f}")
  return graphdef, params, curve


def x0_predictor(graphdef, params, target: str):
  """(x_t, logsnr) -> x0_hat of the trained network."""
  net = nnx.merge(graphdef, params)
  return objectives.denoiser(lambda x, l: net(x, jnp.broadcast_to(l, x.shape[:1])), target)


def excess_mse(denoise, gmm, levels, n: int, key) -> tuple[np.ndarray, np.ndarray]:
  """(E||denoise(x_t) - E[x0|x_t]||^2 / D, E||x0 - E[x0|x_t]||^2 / D) at each level, on
  the same n draws of (x0, eps) at every level."""
  x_key, e_key = jax.random.split(key)
  x0 = gmm.sample(x_key, n)
  eps = jax.random.normal(e_key, x0.shape)

  @jax.jit
  def at(logsnr):
    lam = jnp.full((n,), logsnr)
    x_t = objectives.diffuse(x0, eps, lam)
    exact = gmm.denoise(x_t, lam)
    return (jnp.mean(jnp.square(denoise(x_t, lam) - exact)),
            jnp.mean(jnp.square(x0 - exact)))

  out = np.array([[float(v) for v in at(jnp.float32(l))] for l in levels])
  return out[:, 0], out[:, 1]


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains, measures, writes the outputs to `workdir`; returns the metrics."""
  os.makedirs(workdir, exist_ok=True)
  gmm = testbed_eval.build_mixture(config.data)
  start = time.perf_counter()
  graphdef, params, curve = train(config, gmm)
  train_s = time.perf_counter() - start

  ec, sc = config.eval, config.eval.sampler
  denoise = x0_predictor(graphdef, params, config.diffusion.target)
  mse_key, sample_key, data_key, data2_key, proj_key = jax.random.split(
      jax.random.key(ec.seed), 5)
  levels = [float(l) for l in ec.logsnr_levels]
  excess, bayes = excess_mse(denoise, gmm, levels, ec.num_samples, mse_key)

  sample_schedule = schedules.from_config(sc)
  options = testbed_eval.sampler_options(sc)
  start = time.perf_counter()
  out = jax.jit(lambda key: samplers.sample(
      denoise, sample_schedule, key, (ec.num_samples, gmm.dim), method=sc.method,
      steps=sc.steps, grid=sc.grid, rho=sc.rho, **options))(sample_key)
  x = jax.block_until_ready(out.x)
  sample_s = time.perf_counter() - start
  measured = testbed_eval.measure(gmm, x, data_key, data2_key, proj_key,
                                  ec.num_projections)
  data = measured.pop("data")
  d = config.diffusion
  metrics = {
      "kind": config.kind, "variant": config.get("variant"), "mixture": config.data.mixture,
      "dim": gmm.dim, "schedule": d.schedule, "schedule_kw": d.schedule_kw.to_dict(),
      "target": d.target, "weighting": d.weighting, "weighting_kw": d.weighting_kw.to_dict(),
      "seed": config.train.seed, "steps": config.train.steps,
      **{k: float(v) for k, v in measured.items()},
      "logsnr_levels": levels, "excess_mse": excess.tolist(), "bayes_mse": bayes.tolist(),
      # One number for the whole curve: the mean over levels of log10 excess MSE.
      "mean_log10_excess_mse": float(np.mean(np.log10(np.maximum(excess, 1e-12)))),
      "final_loss": curve[-1][1], "loss_curve": curve, "nfe": int(out.nfe),
      "sampler": f"{sc.method}/{sc.steps} on {sc.schedule} ({sc.grid} grid)",
      "train_s": train_s, "sample_s": sample_s, "backend": jax.default_backend(),
      "config": config.to_dict(),
  }
  np.savez(os.path.join(workdir, "samples.npz"), samples=np.asarray(x, np.float32),
           data=np.asarray(data, np.float32))
  if gmm.dim == 2:
    scatter_metrics = {"method": sc.method, "steps": sc.steps,
                       "sliced_w2": metrics["sliced_w2"],
                       "schedule": f"trained {d.schedule}/{d.target}/{d.weighting}",
                       "num_samples": ec.num_samples}
    testbed_eval.scatter_plot(np.asarray(data), np.asarray(x), scatter_metrics,
                         os.path.join(workdir, "scatter.png"))
  path = os.path.join(workdir, "metrics.json")
  with open(path + ".tmp", "w") as f:
    json.dump(testbed_eval.finite_json(metrics), f, indent=2, allow_nan=False)
    f.write("\n")
  os.replace(path + ".tmp", path)  # last, atomically: its presence marks a finished run

  print(f"gmm_denoiser {metrics['mixture']} (dim {gmm.dim}): {d.schedule}/{d.target}/"
        f"{d.weighting}, seed {config.train.seed}, {config.train.steps} steps in "
        f"{train_s:.1f} s, final loss {metrics['final_loss']:.4f}")
  print(f"  sliced W2 {metrics['sliced_w2']:.4f} (noise floor "
        f"{metrics['sliced_w2_noise_floor']:.4f}); mean log10 excess MSE "
        f"{metrics['mean_log10_excess_mse']:.3f}")
  print(f"  wrote {path}")
  return metrics
