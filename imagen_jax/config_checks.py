"""Checks a config before any job runs, so that mistakes fail in a second, in words.

`validate(config, mode)` raises `ConfigError`, whose message names the key path, the bad
value, the allowed values (with a "did you mean" hint) and the fix, e.g.

  diffusion.schedule='cosin': unknown schedule. Did you mean 'cosine'? Allowed: 'cosine',
  'edm', ... Fix: pass --config.diffusion.schedule=cosine (or edit the config file).

Each config `kind` lists the checks every config of it runs in `KINDS`; the modes a kind
supports are the jobs that declare it (imagen_jax/jobs/), and a job's CHECKS add checks
for that mode only (e.g. the eval settings). Checks are pure: they read the config and
the registries of `imagen_jax.diffusion`, nothing else.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any, Callable, Sequence

import ml_collections

from imagen_jax.diffusion import guidance, objectives, samplers, schedules

# Sampler keys that are not method options; every other key of diffusion.sampler is one.
SAMPLER_KEYS = ("method", "steps", "grid", "rho")

_MISSING = object()


class ConfigError(ValueError):
  """A config value the user can fix; `key` is its dotted path (or a flag such as --mode).

  `allowed` lists the valid values, or the valid key names when `bad_key` is set: then
  the key itself is what is wrong, and the hint is matched against its last component.
  """

  def __init__(self, key: str, value: Any, problem: str, *,
               allowed: Sequence[Any] | None = None, fix: str | None = None,
               bad_key: bool = False):
    self.key, self.value = key, value
    shown = "<missing>" if value is _MISSING else repr(value)
    msg = f"{key}={shown}: {problem}."
    hint = None
    if allowed is not None:
      wrong = key.rsplit(".", 1)[-1] if bad_key else str(value)
      close = difflib.get_close_matches(wrong, [str(a) for a in allowed], n=1)
      hint = close[0] if close else None
      if hint is not None:
        msg += f" Did you mean {hint!r}?"
      msg += " Allowed: " + ", ".join(map(repr, allowed)) + "."
    if fix is None and bad_key:
      fix = f"rename it{f' to {hint!r}' if hint else ''} or remove it in the config file"
    elif fix is None:
      flag = key if key.startswith("--") else f"--config.{key}"
      fix = f"pass {flag}={hint if hint is not None else 'VALUE'} (or edit the config file)"
    super().__init__(f"{msg} Fix: {fix}.")


Check = Callable[[ml_collections.ConfigDict, str], None]


# Small readers: each returns the value at `path` or raises ConfigError naming it. -------

def get(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at dotted `path`; a missing key is a ConfigError, not an AttributeError."""
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(path, _MISSING, "the config has no such key",
                        fix="add it to the config file")
    node = node[part]
  return node


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def one_of(config: ml_collections.ConfigDict, path: str, allowed: Sequence[Any]) -> Any:
  value = get(config, path)
  if value not in allowed:
    raise ConfigError(path, value, f"unknown {path.rsplit('.', 1)[-1]}", allowed=allowed)
  return value


def positive_int(config: ml_collections.ConfigDict, path: str, minimum: int = 1) -> int:
  value = get(config, path)
  if not (_is_int(value) and value >= minimum):
    raise ConfigError(path, value, f"must be an integer >= {minimum}")
  return value


def integer(config: ml_collections.ConfigDict, path: str) -> int:
  value = get(config, path)
  if not _is_int(value):
    raise ConfigError(path, value, "must be an integer")
  return value


def number(config: ml_collections.ConfigDict, path: str, *, low: float = -math.inf,
           strict: bool = False) -> float:
  """A non-NaN number >= low (> low when strict); infinity is allowed when above low."""
  value = get(config, path)
  if not (_is_number(value) and (value > low if strict else value >= low)):
    raise ConfigError(path, value, f"must be a number {'>' if strict else '>='} {low}")
  return value


# Section checks. -------------------------------------------------------------------

def check_gmm_data(config: ml_collections.ConfigDict, mode: str) -> None:
  """data: the analytic Gaussian-mixture testbed."""
  mixture = one_of(config, "data.mixture", ("ring", "random"))
  positive_int(config, "data.num_modes")
  dim = positive_int(config, "data.dim")
  if mixture == "ring":
    if dim != 2:
      raise ConfigError("data.dim", dim, "the ring mixture is 2-D",
                        fix="pass --config.data.dim=2, or --config.data.mixture=random for "
                            "a mixture of any dimension")
    number(config, "data.radius", low=0.0, strict=True)
    number(config, "data.std", low=0.0, strict=True)
  else:
    integer(config, "data.seed")


