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
