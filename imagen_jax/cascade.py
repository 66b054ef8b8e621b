"""The cascade: text -> 64x64 base -> 64->256 SR -> 256->1024 SR, across trained stages.

  cascade = Cascade.from_workdirs(["runs/base64", "runs/sr256", "runs/sr1024"])
  out = cascade.generate(["a red apple, twemoji style"], seed=0, out_dir="runs/samples")
  out.images[-1]  # uint8 [N, 1024, 1024, 3]

Each stage is restored from its training workdir (or its checkpoints/ directory): the
config the run saved with its checkpoint, and its EMA parameters (the slowest-decaying
EMA, as the trainer's sample grids use). Prompts are encoded once per distinct text
encoder the stages were trained with, then each stage samples with its own sampler,
steps, guidance weight, thresholding and (SR) noise-augmentation level: the stage
config's values unless `StageSettings` overrides them. An SR stage is conditioned on the
previous stage's float output (clipped to [-1, 1]), as in Imagen, noise-augmented to its
level: given as a time t of the stage's augmentation schedule, a log-SNR or a noise std
sigma (`guidance.aug_level`), and recorded in all three forms.

Batches are split over every device (the data axis of the cascade's mesh); the last one is
padded and the padding dropped. Image i of a call is drawn from the keys
fold_in(fold_in(key(seed), stage), start_index + i) alone, so with a deterministic sampler
(the default dpmpp_2m) it does not depend on the batch it was sampled in:
`generate([prompt], seed=s, start_index=i)` regenerates image i of an earlier call (to
float rounding: XLA may sum in another order at another batch size). settings.json records
everything that call needs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from imagen_jax import config_schema
from imagen_jax import export
from imagen_jax import images as images_lib
from imagen_jax import sampling
from imagen_jax import sharding as sharding_lib
from imagen_jax import text as text_lib
from imagen_jax.diffusion import guidance
from imagen_jax.errors import UserError
from imagen_jax.train import checkpointing
from imagen_jax.train import state as state_lib


class CascadeError(UserError):
  """A stage that cannot be loaded or does not chain with the previous one."""


WEIGHTS = ("ema", "params")
# What each form of an augmentation level is, for messages (t, logsnr, sigma).
AUG_RANGES = {"t": "a time, so within [0, 1]", "logsnr": "a log-SNR, so a finite number",
              "sigma": "the std of the added noise, so within (0, 1)"}


def aug_value_ok(value: Any, form: str) -> bool:
  """A level any schedule may reach: t in [0, 1], sigma in (0, 1), a finite log-SNR."""
  if not config_schema.is_number(value):
    return False
  if form == "t":
    return 0.0 <= value <= 1.0
  if form == "sigma":
    return 0.0 < value < 1.0
  return math.isfinite(value)


def check_aug_level(c: config_schema.Checker, name: str, form: str) -> None:
  if not aug_value_ok(getattr(c.obj, name), form):
    raise c.error(name, f"is an augmentation level given as {AUG_RANGES[form]}")


@dataclasses.dataclass(frozen=True)
class CascadeSettings:
  """The top-level keys of configs/cascade.py: the stages' workdirs (or exported .npz
  files), base first, and which weights to sample ("ema": the slowest EMA, or "params")."""

  stages: tuple[str, ...]
  weights: str

  def check(self, c: config_schema.Checker) -> None:
    c.strings("stages", fix="pass --config.stages=\"('runs/base64', 'runs/sr256')\"")
    c.one_of("weights", WEIGHTS)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """config.sample of a cascade config: `prompts` (or prompts_file, one per line) sampled
  from `seed` through the first num_stages stages (0 = all), batch_size per call."""

  prompts: tuple[str, ...]
  prompts_file: str
  seed: int
  batch_size: int
  num_stages: int

  def check(self, c: config_schema.Checker) -> None:
    c.string("prompts_file")
    c.integer("batch_size", minimum=1)
    c.integer("seed")
    n = c.integer("num_stages")
    stages = len(c.root.stages) if c.root is not None else n
    if not 0 <= n <= stages:
      raise c.error("num_stages", f"must lie in [0, {stages}] (0 = all {stages} stages)")


@dataclasses.dataclass(frozen=True)
class StageSettings:
  """Per-stage sampling overrides; None keeps the stage config's value.

  The SR noise-augmentation level of the low-res input is given by at most one of aug_t
  (a time of the stage's augmentation schedule), aug_logsnr or aug_sigma (the std of the
  added noise); any one of them replaces the config's level.
  """
  sampler: str | None = None        # diffusion.sampler.method
  steps: int | None = None          # diffusion.sampler.steps
  guidance: float | None = None     # classifier-free guidance weight (config: log.guidance)
  thresholding: str | None = None   # "dynamic", "static" or "none"
  aug_t: float | None = None        # SR only: augmentation level as a time in [0, 1]
  aug_logsnr: float | None = None   # SR only: ... as a log-SNR
  aug_sigma: float | None = None    # SR only: ... as the noise std sigma in (0, 1)

  def check(self, c: config_schema.Checker) -> None:
    """config.stageK: the values that are set. The stage's schedule is known only once it
    is loaded (`Cascade` checks the level against it); here: one form at most, each within
    the range every schedule allows."""
    from imagen_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
    if self.sampler is not None:
      c.one_of("sampler", sorted(samplers.METHODS))
    if self.steps is not None:
      c.integer("steps", minimum=1)
    if self.thresholding is not None:
      c.one_of("thresholding", guidance.THRESHOLDINGS)
    if self.guidance is not None:
      c.number("guidance", low=0.0)
    key = c.one_set(("aug_t", "aug_logsnr", "aug_sigma"), required=False,
                    what="augmentation level")
    if key is not None:
      check_aug_level(c, key, key[len("aug_"):])

  @classmethod
  def from_dict(cls, d: Any) -> "StageSettings":
    # Config files spell "keep the stage's value" as None, 0 or "" (locked configs cannot
    # hold None for a typed key).
    d = {k: (v if v not in ("", None) else None) for k, v in config_schema.as_dict(d).items()}
    return config_schema.from_mapping(cls, d, error=CascadeError, what="stage setting")


@dataclasses.dataclass
class Stage:
  """One trained stage: its config, network definition and (EMA) parameters."""
  config: ml_collections.ConfigDict
  graphdef: Any
  params: Any
  rest: Any
  step: int
  source: str        # the checkpoints directory it came from
  weights: str       # "ema:<decay>" or "params"

  @property
  def is_sr(self) -> bool:
    return self.config.kind == "sr"

  @property
  def resolution(self) -> int:
    return int(self.config.data.resolution)

  @property
  def low_resolution(self) -> int | None:
    return int(self.config.data.low_resolution) if self.is_sr else None

  def settings(self, override: StageSettings | None = None) -> dict[str, Any]:
    """The effective sampling settings (the config's, overridden); for an SR stage the
    augmentation level in all three forms and the schedule that relates them."""
    o = override or StageSettings()
    dc = self.config.diffusion
    out = {"sampler": o.sampler or dc.sampler.method,
           "steps": int(o.steps or dc.sampler.steps),
           "guidance": float(self.config.log.guidance if o.guidance is None else o.guidance),
           "thresholding": o.thresholding or dc.get("thresholding", "dynamic")}
    if self.is_sr:
      aug = guidance.NoiseAug.from_config(dc)
      given = {k: getattr(o, f"aug_{k}") for k in guidance.AUG_LEVEL_FORMS
               if getattr(o, f"aug_{k}") is not None}
      try:
        level = guidance.aug_level(aug.schedule, **given) if given else aug.sample_level()
      except ValueError as e:
        raise CascadeError(f"Stage {self.source}: {e} Fix: give one of "
                           "aug_t / aug_logsnr / aug_sigma within that range.") from e
      out.update(aug_t=level.t, aug_logsnr=level.logsnr, aug_sigma=level.sigma,
                 aug_schedule=aug.schedule_name, aug_schedule_kw=dict(aug.schedule_kw))
    return out


def _checkpoint_dir(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  sub = os.path.join(path, "checkpoints")
  if os.path.isdir(sub):
    return sub
  if os.path.isdir(path):
    return path
  raise CascadeError(f"No stage at {path}: expected a training workdir (with checkpoints/), "
                     "a checkpoints directory or an exported stage (.npz). Fix: train the "
                     "stage first (launch.py --mode=train --workdir=...) or correct the path.")


def load_stage(path: str, *, step: int | None = None, weights: str = "ema",
               mesh: jax.sharding.Mesh | None = None) -> Stage:
  """Restores a stage from a workdir or checkpoints directory onto `mesh` (default: every
  device on the data axis). weights: "ema" (the slowest EMA; params if none) or "params".

  The whole TrainState is restored (optimizer moments included), then only the weights
  kept: simple and exact, at the cost of holding the optimizer state for a moment.
  """
  if weights not in WEIGHTS:
    raise CascadeError(f"weights={weights!r}: choose 'ema' or 'params'.")
  if os.path.isfile(path) and path.endswith(".npz"):
    return _load_exported(path, mesh=mesh)
  directory = _checkpoint_dir(path)
  mesh = mesh or sharding_lib.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})
  ckpt = checkpointing.Checkpointer(directory, every=1, keep=1 << 30, async_save=False)
  try:
    latest = ckpt.latest_step() if step is None else int(step)
    if latest is None:
      raise CascadeError(f"No complete checkpoint in {directory}. Fix: let the stage's "
                         "training save one (it does at ckpt.every steps and at the end).")
    meta = ckpt.read_metadata(latest)
    if not isinstance(meta, dict) or "config" not in meta:
      raise CascadeError(f"The checkpoint of step {latest} in {directory} holds no config "
                         "(not written by imagen_jax's trainer?).")
    config = ml_collections.ConfigDict(meta["config"])
    graphdef, abstract, _ = state_lib.abstract_state(config, mesh)
    state, _, restored_step = ckpt.restore(abstract, step=latest)
  finally:
    ckpt.close()
  if weights == "ema" and state.ema:
    key = max(state.ema, key=float)
    params, label = state.ema[key], f"ema:{key}"
  else:
    params, label = state.params, "params"
  return Stage(config=config, graphdef=graphdef, params=params, rest=state.rest,
               step=int(restored_step), source=directory, weights=label)


def _load_exported(path: str, *, mesh: jax.sharding.Mesh | None = None) -> Stage:
  """A stage written by imagen_jax.export (its sampling weights and config)."""
  try:
    config_dict, meta, arrays = export.read(path)
    config = ml_collections.ConfigDict(config_dict)
    mesh = mesh or sharding_lib.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})
    graphdef, abstract, _ = state_lib.abstract_state(config, mesh)
    params = export.fill(abstract.params, arrays, "params/", path)
    rest = export.fill(abstract.rest, arrays, "rest/", path)
  except ValueError as e:
    raise CascadeError(str(e)) from e
  return Stage(config=config, graphdef=graphdef, params=params, rest=rest,
               step=int(meta["step"]), source=os.path.abspath(path),
               weights=str(meta["weights"]))


def _text_key(data: Any) -> tuple:
  return (data.text_encoder, int(data.max_text_len), data.get("text_tokenizer", ""),
          data.get("text_dtype", "float32"))


def check_chain(stages: Sequence[Stage]) -> None:
  """Stage 0 is a base model and each SR stage starts at its predecessor's resolution."""
  if not stages:
    raise CascadeError("A cascade needs at least one stage.")
  if stages[0].is_sr:
    raise CascadeError(f"The first stage ({stages[0].source}) is a super-resolution stage; "
                       "the cascade starts from a base (text -> image) model.")
  for prev, nxt in zip(stages, stages[1:]):
    if not nxt.is_sr:
      raise CascadeError(f"Stage {nxt.source} is a base model; only the first stage may be.")
    if nxt.low_resolution != prev.resolution:
      raise CascadeError(
          f"Stage {nxt.source} upsamples from {nxt.low_resolution}px but the stage before it "
          f"({prev.source}) makes {prev.resolution}px images. Fix: order the stages by "
          "resolution, or train the SR stage with data.low_resolution="
          f"{prev.resolution}.")


@dataclasses.dataclass
class CascadeOutput:
  prompts: list[str]
  images: list[np.ndarray]          # per stage, uint8 [N, R, R, 3]
  settings: dict[str, Any]          # what settings.json holds
  seconds: list[float]              # sampling time per stage (compilation included)
  out_dir: str | None = None


class Cascade:
  """Trained stages plus the text encoders they were trained with."""

  def __init__(self, stages: Sequence[Stage], *, mesh: jax.sharding.Mesh | None = None,
               encoders: dict[tuple, Any] | None = None):
    check_chain(stages)
    self.stages = list(stages)
    self.mesh = mesh or sharding_lib.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})
    self._encoders = dict(encoders or {})
    self._sample_fns: dict[tuple, Any] = {}

  @classmethod
  def from_workdirs(cls, paths: Sequence[str], *, weights: str = "ema",
                    steps: Sequence[int | None] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> "Cascade":
    """Stages in cascade order (base first) from their workdirs or checkpoint dirs."""
    mesh = mesh or sharding_lib.mesh_from_config({"data": -1, "fsdp": 1, "tensor": 1})
    steps = list(steps or [None] * len(paths))
    stages = [load_stage(p, step=s, weights=weights, mesh=mesh) for p, s in zip(paths, steps)]
    return cls(stages, mesh=mesh)

  # -- pieces ----------------------------------------------------------------------------

  def encode(self, prompts: Sequence[str], stage: Stage) -> tuple[np.ndarray, np.ndarray]:
    """The prompts through the text encoder `stage` was trained with (loaded once)."""
    key = _text_key(stage.config.data)
    if key not in self._encoders:
      self._encoders[key] = text_lib.encoder_from_config(stage.config.data)
    emb, mask = self._encoders[key].encode(list(prompts))
    return np.asarray(emb), np.asarray(mask)

  def _sample_fn(self, index: int, settings: dict[str, Any]):
    # The augmentation level is a per-call argument (settings["aug_logsnr"]), so stages
    # that differ only in it share one compiled sampler; calls without it get the stage
    # config's level.
    key = (index, settings["sampler"], settings["steps"], settings["thresholding"])
    if key not in self._sample_fns:
      stage = self.stages[index]
      config = ml_collections.ConfigDict(stage.config.to_dict())
      config.diffusion.sampler.method = settings["sampler"]
      config.diffusion.sampler.steps = settings["steps"]
      config.diffusion.thresholding = settings["thresholding"]
      self._sample_fns[key] = sampling.make_sample_fn(config, stage.graphdef, stage.rest)
    return self._sample_fns[key]

  # -- generation ------------------------------------------------------------------------

  def generate(self, prompts: Sequence[str], seed: int = 0, *,
               settings: Sequence[StageSettings | None] | None = None,
               num_stages: int | None = None, batch_size: int = 8, start_index: int = 0,
               out_dir: str | None = None, grid_size: int = 64,
               progress: bool = True) -> CascadeOutput:
    """Samples every prompt through the first `num_stages` stages (default: all).

    settings: one StageSettings (or None) per stage. batch_size (capped at the number of
    prompts) is rounded up to a multiple of the device count. With out_dir, writes per stage `stage{k}_{R}px/NNNNN.png`
    and a captioned `grid_{R}px.png` of the first grid_size images, plus `settings.json`
    (prompts, seed, per-stage settings and sources) from which any image can be regenerated.
    """
    prompts = [str(p) for p in prompts]
    if not prompts:
      raise CascadeError("No prompts to sample.")
    stages = self.stages[:num_stages or len(self.stages)]
    overrides = list(settings or [])
    overrides += [None] * (len(stages) - len(overrides))
    per_stage = [s.settings(o) for s, o in zip(stages, overrides)]
    n_dev = self.mesh.size
    n = len(prompts)
    # No bigger than the prompts need (padding rows cost a full sample each).
    batch = max(n_dev, math.ceil(min(batch_size, n) / n_dev) * n_dev)
    batch_sharding = sharding_lib.batch_sharding(self.mesh)
    n_batches = math.ceil(n / batch)

    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=len(stages) * n_batches, disable=not progress, unit="batch",
               desc="cascade")
    images: list[np.ndarray] = []
    seconds: list[float] = []
    lowres = None
    for k, (stage, st) in enumerate(zip(stages, per_stage)):
      bar.set_postfix_str(f"stage {k} ({stage.resolution}px)")
      began = time.perf_counter()
      emb, mask = self.encode(prompts, stage)
      fn = self._sample_fn(k, st)
      stage_key = jax.random.fold_in(jax.random.key(seed), k)
      keys = jax.vmap(lambda i, sk=stage_key: jax.random.fold_in(sk, i))(
          jnp.arange(start_index, start_index + n))
      out = []
      for b in range(n_batches):
        rows = np.arange(b * batch, min(n, (b + 1) * batch))
        pad = np.concatenate([rows, np.full(batch - len(rows), rows[-1])])
        put = lambda x: jax.device_put(x, batch_sharding)  # noqa: E731
        low = None if lowres is None else put(lowres[pad])
        x = fn(stage.params, put(emb[pad]), put(mask[pad]), put(keys[pad]), lowres=low,
               guidance_scale=st["guidance"], aug_logsnr=st.get("aug_logsnr"))
        out.append(np.asarray(jax.device_get(x))[:len(rows)])
        bar.update(1)
      x = np.clip(np.concatenate(out, 0), -1.0, 1.0)
      seconds.append(time.perf_counter() - began)
      images.append(images_lib.to_uint8(x))
      lowres = x
    bar.close()

    record = {
        "prompts": prompts, "seed": int(seed), "start_index": int(start_index),
        "batch_size": batch, "devices": n_dev, "backend": jax.default_backend(),
        "jax": jax.__version__,
        "keys": "image i of stage k: fold_in(fold_in(key(seed), k), start_index + i)",
        "stages": [dict(source=s.source, step=s.step, weights=s.weights, kind=s.config.kind,
                        resolution=s.resolution, low_resolution=s.low_resolution,
                        text_encoder=s.config.data.text_encoder, **st)
                   for s, st in zip(stages, per_stage)],
        "seconds": seconds,
    }
    result = CascadeOutput(prompts=prompts, images=images, settings=record, seconds=seconds)
    if out_dir is not None and jax.process_index() == 0:
      save_outputs(result, out_dir, grid_size=grid_size)
    return result


