r"""Imagen super-resolution stage 2: 256x256 -> 1024x1024, an Efficient U-Net.

  python launch.py --config=configs/sr1024.py:emoji --workdir=/tmp/sr1024 --mode=train

Trained on crops (Imagen: 256x256 crops of the 1024 image with the matching 64x64 crops
of the 256 one) and sampled on whole images: the network is fully convolutional and has
no self-attention, only text cross-attention at its lowest level.

Variants (after the colon):
  emoji  small CPU demo on emoji captions, MiniLM text (384-d): 256 -> 1024 on 64x64
         crops (16x16 low-res crops); 11,372,867 params
  demo   what `make demo` trains on a CPU for a couple of minutes: 256 -> 1024 on 64x64
         crops of a small emoji subset (48 drawings per style and split), a narrow
         network (8 channels); it samples whole 1024x1024 images in 4 steps
  smoke  seconds-long forward/backward on CPU for tests: 8 -> 32, 127,715 params
  400m   paper scale, T5-XXL text (4096-d): 362,448,131 params (-9.4%)

400m has the block counts and multipliers of NVIDIA JAX-Toolbox's
`imagen_sr2_efficientunet_600M.gin`: res blocks (2,4,8,8,8), multipliers (1,2,4,6,6),
strides (2,2,2,2,1), cond 1024, text cross-attention at the lowest level (1/16 of the
resolution, 64x64 at 1024), no self-attention. Rosetta runs them at 128 channels, and
that network is the 600M its file name says (585M here), not the paper's 400M; so the
width is 96 instead, the widest multiple of 32 that lands within 10% of 400M (112 gives
+12%, and its 672-wide bottom does not split into 64-d heads). The counts above are
asserted by tests/models/test_efficient_unet.py.
"""

from __future__ import annotations

import ml_collections

from configs import common

VARIANTS = ("emoji", "demo", "smoke", "400m")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "emoji"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/sr1024.py; choose one of {VARIANTS}.")

  c = common.stage_config(
      "sr", variant,
      # The fields of imagen_jax.models.efficient_unet.EfficientUNetConfig (plus `name`);
      # configs/sr256.py explains levels, strides and skip_scaling.
      model=dict(
          name="efficient_unet", in_channels=3, out_channels=3,
          channels=32, channel_mult=(1, 2, 4, 6), num_res_blocks=(1, 2, 4, 4),
          cross_attn_levels=(3,), self_attn_levels=(),
          text_dim=384, cond_dim=256, head_dim=32, dropout=0.1,
          dtype="float32", remat=False, attention_impl=None,
          strides=(), skip_scaling="sum"),
      data=dict(low_resolution=256, resolution=1024, crop=64, text_encoder="minilm",
                max_text_len=64))

  if variant == "smoke":
    common.smoke(c)
    c.model.update(channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2),
                   cross_attn_levels=(1,), self_attn_levels=(), text_dim=32, cond_dim=32,
                   head_dim=16, dropout=0.0)
    c.data.update(low_resolution=8, resolution=32, crop=None)
  elif variant == "demo":
    common.cpu_demo(c)
    c.model.update(channels=8, num_res_blocks=(1, 1, 2, 2), dropout=0.0)
    c.data.update(limit=48)
    c.train.update(time_limit_s=60)
    c.log.update(sample_every=0)
    c.diffusion.sampler.update(steps=4)
  elif variant == "400m":
    c.model.update(channels=96, channel_mult=(1, 2, 4, 6, 6), num_res_blocks=(2, 4, 8, 8, 8),
                   strides=(2, 2, 2, 2, 1), cross_attn_levels=(4,), self_attn_levels=(),
                   text_dim=4096, cond_dim=1024, head_dim=64, dtype="bfloat16", remat=True)
    common.paper_text(c)
    c.data.update(crop=256)
  return c
