"""`--mode=train`: one loop for every cascade stage (config.kind "base" or "sr").

  python launch.py --config=configs/base64.py:emoji --workdir=runs/base64 --mode=train

What a run leaves in its workdir:
  checkpoints/     Orbax: params, optimizer, EMA, step, RNG + the data iterator's state;
                   a rerun with the same workdir resumes from the newest complete one
  tensorboard/     event files: loss, loss per log-SNR bucket, lr, grad norm, skipped
                   steps, images/s, FLOPs/s, MFU; EMA sample grids
  metrics.jsonl    the same scalars, one JSON object per log step
  samples/         the sample grids as PNG
  loss.png         loss curves, redrawn at the end
  train_summary.json

train.time_limit_s > 0 stops (with a checkpoint) after that much training time (compilation
excluded), for job slots and the CPU demo. Faults: a non-finite loss or gradient skips its update (counted); train.max_bad_steps in a
row stop the run with an error and the last good checkpoint untouched. SIGTERM (a
preemption) saves at the next step boundary and exits 0. Killing the process outright
loses at most the steps since the last checkpoint: rerunning resumes with the exact next
batch, so the result equals an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import config_schema
from imagen_jax import images as images_lib
from imagen_jax import runtime, sampling
from imagen_jax import sharding as sharding_lib
from imagen_jax import text as text_lib
from imagen_jax.data import datasets, pipeline
from imagen_jax.errors import UserError
from imagen_jax.text import cache as cache_lib
from imagen_jax.train import checkpointing
from imagen_jax.train import state as state_lib
from imagen_jax.train import step as step_lib
from imagen_jax.train import logging as log_lib
from imagen_jax.train import metrics as metrics_lib
from imagen_jax.train import plots


# Fault injection for tests: the process SIGKILLs itself after this step (a crash at a
# chosen point, which polling from outside cannot hit reliably on a fast smoke run).
KILL_AT_STEP_ENV = "IMAGEN_JAX_KILL_AT_STEP"


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """config.train: batch_size is global (split over processes and the mesh's data axes);
  text_drop_prob drops the caption for classifier-free guidance; accum_steps micro-batches
  per update; antithetic pairs each noise level t with 1 - t; the faults and time limit
  are the module doc's. The batch against the mesh is checked here at run time, where
  the devices are known."""

  batch_size: int
  steps: int
  seed: int
  text_drop_prob: float
  accum_steps: int
  antithetic: bool
  max_bad_steps: int
  time_limit_s: float

  def check(self, c: config_schema.Checker) -> None:
    for name in ("batch_size", "steps", "accum_steps", "max_bad_steps"):
      c.integer(name, minimum=1)
    c.integer("seed")
    c.number("time_limit_s", low=0.0)
    if not (config_schema.is_number(self.text_drop_prob) and 0 <= self.text_drop_prob <= 1):
      raise c.error("text_drop_prob", "is a probability, so within [0, 1]")
    c.boolean("antithetic")


class DivergedError(UserError, RuntimeError):
  """Too many consecutive non-finite steps."""


def _stage(config) -> str:
  return "sr" if config.kind == "sr" else "base"


def _flops_per_step(step_fn, state, host_batch, mesh) -> float | None:
  """XLA's FLOP count of one step, from the lowered HLO (no second compile; None where
  the backend does not report it)."""
  try:
    batch = step_lib.device_batch(host_batch, mesh)
    cost = step_fn.jitted.lower(state, batch).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) or None
  except Exception:  # pylint: disable=broad-except
    return None


def _sample_inputs(config, text_source, data_cfg) -> dict[str, Any]:
  """Fixed inputs of the periodic sample grid: the config's prompts for the base stage; for
  SR, the first held-out examples (their captions and low-res images)."""
  if _stage(config) == "sr":
    source = datasets.data_source(data_cfg, data_cfg.eval_split)
    n = min(len(config.log.prompts), len(source))
    it = iter(pipeline.make_pipeline(data_cfg, source, stage="sr", batch_size=n, seed=0,
                                     shuffle=False, num_epochs=1, process_index=0,
                                     process_count=1))
    batch = next(it)
    prompts = [str(c) for c in batch["caption"]]
    lowres = batch["lowres"]
  else:
    prompts, lowres = list(config.log.prompts), None
  try:
    emb, mask = text_source.encode(prompts)
  except cache_lib.CacheError:
    # Prompts not in the cache (precompute adds them; older caches may lack them).
    emb, mask = text_lib.encoder_from_config(data_cfg).encode(prompts)
  return {"prompts": prompts, "text": emb, "text_mask": mask, "lowres": lowres}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  tc = config.train
  mesh = sharding_lib.mesh_from_config(config.mesh)
  sharding_lib.check_batch(tc.batch_size, mesh, accum_steps=tc.accum_steps)

  # Data and text first: a missing dataset fails before anything compiles.
  source = datasets.data_source(config.data, config.data.train_split)
  text_source = text_lib.text_source(config.data)
  if is_main and not config.data.embedding_cache and not str(
      config.data.text_encoder).startswith("random"):
    # On a 2-core CPU MiniLM took 0.27 s of a 1.35 s base64.py:study step and half of a
    # :study16 step (benchmarks/results/train_loop.md).
    print(f"note: every batch's captions are encoded by {config.data.text_encoder} at each "
          "step. To encode them once instead, run --mode=precompute and pass "
          "--config.data.embedding_cache=DIR (on a CPU the encoder can take a fifth to a "
          "half of the step).")
  data = pipeline.make_pipeline(config.data, source, stage=_stage(config),
                                batch_size=tc.batch_size, seed=tc.seed,
                                worker_count=config.data.workers, text=text_source)
  data_iter = iter(data)

  ckpt = checkpointing.Checkpointer(
      os.path.join(workdir, "checkpoints"), every=config.ckpt.every, keep=config.ckpt.keep,
      keep_every=config.ckpt.keep_every, async_save=config.ckpt.async_save)
  graphdef, abstract, shardings = state_lib.abstract_state(config, mesh)
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(abstract)
    if data_state is not None:
      data_iter.set_state(data_state)
    print(f"resumed from step {start} ({ckpt.directory})")
  else:
    graphdef, state, shardings = state_lib.create_state(config, mesh)
    start = 0
  step_fn = step_lib.make_train_step(config, graphdef, shardings, mesh)
  sample_fn = sampling.make_sample_fn(config, graphdef)
  # Every process samples (the params are sharded across all of them); only the main
  # process writes the grid.
  sample_inputs = _sample_inputs(config, text_source, config.data)

  logger = log_lib.MetricLogger(workdir, is_main=is_main, total_steps=tc.steps, initial=start)
  peak = float(config.log.peak_flops)
  if not peak:
    try:
      peak = runtime.peak_flops_per_device()[0]
    except ValueError as e:  # an accelerator missing from the table: no MFU, say why
      print(f"warning: {e} MFU is not logged.")
  acc = metrics_lib.MetricAccumulator(peak_flops=peak * jax.device_count() or None,
                                  images_per_step=tc.batch_size,
                                  bucket_edges=step_lib.LOGSNR_BUCKETS)
  metadata = {"config": config.to_dict(), "process_count": jax.process_count()}
  summary: dict[str, Any] = {"start_step": start, "workdir": workdir}
  flops = None
  preempted = False
  kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0")) or None
  time_limit = float(tc.get("time_limit_s", 0) or 0)
  began = None  # the time limit counts training, from the first finished step

  def save(step: int, force: bool = False) -> None:
    ckpt.save(step, state, data_state=data_iter.get_state(), metadata=metadata, force=force)

  with checkpointing.PreemptionGuard() as guard:
    step = start
    last = time.perf_counter()
    while step < tc.steps:
      batch = next(data_iter)
      state, metrics = step_fn(state, batch)
      if flops is None:
        # After the first step, whose compile left the trace cached: lowering again then
        # costs ~1 s instead of ~5 s on the smoke config. The new state has the old one's
        # shapes and shardings (out_shardings), so this is the same program.
        flops = _flops_per_step(step_fn, state, batch, mesh) or 0.0
        acc.flops_per_step = flops or None
      step += 1
      if kill_at == step:
        os.kill(os.getpid(), signal.SIGKILL)
      acc.add(metrics)
      if step % config.log.every == 0 or step == tc.steps:
        now = time.perf_counter()
        scalars = acc.result(seconds=now - last)
        last = now
        logger.scalars(step, scalars)
        if scalars.get("bad_steps", 0) >= tc.max_bad_steps:
          ckpt.wait()
          raise DivergedError(
              f"{int(scalars['bad_steps'])} consecutive steps had a non-finite loss or "
              f"gradient (train.max_bad_steps={tc.max_bad_steps}); stopped at step {step}. "
              f"The last good checkpoint (step {ckpt.latest_step()}) is intact. Fix: lower "
              "optim.lr or raise optim.warmup_steps, check the data for NaNs, then rerun "
              "(it resumes from that checkpoint).")
      if config.log.sample_every and step % config.log.sample_every == 0:
        _log_samples(logger, sample_fn, state, sample_inputs, step, config)
      if ckpt.should_save(step) and int(jax.device_get(state.bad_steps)) == 0:
        save(step)
      if began is None:
        jax.block_until_ready(metrics)
        began = time.perf_counter()
      out_of_time = bool(time_limit) and time.perf_counter() - began > time_limit
      preempt, out_of_time = checkpointing.sync_flags(guard.requested, out_of_time)
      if preempt:
        save(step, force=True)
        preempted = True
        print(f"preemption signal: saved step {step}, exiting")
        break
      if out_of_time:
        print(f"train.time_limit_s={time_limit:g} reached at step {step}; saving and stopping "
              "(rerun with the same workdir to continue)")
        break
  if not preempted:
    save(step, force=True)  # the end, or the time limit
    if config.log.sample_every and step % config.log.sample_every:
      _log_samples(logger, sample_fn, state, sample_inputs, step, config)  # the final grid
  ckpt.wait()
  ckpt.close()
  logger.close()
  if is_main:
    plots.plot_metrics(os.path.join(workdir, "metrics.jsonl"),
                         os.path.join(workdir, "loss.png"))
  summary.update(final_step=step, complete=step >= tc.steps, preempted=preempted,
                 flops_per_step=flops,
                 skipped=int(jax.device_get(state.skipped)))
  if is_main:
    with open(os.path.join(workdir, "train_summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def _log_samples(logger, sample_fn, state, inputs, step: int, config) -> None:
  ema = state.ema[sorted(state.ema)[-1]] if state.ema else state.params
  images = sample_fn(ema, inputs["text"], inputs["text_mask"],
                     jax.random.key(config.train.seed), lowres=inputs["lowres"])
  grid = images_lib.image_grid(np.asarray(jax.device_get(images)))
  logger.image(step, "ema_samples", images_lib.caption_strip(grid, inputs["prompts"]))
