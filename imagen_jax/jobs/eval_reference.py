"""`--mode=eval_reference`: what every `--mode=eval` of a stage config reads from
eval.cache_dir, computed once before any run is scored.

  python launch.py --config=configs/base64.py:study16 --workdir=runs/ref \
      --mode=eval_reference --config.eval.cache_dir=runs/eval_cache

It computes (or finds) the Inception features of the held-out split (eval.reference_limit
of it) and of the train split, and builds the text evaluator, which for the offline
alignment score trains its model into the cache; FID(train, held-out), the floor, is
printed. Without eval.cache_dir it fills WORKDIR/eval/cache, where `--mode=eval` on the
same WORKDIR looks.

Why a job of its own: a sweep's arms share one cache, and arms evaluated at the same time
each computed the same features (on the 2-core CPU the first two arms of Study B each
spent ~10 minutes on them), as would the array tasks of a cluster, racing to write one
file. Sweeps run this in their `prepare` step (experiments/emoji_schedules.py). Writes
WORKDIR/eval_reference.json (sizes, the floor and what was cached) last: it marks the job
finished.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from imagen_jax import multihost
from imagen_jax.eval import evaluators
from imagen_jax.eval import fid as fid_lib
from imagen_jax.jobs import eval_stage


MODE = "eval_reference"
KINDS = ("base",)
SECTIONS = {"eval": "imagen_jax.jobs.eval_stage:StageEvalSettings"}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  ec = config.eval
  cache_dir = eval_stage.stage_cache_dir(ec, workdir)
  os.makedirs(workdir, exist_ok=True)
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  began = time.perf_counter()
  context = evaluators.load_context(ec, data_cfg, cache_dir)
  main = multihost.is_main()
  scorer = evaluators.text_evaluator(context, scoring=main)
  summary: dict[str, Any] = {
      "cache_dir": os.path.abspath(cache_dir),
      "reference_images": len(context.ref_feats),
      "train_images": None if context.train_feats is None else len(context.train_feats),
      "text_metric": scorer.name,
      "seconds": time.perf_counter() - began,
  }
  if not main:
    return summary
  if context.train_feats is not None:
    summary["fid_floor"] = fid_lib.feature_distance(context.train_feats, context.ref_feats)
  summary["protocol"] = evaluators.protocol(context, scorer, num_images=int(ec.num_images))
  path = os.path.join(workdir, "eval_reference.json")
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=2, default=str)
    f.write("\n")
  os.replace(path + ".tmp", path)
  floor = (f", FID(train, held-out) = {summary['fid_floor']:.2f}"
           if "fid_floor" in summary else "")
  print(f"eval cache {cache_dir}: {summary['reference_images']} held-out and "
        f"{summary['train_images']} train images' features, {scorer.name} ready{floor} "
        f"({summary['seconds']:.0f} s)")
  return summary
