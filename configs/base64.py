r"""Imagen base model: text -> 64x64 pixels, the first stage of the cascade.

  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=train

Variants (after the colon):
  emoji  small research config on emoji captions, MiniLM text (384-d): 64x64, 11,409,219 params
  demo   what `make demo` trains on a CPU for a few minutes: the emoji data at 64x64 with
         a narrow network (32 channels, one res block per level, attention at 8x8)
  study  the noise-schedule study's CPU recipe (experiments/emoji_schedules.py:cpu): the
         demo network on the emoji data at 32x32, batch 32, checkpoints kept for
         --mode=eval to follow FID over training
  smoke  seconds-long forward/backward on CPU for tests: 16x16, 798,115 params
  500m   paper scale, T5-XXL text (4096-d): 548,759,555 params (+9.8%)
  2b     paper scale, T5-XXL text (4096-d): 2,155,545,603 params (+7.8%)

The paper-scale shapes are NVIDIA JAX-Toolbox's Imagen base configs
(`imagen_base_{500M,2B}.gin`): 256 / 512 channels, multipliers (1,2,3,4), 3 res blocks
per level, attention at 32/16/8, conditioning width 4 x channels, and the T5 tokens
projected once to 512 / 2048 (`text_proj_dim`, Rosetta's attn_cond_dim) for every
attention layer to read. Our attention layers use all of a level's channels as heads of
64 (Rosetta: 8 heads of 64), which puts both above Rosetta's counts but within 10% of the
nominal sizes. With per-layer projections from 4096-d (text_proj_dim=0) the same shapes
give 2.29B / 670M. The counts above are asserted by tests/models/test_unet.py.
"""

from __future__ import annotations

import ml_collections

VARIANTS = ("emoji", "demo", "study", "smoke", "500m", "2b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "emoji"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/base64.py; choose one of {VARIANTS}.")

  c = ml_collections.ConfigDict()
  c.kind = "base"
  c.variant = variant

  # The fields of imagen_jax.models.unet.UNetConfig (plus `name`, the network to build).
  c.model = dict(
      name="unet", image_size=64, in_channels=3, out_channels=3,
      channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8),
      text_dim=384, cond_dim=None, head_dim=64, dropout=0.1,
      dtype="float32", remat=False, attention_impl=None,
      # text_proj_dim 0: each attention layer projects the encoder's tokens itself; > 0:
      # one shared LayerNorm + Dense to this width, read by every layer (Rosetta's).
      # resample "conv": strided conv down, nearest + conv up; "shuffle": Rosetta's
      # pixel-shuffle resampling ResBlocks.
      text_proj_dim=0, resample="conv")

  c.diffusion = dict(schedule="cosine", target="eps", weighting="eps")

  # text_dim above must match the encoder's width (MiniLM 384, T5-XXL 4096).
  c.data = dict(resolution=64, text_encoder="minilm", max_text_len=64)

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

  # --mode=eval (imagen_jax/eval/stage_eval_job.py): the run's checkpoints at `steps`
  # (() = every one kept), each sampled on num_images held-out captions (same captions and
  # noise at every step: seed) at `guidance` and scored by FID (bootstrap interval over
  # `bootstrap` resamples), KID (kid_subsets subsets of kid_subset_size) and the offline
  # alignment score (or CLIP score with `clip` weights) against reference_limit (0 = all)
  # held-out images; `prompts` are sampled from grid_seed into a grid per step.
  c.eval = dict(steps=(), num_images=500, seed=1234, guidance=3.0, weights="ema",
                batch_size=64, reference_limit=0, bootstrap=200, kid_subsets=100,
                kid_subset_size=1000, clip="", inception="", cache_dir="", grid_size=64,
                grid_seed=0,
                prompts=("grinning face, twemoji style", "smiling face with heart-eyes, "
                         "openmoji style", "red heart, twemoji style", "red apple, openmoji "
                         "style", "banana, twemoji style", "flag: japan, twemoji style",
                         "rocket, twemoji style", "cat face, openmoji style"),
                alignment=dict(train_limit=0, dim=256, steps=1500, batch_size=512, lr=1e-3,
                               weight_decay=1e-4, candidates=100, seed=0))

  if variant == "smoke":
    # Seconds on CPU: a few dozen steps, checkpoints and sample grids included.
    c.train.update(batch_size=8, steps=40)
    c.optim.update(lr=1e-3, warmup_steps=5, ema_decays=(0.9,))
    c.ckpt.update(every=10)
    c.log.update(every=5, sample_every=20)
    c.diffusion.sampler.update(steps=4)
    c.model.update(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(16, 8), text_dim=32, head_dim=16, dropout=0.0)
    c.data.update(resolution=16, max_text_len=8,
                  text_encoder="random-t5:tiny", limit=4)
  elif variant == "demo":
    c.model.update(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                   attn_resolutions=(8,), dropout=0.0)
    c.train.update(batch_size=16, time_limit_s=150)
    c.optim.update(lr=1e-3, warmup_steps=20, ema_decays=(0.99,))
    # v-prediction: a few CPU minutes leave eps errors that x0 = (x_t - sigma eps) / alpha
    # multiplies by 1/alpha (33x at log-SNR -7), which turns early samples into saturated
    # noise; v keeps them bounded. The research variants keep Imagen's eps.
    c.diffusion.update(target="v", weighting="v")
    c.ckpt.update(every=25)
    c.log.update(every=5, sample_every=1000)
    c.diffusion.sampler.update(steps=16)
  elif variant == "study":
    # 32 px: on the 2-core CPU a 64 px step of this network runs at ~14 img/s, 32 px at
    # ~33 img/s, which is what lets six arms each train to recognizable emoji in the
    # study's budget (experiments/README.md).
    c.model.update(image_size=32, channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                   attn_resolutions=(8,), dropout=0.0)
    c.data.update(resolution=32)
    c.train.update(batch_size=32, steps=1000)
    c.optim.update(lr=1e-3, warmup_steps=100, ema_decays=(0.995,))
    c.ckpt.update(every=250, keep=1000, async_save=False)
    c.log.update(every=25, sample_every=500)
    c.diffusion.sampler.update(steps=20)
    c.eval.update(steps=(500, 1000), num_images=200, batch_size=100, reference_limit=0,
                  alignment=dict(train_limit=2000, dim=128, steps=600, batch_size=256,
                                 lr=1e-3, weight_decay=1e-4, candidates=100, seed=0))
  elif variant in ("500m", "2b"):
    c.model.update(text_dim=4096, attn_resolutions=(32, 16, 8), dtype="bfloat16", remat=True)
    c.data.update(text_encoder="t5:/path/to/t5-v1_1-xxl", max_text_len=128,
                  text_dtype="bfloat16")
    # Rosetta's imagen_base_{500M,2B}.gin shapes, with its shared text projection
    # (attn_cond_dim 512 / 2048); cond_dim None = 4 x channels, also Rosetta's.
    if variant == "500m":
      c.model.update(channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     text_proj_dim=512)
    else:
      c.model.update(channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     text_proj_dim=2048)
  return c