def _schedule_at(config: ml_collections.ConfigDict, section: str) -> schedules.Schedule:
  """{section}.schedule and {section}.schedule_kw: the schedule they build."""
  name = one_of(config, f"{section}.schedule", sorted(schedules.SCHEDULES))
  kw_cfg = get(config, f"{section}.schedule_kw")
  kw = kw_cfg.to_dict() if isinstance(kw_cfg, ml_collections.ConfigDict) else dict(kw_cfg)
  fields = [f.name for f in dataclasses.fields(schedules.SCHEDULES[name]) if f.init]
  flag = f"--config.{section}.schedule_kw"
  for key in kw:
    if key not in fields:
      raise ConfigError(
          f"{section}.schedule_kw.{key}", kw[key], f"not an argument of schedule {name!r}",
          allowed=fields, bad_key=True,
          fix=f"replace the whole dict, e.g. {flag}=\"{{'{fields[0]}': ...}}\" (or "
              f"{flag}=\"{{}}\" for defaults)")
  try:
    return schedules.get_schedule(name, **kw)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{section}.schedule_kw", kw, f"schedule {name!r} rejects it ({e})",
                      fix=f"change the values in {flag}=\"{{...}}\"") from e


def check_schedule(config: ml_collections.ConfigDict, mode: str) -> None:
  """diffusion.schedule and diffusion.schedule_kw: building the schedule must succeed."""
  _schedule_at(config, "diffusion")


def _one_level(config: ml_collections.ConfigDict, section: str, keys: Sequence[str],
               *, required: bool) -> str | None:
  """The one key of `keys` under `section` that is set (not None); two set is an error,
  and so is none when `required` (a config section whose default sets one: its keys are
  object-typed, so =None unsets one on the command line). Returns that key, or None."""
  present = [k for k in keys if k in get(config, section)]
  given = [k for k in present if get(config, f"{section}.{k}") is not None]
  if len(given) > 1:
    first, second = given[0], given[1]
    fix = (f"pass --config.{section}.{first}=None to use {second} (or "
           f"--config.{section}.{second}=None to keep {first})" if required else
           f"pass only one of --config.{section}.{first} and --config.{section}.{second}")
    raise ConfigError(f"{section}.{second}", get(config, f"{section}.{second}"),
                      f"the augmentation level is given one way only, and "
                      f"{section}.{first}={get(config, f'{section}.{first}')!r} is set too",
                      fix=fix)
  if not given and required:
    raise ConfigError(f"{section}.{keys[0]}", None, "no sampling augmentation level is "
                      f"given (set one of {', '.join(keys)})",
                      fix=f"pass e.g. --config.{section}.{keys[0]}=0.2")
  return given[0] if given else None


def check_noise_aug(config: ml_collections.ConfigDict, mode: str) -> None:
  """diffusion.noise_aug (SR stages): its own schedule, the training range and draw, and
  exactly one sampling level (sample_t, sample_logsnr or sample_sigma) that the
  augmentation schedule reaches."""
  section = "diffusion.noise_aug"
  schedule = _schedule_at(config, section)
  max_t = number(config, f"{section}.max_t", low=0.0)
  if max_t > 1:
    raise ConfigError(f"{section}.max_t", max_t, "is a time of the augmentation schedule, "
                      "so within [0, 1]", fix=f"pass --config.{section}.max_t=1.0")
  one_of(config, f"{section}.per", guidance.AUG_PER)
  keys = [f"sample_{form}" for form in guidance.AUG_LEVEL_FORMS]
  key = _one_level(config, section, keys, required=True)
  form = key[len("sample_"):]
  value = get(config, f"{section}.{key}")
  lo, hi = guidance.aug_level_range(schedule)[form]
  if not (_is_number(value) and lo <= value <= hi):
    raise ConfigError(f"{section}.{key}", value,
                      f"must be a number in [{lo:.6g}, {hi:.6g}], the range of {form} on "
                      f"the augmentation schedule {get(config, f'{section}.schedule')!r}")


