"""`--mode=eval` for a stage's own config (configs/base64.py): its training checkpoints,
scored one by one with the same samples, so a run's FID can be followed over training
and runs of a sweep compared at the same steps.

  python launch.py --config=configs/base64.py:study --workdir=runs/study --mode=eval

WORKDIR is the stage's training workdir. For each checkpoint step in eval.steps (empty:
every checkpoint the run kept), eval.num_images held-out captions (the same captions and
noise at every step and in every run: eval.seed) are sampled at guidance eval.guidance
with the stage's sampler, and scored against eval.reference_limit held-out images:

  FID     with a 95% percentile-bootstrap interval over the samples (eval.bootstrap
          resamples; imagen_jax.eval.kid.fid_interval)
  KID     mean and std over eval.kid_subsets subsets (unbiased in N, unlike FID)
  precision / recall  (Kynkäänniemi et al., k = 3) from the same Inception features
  alignment score and R-precision of the offline alignment model (or CLIP score when
          eval.clip names CLIP weights), as the cascade's eval job computes them

Each step also samples eval.prompts from fixed seeds (grid_{R}px.png). The loss per
log-SNR bucket over the last logged window is read from the run's metrics.jsonl.
Outputs in WORKDIR/eval/: results.json (rows per step; the last step's figures at the
top level, for experiments/sweep.py), results.md, fid_vs_step.png, step_S/ (samples,
grids, settings.json), cache/ (reference features and the alignment model).

Multi-host: run the same command on every host with launch.py's jax.distributed flags.
Each process loads the checkpoint onto its own devices (evaluators.local_mesh), samples
its share of the captions (image i keeps the key of caption i, so the samples are a
single process's) and computes their features; process 0 gathers the features, scores
them and writes the results. WORKDIR must be on storage every host mounts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from imagen_jax import cascade as cascade_lib
from imagen_jax import config_schema
from imagen_jax import multihost
from imagen_jax.errors import UserError
from imagen_jax.eval import evaluators
from imagen_jax.eval import fid as fid_lib
from imagen_jax.eval import kid as kid_lib
from imagen_jax.eval import precision_recall as pr_lib
from imagen_jax.eval import references
from imagen_jax.train import checkpointing
from imagen_jax.train import logging as log_lib
from imagen_jax.train import plots


MODE = "eval"
KINDS = ("base",)
SECTIONS = {"eval": "StageEvalSettings"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageEvalSettings(evaluators.ScoringSettings):
  """config.eval of a base stage (configs/base64.py explains the keys): the checkpoints
  at `steps` (() = every one kept) sampled at `guidance` with the `weights`, FID's
  bootstrap resamples, KID's subsets, and the fixed-prompt grid."""

  steps: tuple[int, ...]
  guidance: float
  weights: str
  bootstrap: int
  kid_subsets: int
  kid_subset_size: int
  grid_seed: int
  prompts: tuple[str, ...]

  def check(self, c: config_schema.Checker) -> None:
    super().check(c)
    steps = self.steps
    if not (isinstance(steps, (tuple, list)) and
            all(config_schema.is_int(s) and s >= 0 for s in steps)):
      raise c.error("steps", "must be a tuple of checkpoint steps (() = all)",
                    fix=f"pass e.g. {c.flag('steps')}='(500, 1000)'")
    c.integer("grid_seed")
    c.number("guidance", low=0.0)
    c.one_of("weights", cascade_lib.WEIGHTS)
    c.integer("bootstrap", minimum=0)
    c.integer("kid_subsets", minimum=1)
    c.integer("kid_subset_size", minimum=2)
    c.strings("prompts", fix=f"pass e.g. {c.flag('prompts')}=\"('red apple, twemoji style',)\"")


