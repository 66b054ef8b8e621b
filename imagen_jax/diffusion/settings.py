"""`config.diffusion` as each kind of config has it, checked against the registries.

The names a config may use come from the modules that define them (schedules.SCHEDULES
and GRIDS, objectives.TARGETS and WEIGHTINGS, samplers.METHODS and METHOD_KWARGS,
guidance.THRESHOLDINGS and the augmentation forms), so registering a schedule, weighting
or sampler there is all it takes; a new config key of the diffusion section is a field
here. Sections (imagen_jax.config_schema) by config kind:

  gmm           TestbedDiffusion: schedule + sampler
  gmm_denoiser  ObjectiveDiffusion: schedule + target and weighting
  base          StageDiffusion: schedule + objective + thresholding + sampler
  sr            SRDiffusion: a stage's, and noise_aug (the low-res input's augmentation)

The one module of diffusion/ that imports anything of ours: imagen_jax.config_schema, a
leaf that imports nothing of ours itself. The math modules stay free of configs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from imagen_jax import config_schema
from imagen_jax.config_schema import Checker, ConfigError, section
from imagen_jax.diffusion import guidance, objectives, samplers, schedules

# Sampler keys that are not method options; every other field of SamplerSettings is one.
SAMPLER_KEYS = ("method", "steps", "grid", "rho")


def _schedule(c: Checker, name_key: str = "schedule", kw_key: str = "schedule_kw"
              ) -> schedules.Schedule:
  """The schedule named by field `name_key` with keyword arguments `kw_key`, built."""
  name = c.one_of(name_key, sorted(schedules.SCHEDULES))
  kw = config_schema.as_dict(getattr(c.obj, kw_key))
  fields = [f.name for f in dataclasses.fields(schedules.SCHEDULES[name]) if f.init]
  flag = c.flag(kw_key)
  for key in kw:
    if key not in fields:
      raise ConfigError(
          c.key(f"{kw_key}.{key}"), kw[key], f"not an argument of schedule {name!r}",
          allowed=fields, bad_key=True,
          fix=f"replace the whole dict, e.g. {flag}=\"{{'{fields[0]}': ...}}\" (or "
              f"{flag}=\"{{}}\" for defaults)")
  try:
    return schedules.get_schedule(name, **kw)
  except (TypeError, ValueError) as e:
    raise ConfigError(c.key(kw_key), kw, f"schedule {name!r} rejects it ({e})",
                      fix=f"change the values in {flag}=\"{{...}}\"") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerSettings:
  """diffusion.sampler: method, steps, the log-SNR grid (with rho for "karras") and the
  method options (samplers.METHOD_KWARGS; a config carries those it wants, numbers >= 0,
  each passed only to the methods that take it)."""

  method: str
  steps: int
  grid: str
  rho: float
  eta: float | None = None
  s_churn: float | None = None
  s_tmin: float | None = None
  s_tmax: float | None = None
  s_noise: float | None = None

  def check(self, c: Checker) -> None:
    c.one_of("method", sorted(samplers.METHODS))
    c.integer("steps", minimum=1)
    c.one_of("grid", schedules.GRIDS)
    c.number("rho", low=0.0, strict=True)
    for name in option_names():
      if getattr(self, name) is not None:
        c.number(name, low=0.0)  # eta, churn, noise scale and sigma bounds are >= 0
    if self.s_tmin is not None and self.s_tmax is not None and self.s_tmin > self.s_tmax:
      raise c.error("s_tmin", f"must not exceed {c.key('s_tmax')}={self.s_tmax}")


def option_names() -> tuple[str, ...]:
  """The sampler option fields (every numeric option of samplers.METHOD_KWARGS)."""
  return tuple(f.name for f in dataclasses.fields(SamplerSettings)
               if f.name not in SAMPLER_KEYS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleSettings:
  """schedule (a name of schedules.SCHEDULES) and schedule_kw (its arguments)."""

  schedule: str
  schedule_kw: Any

  def check(self, c: Checker) -> None:
    _schedule(c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduledSampler(SamplerSettings, ScheduleSettings):
  """A sampler with its own schedule (configs/gmm_denoiser.py's eval.sampler: every arm
  is sampled on the same schedule, whatever it trained on)."""

  def check(self, c: Checker) -> None:
    ScheduleSettings.check(self, c)
    SamplerSettings.check(self, c)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TestbedDiffusion(ScheduleSettings):
  """config.diffusion of configs/gmm.py: the schedule the exact denoiser samples on."""

  sampler: SamplerSettings = section(SamplerSettings)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ObjectiveDiffusion(ScheduleSettings):
  """Adds the training objective: target, weighting and its arguments (weighting_kw)."""

  target: str
  weighting: str
  weighting_kw: Any = dataclasses.field(default_factory=dict)

  def check(self, c: Checker) -> None:
    super().check(c)
    c.one_of("target", objectives.TARGETS)
    name = c.one_of("weighting", sorted(objectives.WEIGHTINGS))
    kw = config_schema.as_dict(self.weighting_kw)
    try:
      objectives.get_weighting(name, **kw)
    except ValueError as e:
      raise ConfigError(c.key("weighting_kw"), kw, str(e),
                        fix=f"replace the whole dict, e.g. {c.flag('weighting_kw')}="
                            "\"{'gamma': 5.0}\" for min_snr (or \"{}\" for defaults)") from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoiseAugSettings(ScheduleSettings):
  """diffusion.noise_aug (SR stages; configs/common.py explains it): its own schedule,
  the training range max_t and draw `per`, and one sampling level, given as exactly one
  of sample_t, sample_logsnr or sample_sigma, that the augmentation schedule reaches."""

  max_t: float
  per: str
  sample_t: Any = None
  sample_logsnr: Any = None
  sample_sigma: Any = None

  def check(self, c: Checker) -> None:
    schedule = _schedule(c)
    c.number("max_t", low=0.0)
    if self.max_t > 1:
      raise c.error("max_t", "is a time of the augmentation schedule, so within [0, 1]",
                    fix=f"pass {c.flag('max_t')}=1.0")
    c.one_of("per", guidance.AUG_PER)
    keys = [f"sample_{form}" for form in guidance.AUG_LEVEL_FORMS]
    key = c.one_set(keys, required=True, what="sampling augmentation level")
    form = key[len("sample_"):]
    value = getattr(self, key)
    lo, hi = guidance.aug_level_range(schedule)[form]
    if not (config_schema.is_number(value) and lo <= value <= hi):
      raise c.error(key, f"must be a number in [{lo:.6g}, {hi:.6g}], the range of {form} "
                         f"on the augmentation schedule {self.schedule!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageDiffusion(ObjectiveDiffusion):
  """config.diffusion of a network stage: the training schedule and objective, the
  thresholding and sampler of its samples, and (SR stages) noise_aug."""

  thresholding: str
  sampler: SamplerSettings = section(SamplerSettings)

  def check(self, c: Checker) -> None:
    super().check(c)
    c.one_of("thresholding", guidance.THRESHOLDINGS)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SRDiffusion(StageDiffusion):
  """config.diffusion of a super-resolution stage: a stage's, and noise_aug."""

  noise_aug: NoiseAugSettings = section(NoiseAugSettings)
