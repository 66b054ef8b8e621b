r"""Re-run the commands behind benchmarks/results/, each on an idle CPU, one after another.

  python benchmarks/remeasure.py                 # every entry below
  python benchmarks/remeasure.py --only train,compile_cache --max_load 0.3
  python benchmarks/remeasure.py --list

A timing taken while anything else runs is not a figure, and on a 2-core machine the
previous benchmark's own load lingers in the 1-minute average for a minute or two: before
each command this waits until that average is at most --max_load (machine.wait_for_idle),
so every results file starts with a "load before" near zero. Each script writes its own
results file(s) and records the load before and after itself. Entries needing trained
stages or built datasets (cascade.py, train_loop.py) are not listed: their files say how
they were made. Nothing else may run meanwhile, the test suite included.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

# name -> arguments of `python benchmarks/<script>`, run in this order.
COMMANDS: dict[str, list[str]] = {
    "compile_cache": ["compile_cache.py", "--only", "base64.py:demo", "--batch", "16"],
    "train": ["train.py"],
    "train_bf16": ["train.py", "--only", "base64.py:demo,base64.py:emoji",
                   "--set", "model.dtype=bfloat16", "--out", "benchmarks/results/train_bf16"],
    "models": ["models.py", "--before", "benchmarks/results/models_before_issue13"],
    "text": ["text.py"],
    "data": ["data.py"],
    "samplers": ["samplers.py"],
    "xla_cpu_flags": ["xla_cpu_flags.py", "--rounds", "2"],
    "profile_step": ["profile_step.py", "--only", "base64.py:demo"],
    # vs_torch.md keeps older runs as history below the current table, so these write
    # to /tmp and their tables are copied into it by hand.
    "vs_torch_demo": ["vs_torch.py", "--only", "base64.py:demo", "--out", "/tmp/vs_torch_demo"],
    "conv_vs_torch": ["conv_vs_torch.py"],
    "vs_torch_emoji": ["vs_torch.py", "--only", "base64.py:emoji", "--rounds", "3",
                       "--out", "/tmp/vs_torch_emoji"],
}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="", help="comma-separated names (see --list)")
  p.add_argument("--max_load", type=float, default=0.5)
  p.add_argument("--list", action="store_true")
  args = p.parse_args()
  names = [n for n in args.only.split(",") if n] or list(COMMANDS)
  unknown = sorted(set(names) - set(COMMANDS))
  if unknown:
    sys.exit(f"--only: unknown {unknown}; choose from {sorted(COMMANDS)}")
  if args.list:
    for n in names:
      print(f"{n}: python benchmarks/{' '.join(COMMANDS[n])}")
    return
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for n in names:
    load = machine.wait_for_idle(args.max_load)
    cmd = [sys.executable, os.path.join("benchmarks", COMMANDS[n][0]), *COMMANDS[n][1:]]
    print(f"[{n}] load {load:.2f}; running {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    rc = subprocess.call(cmd, cwd=repo)
    print(f"[{n}] exit {rc} after {time.monotonic() - start:.0f} s", flush=True)
    if rc:
      sys.exit(f"[{n}] failed (exit {rc}); the results files of the entries before it are written")


if __name__ == "__main__":
  main()