def checkpoint_steps(workdir: str, wanted: Any) -> list[int]:
  """The steps to evaluate: `wanted` (all must exist), or every complete checkpoint."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise UserError(f"No checkpoints in {workdir}. Fix: train the stage first "
                    f"(launch.py --mode=train --workdir={workdir}), then evaluate it.")
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=1 << 30, async_save=False)
  try:
    have = sorted(int(s) for s in ckpt.all_steps())
  finally:
    ckpt.close()
  if not have:
    raise UserError(f"No complete checkpoint in {directory}. Fix: let training save one.")
  wanted = [int(s) for s in (wanted or ())]
  missing = sorted(set(wanted) - set(have))
  if missing:
    raise UserError(f"eval.steps asks for steps {missing}, but {directory} holds {have}. "
                    "Fix: train with ckpt.every / ckpt.keep_every keeping those steps, or "
                    "pass --config.eval.steps='()' to evaluate what is there.")
  return wanted or have


def loss_by_logsnr(workdir: str) -> dict[str, Any] | None:
  """The last logged per-bucket losses of the run ({"buckets": [...], "loss": [...]})."""
  with_buckets = [r for r in log_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
                  if any(k.startswith("loss/bucket_") for k in r)]
  if not with_buckets:
    return None
  last = with_buckets[-1]
  keys = sorted((k for k in last if k.startswith("loss/bucket_")),
                key=plots.bucket_sort_key)
  return {"step": last.get("step"), "buckets": [k[len("loss/bucket_"):] for k in keys],
          "loss": [float(last[k]) for k in keys]}


def reuse_samples(step_dir: str, prompts: list[str], seed: int, guidance: float, step: int,
                  rows: slice | None = None) -> np.ndarray | None:
  """The samples an earlier evaluation of this step wrote (PNGs and settings.json), when
  they were drawn for the same captions, seed, guidance and checkpoint step; else None.
  An interrupted or re-run evaluation then scores them again without sampling. rows:
  which of them to read (default all; a process's share in a multi-host evaluation)."""
  path = os.path.join(step_dir, "settings.json")
  try:
    with open(path) as f:
      record = json.load(f)
    stage = record["stages"][0]
    same = (record["prompts"] == list(prompts) and int(record["seed"]) == seed
            and float(stage["guidance"]) == guidance and int(stage["step"]) == step)
    if not same:
      return None
    res = int(stage["resolution"])
    folder = os.path.join(step_dir, f"stage0_{res}px")
    from PIL import Image  # pylint: disable=g-import-not-at-top
    wanted = range(len(prompts))[rows or slice(None)]
    if not wanted:
      return np.zeros((0, res, res, 3), np.uint8)
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:05d}.png")).convert("RGB"))
                     for i in wanted])
  except (OSError, KeyError, ValueError, TypeError):
    return None


def stage_cache_dir(ec: Any, workdir: str) -> str:
  """Where the reference features and alignment model live: eval.cache_dir, else
  WORKDIR/eval/cache (also where --mode=eval_reference fills them)."""
  return ec.cache_dir or os.path.join(workdir, "eval", "cache")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ec = config.eval
  steps = checkpoint_steps(workdir, ec.steps)
  out_root = os.path.join(workdir, "eval")
  cache_dir = stage_cache_dir(ec, workdir)
  os.makedirs(out_root, exist_ok=True)
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  began = time.perf_counter()
  context = evaluators.load_context(ec, data_cfg, cache_dir)
  ref_feats, ref_caps = context.ref_feats, context.ref_caps
  train_feats = context.train_feats
  main = multihost.is_main()  # scores, prints and writes results
  scorer = evaluators.text_evaluator(context, scoring=main)
  if main:
    floor = fid_lib.feature_distance(train_feats, ref_feats)
    print(f"reference: {len(ref_feats)} held-out images, FID(train, held-out) = {floor:.2f} "
          f"({time.perf_counter() - began:.0f} s)")

  prompts = references.eval_prompts(ref_caps, int(ec.num_images), int(ec.seed))
  mine = multihost.share(len(prompts))  # this process's captions (all, in one process)
  grid_prompts = [str(p) for p in ec.prompts]
  settings = [cascade_lib.StageSettings(guidance=float(ec.guidance))]
  mesh = evaluators.local_mesh(config.mesh)
  cascade = None
  rows = []
  for step in steps:
    step_dir = os.path.join(out_root, f"step_{step}")
    t0 = time.perf_counter()
    images = reuse_samples(step_dir, prompts, int(ec.seed), float(ec.guidance), step,
                           rows=mine)
    grid_png = os.path.join(step_dir, "prompts", f"grid_{int(config.data.resolution)}px.png")
    # Decided together: sampling (generate_share) gathers from every process.
    if multihost.any_process(images is None or (main and not os.path.isfile(grid_png))):
      stage = cascade_lib.load_stage(workdir, step=step, weights=ec.weights, mesh=mesh)
      if cascade is None:
        cascade = cascade_lib.Cascade([stage], mesh=mesh)
      else:  # same network and shapes: keep the compiled sampler, swap the weights
        cascade.stages[0] = stage
      out, _ = evaluators.generate_share(cascade, prompts, seed=int(ec.seed),
                                         settings=settings, batch_size=int(ec.batch_size),
                                         out_dir=step_dir, grid_size=int(ec.grid_size))
      if main:
        cascade.generate(grid_prompts, seed=int(ec.grid_seed), settings=settings,
                         batch_size=int(ec.batch_size), progress=False,
                         out_dir=os.path.join(step_dir, "prompts"),
                         grid_size=len(grid_prompts))
      images = out.images[0]
    elif main:
      print(f"step {step}: reusing the {len(prompts)} samples in {step_dir} (same captions, "
            "seed and guidance)")
    sample_s = time.perf_counter() - t0
    feats, image_feats = evaluators.share_features(context, scorer, images)
    if not main:
      continue
    if multihost.process_count() > 1:
      images = None  # only this process's share; the scorer has image_feats
    np.savez(os.path.join(step_dir, "features.npz"), features=feats)
    fid, low, high = kid_lib.fid_interval(feats, ref_feats, resamples=int(ec.bootstrap),
                                          seed=int(ec.seed))
    kid, kid_std = kid_lib.kid(feats, ref_feats, subsets=int(ec.kid_subsets),
                               subset_size=int(ec.kid_subset_size), seed=int(ec.seed))
    precision, recall = pr_lib.precision_recall(ref_feats, feats)
    res = int(config.data.resolution)
    # KID's interval is conservative: +-1.96 std of one subset's estimate, wider than the
    # std of their mean (the subsets overlap, so the mean's own std is not known exactly).
    row = {"step": int(step), "fid": fid, "fid_low": low, "fid_high": high, "kid": kid,
           "kid_std": kid_std, "kid_low": kid - 1.96 * kid_std, "kid_high": kid + 1.96 * kid_std,
           "precision": precision, "recall": recall,
           **scorer.score(feats, images, prompts, image_features=image_feats),
           "num_images": len(feats), "sample_s": sample_s,
           "grid": os.path.join(f"step_{step}", "prompts", f"grid_{res}px.png"),
           "samples_grid": os.path.join(f"step_{step}", f"grid_{res}px.png")}
    rows.append(row)
    print(f"step {step}: FID {fid:.1f} [{low:.1f}, {high:.1f}], KID {kid:.4f} ± {kid_std:.4f}, "
          f"{scorer.name} {row[scorer.name]:.3f} ({sample_s:.0f} s sampling)", flush=True)

  if not main:
    return {"process_index": multihost.process_index(), "steps": steps}
  last = rows[-1]
  result = {
      "metric": scorer.name, "rows": rows, "fid_floor": floor,
      "reference_images": len(ref_feats), "train_images": len(train_feats),
      "resolution": int(config.data.resolution), "guidance": float(ec.guidance),
      "num_images": int(ec.num_images), "weights": ec.weights,
      "steps": [r["step"] for r in rows],
      "fid_curve": [r["fid"] for r in rows], "fid_curve_low": [r["fid_low"] for r in rows],
      "fid_curve_high": [r["fid_high"] for r in rows],
      "kid_curve": [r["kid"] for r in rows],
      "loss_by_logsnr": loss_by_logsnr(workdir),
      # The last step's figures, for the sweep's table.
      **{k: last[k] for k in ("step", "fid", "fid_low", "fid_high", "kid", "kid_std",
                              "kid_low", "kid_high", "precision", "recall", scorer.name,
                              "grid")},
      "backend": jax.default_backend(), "seconds": time.perf_counter() - began,
      "protocol": evaluators.protocol(context, scorer, num_images=int(ec.num_images)),
  }
  if "r_precision" in last:
    result["r_precision"] = last["r_precision"]
  write_results(result, out_root)
  return result


