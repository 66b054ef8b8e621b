"""config.data of a network stage: one section with two owners, the image keys of
imagen_jax/data/datasets.py (ImageDataSettings) and the text keys of imagen_jax/text
(TextSettings); a new key is a field of whichever of the two reads it."""

from __future__ import annotations

import dataclasses

from imagen_jax import config_schema
from imagen_jax import text
from imagen_jax.data import datasets


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageDataSettings(datasets.ImageDataSettings, text.TextSettings):
  """A stage's config.data (defaults: configs/common.py and the stage files)."""

  def check(self, c: config_schema.Checker) -> None:
    datasets.ImageDataSettings.check(self, c)
    text.TextSettings.check(self, c)
