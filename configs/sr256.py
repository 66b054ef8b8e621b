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

VARIANTS = ("emoji", "demo", "smoke", "600m")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "emoji"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/sr256.py; choose one of {VARIANTS}.")

  c = ml_collections.ConfigDict()
  c.kind = "sr"
  c.variant = variant

  # The fields of imagen_jax.models.efficient_unet.EfficientUNetConfig (plus `name`).
  # Levels count from full resolution; level i runs at 1/2^i of it.
  c.model = dict(
      name="efficient_unet", in_channels=3, out_channels=3,
      channels=32, channel_mult=(1, 2, 4, 8), num_res_blocks=(1, 2, 4, 4),
      cross_attn_levels=(3,), self_attn_levels=(3,),
      text_dim=384, cond_dim=256, head_dim=32, dropout=0.1,
      dtype="float32", remat=False, attention_impl=None,
      # Each level strides by 2 before its blocks (so level i runs at 1/2^(i+1) of the
      # resolution) unless `strides` says otherwise; skip_scaling "sum" is (h + x)/sqrt(2)
      # in every ResBlock (imagen_jax/models/efficient_unet.py has the other readings).
      strides=(), skip_scaling="sum")

  c.diffusion = dict(
      schedule="cosine", target="eps", weighting="eps",
      # Noise conditioning augmentation of the low-res input (Imagen sec. 2.5), on its own
      # schedule, so that changing `schedule` above leaves it bit-identical. Training
      # corrupts the input to t_aug ~ U[0, max_t] of noise_aug.schedule, one level per
      # "example" or one per "batch" (the paper's pseudo-code, imagen-pytorch), and feeds
      # the model that level's log-SNR. Sampling uses one fixed level, given as exactly one
      # of sample_t, sample_logsnr or sample_sigma (the std of the added noise: x_aug =
      # alpha x + sigma eps); to switch form, unset the other, e.g.
      # --config.diffusion.noise_aug.sample_t=None --config.diffusion.noise_aug.sample_sigma=0.5
      # (object-typed so that None parses). The default t=0.2 on cosine is log-SNR 2.2461,
      # sigma 0.3093. imagen-pytorch's default 0.2 is a time of its linear low-res schedule,
      # log-SNR 0.7093, sigma 0.5742: sample_logsnr=0.7093 here (t=0.389 of cosine).
      noise_aug=dict(
          schedule="cosine", schedule_kw={}, max_t=1.0, per="example",
          sample_t=ml_collections.FieldReference(0.2, field_type=object),
          sample_logsnr=ml_collections.FieldReference(None, field_type=object),
          sample_sigma=ml_collections.FieldReference(None, field_type=object)),
  )

  # text_dim above must match the encoder's width (MiniLM 384, T5-XXL 4096).
  # crop: train on crop x crop windows of the high-res image and the matching
  # crop * low_resolution / resolution window of the low-res one (None: whole images).
  c.data = dict(low_resolution=64, resolution=256, crop=64, text_encoder="minilm",
                max_text_len=64)

  # Text encoding (imagen_jax.text): text_tokenizer overrides the checkpoint's tokenizer
  # (required for t5x: specs); embedding_cache, when set, is read instead of encoding on
  # the fly, and is where --mode=precompute writes (default WORKDIR/text_cache);
  # precompute encodes the dataset's captions, or captions_file's (one per line) if set.
  c.data.update(text_tokenizer="", text_dtype="float32", text_batch_size=64,
                embedding_cache="", cache_dtype="float32", captions_file="")

  # The dataset (imagen_jax/data/datasets.py), prepared by --mode=build_data into data_dir
  # ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets) at data.resolution. limit caps drawings
  # per style in each split (0 = all); source_dir/resize are for dataset="image_text_folder".
  c.data.update(dataset="emoji_cascade", data_dir="", limit=0, source_dir="",
                resize="center_crop", train_split="train", eval_split="test", workers=0)

  # Training schedule options and the sampler of the log's sample grids (and later eval).
  c.diffusion.update(schedule_kw={}, thresholding="dynamic",
                     sampler=dict(method="dpmpp_2m", steps=25, grid="logsnr", rho=7.0))

  # Training (imagen_jax/train). batch_size is global (split over processes and the
  # mesh's data axes); text_drop_prob drops the caption for classifier-free guidance.
  c.train = dict(batch_size=32, steps=200_000, seed=0, text_drop_prob=0.1, accum_steps=1,
                 antithetic=True, max_bad_steps=20, time_limit_s=0)
  c.optim = dict(name="adamw", lr=1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 schedule="constant", warmup_steps=1000, decay_steps=0, end_lr_frac=0.0,
                 grad_clip=1.0, ema_decays=(0.9999,))
  # Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Parameters map to mesh
  # axes by imagen_jax.sharding.DEFAULT_RULES (FSDP over embed/channels, TP over heads/MLP).
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.ckpt = dict(every=1000, keep=3, keep_every=0, async_save=True)
  # Logging: scalars every `every` steps; an EMA sample grid of `prompts` every
  # sample_every steps; MFU against peak_flops per device (0: the device's own,
  # imagen_jax/runtime.py: the data sheet's dense bf16 for GPU/TPU, measured for a CPU).
  c.log = dict(every=50, sample_every=5000, guidance=3.0, peak_flops=0.0,
               prompts=("grinning face, twemoji style", "red apple, openmoji style",
                        "rocket, twemoji style", "cat face, openmoji style"))

  if variant == "smoke":
    # Seconds on CPU: a few dozen steps, checkpoints and sample grids included.
    c.train.update(batch_size=8, steps=40)
    c.optim.update(lr=1e-3, warmup_steps=5, ema_decays=(0.9,))
    c.ckpt.update(every=10)
    c.log.update(every=5, sample_every=20)
    c.diffusion.sampler.update(steps=4)
    c.model.update(channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2),
                   cross_attn_levels=(1,), self_attn_levels=(1,), text_dim=32, cond_dim=32,
                   head_dim=16, dropout=0.0)
    c.data.update(low_resolution=8, resolution=32, crop=None, max_text_len=8,
                  text_encoder="random-t5:tiny", limit=4)
  elif variant == "demo":
    c.model.update(channels=16, num_res_blocks=(1, 1, 2, 2), dropout=0.0)
    c.train.update(batch_size=16, time_limit_s=120)
    c.optim.update(lr=1e-3, warmup_steps=20, ema_decays=(0.99,))
    # v-prediction, as the base demo (configs/base64.py says why).
    c.diffusion.update(target="v", weighting="v")
    c.ckpt.update(every=25)
    c.log.update(every=5, sample_every=1000)
    c.diffusion.sampler.update(steps=8)
  elif variant == "600m":
    c.model.update(channels=128, channel_mult=(1, 2, 4, 8, 8), num_res_blocks=(2, 4, 8, 8, 2),
                   strides=(2, 2, 2, 2, 1), cross_attn_levels=(3, 4), self_attn_levels=(3, 4),
                   text_dim=4096, cond_dim=512, head_dim=64, dtype="bfloat16", remat=True)
    c.data.update(crop=None, text_encoder="t5:/path/to/t5-v1_1-xxl", max_text_len=128,
                  text_dtype="bfloat16")
  return c
