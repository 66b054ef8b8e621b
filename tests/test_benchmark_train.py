"""benchmarks/train.py on accelerators, tested on a CPU: the batch search (a fake step that
runs out of memory above a batch), the peak FLOP/s table, the bf16 default, the CPU table
kept as it was, and the accelerator path end to end on a smoke config with a simulated
out-of-memory error."""

from __future__ import annotations

import csv
import importlib.util
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from imagen_jax import runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def _load(name: str):
  """A benchmarks/ module under a private name (benchmarks/ is scripts, not a package;
  its modules import each other by bare name, hence the sys.path entry)."""
  if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # last: its data.py, text.py must not shadow anything
  spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


batch_search = _load("batch_search")
train = _load("train")

OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.23GiB."


def fake_step(fits_up_to: int, calls: list[int], error: str = OOM):
  """A benchmark that 'runs' up to a batch and raises XLA's error above it."""
  def measure(batch: int) -> dict:
    calls.append(batch)
    if batch > fits_up_to:
      raise jax.errors.JaxRuntimeError(error)
    return {"batch": batch, "images_per_s": 10.0 * batch}
  return measure


def test_search_doubles_until_out_of_memory_and_keeps_the_last_that_fit():
  calls = []
  found = batch_search.largest_batch(fake_step(48, calls), 3, 4096)
  assert calls == [3, 6, 12, 24, 48, 96]
  assert found.batch == 48 and found.result == {"batch": 48, "images_per_s": 480.0}
  assert found.stopped == "96 ran out of memory"


def test_search_stops_at_the_limit():
  calls = []
  found = batch_search.largest_batch(fake_step(10**9, calls), 8, 64)
  assert calls == [8, 16, 32, 64]
  assert (found.batch, found.stopped) == (64, "limit 64 reached")


def test_search_reports_each_trial():
  seen = []
  batch_search.largest_batch(fake_step(4, []), 2, 64, on_trial=lambda b, w: seen.append((b, w)))
  assert seen == [(2, "fits"), (4, "fits"), (8, "out of memory")]


def test_a_start_that_does_not_fit_says_to_start_lower():
  with pytest.raises(batch_search.OutOfMemory, match="--batch 8"):
    batch_search.largest_batch(fake_step(4, []), 16, 64)


@pytest.mark.parametrize("error", ["INVALID_ARGUMENT: batch 3 does not divide 8 devices",
                                   "INTERNAL: cuDNN failed"])
def test_other_xla_errors_are_not_taken_for_a_full_device(error):
  with pytest.raises(jax.errors.JaxRuntimeError, match=error.split(":")[0]):
    batch_search.largest_batch(fake_step(4, [], error), 2, 64)


def test_what_counts_as_out_of_memory():
  assert batch_search.is_out_of_memory(jax.errors.JaxRuntimeError(OOM))
  assert batch_search.is_out_of_memory(batch_search.OutOfMemory("from a subprocess"))
  # Some GPU allocation failures come back as INTERNAL.
  assert batch_search.is_out_of_memory(jax.errors.JaxRuntimeError(
      "INTERNAL: Failed to allocate 2.0GiB: out of memory"))
  assert not batch_search.is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED"))  # not XLA's
  assert not batch_search.is_out_of_memory(MemoryError())  # the host, not the device
  with pytest.raises(ValueError, match="--max-batch"):
    batch_search.largest_batch(fake_step(4, []), 128, 64)


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12),
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12)])
def test_peak_table(kind, peak):
  assert runtime.peak_flops_for_kind(kind) == peak
  flops, source = runtime.peak_flops_per_device(type("D", (), dict(
      platform="tpu" if "TPU" in kind else "gpu", device_kind=kind))())
  assert flops == peak and "dense bf16" in source


@pytest.mark.parametrize("kind", ["NVIDIA GeForce RTX 4090", "TPU v3", "Imaginary X1"])
def test_peak_table_unknown_kinds(kind):
  assert runtime.peak_flops_for_kind(kind) is None


