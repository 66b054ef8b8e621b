r"""Imagen super-resolution stage 1: 64x64 -> 256x256, an Efficient U-Net.

  python launch.py --config=configs/sr256.py:emoji --workdir=/tmp/sr256 --mode=train

Variants (after the colon):
  emoji  small research config on emoji captions, MiniLM text (384-d): 64 -> 256, trained on
         64x64 crops with the matching 16x16 low-res crops; 16,391,171 params
  demo   what `make demo` trains on a CPU for a few minutes: emoji 64 -> 256 on 64x64 crops,
         a narrow network (16 channels); its sample grid runs at the full 256x256
  smoke  seconds-long forward/backward on CPU for tests: 8 -> 32, 131,811 params
  600m   paper scale, T5-XXL text (4096-d): 629,448,195 params (+4.9%)

600m follows NVIDIA JAX-Toolbox's `imagen_sr1_efficientunet_600M.gin`: 128 channels,
multipliers (1,2,4,8,8), res blocks (2,4,8,8,2), cond 512, strides (2,2,2,2,1) (four
DBlocks halve the resolution; the last level stays at 1/16), attention (self + text) at
the two lowest levels, both at 1/16 of the resolution (16x16 at 256). Residual shortcuts
are 1x1 convs only where the width changes (skip_scaling "sum"), so the count differs
slightly from Rosetta's. The counts above are asserted by tests/models/test_efficient_unet.py.
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("emoji", "demo", "smoke", "600m")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "emoji"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/sr256.py; choose one of {VARIANTS}.")

  c = common.stage_config(
      "sr", variant,
      # The fields of imagen_jax.models.efficient_unet.EfficientUNetConfig (plus `name`).
      # Levels count from full resolution; level i runs at 1/2^i of it.
      model=dict(
          name="efficient_unet", in_channels=3, out_channels=3,
          channels=32, channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 2, 4, 4),
          cross_attn_levels=(3,), self_attn_levels=(3,),
          text_dim=384, cond_dim=256, head_dim=32, dropout=0.1,
          dtype="float32", remat=False, attention_impl=None,
          # Each level strides by 2 before its blocks (so level i runs at 1/2^(i+1) of the
          # resolution) unless `strides` says otherwise; skip_scaling "sum" is (h + x) /
          # sqrt(2) in every ResBlock (imagen_jax/models/efficient_unet.py has the others).
          strides=(), skip_scaling="sum"),
      # crop: train on crop x crop windows of the high-res image and the matching
      # crop * low_resolution / resolution window of the low-res one (None: whole images).
      data=dict(low_resolution=64, resolution=256, crop=64, text_encoder="minilm",
                max_text_len=64))

  if variant == "smoke":
    common.smoke(c)
    c.model.update(channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2),
                   cross_attn_levels=(1,), self_attn_levels=(1,), text_dim=32, cond_dim=32,
                   head_dim=16, dropout=0.0)
    c.data.update(low_resolution=8, resolution=32, crop=None)
  elif variant == "demo":
    common.cpu_demo(c)
    c.model.update(channels=16, num_res_blocks=(1, 1, 2, 2), dropout=0.0)
    c.train.update(time_limit_s=120)
    c.log.update(sample_every=1000)
    c.diffusion.sampler.update(steps=8)
  elif variant == "600m":
    c.model.update(channels=128, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=(2, 4, 8, 8, 2),
                   strides=(2, 2, 2, 2, 1), cross_attn_levels=(3, 4), self_attn_levels=(3, 4),
                   text_dim=4096, cond_dim=512, head_dim=64, dtype="bfloat16", remat=True)
    common.paper_text(c)
    c.data.update(crop=None)
  return c
