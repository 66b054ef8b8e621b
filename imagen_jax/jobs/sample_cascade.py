"""`--mode=sample` for configs/cascade.py: prompts through the trained stages.

  python launch.py --config=configs/cascade.py:demo --workdir=runs/demo/samples --mode=sample \
      --prompt="rocket, twemoji style" [--prompts_file=prompts.txt]

Writes WORKDIR/stage{k}_{R}px/*.png, WORKDIR/grid_{R}px.png and WORKDIR/settings.json.
"""

from __future__ import annotations

import os

import ml_collections

from imagen_jax import cascade as cascade_lib


MODE = "sample"
KINDS = ("cascade",)


def run(config: ml_collections.ConfigDict, workdir: str) -> cascade_lib.CascadeOutput:
  prompts = cascade_lib.read_prompts(config.sample)
  n = int(config.sample.num_stages) or None
  cascade = cascade_lib.cascade_from_config(config, n)
  out = cascade.generate(prompts, seed=int(config.sample.seed),
                         settings=cascade_lib.stage_settings(config, len(cascade.stages)),
                         batch_size=int(config.sample.batch_size), out_dir=workdir)
  for k, (imgs, secs) in enumerate(zip(out.images, out.seconds)):
    print(f"stage {k}: {len(imgs)} images at {imgs.shape[1]}px in {secs:.1f} s "
          f"(compilation included) -> {os.path.join(workdir, f'grid_{imgs.shape[1]}px.png')}")
  print(f"settings (seeds, samplers, sources): {os.path.join(workdir, 'settings.json')}")
  return out
