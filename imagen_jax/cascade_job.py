"""`--mode=sample` for configs/cascade.py: prompts through the trained stages.

  python launch.py --config=configs/cascade.py:demo --workdir=runs/demo/samples --mode=sample \
      --prompt="rocket, twemoji style" [--prompts_file=prompts.txt]

Writes WORKDIR/stage{k}_{R}px/*.png, WORKDIR/grid_{R}px.png and WORKDIR/settings.json.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from imagen_jax import cascade as cascade_lib
from imagen_jax.errors import UserError
from imagen_jax import sharding as sharding_lib


def stage_settings(config: ml_collections.ConfigDict, n: int) -> list[cascade_lib.StageSettings]:
  """The per-stage overrides of config.stage0.. (missing sections: no override)."""
  return [cascade_lib.StageSettings.from_dict(config.get(f"stage{k}", {}) or {})
          for k in range(n)]


def cascade_from_config(config: ml_collections.ConfigDict,
                        num_stages: int | None = None) -> cascade_lib.Cascade:
  """The Cascade of config.stages (the first num_stages of them)."""
  paths = list(config.stages)[:num_stages or len(config.stages)]
  if not paths:
    raise UserError("config.stages is empty. Fix: pass the stages' workdirs, base first, "
                    "e.g. --config.stages=\"('runs/base64', 'runs/sr256')\".")
  mesh = sharding_lib.mesh_from_config(config.mesh)
  return cascade_lib.Cascade.from_workdirs(paths, weights=config.weights, mesh=mesh)


def read_prompts(sample_cfg: Any) -> list[str]:
  """sample.prompts_file (one prompt per line, blank lines skipped) or sample.prompts."""
  path = sample_cfg.get("prompts_file", "")
  if path:
    if not os.path.isfile(path):
      raise UserError(f"Prompts file {path} does not exist. Fix: pass --prompts_file with "
                      "one prompt per line, or --prompt=TEXT (repeatable).")
    with open(path, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
      raise UserError(f"Prompts file {path} holds no prompts (one per line).")
    return prompts
  prompts = [str(p) for p in sample_cfg.prompts]
  if not prompts:
    raise UserError("No prompts. Fix: pass --prompt=TEXT (repeatable) or --prompts_file=FILE.")
  return prompts


def run(config: ml_collections.ConfigDict, workdir: str) -> cascade_lib.CascadeOutput:
  prompts = read_prompts(config.sample)
  n = int(config.sample.num_stages) or None
  cascade = cascade_from_config(config, n)
  out = cascade.generate(prompts, seed=int(config.sample.seed),
                         settings=stage_settings(config, len(cascade.stages)),
                         batch_size=int(config.sample.batch_size), out_dir=workdir)
  for k, (imgs, secs) in enumerate(zip(out.images, out.seconds)):
    print(f"stage {k}: {len(imgs)} images at {imgs.shape[1]}px in {secs:.1f} s "
          f"(compilation included) -> {os.path.join(workdir, f'grid_{imgs.shape[1]}px.png')}")
  print(f"settings (seeds, samplers, sources): {os.path.join(workdir, 'settings.json')}")
  return out
