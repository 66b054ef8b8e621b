"""launch.py --mode=train end to end on the smoke configs (subprocesses, 8 simulated CPU
devices): outputs, exact resume after kill -9, SIGTERM, a new mesh on resume, two
processes matching one, and errors before compilation.

Launches dominate the time here, so one uninterrupted 20-step run (made once per session,
shared by xdist workers) is the reference of several tests: its outputs, its final params
(kill -9 + resume), its step-10 checkpoint (resumed on another mesh) and its losses (two
processes). Repeated launches of one config load their programs from the session's
persistent compilation cache (tests/conftest.py) instead of compiling them again."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from imagen_jax import config_files
from imagen_jax import sharding as sharding_lib
from imagen_jax.train import checkpointing, state as state_lib
from imagen_jax.train import trainer

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from test_launch import as_result, assert_user_error, launch  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = 20
COMMON = (f"--config.train.steps={STEPS}", "--config.ckpt.every=5", "--config.log.every=5",
          "--config.log.sample_every=10", "--config.ckpt.async_save=False")
# For the launches that only check training: the grids (compiling and running the
# sampler, ~10 s of a smoke launch) are the uninterrupted run's to test. They use their
# own fixed RNG key, so leaving them out changes no training step.
NO_GRIDS = "--config.log.sample_every=0"


@pytest.fixture(scope="module")
def data_dir(smoke_data):
  return smoke_data[0]  # the base64 and sr256 smoke datasets (conftest.py)


def train_args(workdir, data_dir, config="configs/base64.py:smoke", *extra):
  return (f"--config={config}", f"--workdir={workdir}", "--mode=train",
          f"--config.data.data_dir={data_dir}", *COMMON, *extra)


def final_params(workdir, config="configs/base64.py", mesh=None):
  """The params of the newest checkpoint in workdir, as numpy leaves."""
  cfg = config_files.load(REPO / config, "smoke")
  mesh = mesh or sharding_lib.mesh_from_config(cfg.mesh)
  _, abstract, _ = state_lib.abstract_state(cfg, mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=100)
  state, _, step = ckpt.restore(abstract)
  ckpt.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def read_rows(workdir) -> list[dict]:
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(run_once, data_dir):
  """The workdir of one uninterrupted STEPS-step run on the base smoke config (mesh data=-1:
  data-parallel over the 8 devices), made once per session. Tests only read it."""
  def make(workdir):
    proc = launch(*train_args(workdir, data_dir))
    assert proc.returncode == 0, proc.stderr
    return as_result(proc)

  return run_once("uninterrupted_base64_smoke", make)[0]


def test_train_leaves_checkpoints_logs_and_grids(uninterrupted):
  workdir = uninterrupted
  rows = read_rows(workdir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert any(k.startswith("loss/bucket") for k in rows[-1])
  assert rows[-1]["loss"] < rows[0]["loss"]  # 20 steps at lr 1e-3 on 8 images: it falls
  assert list((workdir / "tensorboard").iterdir())
  assert len(list((workdir / "samples").glob("*.png"))) == 2  # steps 10 and 20
  assert (workdir / "loss.png").stat().st_size > 0
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit())[-1] == STEPS


def test_kill_9_then_resume_equals_uninterrupted_bit_for_bit(uninterrupted, data_dir, tmp_path):
  # SIGKILL at a random step past the first checkpoint (the trainer kills itself there:
  # polling from outside cannot hit a chosen step of a run this fast).
  kill_at = int(np.random.default_rng().integers(6, STEPS))
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{trainer.KILL_AT_STEP_ENV: str(kill_at)})
  args = train_args(tmp_path, data_dir, "configs/base64.py:smoke", NO_GRIDS)
  proc = subprocess.run([sys.executable, "launch.py", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
  resumed = launch(*args)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from step" in resumed.stdout
  step_a, a = final_params(uninterrupted)
  step_b, b = final_params(tmp_path)
  assert step_a == step_b == STEPS
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_sigterm_saves_and_exits_cleanly(data_dir, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  args = train_args(tmp_path, data_dir, "configs/base64.py:smoke", "--config.train.steps=100000",
                    NO_GRIDS)
  proc = subprocess.Popen([sys.executable, "launch.py", *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err
  assert "preemption signal: saved step" in out
  saved = int(out.split("preemption signal: saved step")[1].split(",")[0])
  ckpt = checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints"), every=1, keep=10)
  assert ckpt.latest_step() == saved
  ckpt.close()


def test_resume_on_another_mesh(uninterrupted, data_dir, tmp_path):
  # 10 steps on mesh data=8, then 10 more on (data=2, fsdp=4): the checkpoint is restored
  # onto the new shardings. The first 10 steps are the uninterrupted run's (data=-1 is
  # data=8 on the 8 devices): its step-10 checkpoint and its log up to step 10 are what a
  # 10-step run leaves (the constant lr schedule does not depend on train.steps).
  shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints",
                  ignore=lambda d, names: [n for n in names if n.isdigit() and int(n) > 10])
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10"]
  reference = read_rows(uninterrupted)
  (tmp_path / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in reference if r["step"] <= 10))
  second = launch(*train_args(tmp_path, data_dir, "configs/base64.py:smoke",
                              "--config.mesh.data=2", "--config.mesh.fsdp=4", NO_GRIDS))
  assert second.returncode == 0, second.stderr
  assert "resumed from step 10" in second.stdout
  rows = read_rows(tmp_path)
  assert [r["step"] for r in rows] == [5, 10, 15, 20]
  # The resumed steps continue the same run: only the reduction order of the sharded
  # contractions differs from the data=8 mesh (float32 rounding over 10 steps).
  np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference],
                             rtol=1e-4)


def test_sr_stage_trains(data_dir, tmp_path):
  proc = launch(*train_args(tmp_path, data_dir, "configs/sr256.py:smoke",
                            "--config.train.steps=10"))
  assert proc.returncode == 0, proc.stderr
  rows = read_rows(tmp_path)
  assert all(np.isfinite(r["loss"]) for r in rows)
  assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(uninterrupted, data_dir, tmp_path):
  """2 processes x 4 CPU devices (gloo on loopback) vs 1 process x 8 devices (the first
  10 steps of the uninterrupted run: its sample grids use their own fixed RNG key, so
  they do not change the training steps)."""
  steps = ("--config.train.steps=10", NO_GRIDS)
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, "launch.py",
       *train_args(tmp_path / "two", data_dir, "configs/base64.py:smoke", *steps),
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err
  one = [r for r in read_rows(uninterrupted) if r["step"] <= 10]
  two = read_rows(tmp_path / "two")
  assert [r["step"] for r in two] == [r["step"] for r in one] == [5, 10]
  # Same data order and RNG; only the reduction order of the cross-process all-reduce
  # differs, so the losses agree to float32 rounding over 10 steps.
  np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4)


def test_errors_before_compiling(data_dir, tmp_path):
  assert_user_error(launch(*train_args(tmp_path, data_dir, "configs/base64.py:smoke",
                                       "--config.mesh.data=3")),
                    "mesh", "devices")
  assert_user_error(launch(*train_args(tmp_path, data_dir, "configs/base64.py:smoke",
                                       "--config.train.batch_size=6")),
                    "train.batch_size=6", "--config.train.batch_size=")
  assert_user_error(launch(*train_args(tmp_path, tmp_path / "no_data",
                                       "configs/base64.py:smoke")),
                    "is not built", "--mode=build_data")
