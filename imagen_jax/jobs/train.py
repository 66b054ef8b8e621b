"""`--mode=train` for a stage config (configs/base64.py, sr256.py, sr1024.py): the trainer
(imagen_jax/train/trainer.py, which holds the loop, checkpoints and logs) on WORKDIR.

  python launch.py --config=configs/base64.py:emoji --workdir=runs/base64 --mode=train
"""

from __future__ import annotations

from typing import Any

import ml_collections

MODE = "train"
KINDS = ("base", "sr")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  from imagen_jax.train import trainer  # pylint: disable=g-import-not-at-top
  return trainer.run(config, workdir)
