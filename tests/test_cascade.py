"""The cascade end to end on three chained smoke stages (16 -> 32 -> 64 px, random weights):
shapes, saved files, same seed same pixels, per-image regeneration, per-stage overrides,
chain checks, and launch.py --mode=sample."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import stage_testing
from imagen_jax import cascade as cascade_lib
from imagen_jax import config_files
from imagen_jax.diffusion import guidance, schedules
from imagen_jax import sampling as samples

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["grinning face", "red apple", "rocket", "cat face", "a dog"]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
  return stage_testing.smoke_stages(str(tmp_path_factory.mktemp("stages")))


@pytest.fixture(scope="module")
def cascade(stages):
  return cascade_lib.Cascade.from_workdirs(stages)


@pytest.fixture(scope="module")
def first(cascade, tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("out"))
  return cascade.generate(PROMPTS, seed=3, batch_size=8, out_dir=out_dir, progress=False)


def test_every_stage_at_its_resolution(first, cascade):
  assert [s.resolution for s in cascade.stages] == [16, 32, 64]
  assert [im.shape for im in first.images] == [(5, r, r, 3) for r in (16, 32, 64)]
  assert all(im.dtype == np.uint8 for im in first.images)
  # Random weights, but still a function of the prompt: no two images alike.
  last = first.images[-1].astype(np.int32)
  assert min(np.abs(last[i] - last[j]).mean() for i in range(5) for j in range(i)) > 1.0


def test_saved_files_and_settings(first):
  out = first.out_dir
  for k, res in enumerate((16, 32, 64)):
    files = sorted(os.listdir(os.path.join(out, f"stage{k}_{res}px")))
    assert files == [f"{i:05d}.png" for i in range(5)]
    png = np.asarray(Image.open(os.path.join(out, f"stage{k}_{res}px", "00002.png")))
    np.testing.assert_array_equal(png, first.images[k][2])  # PNG is lossless
    assert os.path.isfile(os.path.join(out, f"grid_{res}px.png"))
  with open(os.path.join(out, "settings.json")) as f:
    settings = json.load(f)
  assert settings["prompts"] == PROMPTS and settings["seed"] == 3
  assert [s["resolution"] for s in settings["stages"]] == [16, 32, 64]
  assert settings["stages"][1]["aug_t"] == 0.2 and settings["stages"][0]["steps"] == 4
  assert settings["stages"][0]["weights"] == "ema:0.9"
  # The SR stages' augmentation level in all three forms, on the schedule relating them:
  # t=0.2 of cosine is log-SNR 2.2461, sigma 0.3093 (tests/diffusion/test_guidance.py).
  for sr in settings["stages"][1:]:
    assert sr["aug_t"] == 0.2 and sr["aug_schedule"] == "cosine"
    assert sr["aug_logsnr"] == pytest.approx(2.2461, abs=5e-5)
    assert sr["aug_sigma"] == pytest.approx(0.3093, abs=5e-5)
    assert sr["aug_sigma"] == pytest.approx(math.sqrt(1 / (1 + math.exp(sr["aug_logsnr"]))))
  assert "aug_t" not in settings["stages"][0]


def test_same_seed_same_pixels_and_seed_matters(cascade, first):
  again = cascade.generate(PROMPTS, seed=3, batch_size=8, progress=False)
  for a, b in zip(first.images, again.images):
    np.testing.assert_array_equal(a, b)
  other = cascade.generate(PROMPTS[:1], seed=4, batch_size=8, progress=False)
  assert np.abs(other.images[0][0].astype(int) - first.images[0][0]).mean() > 1.0


def test_one_image_regenerates_alone(cascade, first):
  # Image 3 of the batch, from its prompt, seed and index only. XLA may sum in another
  # order at another batch size, so allow one uint8 level on rare pixels.
  one = cascade.generate([PROMPTS[3]], seed=3, start_index=3, batch_size=8, progress=False)
  for k, im in enumerate(one.images):
    diff = np.abs(im[0].astype(int) - first.images[k][3])
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (k, diff.max())


def test_stage_overrides(cascade, first):
  s = cascade_lib.StageSettings
  fewer = cascade.generate(PROMPTS[:2], seed=3, batch_size=8, progress=False,
                           settings=[s(guidance=1.0), s(steps=2), None])
  assert fewer.settings["stages"][0]["guidance"] == 1.0
  assert fewer.settings["stages"][1]["steps"] == 2
  assert fewer.settings["stages"][2]["steps"] == 4
  # Each override reaches its stage's sampler (random weights move the pixels only a
  # little, so this checks change, not size).
  assert (fewer.images[0] != first.images[0][:2]).any()
  assert (fewer.images[1] != first.images[1][:2]).any()
  base_only = cascade.generate(PROMPTS[:2], seed=3, num_stages=1, batch_size=8,
                               progress=False)
  assert len(base_only.images) == 1
  np.testing.assert_array_equal(base_only.images[0], first.images[0][:2])
  with pytest.raises(cascade_lib.CascadeError, match="Unknown stage setting"):
    s.from_dict({"step": 3})


def test_aug_level_overrides_in_any_form(cascade):
  # One level given as a sigma or as the equivalent t samples the same images (one
  # compiled sampler: the level is a call argument) and records the same three forms.
  s = cascade_lib.StageSettings
  level = guidance.aug_level(schedules.get_schedule("cosine"), t=0.35)
  by_sigma = cascade.generate(PROMPTS[:2], seed=3, num_stages=2, progress=False,
                              settings=[None, s(aug_sigma=level.sigma)])
  by_t = cascade.generate(PROMPTS[:2], seed=3, num_stages=2, progress=False,
                          settings=[None, s(aug_t=0.35)])
  default = cascade.generate(PROMPTS[:2], seed=3, num_stages=2, progress=False)
  rec_sigma, rec_t = by_sigma.settings["stages"][1], by_t.settings["stages"][1]
  assert rec_sigma["aug_t"] == pytest.approx(0.35, abs=1e-9)
  for key in ("aug_logsnr", "aug_sigma"):
    assert rec_sigma[key] == pytest.approx(rec_t[key], rel=1e-9)
  diff = np.abs(by_sigma.images[1].astype(int) - by_t.images[1])
  assert diff.max() <= 1
  assert (by_t.images[1] != default.images[1]).any()       # the level reaches the sampler
  np.testing.assert_array_equal(by_t.images[0], default.images[0])  # base untouched
  with pytest.raises(cascade_lib.CascadeError, match="exactly one"):
    cascade.stages[1].settings(s(aug_t=0.2, aug_logsnr=2.0))
  with pytest.raises(cascade_lib.CascadeError, match="outside"):
    cascade.stages[1].settings(s(aug_logsnr=40.0))


def test_stage_saved_before_the_aug_schedule_loads(stages, tmp_path):
  # Checkpoints store their config; one written before noise_aug had its own schedule
  # (and per / sample_logsnr / sample_sigma) augmented on diffusion.schedule: it still
  # loads, and its level is read on that schedule.
  config = config_files.load("configs/sr256.py", "smoke")
  config.data.update(low_resolution=16, resolution=32)
  config.diffusion.schedule = "linear"
  config.diffusion.noise_aug = dict(max_t=1.0, sample_t=0.2)
  path = stage_testing.write_stage(config, str(tmp_path / "old_sr"))
  old = cascade_lib.Cascade.from_workdirs([stages[0], path])
  rec = old.stages[1].settings()
  assert rec["aug_schedule"] == "linear" and rec["aug_t"] == 0.2
  assert rec["aug_logsnr"] == pytest.approx(
      float(schedules.get_schedule("linear").logsnr(0.2)), rel=1e-5)
  samples.make_sample_fn(old.stages[1].config, old.stages[1].graphdef)  # builds


def test_chain_checks(stages, tmp_path):
  with pytest.raises(cascade_lib.CascadeError, match="super-resolution stage"):
    cascade_lib.Cascade.from_workdirs([stages[1]])
  with pytest.raises(cascade_lib.CascadeError, match="upsamples from 32px"):
    cascade_lib.Cascade.from_workdirs([stages[0], stages[2]])
  with pytest.raises(cascade_lib.CascadeError, match="No stage at"):
    cascade_lib.load_stage(str(tmp_path / "missing"))
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(cascade_lib.CascadeError, match="No complete checkpoint"):
    cascade_lib.load_stage(str(tmp_path / "empty"))


def test_launch_sample_mode(stages, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("rocket\n\nred apple\n")
  workdir = tmp_path / "samples"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "launch.py", "--config=configs/cascade.py:smoke",
         f"--workdir={workdir}", "--mode=sample", f"--config.stages={tuple(stages[:2])!r}",
         f"--prompts_file={prompts}", "--config.stage1.steps=2"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(workdir / "settings.json") as f:
    settings = json.load(f)
  assert settings["prompts"] == ["rocket", "red apple"]
  assert settings["stages"][1]["steps"] == 2
  assert sorted(os.listdir(workdir / "stage1_32px")) == ["00000.png", "00001.png"]
  bad = subprocess.run(cmd[:-2] + ["--config.stage0.sampler=dpm"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "Did you mean 'ddpm'" in bad.stderr


def test_cascade_configs_validate():
  from imagen_jax import config_checks, config_files
  for variant in ("demo", "emoji"):
    for mode in ("sample", "eval"):
      config_checks.validate(config_files.load("configs/cascade.py", variant), mode)
  smoke = config_files.load("configs/cascade.py", "smoke")
  with pytest.raises(config_checks.ConfigError, match="stages"):
    config_checks.validate(smoke, "sample")
  demo = config_files.load("configs/cascade.py", "demo")
  demo.eval.guidance_weights = (1.0, -2.0)
  with pytest.raises(config_checks.ConfigError, match="guidance_weights"):
    config_checks.validate(demo, "eval")
  demo = config_files.load("configs/cascade.py", "demo")
  demo.stage2.aug_t = 1.5
  with pytest.raises(config_checks.ConfigError, match="aug_t"):
    config_checks.validate(demo, "sample")


def test_the_shipped_base_stage_loads_and_is_small():
  # `make demo` samples it (configs/cascade.py:shipped); assets/README.md says how it was
  # made. Under 5 MB (float16 weights) so the repo stays light; a 32 px base stage
  # trained past the study.
  from imagen_jax import config_checks, config_files  # pylint: disable=g-import-not-at-top
  config = config_files.load("configs/cascade.py", "shipped")
  config_checks.validate(config, "sample")
  path = os.path.join(REPO, config.stages[0])
  assert os.path.getsize(path) < 5 * 10**6
  stage = cascade_lib.load_stage(path)
  assert stage.config.kind == "base" and stage.resolution == 32 and stage.step >= 4000
  assert stage.config.diffusion.target == "v" and stage.weights.startswith("ema")


def test_sampling_a_cascade_does_not_import_the_trainer():
  # Inference reads checkpoints (train.checkpointing, train.state for their structure) but
  # must not load the training loop, the train step or the training log.
  code = ("import sys, imagen_jax.cascade, imagen_jax.jobs.sample_cascade; "
          "print(sorted(m for m in sys.modules if m.startswith('imagen_jax.train')))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  loaded = eval(proc.stdout.strip().splitlines()[-1])  # pylint: disable=eval-used
  for module in ("trainer", "step", "logging", "metrics", "plots"):
    assert f"imagen_jax.train.{module}" not in loaded, loaded


def test_an_exported_stage_samples_as_its_checkpoint(stages, tmp_path):
  from imagen_jax import export  # pylint: disable=g-import-not-at-top
  stage = cascade_lib.load_stage(stages[0])
  path = export.save(stage, str(tmp_path / "base.npz"))
  again = cascade_lib.load_stage(path)
  assert again.step == stage.step and again.weights == stage.weights
  assert again.config.to_dict() == stage.config.to_dict()
  for a, b in zip(jax.tree.leaves(stage.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The same weights and keys: the same samples, bit for bit.
  one = cascade_lib.Cascade([stage]).generate(["rocket"], seed=3, progress=False)
  two = cascade_lib.Cascade([again]).generate(["rocket"], seed=3, progress=False)
  np.testing.assert_array_equal(one.images[0], two.images[0])
  # float16 storage: about half the file, each weight rounded once to float16 and read
  # back as the network's float32.
  half = cascade_lib.load_stage(export.save(stage, str(tmp_path / "half.npz"), dtype="float16"))
  assert os.path.getsize(tmp_path / "half.npz") < 0.6 * os.path.getsize(path)
  for a, b in zip(jax.tree.leaves(stage.params), jax.tree.leaves(half.params)):
    assert b.dtype == a.dtype
    np.testing.assert_array_equal(np.asarray(b), np.asarray(a).astype(np.float16).astype(a.dtype))
  # A file that is not an export says how to make one.
  bad = tmp_path / "bad.npz"
  bad.write_bytes(b"not a zip")
  with pytest.raises(cascade_lib.CascadeError, match="python -m imagen_jax.export"):
    cascade_lib.load_stage(str(bad))
