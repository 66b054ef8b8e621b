"""Checks a config before any job runs, so that mistakes fail in a second, in words.

`validate(config, mode)` raises `ConfigError`, whose message names the key path, the bad
value, the allowed values (with a "did you mean" hint) and the fix, e.g.

  diffusion.schedule='cosin': unknown schedule. Did you mean 'cosine'? Allowed: 'cosine',
  'edm', ... Fix: pass --config.diffusion.schedule=cosine (or edit the config file).

This module only says which sections each config `kind` has (`KINDS`); each section's
keys and their checks are a dataclass in the module that uses them
(imagen_jax/config_schema.py explains the pattern), so adding a key never touches this
file. The modes a kind supports are the jobs that declare it (imagen_jax/jobs/), and a
job's SECTIONS add the sections that mode reads (e.g. the eval settings).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

import ml_collections

from imagen_jax import config_schema
from imagen_jax.config_schema import ConfigError, get

__all__ = ["ConfigError", "KINDS", "Kind", "get", "read_section", "validate"]

Check = Callable[[ml_collections.ConfigDict, str], None]


def check_model(config: ml_collections.ConfigDict, mode: str) -> None:
  """model: a known network whose config dataclass (imagen_jax/models/) accepts every key."""
  from imagen_jax import models  # flax; only for configs that have a network
  name = get(config, "model.name")
  if name not in models.NAMES:
    raise ConfigError("model.name", name, "unknown name", allowed=models.NAMES)
  try:
    models.config_from_dict(get(config, "model"))
  except (TypeError, ValueError) as e:
    raise ConfigError("model", name, f"bad network config ({e})",
                      fix="correct the model section of the config file") from e


def stage_override_sections(config: ml_collections.ConfigDict) -> list[str]:
  """The cascade config's per-stage override sections stage0, stage1, ..., in order."""
  found = [k for k in config.keys() if re.fullmatch(r"stage\d+", k)]
  return sorted(found, key=lambda k: int(k[len("stage"):]))


def check_stage_overrides(config: ml_collections.ConfigDict, mode: str) -> None:
  """stage0, stage1, ...: each an imagen_jax.cascade.StageSettings (any number of stages)."""
  for path in stage_override_sections(config):
    read_section(config, path, "imagen_jax.cascade:StageSettings")


@dataclasses.dataclass(frozen=True)
class Kind:
  """What every config of a `kind` must pass, whatever the mode: its `sections` (config
  path -> "module:Class", the dataclass that owns the keys; "" = top-level keys) and any
  `checks` that are not a section's; `why` is shown when a mode is not supported. The
  modes themselves are the jobs that declare the kind (imagen_jax/jobs/)."""

  sections: dict[str, str]
  checks: tuple[Check, ...] = ()
  why: str = ""


_STAGE = {
    "data": "imagen_jax.data.settings:StageDataSettings",
    "train": "imagen_jax.train.trainer:TrainSettings",
    "optim": "imagen_jax.train.optim:OptimSettings",
    "mesh": "imagen_jax.sharding:MeshSettings",
    "ckpt": "imagen_jax.train.checkpointing:CheckpointSettings",
    "log": "imagen_jax.train.logging:LogSettings",
}

KINDS: dict[str, Kind] = {
    "gmm": Kind(
        sections={"data": "imagen_jax.testbed_eval:MixtureSettings",
                  "diffusion": "imagen_jax.diffusion.settings:TestbedDiffusion",
                  "eval": "imagen_jax.testbed_eval:SampleEvalSettings"},
        why="the Gaussian-mixture testbed uses its exact denoiser, so there is no "
            "network to train, evaluate or precompute inputs for"),
    "gmm_denoiser": Kind(
        sections={"data": "imagen_jax.testbed_eval:MixtureSettings",
                  "diffusion": "imagen_jax.diffusion.settings:ObjectiveDiffusion",
                  "model": "imagen_jax.jobs.testbed_train:DenoiserModelSettings",
                  "train": "imagen_jax.jobs.testbed_train:DenoiserTrainSettings",
                  "eval": "imagen_jax.jobs.testbed_train:DenoiserEvalSettings"},
        why="the job trains the denoiser and then evaluates it in one run"),
    # Network configs: a stage is trained alone, then sampled and evaluated in a cascade.
    "base": Kind(sections={"diffusion": "imagen_jax.diffusion.settings:StageDiffusion",
                           **_STAGE},
                 checks=(check_model,),
                 why="trained stages are sampled together through configs/cascade.py; "
                     "--mode=eval scores a base stage's own checkpoints"),
    "sr": Kind(sections={"diffusion": "imagen_jax.diffusion.settings:SRDiffusion", **_STAGE},
               checks=(check_model,),
               why="trained stages are sampled and evaluated together through "
                   "configs/cascade.py"),
    "cascade": Kind(sections={"": "imagen_jax.cascade:CascadeSettings",
                              "mesh": "imagen_jax.sharding:MeshSettings",
                              "sample": "imagen_jax.cascade:SampleSettings"},
                    checks=(check_stage_overrides,),
                    why="it combines stages trained with their own configs"),
}


def section_class(ref: str) -> type:
  """The class a "module:Class" reference names."""
  module, _, name = ref.partition(":")
  return getattr(importlib.import_module(module), name)


def read_section(config: ml_collections.ConfigDict, path: str, ref: str) -> Any:
  """The checked section at `path` (see imagen_jax.config_schema.read)."""
  return config_schema.read(config, path, section_class(ref))


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """Raises ConfigError for the first problem found in `config` run under `mode`."""
  from imagen_jax import jobs  # pylint: disable=g-import-not-at-top
  kind = get(config, "kind")
  if kind not in KINDS:
    raise ConfigError("kind", kind, "unknown kind", allowed=sorted(KINDS))
  spec = KINDS[kind]
  modes_of_kind = jobs.modes_of(kind)
  if not modes_of_kind:
    raise ConfigError("--mode", mode, f"configs of kind {kind!r} cannot run yet ({spec.why})",
                      fix="see the README for what runs today")
  if mode not in modes_of_kind:
    modes = ", ".join(f"--mode={m}" for m in modes_of_kind)
    raise ConfigError(
        "--mode", mode,
        f"configs of kind {kind!r} support only {modes}" + (f" ({spec.why})" if spec.why else ""),
        fix=f"pass {modes.split(', ')[0]}, or a config of another kind")
  for check in spec.checks:
    check(config, mode)
  job = jobs.table()[(kind, mode)]
  for path, ref in (*spec.sections.items(), *job.sections):
    read_section(config, path, ref)
