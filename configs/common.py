"""The sections every network stage's config shares (configs/base64.py, sr256.py, sr1024.py),
as big_vision's configs/common.py: each stage file holds only what differs.

  from configs import common
  c = common.stage_config("sr", variant, model=dict(...), data=dict(resolution=256, ...))

`configs` is found on sys.path from the repository root: launch.py's own folder, and
imagen_jax.config_files.load puts the root of the file it loads there.
"""

from __future__ import annotations

from typing import Any

import ml_collections

# The log's (and the stage eval's) sample prompts.
PROMPTS = ("grinning face, twemoji style", "red apple, openmoji style",
           "rocket, twemoji style", "cat face, openmoji style")
# The stage eval's fixed grid prompts (the noise-schedule study's grids, and what
# `make demo` samples from the shipped stage: configs/cascade.py:shipped).
GRID_PROMPTS = ("grinning face, twemoji style", "smiling face with heart-eyes, openmoji style",
                "red heart, twemoji style", "red apple, openmoji style",
                "banana, twemoji style", "flag: japan, twemoji style",
                "rocket, twemoji style", "cat face, openmoji style")


# Imagen's guidance-weight grid (Saharia et al. 2022, Fig. 4 and A.11): the base-stage and
# SR-stage sweeps of configs/cascade.py:imagen_sweeps use it.
IMAGEN_GUIDANCE_GRID = (1.0, 1.25, 1.5, 1.75, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0)


def noise_aug() -> dict[str, Any]:
  """SR stages: noise conditioning augmentation of the low-res input (Imagen sec. 2.5).

  On its own schedule, so that changing diffusion.schedule leaves it bit-identical.
  Training corrupts the input to t_aug ~ U[0, max_t] of noise_aug.schedule, one level per
  "example" or one per "batch" (the paper's pseudo-code, imagen-pytorch), and feeds the
  model that level's log-SNR. Sampling uses one fixed level, given as exactly one of
  sample_t, sample_logsnr or sample_sigma (the std of the added noise: x_aug = alpha x +
  sigma eps); to switch form, unset the other, e.g.
  --config.diffusion.noise_aug.sample_t=None --config.diffusion.noise_aug.sample_sigma=0.5
  (object-typed so that None parses). The default t=0.2 on cosine is log-SNR 2.2461,
  sigma 0.3093. imagen-pytorch's default 0.2 is a time of its linear low-res schedule,
  log-SNR 0.7093, sigma 0.5742: sample_logsnr=0.7093 here (t=0.389 of cosine).
  """
  return dict(
      schedule="cosine", schedule_kw={}, max_t=1.0, per="example",
      sample_t=ml_collections.FieldReference(0.2, field_type=object),
      sample_logsnr=ml_collections.FieldReference(None, field_type=object),
      sample_sigma=ml_collections.FieldReference(None, field_type=object))


def stage_config(kind: str, variant: str, *, model: dict[str, Any],
                 data: dict[str, Any]) -> ml_collections.ConfigDict:
  """A stage's config: `model` (the network's fields), `data` (resolutions, crop, text
  encoder) and the shared diffusion, data, train, optim, mesh, ckpt and log sections."""
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.variant = variant
  c.model = model
  c.diffusion = dict(schedule="cosine", target="eps", weighting="eps")
  if kind == "sr":
    c.diffusion.noise_aug = noise_aug()

  # text_dim in `model` must match the encoder's width (MiniLM 384, T5-XXL 4096).
  c.data = data
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
  # --mode=build_data of image_text_folder through Apache Beam (imagen_jax/data/settings.py):
  # beam_options are Beam's flags, e.g. "--runner=DataflowRunner --project=P --region=R
  # --temp_location=gs://B/tmp"; "" = DirectRunner here, one process per core.
  c.data.update(beam=False, beam_options="")

  # Training schedule options and the sampler of the log's sample grids (and later eval).
  # weighting_kw: the loss weighting's arguments, e.g. {'gamma': 5.0} for min_snr.
  c.diffusion.update(schedule_kw={}, weighting_kw={}, thresholding="dynamic",
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
  c.log = dict(every=50, sample_every=5000, guidance=3.0, peak_flops=0.0, prompts=PROMPTS)
  return c


def smoke(c: ml_collections.ConfigDict) -> None:
  """Seconds on CPU, for tests: a few dozen steps, checkpoints and sample grids included."""
  c.train.update(batch_size=8, steps=40)
  c.optim.update(lr=1e-3, warmup_steps=5, ema_decays=(0.9,))
  c.ckpt.update(every=10)
  c.log.update(every=5, sample_every=20)
  c.diffusion.sampler.update(steps=4)
  c.data.update(max_text_len=8, text_encoder="random-t5:tiny", limit=4)


def cpu_demo(c: ml_collections.ConfigDict) -> None:
  """What `make demo` trains for a few CPU minutes per stage: batch 16, a high learning
  rate with a short warmup and EMA, checkpoints every 25 steps, and v-prediction: a few
  CPU minutes leave eps errors that x0 = (x_t - sigma eps) / alpha multiplies by 1/alpha
  (33x at log-SNR -7), which turns early samples into saturated noise; v keeps them
  bounded. The research variants keep Imagen's eps."""
  c.train.update(batch_size=16)
  c.optim.update(lr=1e-3, warmup_steps=20, ema_decays=(0.99,))
  c.diffusion.update(target="v", weighting="v")
  c.ckpt.update(every=25)
  c.log.update(every=5)


def paper_text(c: ml_collections.ConfigDict) -> None:
  """The paper-scale variants' text: T5-XXL (4096-d) in bf16, 128 tokens."""
  c.data.update(text_encoder="t5:/path/to/t5-v1_1-xxl", max_text_len=128,
                text_dtype="bfloat16")
