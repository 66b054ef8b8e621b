r"""Cold and warm compile times of a train step with the persistent compilation cache.

  python benchmarks/compile_cache.py                       # base64.py:demo, batch 16
  python benchmarks/compile_cache.py --only base64.py:demo,sr256.py:demo

For each config, three fresh processes compile the train-state init and the train step
(what `launch.py --mode=train` compiles before its first step): one without the cache,
one with an empty cache directory (cold: compiles and writes), one with that directory
filled (warm: reads). Each process is new, as a resumed run or another sweep arm is.
Writes benchmarks/results/compile_cache.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import machine
import step_inputs


def one(spec: str, batch: int, cache_dir: str) -> dict:
  from imagen_jax import runtime  # pylint: disable=g-import-not-at-top
  if cache_dir:
    runtime.enable_compilation_cache(cache_dir)
  else:
    runtime.disable_compilation_cache()
  from imagen_jax import sharding
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  c = step_inputs.load_config(spec, batch)
  mesh = sharding.mesh_from_config(c.mesh)
  t0 = time.perf_counter()
  graphdef, state, shardings = state_lib.create_state(c, mesh)
  init_s = time.perf_counter() - t0
  fn = step_lib.make_train_step(c, graphdef, shardings, mesh)
  b = step_inputs.synthetic_batch(c, batch)
  dev = step_lib.device_batch(b, mesh)
  t0 = time.perf_counter()
  fn.jitted.lower(state, dev).compile()
  return {"init_s": init_s, "step_compile_s": time.perf_counter() - t0}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="base64.py:demo")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  p.add_argument("--one", default="", help=argparse.SUPPRESS)
  p.add_argument("--cache", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.one:
    print(json.dumps(one(args.one, args.batch, args.cache)))
    return
  load = os.getloadavg()
  rows = []
  for spec in args.only.split(","):
    with tempfile.TemporaryDirectory() as cache:
      row = {"config": spec}
      for label, d in (("no cache", ""), ("cold", cache), ("warm", cache)):
        proc = subprocess.run([sys.executable, __file__, f"--one={spec}", f"--cache={d}",
                               f"--batch={args.batch}"], capture_output=True, text=True,
                              check=True)
        row[label] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{spec} {label}: {row[label]}", flush=True)
      rows.append(row)
  lines = ["# Compile times with the persistent compilation cache", "",
           f"Command: `python benchmarks/compile_cache.py --only {args.only} --batch "
           f"{args.batch}`; CPU: {machine.describe()}; load average before {load[0]:.2f}, after "
           f"{os.getloadavg()[0]:.2f}. Each column is a fresh process: without the cache, "
           "with an empty cache directory (cold), with the directory the cold run filled "
           "(warm). Seconds to build the train state (init program) and to compile the "
           "train step.", "",
           "| config | batch | init: no cache / cold / warm s | step compile: no cache / cold / warm s |",
           "| --- | ---: | ---: | ---: |"]
  for r in rows:
    f = lambda k: " / ".join(f"{r[c][k]:.1f}" for c in ("no cache", "cold", "warm"))
    lines.append(f"| {r['config']} | {args.batch} | {f('init_s')} | {f('step_compile_s')} |")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "compile_cache.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