@pytest.mark.parametrize("dtype,config,backend,want", [
    ("auto", "float32", "cpu", "float32"), ("auto", "float32", "gpu", "bfloat16"),
    ("auto", "float32", "tpu", "bfloat16"), ("auto", "bfloat16", "cpu", "bfloat16"),
    ("config", "float32", "gpu", "float32"), ("bfloat16", "float32", "cpu", "bfloat16"),
    ("float32", "bfloat16", "tpu", "float32")])
def test_compute_dtype(dtype, config, backend, want):
  assert train.resolve_dtype(dtype, config, backend) == want


CPU_ROW = {"config": "base64.py:demo", "batch": 16, "params": 2174531, "compile_s": 17.2,
           "step_s": 1.07, "images_per_s": 14.97, "gflop_per_step": 96.5,
           "gflops_per_s": 90.3, "mfu": 0.423, "peak_host_mib": 1968.0,
           "backend": "cpu x1", "peak_gflops_per_device": 213.0, "peak_source": "measured"}


def test_the_cpu_table_keeps_its_columns():
  committed = (BENCH / "results" / "train.md").read_text().splitlines()
  header = [line for line in committed if line.startswith(("| config", "| ---"))]
  lines = train.table([CPU_ROW], accel=False)
  assert lines[:2] == header
  assert lines[2] == ("| base64.py:demo | cpu x1 | 2,174,531 | 16 | 14.97 | 96.5 | 90.3 | "
                      "42.3% | 17 | 1968 |")


def test_the_accelerator_table():
  row = dict(CPU_ROW, backend="gpu x8", dtype="bfloat16", device_kind="NVIDIA A100-SXM4-80GB",
             devices=8, images_per_s_per_device=1.87, peak_device_mib=61234.4,
             search="32 ran out of memory")
  lines = train.table([row, dict(row, peak_device_mib=None, search=None)], accel=True)
  assert "img/s per device" in lines[0] and "peak device MiB" in lines[0]
  assert lines[0].count("|") == lines[1].count("|") == lines[2].count("|")
  assert ("| NVIDIA A100-SXM4-80GB x8 | bfloat16 | 2,174,531 | 16 (32 ran out of memory) | "
          "14.97 | 1.87 |") in lines[2]
  assert "| 61234 | 1968 |" in lines[2]
  assert "| 16 | 14.97 |" in lines[3] and "| n/a | 1968 |" in lines[3]


def test_accelerator_path_end_to_end_on_cpu(tmp_path):
  """--batch-search on the SR smoke config, bf16, with batches above 2 'out of memory':
  batch 2 is measured, batch 4 fails in its subprocess, the row keeps batch 2."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
  proc = subprocess.run(
      [sys.executable, str(BENCH / "train.py"), "--only=sr256.py:smoke", "--batch=2",
       "--steps=1", "--batch-search", "--dtype=bfloat16", "--simulate-oom-above=2",
       f"--out={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
  assert "sr256.py:smoke batch 2: fits" in proc.stdout
  assert "sr256.py:smoke batch 4: out of memory" in proc.stdout
  md = (tmp_path / "train.md").read_text()
  assert "img/s per device" in md
  assert "| sr256.py:smoke | cpu x1 | bfloat16 | 131,811 | 2 (4 ran out of memory) |" in md
  with open(tmp_path / "train.csv") as f:
    (row,) = list(csv.DictReader(f))
  assert row["dtype"] == "bfloat16" and row["batch"] == "2" and row["devices"] == "1"
  assert row["peak_device_mib"] == ""  # XLA:CPU keeps no allocator statistics
  assert float(row["images_per_s"]) > 0 and 0 < float(row["mfu"]) < 1


def test_peak_device_memory_is_the_largest_over_devices():
  def device(stats):
    return type("D", (), {"memory_stats": lambda self: stats})()
  assert train.peak_device_bytes([device({"peak_bytes_in_use": 5, "bytes_in_use": 9}),
                                  device({"peak_bytes_in_use": 7})]) == 7
  assert train.peak_device_bytes([device(None), device({})]) is None  # XLA:CPU: no stats
