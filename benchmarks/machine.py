"""What every benchmark records about the machine it ran on.

`describe()` -> e.g. "AMD EPYC (x86 family 26, 2 cores, AVX-512)": the model name alone
says little on a cloud host (this project's development CPU has been a Zen 3 without
AVX-512 and a Zen 5 with it under the same name), so the family and vector width go
with it. `load()` -> the 1-minute load average, to print before and after a timing.
"""

from __future__ import annotations

import os


def _cpuinfo() -> dict[str, str]:
  info: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key and key not in info:
          info[key] = value.strip()
        if not line.strip() and info:
          break
  except OSError:
    pass
  return info


def describe() -> str:
  info = _cpuinfo()
  name = info.get("model name", "unknown CPU")
  simd = "AVX-512" if "avx512f" in info.get("flags", "").split() else (
      "AVX2" if "avx2" in info.get("flags", "").split() else "no AVX2")
  family = f"x86 family {info['cpu family']}, " if "cpu family" in info else ""
  return f"{name} ({family}{os.cpu_count()} cores, {simd})"


def load() -> float:
  return os.getloadavg()[0]


def provenance(command: str, load_before: float) -> str:
  """One sentence for a results file: the command, the machine, the load average before
  (taken by the caller at its start) and now, jax's version and the XLA flags in force."""
  import jax  # pylint: disable=g-import-not-at-top
  import imagen_jax  # pylint: disable=g-import-not-at-top,unused-import  (its XLA defaults)
  flags = os.environ.get("XLA_FLAGS", "").strip() or "none"
  return (f"Command: `{command}`; machine: {describe()}; load average {load_before:.2f} "
          f"before, {load():.2f} after; jax {jax.__version__} "
          f"({jax.default_backend()}, {jax.device_count()} device(s)), XLA_FLAGS `{flags}`.")


def command(script: str, argv: list[str]) -> str:
  """The command line a results file quotes: `python benchmarks/SCRIPT ARGS`."""
  import shlex  # pylint: disable=g-import-not-at-top
  return shlex.join(["python", f"benchmarks/{script}", *argv])


def wait_for_idle(max_load: float = 0.5, timeout_s: float = 900.0, poll_s: float = 10.0,
                  log=print) -> float:
  """Blocks until the 1-minute load average is at most `max_load` (a previous run's load
  decays with a one-minute time constant, so ~1.5 min after a 2-core run ends); returns it.
  Raises TimeoutError naming the load after `timeout_s`: something else is using the CPU
  and a timing taken now would not be a figure."""
  import time  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  while (now := load()) > max_load:
    if time.monotonic() - start > timeout_s:
      raise TimeoutError(
          f"1-minute load average still {now:.2f} (> {max_load}) after {timeout_s:.0f} s: "
          "stop what else is running (`uptime`, `ps aux --sort=-%cpu | head`) and rerun.")
    log(f"waiting for an idle CPU: load {now:.2f} > {max_load}")
    time.sleep(poll_s)
  return now
