"""config.data of a network stage: one section with three owners, the image keys of
imagen_jax/data/datasets.py (ImageDataSettings), the text keys of imagen_jax/text
(TextSettings) and the build keys of --mode=build_data (BuildSettings, here); a new key is
a field of whichever of them reads it."""

from __future__ import annotations

import dataclasses
import importlib.util
import shlex

from imagen_jax import config_schema
from imagen_jax import text
from imagen_jax.data import datasets

# The apache-beam pin of requirements.txt, for the error that says how to install it.
BEAM_REQUIREMENT = "apache-beam==2.78.0"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildSettings:
  """How --mode=build_data builds the dataset (imagen_jax/jobs/build_data.py): beam=True
  builds image_text_folder with an Apache Beam pipeline, whose flags are beam_options, e.g.
  "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp" ("" =
  DirectRunner on this machine, one process per core)."""

  beam: bool = False
  beam_options: str = ""

  def check(self, c: config_schema.Checker) -> None:
    beam = c.boolean("beam")
    options = c.string("beam_options")
    if options and not beam:
      raise c.error("beam_options", "is set but no Beam pipeline runs (data.beam=False)",
                    fix=f"pass {c.flag('beam')}=True to build with Beam, or "
                        f"{c.flag('beam_options')}='' to build in this process")
    if not beam:
      return
    try:
      flags = shlex.split(options)
    except ValueError as e:
      raise c.error("beam_options", f"cannot be split into flags ({e})",
                    fix="quote it as a shell would, e.g. "
                        f"{c.flag('beam_options')}=\"--runner=DirectRunner\"") from e
    bad = [f for f in flags if not f.startswith("--")]
    if bad:
      raise c.error("beam_options", f"{bad[0]!r} is not a --flag (Beam's pipeline options "
                                    "are --name=value)",
                    fix=f"pass e.g. {c.flag('beam_options')}=\"--runner=FlinkRunner "
                        "--flink_master=HOST:8081\"")
    if importlib.util.find_spec("apache_beam") is None:
      raise c.error("beam", "Beam builds need the apache_beam package, which is not installed",
                    fix=f"pip install {BEAM_REQUIREMENT} (pinned in requirements.txt), or "
                        f"pass {c.flag('beam')}=False")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageDataSettings(datasets.ImageDataSettings, text.TextSettings, BuildSettings):
  """A stage's config.data (defaults: configs/common.py and the stage files)."""

  def check(self, c: config_schema.Checker) -> None:
    datasets.ImageDataSettings.check(self, c)
    text.TextSettings.check(self, c)
    BuildSettings.check(self, c)
    if self.beam and self.dataset != "image_text_folder":
      raise c.error("beam", f"only image_text_folder builds with Beam ({c.key('dataset')}="
                            f"{self.dataset!r} builds in this process)",
                    fix=f"pass {c.flag('beam')}=False")
