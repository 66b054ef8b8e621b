"""Optimizers and learning-rate schedules from a config's `optim` section.

  make_optimizer(optim_cfg, total_steps) -> optax.GradientTransformation
  learning_rate(optim_cfg, total_steps)  -> optax.Schedule (count of applied updates -> lr)

The chain is: global-norm clipping (`grad_clip`, 0 = off) -> the optimizer, whose step
size follows `learning_rate`. Optimizers (`name`):

  adamw      Adam with decoupled weight decay (b1, b2, eps, weight_decay); decay is
             masked off 1-D parameters (norm scales and biases), the usual choice:
             pulling a norm's gain or a bias towards 0 is not a useful prior.
  adam       plain Adam (b1, b2, eps); weight_decay is ignored.
  adafactor  optax.adafactor with our schedule and its own defaults: factored second
             moments for dims >= 128, decay_rate 0.8, update clipping at RMS 1.0, updates
             scaled by the parameter RMS (multiply_by_parameter_scale), no momentum,
             eps 1e-30; weight_decay (if > 0) as its weight_decay_rate, masked as adamw.

Schedules (`schedule`), both with a linear warmup over `warmup_steps`:
  constant   lr * min(1, (n + 1) / warmup_steps)
  cosine     the warmup, then lr -> lr * end_lr_frac along a half cosine over
             `decay_steps` updates (0: the rest of training, total_steps - warmup_steps),
             then flat at lr * end_lr_frac.
The warmup starts at lr / warmup_steps rather than 0, so no update is wasted at lr 0.
`n` counts applied updates (optax's count), which the trainer's skipped steps do not
advance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

from imagen_jax import config_schema

OPTIMIZERS = ("adamw", "adam", "adafactor")
SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """config.optim (defaults: configs/common.py; meanings: the module doc). ema_decays: the
  decays of the EMA copies of the parameters the trainer keeps (the slowest is sampled)."""

  name: str
  lr: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  schedule: str
  warmup_steps: int
  decay_steps: int
  end_lr_frac: float
  grad_clip: float
  ema_decays: tuple[float, ...]

  def check(self, c: config_schema.Checker) -> None:
    c.one_of("name", OPTIMIZERS)
    c.one_of("schedule", SCHEDULES)
    c.number("lr", low=0.0, strict=True)
    for name in ("b1", "b2"):
      c.number(name, low=0.0, high=1.0)
    c.number("eps", low=0.0)
    for name in ("warmup_steps", "decay_steps"):
      c.integer(name, minimum=0)
    for name in ("weight_decay", "grad_clip", "end_lr_frac"):
      c.number(name, low=0.0)
    decays = self.ema_decays
    if not (isinstance(decays, (tuple, list)) and
            all(config_schema.is_number(d) and 0 < d < 1 for d in decays)):
      raise c.error("ema_decays", "each EMA decay must lie in (0, 1)",
                    fix=f"pass e.g. {c.flag('ema_decays')}='(0.9999,)'")


def _get(cfg: Mapping[str, Any], key: str, default: Any = None) -> Any:
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def learning_rate(optim_cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """The step size as a function of the number of applied updates (see module doc)."""
  lr = float(_get(optim_cfg, "lr"))
  kind = _get(optim_cfg, "schedule", "constant")
  warmup = int(_get(optim_cfg, "warmup_steps", 0))
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r}: unknown schedule; choose one of {SCHEDULES}.")
  if warmup < 0:
    raise ValueError(f"optim.warmup_steps={warmup} must be >= 0.")
  decay = int(_get(optim_cfg, "decay_steps", 0)) or max(int(total_steps) - warmup, 1)
  end = float(_get(optim_cfg, "end_lr_frac", 0.0))

  def schedule(count):
    n = jnp.asarray(count, jnp.float32)
    scale = jnp.minimum(1.0, (n + 1.0) / warmup) if warmup else jnp.float32(1.0)
    if kind == "cosine":
      frac = jnp.clip((n - warmup) / decay, 0.0, 1.0)
      scale = scale * (end + (1.0 - end) * 0.5 * (1.0 + jnp.cos(math.pi * frac)))
    return lr * scale

  return schedule


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: every array with more than one dim."""
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(optim_cfg: Mapping[str, Any], total_steps: int) -> optax.GradientTransformation:
  """Clipping, then `optim_cfg.name` with the `learning_rate` schedule (see module doc)."""
  name = _get(optim_cfg, "name")
  schedule = learning_rate(optim_cfg, total_steps)
  wd = float(_get(optim_cfg, "weight_decay", 0.0))
  b1, b2, eps = (float(_get(optim_cfg, k, d)) for k, d in (("b1", 0.9), ("b2", 0.999),
                                                              ("eps", 1e-8)))
  if name == "adamw":
    opt = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
  elif name == "adam":
    opt = optax.adam(schedule, b1=b1, b2=b2, eps=eps)
  elif name == "adafactor":
    opt = optax.adafactor(schedule, weight_decay_rate=wd or None,
                          weight_decay_mask=decay_mask if wd else None)
  else:
    raise ValueError(f"optim.name={name!r}: unknown optimizer; choose one of {OPTIMIZERS}.")
  clip = float(_get(optim_cfg, "grad_clip", 0.0))
  if clip < 0:
    raise ValueError(f"optim.grad_clip={clip} must be >= 0 (0 turns clipping off).")
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt
