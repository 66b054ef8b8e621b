"""Sampling a trained stage with guidance and thresholding: the cascade's per-stage step
and the training log's sample grids. Imports nothing of `train/`, so inference does not
load the trainer.

`make_sample_fn(config, graphdef)` returns a jitted
`fn(params, text, text_mask, rng, lowres=None, ...) -> images [N, R, R, C]` that runs
config.diffusion.sampler with classifier-free guidance at config.log.guidance and
config.diffusion.thresholding. Guidance follows `guidance.cfg_denoise_fn`:
w * cond + (1 - w) * uncond, so w = 1 is the conditional model and w = 0 the
unconditional one; either takes one network pass per step, any other w one pass on a
doubled batch (the unconditional half is the same text with an all-False mask, which the
networks read as "no text").

An SR stage (config.kind == "sr") is conditioned on `lowres` noise-augmented to one fixed
level: config.diffusion.noise_aug's sampling level (sample_t, sample_logsnr or
sample_sigma on the augmentation's own schedule, resolved by `guidance.NoiseAug`), or a
log-SNR given per call. It samples at the full config.data.resolution even when it
trained on crops: the Efficient U-Net is fully convolutional.

`rng` is one PRNG key, or a batch of keys [N] (one per image): then image i's starting
noise and low-res augmentation noise come from key i alone, so with a deterministic
sampler (dpmpp_*, ddim eta=0, heun without churn) an image does not depend on which other
prompts share its batch (the cascade relies on this to make every image regenerable).
Stochastic sampler steps draw from the first key's stream for the whole batch.

The images are the sampler's final x0_hat: within [-1, 1] when thresholding is on; with
thresholding "none" they may overshoot, and `images.image_grid` clips them for display.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from imagen_jax.diffusion import guidance, objectives, samplers, schedules
from imagen_jax.models import build_model

Array = jax.Array
SampleFn = Callable[..., Array]


def sampler_kwargs(sampler_cfg: Any) -> dict[str, Any]:
  """`samplers.sample` keyword arguments from a diffusion.sampler section."""
  method = sampler_cfg["method"]
  kw = dict(method=method, steps=int(sampler_cfg["steps"]), grid=sampler_cfg["grid"],
            rho=float(sampler_cfg["rho"]))
  # Method options (eta, s_churn, ...) are optional keys of the same section.
  kw.update({k: sampler_cfg[k] for k in samplers.METHOD_KWARGS.get(method, ())
             if k in sampler_cfg})
  return kw




def _placeholder_rest(config: ml_collections.ConfigDict) -> nnx.State:
  """Non-parameter state (dropout RNG keys and counts) of a fresh model.

  `nnx.merge` needs every variable of the graphdef, but an EMA copy holds only params;
  sampling runs in eval mode, where these values are never read. Built under jit, so
  XLA drops the unused parameter initialisers and no full model is materialised.
  """
  def rest():
    model = build_model(config.model, nnx.Rngs(0))
    return nnx.state(model, nnx.Not(nnx.Param))

  return jax.jit(rest)()


def _resolution(config: ml_collections.ConfigDict) -> int:
  # Not data.crop: a stage trained on crops still samples whole images.
  return int(config.data.resolution)


def make_sample_fn(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                   rest: Any = None, *, guidance_scale: float | None = None) -> SampleFn:
  """`fn(params, text, text_mask, rng, lowres=None, rest=None, guidance_scale=None,
  aug_logsnr=None)`.

  Args:
    config: a stage config (sections kind, model, diffusion, data, log).
    graphdef: from `nnx.split(model, nnx.Param, ...)`.
    rest: the non-param state(s) of that split (a State or a tuple of States), used when
      a call passes none; None builds placeholders (unused in eval mode).
    guidance_scale: the default guidance weight instead of config.log.guidance.

  The returned function takes params (an nnx.State of nnx.Param, e.g. an EMA copy),
  text [N, L, D], text_mask [N, L] bool, a PRNG key and, for an SR stage, lowres
  [N, r, r, C] in [-1, 1]; it returns float32 images [N, R, R, C]. `guidance_scale`
  overrides the weight per call: a Python 0 or 1 takes a single-pass program, any other
  weight (or an array) the doubled-batch one, which is compiled once for all weights, so
  a guidance sweep does not recompile. `aug_logsnr` (SR stages) overrides the low-res
  input's augmentation level, as a log-SNR (`guidance.aug_level` converts a t or sigma);
  it is a traced argument too, so an augmentation sweep does not recompile either.
  """
  is_sr = config.kind == "sr"
  dc = config.diffusion
  schedule = schedules.from_config(dc)
  kw = sampler_kwargs(dc.sampler)
  target = dc.target
  default_scale = float(config.log.guidance if guidance_scale is None else guidance_scale)
  threshold = dc.get("thresholding", "dynamic")
  percentile = float(dc.get("threshold_percentile", 99.5))
  # Resolved once, on the host: a config with no valid level fails here, not in a trace.
  default_aug = guidance.NoiseAug.from_config(dc).sample_level().logsnr if is_sr else 0.0
  res = _resolution(config)
  channels = int(config.model.get("in_channels", 3))
  default_rest = [rest]

  @functools.partial(jax.jit, static_argnames="branches")
  def sample(params, text, text_mask, rng, lowres, rest_state, scale, aug_logsnr, branches):
    states = rest_state if isinstance(rest_state, (tuple, list)) else (rest_state,)
    model = nnx.merge(graphdef, params, *states)
    model.eval()  # dropout off
    n = text.shape[0]
    text_mask = jnp.asarray(text_mask, bool)
    shape = (n, res, res, channels)
    x_init = None
    if rng.ndim == 1:  # one key per image (see the module docstring)
      keys = jax.vmap(lambda k: jax.random.split(k, 3))(rng)
      x_init = jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys[:, 0])
      aug_noise = (jax.vmap(lambda k: jax.random.normal(k, lowres.shape[1:], jnp.float32))(
          keys[:, 1]) if is_sr else None)
      rng = keys[0, 2]
    else:
      rng, aug_key = jax.random.split(rng)
      aug_noise = (jax.random.normal(aug_key, lowres.shape, jnp.float32) if is_sr else None)
    extra = ()
    if is_sr:
      aug_logsnr = jnp.broadcast_to(aug_logsnr, (n,))
      extra = (objectives.diffuse(lowres.astype(jnp.float32), aug_noise, aug_logsnr),
               aug_logsnr)

    if branches != "both":
      # One pass: the conditional model (w = 1) or the unconditional one (w = 0).
      mask = text_mask if branches == "cond" else jnp.zeros_like(text_mask)
      denoise = objectives.denoiser(
          lambda x_t, logsnr: model(x_t, logsnr, text, mask, *extra), target)
    else:
      # Both branches in one network call on a doubled batch.
      text2 = jnp.concatenate([text, text], 0)
      mask2 = jnp.concatenate([text_mask, jnp.zeros_like(text_mask)], 0)
      extra2 = tuple(jnp.concatenate([e, e], 0) for e in extra)

      def pred_fn(x_t, logsnr):
        both = model(jnp.concatenate([x_t, x_t], 0), jnp.concatenate([logsnr, logsnr], 0),
                     text2, mask2, *extra2)
        return both[:n], both[n:]

      denoise = guidance.cfg_denoise_fn(pred_fn, scale=scale, target=target)

    denoise = guidance.thresholded(denoise, threshold, percentile)
    out = samplers.sample(denoise, schedule, rng, shape, x_init=x_init, **kw)
    return out.x.astype(jnp.float32)

  def fn(params, text: Array, text_mask: Array, rng: Array, lowres: Array | None = None,
         rest: Any = None, guidance_scale: float | Array | None = None,
         aug_logsnr: float | Array | None = None) -> Array:
    if is_sr and lowres is None:
      raise ValueError("an SR stage (config.kind='sr') samples from `lowres` images; "
                       "got lowres=None.")
    if rest is None:
      if default_rest[0] is None:
        default_rest[0] = _placeholder_rest(config)
      rest = default_rest[0]
    scale = default_scale if guidance_scale is None else guidance_scale
    branches = {0.0: "uncond", 1.0: "cond"}.get(scale, "both") \
        if isinstance(scale, (int, float)) else "both"
    aug = default_aug if aug_logsnr is None or not is_sr else aug_logsnr
    return sample(params, text, text_mask, rng, lowres if is_sr else None, rest,
                  jnp.float32(scale), jnp.float32(aug), branches)

  return fn