def check_sampler(config: ml_collections.ConfigDict, mode: str) -> None:
  """diffusion.sampler: method, steps, grid, rho and method options."""
  _sampler_at(config, "diffusion.sampler")


def _sampler_at(config: ml_collections.ConfigDict, section: str,
                extra: Sequence[str] = ()) -> None:
  """{section}: method, steps, grid, rho, method options, and the `extra` keys (checked
  by the caller)."""
  one_of(config, f"{section}.method", sorted(samplers.METHODS))
  positive_int(config, f"{section}.steps")
  one_of(config, f"{section}.grid", schedules.GRIDS)
  number(config, f"{section}.rho", low=0.0, strict=True)
  options = sorted({k for ks in samplers.METHOD_KWARGS.values() for k in ks})
  for key in get(config, section):
    if key in SAMPLER_KEYS or key in extra:
      continue
    path = f"{section}.{key}"
    if key not in options:
      raise ConfigError(path, get(config, path), "not a sampler option",
                        allowed=list(SAMPLER_KEYS) + list(extra) + options, bad_key=True)
    number(config, path, low=0.0)  # eta, churn, noise scale and sigma bounds are >= 0
  sampler = get(config, section)
  if "s_tmin" in sampler and "s_tmax" in sampler and sampler.s_tmin > sampler.s_tmax:
    raise ConfigError(f"{section}.s_tmin", sampler.s_tmin,
                      f"must not exceed {section}.s_tmax={sampler.s_tmax}")


def check_objective(config: ml_collections.ConfigDict, mode: str) -> None:
  """diffusion.target and diffusion.weighting (with weighting_kw, where the config has it)."""
  one_of(config, "diffusion.target", objectives.TARGETS)
  name = one_of(config, "diffusion.weighting", sorted(objectives.WEIGHTINGS))
  if "weighting_kw" not in get(config, "diffusion"):
    return
  kw_cfg = get(config, "diffusion.weighting_kw")
  kw = kw_cfg.to_dict() if isinstance(kw_cfg, ml_collections.ConfigDict) else dict(kw_cfg or {})
  try:
    objectives.get_weighting(name, **kw)
  except ValueError as e:
    raise ConfigError("diffusion.weighting_kw", kw, str(e),
                      fix="replace the whole dict, e.g. --config.diffusion.weighting_kw="
                          "\"{'gamma': 5.0}\" for min_snr (or \"{}\" for defaults)") from e


def check_gmm_denoiser(config: ml_collections.ConfigDict, mode: str) -> None:
  """model, train and eval of configs/gmm_denoiser.py (the MLP trained on the testbed)."""
  for key in ("model.width", "model.depth", "model.feat_dim", "train.steps",
              "train.batch_size", "train.log_every"):
    positive_int(config, key)
  if get(config, "model.feat_dim") % 2:
    raise ConfigError("model.feat_dim", get(config, "model.feat_dim"),
                      "must be even (sine and cosine features)")
  integer(config, "train.seed")
  number(config, "train.lr", low=0.0, strict=True)
  positive_int(config, "train.warmup_steps", minimum=0)
  levels = get(config, "eval.logsnr_levels")
  if not (isinstance(levels, (tuple, list)) and levels and all(_is_number(v) for v in levels)):
    raise ConfigError("eval.logsnr_levels", levels, "must be a non-empty tuple of log-SNRs",
                      fix="pass e.g. --config.eval.logsnr_levels='(-6.0, 0.0, 6.0)'")
  _schedule_at(config, "eval.sampler")
  _sampler_at(config, "eval.sampler", extra=("schedule", "schedule_kw"))


def check_eval_samples(config: ml_collections.ConfigDict, mode: str) -> None:
  """eval: sample count (>= 2, for covariances), seed, sliced-Wasserstein projections."""
  positive_int(config, "eval.num_samples", minimum=2)
  integer(config, "eval.seed")
  positive_int(config, "eval.num_projections")


def check_model(config: ml_collections.ConfigDict, mode: str) -> None:
  """model: a known network whose config dataclass accepts every key."""
  from imagen_jax import models  # flax; only for configs that have a network
  one_of(config, "model.name", models.NAMES)
  try:
    models.config_from_dict(get(config, "model"))
  except (TypeError, ValueError) as e:
    raise ConfigError("model", get(config, "model.name"), f"bad network config ({e})",
                      fix="correct the model section of the config file") from e


