"""experiments/sweep.py: a two-arm smoke sweep end to end (run, skip, collate, list), its
statistics against hand-computed values, and its errors."""

from __future__ import annotations

import csv
import importlib.util
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "experiments/gmm_schedules.py:smoke"


def _sweep_module():
  spec = importlib.util.spec_from_file_location("sweep_driver", REPO / "experiments" / "sweep.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


sweep_lib = _sweep_module()


def _cli(*args, cwd=REPO) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(REPO / "experiments" / "sweep.py"), *args],
                        cwd=cwd, capture_output=True, text=True, timeout=600)


def test_smoke_sweep_end_to_end(tmp_path):
  root = tmp_path / "sweep"
  start = time.perf_counter()
  proc = _cli(SMOKE, "all", "--jobs", "2", "--root", str(root))
  assert proc.returncode == 0, proc.stdout + proc.stderr
  print(f"two-arm smoke sweep: {time.perf_counter() - start:.1f} s")
  out = root / "results"
  with open(out / "runs.csv") as f:
    rows = list(csv.DictReader(f))
  assert sorted((r["arm"], r["seed"]) for r in rows) == [
      ("edm", "0"), ("edm", "1"), ("imagen", "0"), ("imagen", "1")]
  assert all(np.isfinite(float(r["sliced_w2"])) and float(r["sliced_w2"]) > 0 for r in rows)
  table = (out / "results.md").read_text()
  for needle in ("| imagen |", "| edm |", "diffusion.weighting=edm", "reference", "N"):
    assert needle in table
  for png in ("sliced_w2.png", "mean_log10_excess_mse.png", "excess_mse.png"):
    assert (out / png).stat().st_size > 1000
  # Each run trained under its own arm's objective (the overrides reached the job).
  import json  # pylint: disable=g-import-not-at-top
  edm = json.loads((root / "edm" / "seed1" / "metrics.json").read_text())
  assert (edm["schedule"], edm["weighting"], edm["target"], edm["seed"]) == (
      "lognormal", "edm", "v", 1)

  # Again: every run is finished, so nothing runs.
  again = _cli(SMOKE, "run", "--root", str(root))
  assert again.returncode == 0 and again.stdout.count("skipped (finished)") == 4, again.stdout

  # An interrupted run (no marker file) is run again; the others are left alone.
  (root / "imagen" / "seed0" / "metrics.json").unlink()
  listed = _cli(SMOKE, "list", "--root", str(root))
  assert listed.returncode == 0
  assert listed.stdout.count("(finished)") == 3 and "to run: train" in listed.stdout
  assert "--config.diffusion.schedule=lognormal" in listed.stdout
  assert f"--workdir={root}/edm/seed0" in listed.stdout
  one = _cli(SMOKE, "run", "--root", str(root), "--arm", "imagen")
  assert one.returncode == 0 and "imagen seed 0: done" in one.stdout, one.stdout
  assert one.stdout.count("skipped") == 1


def test_interval_and_holm_match_hand_computation():
  mean, half = sweep_lib.interval(np.array([1.0, 2.0, 3.0]))
  # t_{0.975, 2} = 4.302653; s = 1; sqrt(3).
  assert mean == 2.0 and half == pytest.approx(4.302653 / np.sqrt(3), rel=1e-6)
  assert np.isnan(sweep_lib.interval(np.array([5.0]))[1])
  # Holm: sorted p 0.01, 0.03, 0.04 times 3, 2, 1, made monotone.
  assert sweep_lib.holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx(
      {"a": 0.03, "c": 0.06, "b": 0.06})


def test_compare_orients_better_and_worse_and_keeps_overlaps_unranked():
  sweep = {"reference": "ref", "metrics": {"fid": "lower", "clip": "higher"}}
  values = {"ref": np.array([10.0, 10.1, 9.9, 10.05]), "low": np.array([5.0, 5.1, 4.9, 5.05]),
            "same": np.array([10.0, 10.2, 9.8, 10.1])}
  fid = sweep_lib.compare(sweep, values, "fid")
  assert fid["low"][1] == "better" and fid["same"][1] == "n.s."
  assert sweep_lib.compare(sweep, values, "clip")["low"][1] == "worse"


def test_errors_name_the_problem(tmp_path):
  bad_arm = _cli(SMOKE, "list", "--arm", "nope", "--root", str(tmp_path))
  assert bad_arm.returncode == 2 and "no such arm" in bad_arm.stderr and "imagen" in bad_arm.stderr
  bad_task = _cli(SMOKE, "list", "--task", "9", "--root", str(tmp_path))
  assert bad_task.returncode == 2 and "has 4 runs" in bad_task.stderr
  missing = _cli("experiments/nope.py", "list")
  assert missing.returncode == 2 and "no such sweep file" in missing.stderr
  typo = tmp_path / "typo.py"
  typo.write_text("def get_sweep(variant=None):\n  return dict(name='x', config='c', "
                  "arms={'a': {}}, seeds=(0,), seed_keys=(), modes=(), results='m.json', "
                  "metrics={'m': 'lower'}, reference='a', armz={})\n")
  proc = _cli(str(typo), "list")
  assert proc.returncode == 2 and "unknown keys ['armz']" in proc.stderr
  nothing = _cli(SMOKE, "collate", "--root", str(tmp_path / "empty"))
  assert nothing.returncode == 2 and "No finished runs" in nothing.stderr


