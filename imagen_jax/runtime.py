"""Process-level settings every entry point shares: XLA:CPU flags, the persistent
compilation cache, and the peak FLOP/s that MFU is measured against.

XLA:CPU flags. jaxlib 0.10.2 sends convolutions and dots to YNNPACK by default
(`--xla_cpu_experimental_ynn_fusion_type`). On the training step of our U-Nets that is
the slow path: measured on the 2-core development CPU (AMD EPYC, x86 family 25,
AVX-512), the base64.py:demo step runs at 10.7 img/s with YNNPACK and 14.0 img/s with
XLA's own (Eigen) convolutions, and the emoji step at 1.9 and 2.5 img/s
(`python benchmarks/xla_cpu_flags.py`, benchmarks/results/xla_cpu_flags.md, which also
shows the losses agree to float32 rounding, 1e-7 relative). The weight-gradient convolutions are where
YNNPACK loses most. So `apply_xla_flag_defaults` (run when `imagen_jax` is imported)
turns YNNPACK fusions off, unless the user's XLA_FLAGS already name that flag or
IMAGEN_JAX_XLA_DEFAULTS=0. The flag only concerns the CPU backend; GPU and TPU runs are
unaffected. It must be in the environment before JAX starts its backend, which is why
it is set at import.

Compilation cache. XLA:CPU takes 15-60 s to compile a train step; `launch.py` keeps
compiled programs in JAX's persistent cache (`enable_compilation_cache`), so a resumed
run, a second sweep arm with the same shapes, a second `make demo` and the eval job pay
each compile once. Executables are keyed by the program, the jax/jaxlib version, the
XLA flags and the device, so a changed program is never served a stale executable.

Peak FLOP/s. MFU needs the hardware's peak. For accelerators it is the vendor's dense
bf16 figure (`PEAK_FLOPS`); for a CPU, whose clock and vector width vary with the host,
it is measured (`measured_cpu_flops`): the best float32 matmul rate XLA reaches, a lower
bound on the true peak, so the MFU it gives is an upper bound, and says so.
"""

from __future__ import annotations

import functools
import os
import time
import warnings

# Flags appended to XLA_FLAGS unless the user set them (see the module docstring).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
_OPT_OUT = "IMAGEN_JAX_XLA_DEFAULTS"

# Default directory of the persistent compilation cache (launch.py --compilation_cache_dir).
DEFAULT_CACHE_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imagen_jax", "xla")

# Dense bf16 peak FLOP/s per device (a GPU, or a TPU chip as JAX shows it), from the
# vendors' data sheets, keyed by a lower-case substring of jax's `device_kind`; the
# longest key that matches wins ("tpu v5 lite" over "tpu v5", "h100 pcie" over "h100").
# Kinds as JAX reports them: "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3",
# "NVIDIA H100 PCIe", "NVIDIA H200", "TPU v4", "TPU v5 lite" (v5e), "TPU v5" / "TPU v5p"
# (v5p), "TPU v6 lite" (v6e, Trillium). A CPU is measured instead (measured_cpu_flops).
PEAK_FLOPS = {
    "a100": 312e12,
    "h100": 989e12,  # SXM
    "h100 pcie": 756e12,
    "h200": 989e12,  # also GH200
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,  # v5e
    "tpu v5e": 197e12,
    "tpu v5": 459e12,  # v5p
    "tpu v5p": 459e12,
    "tpu v6 lite": 918e12,  # v6e
}


def peak_flops_for_kind(device_kind: str) -> float | None:
  """The data sheet's dense bf16 FLOP/s for a jax `device_kind`, or None if unknown."""
  kind = device_kind.lower()
  matches = [key for key in PEAK_FLOPS if key in kind]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def _flag_name(flag: str) -> str:
  return flag.split("=", 1)[0].lstrip("-")


def apply_xla_flag_defaults() -> list[str]:
  """Appends CPU_XLA_FLAGS to XLA_FLAGS (never overriding a flag the user set); returns
  the flags added. Warns if JAX's backend already started, when flags no longer apply."""
  if os.environ.get(_OPT_OUT, "1") == "0":
    return []
  current = os.environ.get("XLA_FLAGS", "")
  added = [f for f in CPU_XLA_FLAGS if _flag_name(f) not in current]
  if not added:
    return []
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = False
  if started:
    warnings.warn(f"imagen_jax was imported after JAX started its backend, so its XLA:CPU "
                  f"defaults {added} do not apply (CPU training is then up to 1.3x "
                  "slower). Import imagen_jax before using JAX, or set them in XLA_FLAGS.")
    return []
  os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def enable_compilation_cache(directory: str | None = None) -> str:
  """Turns on JAX's persistent compilation cache in `directory` (default: an existing
  JAX_COMPILATION_CACHE_DIR, else DEFAULT_CACHE_DIR); returns the directory."""
  import jax  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.expanduser(
      directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE_DIR))
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", directory)
  # Our slow compiles are the train step, samplers and encoders (seconds to a minute);
  # programs under half a second are cheaper to compile than to write out.
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return directory


def disable_compilation_cache() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_enable_compilation_cache", False)


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(size: int = 2048, repeats: int = 5) -> float:
  """The best float32 FLOP/s of an XLA size x size matmul on all CPU devices' cores (the
  process's CPU; one matmul uses every core)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  cpu = jax.devices("cpu")[0]
  a = jax.device_put(jnp.ones((size, size), jnp.float32), cpu)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(mm(a))
    best = min(best, time.perf_counter() - start)
  return 2.0 * size**3 / best


def peak_flops_per_device(device=None) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  import jax  # pylint: disable=g-import-not-at-top
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    # XLA's CPU devices share the host's cores; with N simulated devices each gets 1/N.
    n = len(jax.devices("cpu"))
    return measured_cpu_flops() / n, "measured: best float32 XLA matmul on this CPU"
  flops = peak_flops_for_kind(device.device_kind)
  if flops is not None:
    return flops, f"data sheet, dense bf16 ({device.device_kind})"
  raise ValueError(f"No peak FLOP/s known for device kind {device.device_kind!r}; pass "
                   "it explicitly (log.peak_flops / benchmarks/train.py --peak) or add it to "
                   "imagen_jax.runtime.PEAK_FLOPS.")