def _encoder_width(spec: str, tokenizer: str) -> int | None:
  """The embedding width a text encoder spec gives, read without loading weights (None when
  it cannot be known cheaply). Raises ConfigError for a spec that cannot load."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  from imagen_jax import text  # pylint: disable=g-import-not-at-top
  try:
    kind, arg = text.parse_spec(spec)
  except ValueError as e:
    raise ConfigError("data.text_encoder", spec, str(e).rstrip("."),
                      fix="pass e.g. --config.data.text_encoder=minilm") from e
  if kind == "minilm":
    return 384
  if kind == "random-t5":
    from imagen_jax.text import t5  # pylint: disable=g-import-not-at-top
    if arg not in t5.T5_SIZES:
      raise ConfigError("data.text_encoder", spec, "unknown random T5 size",
                        allowed=[f"random-t5:{k}" for k in t5.T5_SIZES])
    return t5.T5_SIZES[arg].d_model
  if not os.path.isdir(arg):
    raise ConfigError("data.text_encoder", spec, f"checkpoint directory {arg!r} does not exist",
                      fix=f"pass --config.data.text_encoder={kind}:/path/to/your/checkpoint")
  if kind == "t5x":
    if not tokenizer:
      raise ConfigError("data.text_tokenizer", tokenizer, "T5X checkpoints carry no tokenizer",
                        fix="pass --config.data.text_tokenizer=/path/to/spiece.model")
    return None
  cfg_file = os.path.join(arg, "config.json")
  try:
    with open(cfg_file) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError("data.text_encoder", spec, f"cannot read {cfg_file} ({e})",
                      fix="point it at a Hugging Face checkpoint directory") from e
  return hf.get("d_model", hf.get("hidden_size"))


def check_text(config: ml_collections.ConfigDict, mode: str) -> None:
  """data.text_*: a loadable encoder spec whose width is the network's text_dim, and (for
  --mode=precompute) a caption file to encode."""
  import os  # pylint: disable=g-import-not-at-top
  positive_int(config, "data.max_text_len", minimum=2)
  positive_int(config, "data.text_batch_size")
  one_of(config, "data.text_dtype", ("float32", "bfloat16"))
  one_of(config, "data.cache_dtype", ("float32", "float16", "bfloat16"))
  tokenizer = get(config, "data.text_tokenizer")
  if tokenizer and not os.path.isfile(tokenizer):
    raise ConfigError("data.text_tokenizer", tokenizer, "no such file",
                      fix="pass the path of a spiece.model or tokenizer.json, or '' for the "
                          "checkpoint's own")
  width = _encoder_width(get(config, "data.text_encoder"), tokenizer)
  text_dim = get(config, "model.text_dim")
  if width is not None and width != text_dim:
    raise ConfigError("model.text_dim", text_dim,
                      f"data.text_encoder={config.data.text_encoder!r} gives {width}-d "
                      "embeddings", fix=f"pass --config.model.text_dim={width}")
  captions = get(config, "data.captions_file")
  if captions and not os.path.isfile(captions):
    raise ConfigError("data.captions_file", captions, "no such file",
                      fix="pass a text file with one caption per line, or '' to encode the "
                          "dataset's captions")


def check_data(config: ml_collections.ConfigDict, mode: str) -> None:
  """data: a known dataset, sizes that fit the stage, and a source folder when needed."""
  import os  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import datasets  # pylint: disable=g-import-not-at-top
  dataset = one_of(config, "data.dataset", datasets.DATASETS)
  resolution = positive_int(config, "data.resolution", minimum=8)
  if "low_resolution" in config.data:
    low = positive_int(config, "data.low_resolution")
    if resolution % low:
      raise ConfigError("data.low_resolution", low,
                        f"must divide data.resolution={resolution}")
    crop = get(config, "data.crop")
    if crop is not None:
      factor = resolution // low
      if not (_is_int(crop) and 0 < crop <= resolution and crop % factor == 0):
        raise ConfigError("data.crop", crop, f"must be None or a multiple of {factor} (the SR "
                          f"factor) no larger than data.resolution={resolution}")
  limit = get(config, "data.limit")
  if not (_is_int(limit) and limit >= 0):
    raise ConfigError("data.limit", limit, "must be an integer >= 0 (0 = every drawing)")
  one_of(config, "data.resize", ("center_crop", "pad"))
  for key in ("data.train_split", "data.eval_split"):
    if not get(config, key):
      raise ConfigError(key, get(config, key), "must name a split", fix=f"pass --config.{key}=train")
  if dataset == "image_text_folder":
    source = get(config, "data.source_dir")
    if not source or not os.path.isdir(source):
      raise ConfigError("data.source_dir", source, "image_text_folder needs an existing folder",
                        fix="pass --config.data.source_dir=/path/to/images (images with "
                            "same-stem .txt captions, or a metadata.jsonl/csv manifest)")


def check_mesh_sizes(config: ml_collections.ConfigDict) -> None:
  """mesh.data/fsdp/tensor: positive sizes or -1 (the devices are checked at run time)."""
  for axis in ("data", "fsdp", "tensor"):
    size = integer(config, f"mesh.{axis}")
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{axis}", size, "must be a positive size or -1 (the rest)")


def check_train(config: ml_collections.ConfigDict, mode: str) -> None:
  """train, optim, mesh, ckpt, log: types and ranges (the mesh against the devices and the
  batch against the mesh are checked by the trainer, which knows the devices)."""
  positive_int(config, "train.batch_size")
  positive_int(config, "train.steps")
  integer(config, "train.seed")
  positive_int(config, "train.accum_steps")
  positive_int(config, "train.max_bad_steps")
  number(config, "train.time_limit_s", low=0.0)
  p = number(config, "train.text_drop_prob", low=0.0)
  if p > 1:
    raise ConfigError("train.text_drop_prob", p, "is a probability, so at most 1")
  one_of(config, "optim.name", ("adamw", "adam", "adafactor"))
  one_of(config, "optim.schedule", ("constant", "cosine"))
  number(config, "optim.lr", low=0.0, strict=True)
  for key in ("optim.warmup_steps", "optim.decay_steps"):
    if not (_is_int(get(config, key)) and get(config, key) >= 0):
      raise ConfigError(key, get(config, key), "must be an integer >= 0")
  for key in ("optim.weight_decay", "optim.grad_clip", "optim.end_lr_frac"):
    number(config, key, low=0.0)
  decays = get(config, "optim.ema_decays")
  if not all(_is_number(d) and 0 < d < 1 for d in decays):
    raise ConfigError("optim.ema_decays", decays, "each EMA decay must lie in (0, 1)",
                      fix="pass e.g. --config.optim.ema_decays='(0.9999,)'")
  check_mesh_sizes(config)
  positive_int(config, "ckpt.every")
  positive_int(config, "ckpt.keep")
  if not (_is_int(get(config, "ckpt.keep_every")) and get(config, "ckpt.keep_every") >= 0):
    raise ConfigError("ckpt.keep_every", get(config, "ckpt.keep_every"),
                      "must be an integer >= 0 (0 keeps only the newest ckpt.keep)")
  positive_int(config, "log.every")
  if not (_is_int(get(config, "log.sample_every")) and get(config, "log.sample_every") >= 0):
    raise ConfigError("log.sample_every", get(config, "log.sample_every"),
                      "must be an integer >= 0 (0 = no sample grids)")
  number(config, "log.guidance", low=0.0)
  number(config, "log.peak_flops", low=0.0)
  one_of(config, "diffusion.thresholding", ("dynamic", "static", "none"))
  positive_int(config, "data.workers", minimum=0)


def stage_override_sections(config: ml_collections.ConfigDict) -> list[str]:
  """The cascade config's per-stage override sections stage0, stage1, ..., in order."""
  found = [k for k in config.keys() if re.fullmatch(r"stage\d+", k)]
  return sorted(found, key=lambda k: int(k[len("stage"):]))