def save_outputs(result: CascadeOutput, out_dir: str, *, grid_size: int = 64) -> None:
  """PNG per image and stage, a captioned grid of the first grid_size images per stage,
  settings.json (written atomically)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  for k, imgs in enumerate(result.images):
    res = imgs.shape[1]
    sub = os.path.join(out_dir, f"stage{k}_{res}px")
    os.makedirs(sub, exist_ok=True)
    start = result.settings["start_index"]
    for i, img in enumerate(imgs):
      Image.fromarray(img).save(os.path.join(sub, f"{start + i:05d}.png"))
    # Tiles of at least 64 px (nearest-neighbour), so a 16 or 32 px stage stays readable
    # beside its captions; the PNGs per image keep their own size.
    upscale = max(1, 64 // res)
    grid = images_lib.caption_strip(
        images_lib.image_grid(imgs[:grid_size], pad=2, upscale=upscale),
        result.prompts[:grid_size])
    Image.fromarray(grid).save(os.path.join(out_dir, f"grid_{res}px.png"))
  tmp = os.path.join(out_dir, "settings.json.tmp")
  with open(tmp, "w") as f:
    json.dump(result.settings, f, indent=2)
  os.replace(tmp, os.path.join(out_dir, "settings.json"))
  result.out_dir = out_dir


# From a cascade config (configs/cascade.py). -------------------------------------------

def stage_settings(config: ml_collections.ConfigDict, n: int) -> list[StageSettings]:
  """The per-stage overrides of config.stage0.. (missing sections: no override)."""
  return [StageSettings.from_dict(config.get(f"stage{k}", {}) or {})
          for k in range(n)]


def cascade_from_config(config: ml_collections.ConfigDict,
                        num_stages: int | None = None) -> Cascade:
  """The Cascade of config.stages (the first num_stages of them)."""
  paths = list(config.stages)[:num_stages or len(config.stages)]
  if not paths:
    raise CascadeError("config.stages is empty. Fix: pass the stages' workdirs, base first, "
                       "e.g. --config.stages=\"('runs/base64', 'runs/sr256')\".")
  mesh = sharding_lib.mesh_from_config(config.mesh)
  return Cascade.from_workdirs(paths, weights=config.weights, mesh=mesh)


def read_prompts(sample_cfg: Any) -> list[str]:
  """sample.prompts_file (one prompt per line, blank lines skipped) or sample.prompts."""
  path = sample_cfg.get("prompts_file", "")
  if path:
    if not os.path.isfile(path):
      raise CascadeError(f"Prompts file {path} does not exist. Fix: pass --prompts_file "
                         "with one prompt per line, or --prompt=TEXT (repeatable).")
    with open(path, encoding="utf-8") as f:
      prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
      raise CascadeError(f"Prompts file {path} holds no prompts (one per line).")
    return prompts
  prompts = [str(p) for p in sample_cfg.prompts]
  if not prompts:
    raise CascadeError("No prompts. Fix: pass --prompt=TEXT (repeatable) or "
                       "--prompts_file=FILE.")
  return prompts
