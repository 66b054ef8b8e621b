"""The cascade's denoising networks, built from a config's `model` section.

`build_model(model_cfg, rngs)` picks the network by `model_cfg.name`:
  "unet"            the Imagen base U-Net (64x64), `unet.py`
  "efficient_unet"  the Efficient U-Net of the super-resolution stages, `efficient_unet.py`

`example_inputs(model_cfg, batch, resolution, text_len)` makes the arguments of a call,
so benchmarks and tests can drive either network the same way.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

NAMES = ("unet", "efficient_unet")


def _split(model_cfg: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  cfg = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
  name = cfg.pop("name", None)
  if name not in NAMES:
    raise ValueError(f"model.name={name!r}: unknown network; choose one of {NAMES}.")
  return name, cfg


def _classes(name: str):
  if name == "unet":
    from imagen_jax.models.unet import UNet, UNetConfig
    return UNet, UNetConfig
  from imagen_jax.models.efficient_unet import EfficientUNet, EfficientUNetConfig
  return EfficientUNet, EfficientUNetConfig


def config_from_dict(model_cfg: Mapping[str, Any]):
  """The network's config dataclass; raises ValueError naming any unknown key."""
  name, cfg = _split(model_cfg)
  return _classes(name)[1].from_dict(cfg)


def build_model(model_cfg: Mapping[str, Any], rngs: nnx.Rngs) -> nnx.Module:
  """The network named by `model_cfg["name"]`, configured by the other keys."""
  name, _ = _split(model_cfg)
  return _classes(name)[0](config_from_dict(model_cfg), rngs=rngs)


def example_inputs(model_cfg: Mapping[str, Any], batch: int, resolution: int,
                   text_len: int = 16, lowres: int | None = None,
                   rng: jax.Array | None = None) -> tuple[jax.Array, ...]:
  """Random call arguments: (x, logsnr, text, text_mask[, lowres, aug_logsnr]).

  `lowres` is the low-resolution input size of an SR network (default resolution // 4).
  """
  name, cfg = _split(model_cfg)
  ks = jax.random.split(jax.random.PRNGKey(0) if rng is None else rng, 4)
  c = cfg.get("in_channels", 3)
  x = jax.random.normal(ks[0], (batch, resolution, resolution, c))
  logsnr = jax.random.uniform(ks[1], (batch,), minval=-10.0, maxval=10.0)
  text = jax.random.normal(ks[2], (batch, text_len, cfg["text_dim"]))
  mask = jnp.arange(text_len)[None] < jnp.maximum(text_len // 2, 1)
  mask = jnp.broadcast_to(mask, (batch, text_len))
  if name == "unet":
    return x, logsnr, text, mask
  lo = lowres or resolution // 4
  low = jax.random.uniform(ks[3], (batch, lo, lo, c), minval=-1.0, maxval=1.0)
  return x, logsnr, text, mask, low, jnp.zeros((batch,))


def count_params(model_or_state: Any) -> int:
  """Number of parameters (works on abstract states from `nnx.eval_shape` too)."""
  state = nnx.state(model_or_state, nnx.Param) if isinstance(model_or_state, nnx.Module) \
      else model_or_state
  return sum(int(x.size) for x in jax.tree.leaves(state))