def check_cascade(config: ml_collections.ConfigDict, mode: str) -> None:
  """stages, weights, per-stage overrides (unset = the stage's own value), sample."""
  stages = get(config, "stages")
  if not isinstance(stages, (tuple, list)) or not stages or not all(
      isinstance(p, str) and p for p in stages):
    raise ConfigError("stages", stages, "must list the stages' workdirs, base first",
                      fix="pass --config.stages=\"('runs/base64', 'runs/sr256')\"")
  one_of(config, "weights", ("ema", "params"))
  for section in stage_override_sections(config):
    o = get(config, section)
    if o.get("sampler") is not None:
      one_of(config, f"{section}.sampler", sorted(samplers.METHODS))
    if o.get("steps") is not None:
      positive_int(config, f"{section}.steps")
    if o.get("thresholding") is not None:
      one_of(config, f"{section}.thresholding", ("dynamic", "static", "none"))
    if o.get("guidance") is not None:
      number(config, f"{section}.guidance", low=0.0)
    # The stage's schedule is known only once it is loaded (cascade.py checks the level
    # against it); here: one form at most, each within the range every schedule allows.
    key = _one_level(config, section, ("aug_t", "aug_logsnr", "aug_sigma"), required=False)
    if key is not None:
      _check_aug_value(config, f"{section}.{key}", key[len("aug_"):])
  check_mesh_sizes(config)
  positive_int(config, "sample.batch_size")
  integer(config, "sample.seed")
  n = integer(config, "sample.num_stages")
  if not 0 <= n <= len(stages):
    raise ConfigError("sample.num_stages", n,
                      f"must lie in [0, {len(stages)}] (0 = all {len(stages)} stages)")


