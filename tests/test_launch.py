"""launch.py end to end, in subprocesses on the smoke config (seconds each): outputs,
overrides, and one-paragraph exit-2 messages for mistakes a user can fix."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "--config=configs/gmm.py:smoke"


def launch(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "launch.py", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def as_result(proc: subprocess.CompletedProcess) -> dict:
  """A launch's outcome as JSON (for results shared between xdist workers: run_once)."""
  return {"args": list(proc.args), "returncode": proc.returncode, "stdout": proc.stdout,
          "stderr": proc.stderr}


def completed(result: dict) -> subprocess.CompletedProcess:
  return subprocess.CompletedProcess(result["args"], result["returncode"], result["stdout"],
                                     result["stderr"])


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
  """Exit status 2, no traceback, one paragraph on stderr containing every fragment."""
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().count("\n") == 0, proc.stderr
  for fragment in fragments:
    assert fragment in proc.stderr, (fragment, proc.stderr)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke")
  (workdir / "keep.txt").write_text("not the job's")
  proc = launch(SMOKE, f"--workdir={workdir}", "--mode=sample")
  assert proc.returncode == 0, proc.stderr
  return workdir, proc


def test_sample_writes_outputs(smoke_run):
  workdir, proc = smoke_run
  for name in ("samples.npz", "metrics.json", "scatter.png"):
    assert (workdir / name).stat().st_size > 0
    assert str(workdir / name) in proc.stdout
  assert (workdir / "keep.txt").read_text() == "not the job's"  # others' files are kept
  with np.load(workdir / "samples.npz") as f:
    assert f["samples"].shape == f["data"].shape == (256, 2)
    assert np.isfinite(f["samples"]).all()


def test_sample_metrics(smoke_run):
  metrics = json.loads((smoke_run[0] / "metrics.json").read_text())
  assert metrics["method"] == "ddim" and metrics["sampler_options"] == {"eta": 0.0}
  assert metrics["nfe"] == metrics["steps"] == metrics["config"]["diffusion"]["sampler"]["steps"]
  for key in ("sliced_w2", "sliced_w2_noise_floor", "mean_err", "cov_rel_err",
              "mean_err_noise_floor", "cov_rel_err_noise_floor", "compile_s", "sample_s"):
    assert isinstance(metrics[key], float) and math.isfinite(metrics[key]), key
  # The exact denoiser with DDIM lands near exact sampling (pure N(0, I) noise scores
  # about 4.5x the floor here).
  assert 0 < metrics["sliced_w2"] < 2 * metrics["sliced_w2_noise_floor"]


def test_overrides_take_effect(tmp_path):
  proc = launch(SMOKE, f"--workdir={tmp_path}", "--mode=sample",
                "--config.diffusion.sampler.method=dpmpp_2m",
                "--config.diffusion.sampler.steps=5",
                "--config.diffusion.schedule_kw={'logsnr_min': -12.0}")
  assert proc.returncode == 0, proc.stderr
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["method"] == "dpmpp_2m" and metrics["sampler_options"] == {}
  assert metrics["steps"] == metrics["nfe"] == 5
  assert metrics["schedule_kw"] == {"logsnr_min": -12.0}


def test_unknown_key(tmp_path):
  proc = launch(SMOKE, f"--workdir={tmp_path}", "--mode=sample", "--config.diffusion.nope=1")
  assert proc.returncode != 0
  assert_user_error(proc, "--config.diffusion.nope", "'nope'", "schedule_kw")


def test_unknown_key_gets_a_hint(tmp_path):
  proc = launch(SMOKE, f"--workdir={tmp_path}", "--mode=sample",
                "--config.diffusion.schedul=edm")
  assert_user_error(proc, "--config.diffusion.schedul", "did you mean 'schedule'?")


def test_misspelled_schedule(tmp_path):
  proc = launch(SMOKE, f"--workdir={tmp_path}", "--mode=sample",
                "--config.diffusion.schedule=cosin")
  assert_user_error(proc, "diffusion.schedule", "'cosin'", "Did you mean 'cosine'?",
                    "--config.diffusion.schedule=cosine")
  assert not (tmp_path / "metrics.json").exists()


def test_unsupported_mode(tmp_path):
  proc = launch(SMOKE, f"--workdir={tmp_path}", "--mode=train")
  assert_user_error(proc, "--mode='train'", "--mode=sample", "'gmm'")


@pytest.mark.parametrize("args, fragments", [
    ([SMOKE, "--mode=sampel"], ["--mode=sampel", "train|sample|eval|precompute"]),
    ([SMOKE], ["--mode is required"]),
    (["--config=configs/gmm.py:bogus", "--mode=sample"], ["'bogus'", "smoke"]),
    (["--config=configs/nope.py", "--mode=sample"], ["no such file", "configs/nope.py"]),
    ([SMOKE, "--mode=sample", "--config.diffusion.sampler.steps=1.5"], ["steps=1.5"]),
])
def test_flag_errors(tmp_path, args, fragments):
  assert_user_error(launch(*args, f"--workdir={tmp_path}"), *fragments)


def test_jobs_cover_exactly_the_supported_modes(monkeypatch):
  monkeypatch.syspath_prepend(str(REPO))
  import launch as launch_module  # defines absl flags; nothing else here does
  from imagen_jax import jobs  # pylint: disable=g-import-not-at-top
  from imagen_jax.config_checks import KINDS
  supported = {(kind, mode) for kind in KINDS for mode in jobs.modes_of(kind)}
  assert set(launch_module.JOBS) == supported
  assert set(launch_module.MODES) == {"train", "sample", "eval", "precompute", "build_data",
                                     "eval_reference"}
  # Every job module exists and defines run(config, workdir).
  import importlib  # pylint: disable=g-import-not-at-top
  for target in launch_module.JOBS.values():
    module, function = target.split(":")
    assert callable(getattr(importlib.import_module(module), function)), target