def write_results(result: dict[str, Any], out_root: str) -> None:
  """results.md and fid_vs_step.png, then results.json last (atomically: it marks the
  evaluation finished for experiments/sweep.py)."""
  metric = result["metric"]
  lines = [f"# Checkpoint evaluation at {result['resolution']}px", "",
           f"{result['num_images']} samples per step at guidance {result['guidance']:g} "
           f"({result['weights']} weights) against {result['reference_images']} held-out "
           f"images; FID(train, held-out) = {result['fid_floor']:.2f}.", "",
           evaluators.protocol_markdown(result["protocol"]), "",
           f"| step | FID [95% bootstrap] | KID ± std | precision | recall | "
           f"{evaluators.metric_label(result['protocol'])} |",
           "|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    lines.append(f"| {r['step']} | {r['fid']:.1f} [{r['fid_low']:.1f}, {r['fid_high']:.1f}] "
                 f"| {r['kid']:.4f} ± {r['kid_std']:.4f} | {r['precision']:.3f} "
                 f"| {r['recall']:.3f} | {r[metric]:.3f} |")
  lines += ["", "![fid_vs_step.png](fid_vs_step.png)", ""]
  for r in result["rows"]:
    lines += [f"Step {r['step']}:", "", f"![{r['grid']}]({r['grid']})", ""]
  with open(os.path.join(out_root, "results.md"), "w") as f:
    f.write("\n".join(lines))
  _plot(result, os.path.join(out_root, "fid_vs_step.png"))
  tmp = os.path.join(out_root, "results.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, default=float)
  os.replace(tmp, os.path.join(out_root, "results.json"))


def _plot(result: dict[str, Any], path: str) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(5.5, 4))
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  x = np.asarray(result["steps"])
  ax.plot(x, result["fid_curve"], "o-", label="samples")
  ax.fill_between(x, result["fid_curve_low"], result["fid_curve_high"], alpha=0.2,
                  label="95% bootstrap")
  ax.axhline(result["fid_floor"], color="tab:green", ls="--", lw=1,
             label="FID train vs held-out")
  ax.set_xlabel("training step")
  ax.set_ylabel(f"FID ({result['num_images']} samples)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