def _aug_value_ok(value: Any, form: str) -> bool:
  """A level any schedule may reach: t in [0, 1], sigma in (0, 1), a finite log-SNR."""
  if not _is_number(value):
    return False
  if form == "t":
    return 0.0 <= value <= 1.0
  if form == "sigma":
    return 0.0 < value < 1.0
  return math.isfinite(value)


_AUG_RANGES = {"t": "a time, so within [0, 1]", "logsnr": "a log-SNR, so a finite number",
               "sigma": "the std of the added noise, so within (0, 1)"}


def _check_aug_value(config: ml_collections.ConfigDict, path: str, form: str) -> None:
  value = get(config, path)
  if not _aug_value_ok(value, form):
    raise ConfigError(path, value, f"is an augmentation level given as {_AUG_RANGES[form]}")


def check_cascade_eval(config: ml_collections.ConfigDict, mode: str) -> None:
  """eval: the guidance and augmentation-level sweeps, sample and reference counts, the
  measured stage, alignment."""
  if mode != "eval":
    return
  weights = get(config, "eval.guidance_weights")
  if not weights or not all(_is_number(w) and w >= 0 for w in weights):
    raise ConfigError("eval.guidance_weights", weights, "must list weights >= 0",
                      fix="pass e.g. --config.eval.guidance_weights='(1.0, 3.0, 5.0)'")
  positive_int(config, "eval.num_images", minimum=2)
  integer(config, "eval.seed")
  positive_int(config, "eval.batch_size")
  positive_int(config, "eval.grid_size")
  stage = integer(config, "eval.fid_stage")
  if not 0 <= stage < len(get(config, "stages")):
    raise ConfigError("eval.fid_stage", stage,
                      f"names a stage, so must lie in [0, {len(get(config, 'stages')) - 1}]")
  form = one_of(config, "eval.aug_level_kind", guidance.AUG_LEVEL_FORMS)
  levels = get(config, "eval.aug_levels")
  if not isinstance(levels, (tuple, list)) or not all(_aug_value_ok(v, form) for v in levels):
    raise ConfigError("eval.aug_levels", levels,
                      f"must list augmentation levels, each {_AUG_RANGES[form]} "
                      f"(eval.aug_level_kind={form!r})",
                      fix="pass e.g. --config.eval.aug_levels='(0.1, 0.2, 0.3)' (times t), "
                          "or () for each stage's own level")
  if levels and stage == 0:
    raise ConfigError("eval.fid_stage", stage, "an augmentation sweep (eval.aug_levels="
                      f"{tuple(levels)}) acts on the SR stages, but FID is measured on the "
                      "base stage, which they do not touch",
                      fix="pass --config.eval.fid_stage=1 (or --config.eval.aug_levels='()')")
  limit = integer(config, "eval.reference_limit")
  if limit != 0 and limit < 2:
    raise ConfigError("eval.reference_limit", limit, "must be 0 (all) or >= 2 (covariances)")
  _check_alignment(config)