def _write_eval(workdir: pathlib.Path, fid: float, low: float, high: float,
                resize: str = "pytorch_fid") -> None:
  """What jobs/eval_stage.py writes, reduced to the keys the image sweep collates."""
  import json  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (workdir / "eval" / "step_20" / "prompts").mkdir(parents=True)
  Image.new("RGB", (8, 8), (255, 0, 0)).save(workdir / "eval" / "step_20" / "prompts" / "g.png")
  (workdir / "eval" / "results.json").write_text(json.dumps({
      "fid": fid, "fid_low": low, "fid_high": high, "kid": 0.1, "kid_low": 0.05,
      "kid_high": 0.15, "alignment": 10.0, "step": 20, "steps": [10, 20],
      "fid_curve": [2 * fid, fid], "fid_curve_low": [2 * low, low],
      "fid_curve_high": [2 * high, high], "fid_floor": 5.0,
      "grid": "step_20/prompts/g.png",
      "protocol": {"num_images": 200, "fid_resize": resize, "inception_sha1": "ab12"},
      "loss_by_logsnr": {"buckets": ["-5_0", "0_5"], "loss": [1.0, 0.5]}}))


def test_one_seed_arms_compare_by_their_own_intervals(tmp_path):
  sweep = sweep_lib.load_sweep(str(REPO / "experiments" / "emoji_schedules.py") + ":cpu")
  assert sweep["seeds"] == (0,)
  root = tmp_path / "sweep"
  runs = sweep_lib.plan(sweep, str(root), extra={"data.data_dir": "/data/tfds"})
  # {root} in a shared override is the sweep's root; --set reaches every run.
  assert runs[0].overrides["eval.cache_dir"] == f"{root}/eval_cache"
  assert all(r.overrides["data.data_dir"] == "/data/tfds" for r in runs)
  by_arm = {r.arm: pathlib.Path(r.workdir) for r in runs}
  _write_eval(by_arm["imagen"], 100.0, 90.0, 110.0)
  _write_eval(by_arm["v"], 50.0, 45.0, 56.0)          # disjoint and lower: better
  _write_eval(by_arm["edm"], 95.0, 85.0, 104.0)       # overlapping: not significant
  _write_eval(by_arm["sigmoid"], 150.0, 140.0, 160.0)  # disjoint and higher: worse
  out = tmp_path / "results"
  table = sweep_lib.collate(sweep, runs, str(out), "emoji_schedules.py:cpu")
  lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
  assert "50.0 [45.0, 56.0] | better" in lines["v"]
  assert "95.0 [85.0, 104.0] | n.s. (intervals overlap)" in lines["edm"]
  assert "150.0 [140.0, 160.0] | worse" in lines["sigmoid"]
  assert "| reference |" in lines["imagen"]
  for name in ("fid_curve.png", "loss_by_logsnr.png", "v_seed0.png", "imagen_seed0.png"):
    assert (out / name).is_file(), name
  text = (out / "results.md").read_text()
  assert "![v_seed0.png](v_seed0.png)" in text and "intervals are disjoint" in text
  # Unfinished arms (no results) are left out, not tabulated as zeros.
  assert "min_snr5" not in lines
  # The shared evaluation protocol is stated once...
  assert "Protocol: num_images `200`; fid_resize `pytorch_fid`; inception_sha1 `ab12`." in text
  # ... and an arm scored under another one is called out, not silently tabulated.
  _write_eval(by_arm["min_snr5"], 70.0, 60.0, 80.0, resize="clean_fid")
  sweep_lib.collate(sweep, runs, str(out), "emoji_schedules.py:cpu")
  text = (out / "results.md").read_text()
  assert "different protocols" in text and "- min_snr5/seed0: " in text


