r"""Imagen base model: text -> 64x64 pixels, the first stage of the cascade.

  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=train

Variants (after the colon):
  emoji  small research config on emoji captions, MiniLM text (384-d): 64x64, 11,409,219 params
  demo   what `make demo` trains on a CPU for a few minutes: the emoji data at 64x64 with
         a narrow network (32 channels, one res block per level, attention at 8x8)
  study  the noise-schedule study's first CPU recipe (experiments/emoji_schedules.py:cpu):
         the demo network on the emoji data at 32x32, batch 32, checkpoints kept for
         --mode=eval to follow FID over training
  study16  its faster recipe (experiments/emoji_schedules.py:cpu16): the same blocks on
         three levels at 16x16, 8000 steps of batch 8 with a cosine lr decay, text from
         the embedding cache (--mode=precompute fills it; data.embedding_cache names it)
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

from configs import common

VARIANTS = ("emoji", "demo", "study", "study16", "smoke", "500m", "2b")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  variant = arg or "emoji"
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/base64.py; choose one of {VARIANTS}.")

  c = common.stage_config(
      "base", variant,
      # The fields of imagen_jax.models.unet.UNetConfig (plus `name`, the network to build).
      model=dict(
          name="unet", image_size=64, in_channels=3, out_channels=3,
          channels=64, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8),
          text_dim=384, cond_dim=None, head_dim=64, dropout=0.1,
          dtype="float32", remat=False, attention_impl=None,
          # text_proj_dim 0: each attention layer projects the encoder's tokens itself; > 0:
          # one shared LayerNorm + Dense to this width, read by every layer (Rosetta's).
          # resample "conv": strided conv down, nearest + conv up; "shuffle": Rosetta's
          # pixel-shuffle resampling ResBlocks.
          text_proj_dim=0, resample="conv"),
      data=dict(resolution=64, text_encoder="minilm", max_text_len=64))

  # --mode=eval (imagen_jax/jobs/eval_stage.py): the run's checkpoints at `steps`
  # (() = every one kept), each sampled on num_images held-out captions (same captions and
  # noise at every step: seed) at `guidance` and scored by FID (bootstrap interval over
  # `bootstrap` resamples), KID (kid_subsets subsets of kid_subset_size) and the offline
  # alignment score (or CLIP score with `clip` weights; text_metric names the evaluator,
  # imagen_jax/eval/evaluators.py; clip_model: the CLIP the weights must be, "any" for
  # another) against reference_limit (0 = all) held-out images, resized for Inception by
  # fid_resize ("pytorch_fid" or "clean_fid", imagen_jax/eval/fid.py); `prompts` are
  # sampled from grid_seed into a grid per step.
  c.eval = dict(steps=(), num_images=500, seed=1234, guidance=3.0, weights="ema",
                batch_size=64, reference_limit=0, bootstrap=200, kid_subsets=100,
                kid_subset_size=1000, clip="", inception="", cache_dir="", grid_size=64,
                text_metric="auto", fid_resize="pytorch_fid", clip_model="ViT-L/14",
                grid_seed=0,
                prompts=common.GRID_PROMPTS,
                alignment=dict(train_limit=0, dim=256, steps=1500, batch_size=512, lr=1e-3,
                               weight_decay=1e-4, candidates=100, seed=0))

  if variant == "smoke":
    common.smoke(c)
    c.model.update(image_size=16, channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attn_resolutions=(16, 8), text_dim=32, head_dim=16, dropout=0.0)
    c.data.update(resolution=16)
  elif variant == "demo":
    common.cpu_demo(c)
    c.model.update(channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1,
                   attn_resolutions=(8,), dropout=0.0)
    c.train.update(time_limit_s=150)
    c.log.update(sample_every=1000)
    c.diffusion.sampler.update(steps=16)
  elif variant == "study":
    # 32 px: on the 2-core CPU a 64 px step of this network runs at ~14 img/s, 32 px at
    # 33-57 img/s (Intel Xeon / AMD EPYC), which is what lets six arms each train 1250
    # steps, two at a time, in about two hours (experiments/README.md).
    _cpu_study(c, resolution=32, channel_mult=(1, 2, 2, 2), batch_size=32, steps=1250,
               ckpt_every=250, log_every=25, eval_steps=(250, 750, 1250))
  elif variant == "study16":
    # What a :study step cost on the 2-core CPU: ~0.45 s encoding the batch's captions
    # with MiniLM (the cache removes it) and ~1.1 s the 32 px step. At 16 px and batch 8 a
    # step takes ~0.14 s (benchmarks/results/train_loop.md), so an arm trains 8000 steps
    # in about 20 minutes alone and six arms, two at a time, fit one ~2 h sitting. At a
    # constant lr the v arm's grid showed round faces by step 10000, not yet at 5000
    # (experiments/results/emoji16_v_probe); the cosine decay to a tenth spends the last
    # steps at small steps, where a short run gains most.
    _cpu_study(c, resolution=16, channel_mult=(1, 2, 2), batch_size=8, steps=8000,
               ckpt_every=1000, log_every=50, eval_steps=(2000, 4000, 8000))
    c.optim.update(schedule="cosine", end_lr_frac=0.1)
  elif variant in ("500m", "2b"):
    c.model.update(text_dim=4096, attn_resolutions=(32, 16, 8), dtype="bfloat16", remat=True)
    common.paper_text(c)
    # Rosetta's imagen_base_{500M,2B}.gin shapes, with its shared text projection
    # (attn_cond_dim 512 / 2048); cond_dim None = 4 x channels, also Rosetta's.
    if variant == "500m":
      c.model.update(channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     text_proj_dim=512)
    else:
      c.model.update(channels=512, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     text_proj_dim=2048)
  return c


def _cpu_study(c: ml_collections.ConfigDict, *, resolution: int,
               channel_mult: tuple[int, ...], batch_size: int, steps: int, ckpt_every: int,
               log_every: int, eval_steps: tuple[int, ...]) -> None:
  """The noise-schedule study's CPU recipes: the demo network's blocks (32 channels, one
  res block per level, attention at 8 px) at `resolution`, checkpoints kept for
  --mode=eval, which scores `eval_steps` on 200 held-out captions and draws the grids (so
  training does not sample)."""
  c.model.update(image_size=resolution, channels=32, channel_mult=channel_mult,
                 num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
  c.data.update(resolution=resolution)
  c.train.update(batch_size=batch_size, steps=steps)
  c.optim.update(lr=1e-3, warmup_steps=100, ema_decays=(0.995,))
  c.ckpt.update(every=ckpt_every, keep=1000, async_save=False)
  c.log.update(every=log_every, sample_every=0)
  c.diffusion.sampler.update(steps=20)
  c.eval.update(steps=eval_steps, num_images=200, batch_size=100, reference_limit=0,
                alignment=dict(train_limit=2000, dim=128, steps=600, batch_size=256,
                               lr=1e-3, weight_decay=1e-4, candidates=100, seed=0))