def _check_alignment(config: ml_collections.ConfigDict) -> None:
  """eval.text_metric (an evaluator's name) and eval.alignment: the offline alignment
  model's training settings."""
  from imagen_jax.eval import evaluators  # pylint: disable=g-import-not-at-top
  one_of(config, "eval.text_metric", evaluators.CHOICES)
  if not (_is_int(get(config, "eval.alignment.train_limit")) and
          get(config, "eval.alignment.train_limit") >= 0):
    raise ConfigError("eval.alignment.train_limit", get(config, "eval.alignment.train_limit"),
                      "must be an integer >= 0 (0 = the whole train split)")
  for key in ("dim", "steps", "batch_size"):
    positive_int(config, f"eval.alignment.{key}")
  positive_int(config, "eval.alignment.candidates", minimum=2)
  number(config, "eval.alignment.lr", low=0.0, strict=True)
  number(config, "eval.alignment.weight_decay", low=0.0)


def check_stage_eval(config: ml_collections.ConfigDict, mode: str) -> None:
  """eval of a base stage's checkpoints (imagen_jax/jobs/eval_stage.py declares it)."""
  del mode
  steps = get(config, "eval.steps")
  if not (isinstance(steps, (tuple, list)) and all(_is_int(s) and s >= 0 for s in steps)):
    raise ConfigError("eval.steps", steps, "must be a tuple of checkpoint steps (() = all)",
                      fix="pass e.g. --config.eval.steps='(500, 1000)'")
  positive_int(config, "eval.num_images", minimum=2)
  integer(config, "eval.seed")
  integer(config, "eval.grid_seed")
  number(config, "eval.guidance", low=0.0)
  one_of(config, "eval.weights", ("ema", "params"))
  positive_int(config, "eval.batch_size")
  positive_int(config, "eval.grid_size")
  limit = integer(config, "eval.reference_limit")
  if limit < 0 or limit == 1:
    raise ConfigError("eval.reference_limit", limit, "must be 0 (all) or >= 2 (covariances)")
  positive_int(config, "eval.bootstrap", minimum=0)
  positive_int(config, "eval.kid_subsets")
  positive_int(config, "eval.kid_subset_size", minimum=2)
  prompts = get(config, "eval.prompts")
  if not (isinstance(prompts, (tuple, list)) and prompts and
          all(isinstance(p, str) and p for p in prompts)):
    raise ConfigError("eval.prompts", prompts, "must be a non-empty tuple of prompts",
                      fix="pass e.g. --config.eval.prompts=\"('red apple, twemoji style',)\"")
  _check_alignment(config)

@dataclasses.dataclass(frozen=True)
class Kind:
  """The checks every config of a `kind` must pass, whatever the mode; `why` is shown when
  a mode is not supported. The modes themselves are the jobs that declare the kind
  (imagen_jax/jobs/), which may add checks of their own (their CHECKS)."""

  checks: tuple[Check, ...]
  why: str = ""


KINDS: dict[str, Kind] = {
    "gmm": Kind(
        checks=(check_gmm_data, check_schedule, check_sampler, check_eval_samples),
        why="the Gaussian-mixture testbed uses its exact denoiser, so there is no "
            "network to train, evaluate or precompute inputs for"),
    "gmm_denoiser": Kind(
        checks=(check_gmm_data, check_schedule, check_objective, check_gmm_denoiser,
                check_eval_samples),
        why="the job trains the denoiser and then evaluates it in one run"),
    # Network configs: a stage is trained alone, then sampled and evaluated in a cascade.
    "base": Kind(checks=(check_model, check_data, check_text, check_schedule, check_objective,
                         check_sampler, check_train),
                 why="trained stages are sampled together through configs/cascade.py; "
                     "--mode=eval scores a base stage's own checkpoints"),
    "sr": Kind(checks=(check_model, check_data, check_text, check_schedule, check_objective,
                       check_noise_aug, check_sampler, check_train),
               why="trained stages are sampled and evaluated together through "
                   "configs/cascade.py"),
    "cascade": Kind(checks=(check_cascade,),
                    why="it combines stages trained with their own configs"),
}


def validate(config: ml_collections.ConfigDict, mode: str) -> None:
  """Raises ConfigError for the first problem found in `config` run under `mode`."""
  from imagen_jax import jobs  # pylint: disable=g-import-not-at-top
  kind = one_of(config, "kind", sorted(KINDS))
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
  job = jobs.table()[(kind, mode)]
  for check in spec.checks + tuple(globals()[name] for name in job.checks):
    check(config, mode)