def test_an_interrupted_training_is_not_finished(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  sweep = sweep_lib.load_sweep(str(REPO / "experiments" / "emoji_schedules.py") + ":quick")
  run = sweep_lib.plan(sweep, str(tmp_path))[0]
  workdir = pathlib.Path(run.workdir)
  workdir.mkdir(parents=True)
  # The trainer writes train_summary.json also when a time limit or preemption stops it.
  (workdir / "train_summary.json").write_text(json.dumps({"complete": False}))
  assert sweep_lib.pending_modes(sweep, run) == ["train", "eval"]
  (workdir / "train_summary.json").write_text(json.dumps({"complete": True}))
  assert sweep_lib.pending_modes(sweep, run) == ["eval"]


def test_prepare_runs_once_before_the_arms_and_array_tasks_wait_for_it(tmp_path):
  spec = str(REPO / "experiments" / "emoji_schedules.py") + ":quick"
  sweep = sweep_lib.load_sweep(spec)
  root = tmp_path / "root"
  prep = sweep_lib.prepare_run(sweep, str(root), {"data.data_dir": "/data"})
  # In ROOT/prepare, with the common overrides (the cache every arm reads) and --set's.
  assert prep.workdir == str(root / "prepare")
  assert prep.overrides["data.embedding_cache"] == f"{root}/text_cache"
  assert prep.overrides["data.data_dir"] == "/data"
  assert all(r.overrides["data.embedding_cache"] == f"{root}/text_cache"
             for r in sweep_lib.plan(sweep, str(root)))
  assert sweep_lib.pending_modes(sweep, prep) == ["precompute", "eval_reference"]
  (root / "prepare").mkdir(parents=True)
  (root / "prepare" / "precompute.json").write_text("{}")
  assert sweep_lib.pending_modes(sweep, prep) == ["eval_reference"]
  (root / "prepare" / "eval_reference.json").write_text("{}")
  assert sweep_lib.pending_modes(sweep, prep) == []
  # The 32 px study on record encodes captions at every step: it prepares only the
  # evaluation's shared cache.
  cpu = sweep_lib.load_sweep(str(REPO / "experiments" / "emoji_schedules.py") + ":cpu")
  assert sweep_lib.pending_modes(cpu, sweep_lib.prepare_run(cpu, str(root))) == []
  assert all("data.embedding_cache" not in r.overrides for r in sweep_lib.plan(cpu, "/r"))

  listed = _cli(spec, "list", "--root", str(tmp_path / "fresh"))
  assert listed.returncode == 0, listed.stderr
  head = listed.stdout.splitlines()[:3]
  assert head[0] == "# [prepare] once, before any run (to run: precompute, eval_reference)"
  assert "--mode=precompute" in head[1] and f"{tmp_path}/fresh/prepare" in head[1]
  assert "--mode=eval_reference" in head[2] and f"--config.eval.cache_dir={tmp_path}/fresh/eval_cache" in head[2]
  # An array task must not race the others to write the cache: it refuses until prepared.
  task = _cli(spec, "run", "--task", "0", "--root", str(tmp_path / "fresh"))
  assert task.returncode == 2 and "prepare" in task.stderr, task.stderr
  assert not (tmp_path / "fresh" / "imagen").exists()


def test_an_arm_may_not_take_the_preparations_name(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("def get_sweep(variant=None):\n"
                  "  return dict(name='b', config='configs/base64.py:smoke',\n"
                  "              arms={'prepare': {}, 'x': {}}, seeds=(0,), seed_keys=(),\n"
                  "              modes=(('train', 'train_summary.json'),), results='r.json',\n"
                  "              metrics={'fid': 'lower'}, reference='x')\n")
  with pytest.raises(sweep_lib.SweepError, match="named 'prepare'"):
    sweep_lib.load_sweep(str(path))


def _overridden(config, overrides: dict, what: str):
  """`config` with a run's overrides written in, each key asserted to exist."""
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    assert last in node, f"{what}: the config has no key {key}"
    node[last] = value
  return config


@pytest.mark.parametrize("spec", ["gmm_schedules.py:ring", "emoji_schedules.py:cpu16",
                                  "emoji_schedules.py:cpu", "emoji_schedules.py:quick",
                                  "emoji_schedules.py:pod"])
def test_every_run_of_a_sweep_is_a_valid_config(spec):
  # Each run's overrides name keys its base config has (configs are locked: launch.py would
  # reject the run only when its turn comes, after the runs before it) and pass the checks
  # of every mode the sweep runs.
  from imagen_jax import config_checks, config_files  # pylint: disable=g-import-not-at-top
  sweep = sweep_lib.load_sweep(str(REPO / "experiments" / spec))
  for run in sweep_lib.plan(sweep, "/tmp/sweep-root"):
    config = _overridden(config_files.load(str(REPO / sweep["config"])), run.overrides,
                         f"{spec} arm {run.arm}")
    if spec.endswith(":pod"):
      continue  # its T5-XXL checkpoint is the user's (--set data.text_encoder=t5:DIR)
    for mode, _ in sweep["modes"]:
      config_checks.validate(config, mode)
  prep = sweep_lib.prepare_run(sweep, "/tmp/sweep-root")
  if prep is not None and not spec.endswith(":pod"):
    config = _overridden(config_files.load(str(REPO / sweep["config"])), prep.overrides,
                         f"{spec} prepare")
    for mode, _ in sweep["prepare"]:
      config_checks.validate(config, mode)
