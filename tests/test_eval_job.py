"""--mode=eval end to end on a tiny built dataset and random-weight smoke stages: the sweep's
files, FID/alignment values, caches reused, and the alignment model on separable data."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import stage_testing
from imagen_jax import config_files
from imagen_jax.data import datasets
from imagen_jax.errors import UserError
from imagen_jax.eval import alignment
from imagen_jax.jobs import eval_cascade as eval_job
from imagen_jax.jobs import eval_stage as stage_eval_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("eval")
  data_dir = str(root / "tfds")
  base = config_files.load("configs/base64.py", "smoke")
  base.data.data_dir = data_dir
  datasets.make_builder(base.data).download_and_prepare()
  stages = stage_testing.smoke_stages(str(root / "stages"), data_dir=data_dir)
  return root, stages


def _config(stages):
  c = config_files.load("configs/cascade.py", "smoke")
  c.stages = tuple(stages)
  c.sample.prompts = ("rocket, twemoji style",)
  return c


def test_eval_writes_the_sweep(setup):
  root, stages = setup
  workdir = str(root / "run")
  result = eval_job.run(_config(stages[:2]), workdir)
  rows = result["rows"]
  assert [r["guidance"] for r in rows] == [1.0, 3.0]
  for r in rows:
    assert np.isfinite(r["fid"]) and r["fid"] > 0
    assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    assert 0.0 <= r["alignment"] <= 100.0 and 0.0 <= r["r_precision"] <= 1.0
    assert r["num_images"] == 8
    assert os.path.isfile(os.path.join(workdir, r["grid"]))
  assert result["metric"] == "alignment" and result["fid_floor"] > 0
  for name in ("results.csv", "results.md", "results.json", "report.md",
               "fid_vs_alignment.png", "cascade/grid_32px.png"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [float(r["guidance"]) for r in table] == [1.0, 3.0]
  assert float(table[1]["fid"]) == pytest.approx(rows[1]["fid"])
  report = open(os.path.join(workdir, "report.md")).read()
  assert "fid_vs_alignment.png" in report and "cascade/grid_32px.png" in report
  cached = sorted(os.listdir(os.path.join(workdir, "cache")))
  assert len([f for f in cached if f.startswith("features-")]) == 2
  assert len([f for f in cached if f.startswith("alignment-")]) == 1

  # A second run reuses the cached features and alignment model: same numbers exactly.
  with open(os.path.join(workdir, "results.json")) as f:
    first = json.load(f)
  again = eval_job.run(_config(stages[:2]), workdir)
  assert again["fid_floor"] == first["fid_floor"]
  assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in first["rows"]]


def test_eval_sweeps_the_sr_aug_level(setup):
  # One row per (weight, level): the SR stage samples its low-res input at each level,
  # given here as sigmas; FID is measured at that stage (32 px), whose split gets built.
  root, stages = setup
  sr = config_files.load("configs/sr256.py", "smoke")
  sr.data.update(low_resolution=16, resolution=32, data_dir=str(root / "tfds"))
  datasets.make_builder(sr.data).download_and_prepare()
  config = _config(stages[:2])
  config.eval.update(fid_stage=1, guidance_weights=(3.0,), aug_levels=(0.2, 0.6),
                     aug_level_kind="sigma", cascade_samples=False)
  workdir = str(root / "aug")
  rows = eval_job.run(config, workdir)["rows"]
  assert [(r["guidance"], r["aug_level"]) for r in rows] == [(3.0, 0.2), (3.0, 0.6)]
  for r, sigma in zip(rows, (0.2, 0.6)):
    assert r["aug_sigma"] == pytest.approx(sigma, rel=1e-9)
    assert r["aug_sigma"] == pytest.approx(math.sqrt(1 / (1 + math.exp(r["aug_logsnr"]))))
    assert 0.0 < r["aug_t"] < 1.0 and np.isfinite(r["fid"])
    assert r["aug_stages"] == [dict(stage=1, t=r["aug_t"], logsnr=r["aug_logsnr"],
                                    sigma=r["aug_sigma"])]
    sample_dir = os.path.join(workdir, "samples", f"guidance_3_aug_sigma_{sigma:g}")
    with open(os.path.join(sample_dir, "settings.json")) as f:
      assert json.load(f)["stages"][1]["aug_sigma"] == pytest.approx(sigma, rel=1e-9)
    assert os.path.isfile(os.path.join(workdir, r["grid"]))
  assert rows[0]["aug_logsnr"] > rows[1]["aug_logsnr"]  # more noise, lower log-SNR
  assert rows[0]["fid"] != rows[1]["fid"]                 # the level reached the sampler
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert list(table[0])[:7] == ["sweep", "guidance", "sr_guidance", "aug_t", "aug_logsnr",
                                "aug_sigma", "fid"]
  assert [float(r["aug_sigma"]) for r in table] == pytest.approx([0.2, 0.6])
  assert "| aug_t | aug_logsnr | aug_sigma |" in open(os.path.join(workdir, "results.md")).read()
  report = open(os.path.join(workdir, "report.md")).read()
  assert "augmentation sweep" in report and "aug sigma=0.6" in report


def test_eval_sweeps_the_sr_guidance_as_a_second_curve(setup):
  root, stages = setup
  config = _config(stages[:2])
  config.eval.update(fid_stage=1, guidance_weights=(1.0, 3.0), sr_guidance_weights=(1.0, 5.0),
                     cascade_samples=False)
  workdir = str(root / "sr_guidance")
  result = eval_job.run(config, workdir)
  rows = result["rows"]
  sr_own = rows[0]["sr_guidance"]  # the SR stage's own weight in the base sweep
  assert [(r["sweep"], r["guidance"], r["sr_guidance"]) for r in rows] == [
      ("guidance", 1.0, sr_own), ("guidance", 3.0, sr_own),
      ("sr_guidance", rows[2]["guidance"], 1.0), ("sr_guidance", rows[2]["guidance"], 5.0)]
  assert rows[2]["fid"] != rows[3]["fid"]  # the SR weight reached the sampler
  assert os.path.isdir(os.path.join(workdir, "samples", "sr_guidance_5"))
  curves = eval_job._series(rows, None)  # pylint: disable=protected-access
  assert [len(v) for v in curves.values()] == [2, 2]
  assert list(curves) == ["guidance sweep", "SR guidance sweep"]
  assert os.path.isfile(os.path.join(workdir, "fid_vs_alignment.png"))
  with pytest.raises(Exception, match="sr_guidance_weights"):
    from imagen_jax import config_checks  # pylint: disable=g-import-not-at-top
    config.eval.fid_stage = 0
    config_checks.validate(config, "eval")


def _tiny_coco(src, num_images=6, captions_per_image=2):
  """An MS-COCO-format folder (annotations/captions_val2014.json + val2014/*.jpg) of small
  distinct images with several captions each; no train split, as a user with only the
  validation zips has."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(src, "val2014"))
  os.makedirs(os.path.join(src, "annotations"))
  images, annotations = [], []
  for i in range(1, num_images + 1):
    name = f"COCO_val2014_{i:012d}.jpg"
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(src, "val2014", name), quality=95)
    images.append({"id": i, "file_name": name, "width": 40, "height": 30})
    annotations += [{"id": 100 * i + k, "image_id": i, "caption": f"photo {i}, view {k}"}
                    for k in range(captions_per_image)]
  with open(os.path.join(src, "annotations", "captions_val2014.json"), "w") as f:
    json.dump({"images": images, "annotations": annotations}, f)


def test_coco_fid30k_protocol_on_a_tiny_coco_folder(setup):
  # configs/cascade.py:coco with N scaled down: captions of distinct val images (one per
  # image), samples from the 64->256 stage (here 16->32), FID against the val images built
  # at that stage's resolution (each image once), CLIP score, and the protocol recorded.
  from imagen_jax import config_checks  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import evaluators  # pylint: disable=g-import-not-at-top
  root, stages = setup
  src = str(root / "coco")
  _tiny_coco(src)
  config = config_files.load("configs/cascade.py", "coco")
  config.stages = tuple(stages[:2])
  clip_dir = os.path.join(REPO, "tests", "fixtures", "eval", "clip_tiny")
  config.eval.update(num_images=4, batch_size=4, grid_size=4, source_dir=src,
                     data_dir=str(root / "coco_tfds"), clip=clip_dir)
  # The fixture CLIP is a tiny custom model: the ViT-L/14 default refuses it by name.
  config_checks.validate(config, "eval")
  ref_data = eval_job.reference_data(
      cascade_lib_stage_data(stages[1]), config.eval)
  assert (ref_data.dataset, ref_data.resolution, ref_data.eval_split) == (
      "image_text_folder", 32, "validation")
  datasets.make_builder(ref_data).download_and_prepare()
  with pytest.raises(UserError, match=r"custom ViT.*clip_model"):
    eval_job.run(config, str(root / "coco_l14"))
  config.eval.clip_model = "any"
  workdir = str(root / "coco_eval")
  result = eval_job.run(config, workdir)
  (row,) = result["rows"]
  assert row["guidance"] == 1.35 and row["sr_guidance"] == 8.0 and row["sweep"] == "guidance"
  assert np.isfinite(row["fid"]) and row["num_images"] == 4
  assert np.isfinite(row["clip_score"])
  # Six images with two captions each: the reference counts each image once.
  assert result["reference_images"] == 6 and result["fid_floor"] is None
  protocol = result["protocol"]
  assert protocol["fid_resize"] == "pytorch_fid" and protocol["num_images"] == 4
  assert protocol["reference_images"] == 6 and protocol["reference_split"] == "validation"
  assert protocol["inception_weights"] == "default_1.pt"
  assert len(protocol["inception_sha1"]) == 40
  assert protocol["text_metric"] == "clip_score"
  assert protocol["clip_model"].startswith("custom ViT") and len(protocol["clip_sha1"]) == 40
  assert protocol["clip_weights"] == "model.safetensors"
  # The prompts are captions of distinct images, one caption each.
  with open(os.path.join(workdir, "samples", "guidance_1.35", "settings.json")) as f:
    prompts = json.load(f)["prompts"]
  photos = [p.split(",")[0] for p in prompts]
  assert len(set(photos)) == len(prompts) == 4
  for name in ("results.md", "report.md"):
    text = open(os.path.join(workdir, name)).read()
    assert "fid_resize `pytorch_fid`" in text and "CLIP score (custom ViT" in text, name
  # clean-fid's resize is a recorded, separately cached choice, and moves FID.
  config.eval.fid_resize = "clean_fid"
  clean = eval_job.run(config, str(root / "coco_clean"))
  assert clean["protocol"]["fid_resize"] == "clean_fid"
  assert clean["rows"][0]["fid"] != row["fid"]


def cascade_lib_stage_data(stage_dir):
  from imagen_jax import cascade as cascade_lib  # pylint: disable=g-import-not-at-top
  return cascade_lib.load_stage(stage_dir).config.data


def test_alignment_model_learns_pairs():
  # Two noisy views of the same latent: after training, held-out pairs rank far above chance.
  rng = np.random.default_rng(0)
  z = rng.standard_normal((400, 16)).astype(np.float32)
  img = z @ rng.standard_normal((16, 64)).astype(np.float32) + 0.1 * rng.standard_normal(
      (400, 64)).astype(np.float32)
  txt = z @ rng.standard_normal((16, 24)).astype(np.float32)
  caps = [f"c{i}" for i in range(400)]
  model = alignment.train(img[:300], txt[:300], dim=16, steps=300, batch_size=128, lr=3e-3,
                          progress=False)
  held = alignment.summary(model, img[300:], txt[300:], caps[300:], candidates=20)
  assert held["r_precision"] > 0.6  # chance is 1/20
  shuffled = alignment.summary(model, img[300:], txt[300:][::-1], caps[300:], candidates=20)
  assert held["alignment"] > shuffled["alignment"] + 10
  assert shuffled["r_precision"] < 0.2


def test_launch_eval_errors(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "launch.py", "--config=configs/cascade.py:smoke",
       f"--workdir={tmp_path}", "--mode=eval", "--config.stages=('/nonexistent/stage',)",
       "--config.eval.fid_stage=1"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 2 and "eval.fid_stage=1" in proc.stderr, proc.stderr[-2000:]


def _stage_eval_config(data_dir: str):
  c = config_files.load("configs/base64.py", "smoke")
  c.data.data_dir = data_dir
  c.eval.update(num_images=8, reference_limit=8, batch_size=8, bootstrap=20, kid_subsets=5,
                kid_subset_size=8, prompts=("rocket, twemoji style", "red apple, twemoji style"),
                alignment=dict(train_limit=16, dim=8, steps=20, batch_size=16, lr=1e-2,
                               weight_decay=0.0, candidates=4, seed=0))
  return c


def test_stage_eval_scores_each_checkpoint(setup):
  root, _ = setup
  config = _stage_eval_config(str(root / "tfds"))
  workdir = str(root / "base_run")
  # Two checkpoints of different (random) weights, as training would leave at two steps.
  stage_testing.write_stage(config, workdir, seed=0, step=10)
  stage_testing.write_stage(config, workdir, seed=1, step=20)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 20, "loss": 1.0, "loss/bucket_5_10": 0.5,
                        "loss/bucket_-5_0": 2.0}) + "\n")
  result = stage_eval_job.run(config, workdir)
  rows = result["rows"]
  assert [r["step"] for r in rows] == [10, 20] == result["steps"]
  for r in rows:
    assert np.isfinite(r["fid"]) and r["fid_low"] < r["fid"] < r["fid_high"]
    assert r["kid_low"] < r["kid"] < r["kid_high"]
    assert 0.0 <= r["precision"] <= 1.0 and 0.0 <= r["recall"] <= 1.0
    assert 0.0 <= r["alignment"] <= 100.0 and r["num_images"] == 8
    assert os.path.isfile(os.path.join(workdir, "eval", r["grid"]))
  # Different weights give different samples, so different scores; the top level is the
  # last step's (what experiments/sweep.py tabulates).
  assert rows[0]["fid"] != rows[1]["fid"]
  assert result["fid"] == rows[1]["fid"] and result["step"] == 20
  assert result["loss_by_logsnr"] == {"step": 20, "buckets": ["-5_0", "5_10"],
                                      "loss": [2.0, 0.5]}
  for name in ("results.json", "results.md", "fid_vs_step.png", "step_10/features.npz"):
    assert os.path.isfile(os.path.join(workdir, "eval", name)), name

  # Run again: the samples on disk are reused (same captions, seed, guidance, step), so the
  # scores are the same without sampling.
  again = stage_eval_job.run(config, workdir)
  assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in rows]
  assert all(r["sample_s"] < 5.0 for r in again["rows"])

  # Asking for a step the run did not keep names the steps it has.
  config.eval.steps = (15,)
  with pytest.raises(UserError, match=r"steps \[15\].*\[10, 20\]"):
    stage_eval_job.run(config, workdir)


def test_eval_reference_fills_the_cache_that_eval_reads(setup):
  """--mode=eval_reference (a sweep's prepare step) computes the features and the
  alignment model once; --mode=eval with the same cache_dir then computes none of them."""
  from imagen_jax.jobs import eval_reference  # pylint: disable=g-import-not-at-top
  root, _ = setup
  config = _stage_eval_config(str(root / "tfds"))
  config.eval.cache_dir = str(root / "shared_cache")
  summary = eval_reference.run(config, str(root / "prepare"))
  cached = sorted(os.listdir(config.eval.cache_dir))
  assert any(n.startswith("features-test-") for n in cached), cached
  assert any(n.startswith("features-train-") for n in cached), cached
  assert any(n.startswith("alignment-") for n in cached), cached
  with open(root / "prepare" / "eval_reference.json") as f:
    written = json.load(f)
  assert written["reference_images"] == 8 and written["text_metric"] == "alignment"
  assert np.isfinite(written["fid_floor"]) and written["fid_floor"] == summary["fid_floor"]
  mtimes = {n: os.path.getmtime(os.path.join(config.eval.cache_dir, n)) for n in cached}

  workdir = str(root / "run_after_prepare")
  stage_testing.write_stage(config, workdir, seed=0, step=10)
  result = stage_eval_job.run(config, workdir)
  assert sorted(os.listdir(config.eval.cache_dir)) == cached  # nothing new computed
  assert {n: os.path.getmtime(os.path.join(config.eval.cache_dir, n))
          for n in cached} == mtimes  # nor rewritten
  assert result["fid_floor"] == summary["fid_floor"]
  assert result["protocol"]["alignment_model"] == written["protocol"]["alignment_model"]


def test_text_metric_picks_an_evaluator_by_name(monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from imagen_jax.eval import evaluators  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(evaluators.EVALUATORS, "alignment", lambda ctx: "alignment scorer")
  monkeypatch.setitem(evaluators.EVALUATORS, "clip_score", lambda ctx: "clip scorer")

  def pick(text_metric, clip):
    ec = ml_collections.ConfigDict(dict(text_metric=text_metric, clip=clip))
    return evaluators.text_evaluator(evaluators.Context(
        ec=ec, data_cfg=None, cache_dir="", train_feats=None, train_caps=[],
        ref_feats=None, ref_caps=[]))

  # "auto" keeps the old rule (CLIP score when CLIP weights are given); a name overrides it.
  assert pick("auto", "") == "alignment scorer"
  assert pick("auto", "/clip") == "clip scorer"
  assert pick("alignment", "/clip") == "alignment scorer"
  with pytest.raises(UserError, match="no such evaluator"):
    pick("precision", "")
