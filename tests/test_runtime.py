"""imagen_jax/runtime.py: the XLA:CPU flag defaults applied at import (in fresh
processes, since XLA reads its flags once), launch.py's compilation cache, and the peak
FLOP/s table behind MFU."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import types

import pytest

from imagen_jax import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
YNN = "--xla_cpu_experimental_ynn_fusion_type"


def python(code: str, **env: str) -> subprocess.CompletedProcess:
  full = dict(os.environ, JAX_PLATFORMS="cpu")
  for key, value in env.items():
    if value is None:
      full.pop(key, None)
    else:
      full[key] = value
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full,
                        capture_output=True, text=True, timeout=120)


# Imports the package, then starts the backend: XLA aborts on a flag it does not know, so
# this also proves the current jaxlib still accepts the flag we set.
SHOW = ("import os, imagen_jax, jax; jax.devices(); "
        "print('XLA_FLAGS=' + os.environ.get('XLA_FLAGS', ''))")


def flags_of(proc: subprocess.CompletedProcess) -> str:
  assert proc.returncode == 0, proc.stderr
  return proc.stdout.strip().splitlines()[-1].removeprefix("XLA_FLAGS=")


def test_import_adds_the_cpu_flag_and_keeps_the_users():
  flags = flags_of(python(SHOW, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                          IMAGEN_JAX_XLA_DEFAULTS=None))
  assert flags.split() == ["--xla_force_host_platform_device_count=2", f"{YNN}="]


def test_a_flag_the_user_set_wins():
  mine = f"{YNN}=individual_dot"
  flags = flags_of(python(SHOW, XLA_FLAGS=mine, IMAGEN_JAX_XLA_DEFAULTS=None))
  assert flags == mine


def test_opt_out():
  flags = flags_of(python(SHOW, XLA_FLAGS="", IMAGEN_JAX_XLA_DEFAULTS="0"))
  assert YNN not in flags


def test_warns_when_imported_after_the_backend_started():
  proc = python("import warnings, jax; jax.devices(); warnings.simplefilter('always'); "
                "import imagen_jax", XLA_FLAGS="", IMAGEN_JAX_XLA_DEFAULTS=None)
  assert proc.returncode == 0, proc.stderr
  assert "do not apply" in proc.stderr and "Import imagen_jax before" in proc.stderr


def cached_files(directory: pathlib.Path) -> list[pathlib.Path]:
  return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def test_launch_writes_the_compilation_cache_where_told_and_not_when_off(tmp_path):
  def launch(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return subprocess.run([sys.executable, "launch.py", "--config=configs/gmm.py:smoke",
                           "--mode=sample", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  cache = tmp_path / "cache"
  proc = launch(f"--workdir={tmp_path / 'on'}", f"--compilation_cache_dir={cache}")
  assert proc.returncode == 0, proc.stderr
  assert cached_files(cache), "no compiled program was written to --compilation_cache_dir"
  off = tmp_path / "off_cache"
  proc = launch(f"--workdir={tmp_path / 'off'}", "--nocompilation_cache",
                f"--compilation_cache_dir={off}")
  assert proc.returncode == 0, proc.stderr
  assert not cached_files(off)


def fake_device(platform: str, kind: str):
  return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize("kind,peak", [("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA A100-SXM4-40GB", 312e12),
                                       ("NVIDIA H200", 989e12),
                                       ("TPU v4", 275e12),
                                       ("TPU v5 lite", 197e12),
                                       ("TPU v5p", 459e12)])
def test_peak_from_the_data_sheet(kind, peak):
  flops, source = runtime.peak_flops_per_device(fake_device("gpu", kind))
  assert flops == peak and kind in source


def test_unknown_accelerator_says_how_to_fix():
  with pytest.raises(ValueError, match="log.peak_flops"):
    runtime.peak_flops_per_device(fake_device("gpu", "Imaginary X1"))


def test_cpu_peak_is_measured_and_shared_by_the_simulated_devices():
  import jax  # pylint: disable=g-import-not-at-top
  flops, source = runtime.peak_flops_per_device(jax.devices("cpu")[0])
  total = runtime.measured_cpu_flops()
  assert "measured" in source
  # A 2048^3 float32 matmul: anything from 1 GFLOP/s (a slow CI host) to 100 TFLOP/s.
  assert 1e9 < total < 1e14
  assert flops == pytest.approx(total / len(jax.devices("cpu")))
