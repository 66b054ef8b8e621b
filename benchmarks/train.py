r"""Train-step throughput: images/s, FLOPs/s and MFU, compile time, peak host memory.

  python benchmarks/train.py                         # the CPU rows below
  python benchmarks/train.py --only base64.py:demo   # one config
  python benchmarks/train.py --only base64.py:500m --batch 64   # a GPU (peak from the table)
  python benchmarks/train.py --only base64.py:demo --set model.dtype=bfloat16 \
      --out benchmarks/results/train_bf16    # each config as is, then with the overrides

Each config runs in its own subprocess (so peak memory is its own): the sharded train
state is created, one jitted step (`imagen_jax.train.step`) compiled on synthetic batches
of the config's shapes (text embeddings random, as from the cache), then timed over
`--steps` steps after one warm-up. FLOPs per step come from XLA's cost analysis of the
compiled step; MFU = FLOPs/s / (peak per device x devices). The peak is
`imagen_jax.runtime.peak_flops_per_device()` unless --peak gives one: the data sheet's
dense bf16 for GPUs and TPUs, and for a CPU the best float32 matmul rate XLA reaches on
it (a lower bound on the hardware peak, so the CPU MFU is an upper bound). Writes
benchmarks/results/train.{md,csv}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time

import machine
import step_inputs

# (config, batch): the configs a CPU can step in seconds.
RUNS = (("base64.py:smoke", 8), ("base64.py:demo", 16), ("base64.py:emoji", 8),
        ("sr256.py:smoke", 8), ("sr256.py:demo", 16), ("sr256.py:emoji", 8))


def _override(config, assignment: str) -> None:
  """Sets KEY=VALUE (dotted KEY; VALUE a Python literal, else a string) on `config`."""
  import ast  # pylint: disable=g-import-not-at-top
  key, _, raw = assignment.partition("=")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def one(spec: str, batch: int, steps: int, peak: float, sets: tuple[str, ...] = ()) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import sharding
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

  c = step_inputs.load_config(spec, batch)
  for assignment in sets:
    _override(c, assignment)
  mesh = sharding.mesh_from_config(c.mesh)
  graphdef, state, shardings = state_lib.create_state(c, mesh)
  fn = step_lib.make_train_step(c, graphdef, shardings, mesh)
  b = step_inputs.synthetic_batch(c, batch)
  dev = step_lib.device_batch(b, mesh)
  start = time.perf_counter()
  compiled = fn.jitted.lower(state, dev).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0))
  state, m = compiled(state, dev)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, step_lib.device_batch(b, mesh))
  jax.block_until_ready(m)
  sec = (time.perf_counter() - start) / steps
  from imagen_jax import runtime  # pylint: disable=g-import-not-at-top
  peak_src = "--peak"
  if not peak:
    peak, peak_src = runtime.peak_flops_per_device()
  total_peak = peak * jax.device_count()
  label = spec + (f" [{', '.join(sets)}]" if sets else "")
  return {"config": label, "batch": batch, "params": int(sum(
      x.size for x in jax.tree.leaves(state.params))), "compile_s": compile_s,
          "step_s": sec, "images_per_s": batch / sec, "gflop_per_step": flops / 1e9,
          "gflops_per_s": flops / sec / 1e9, "mfu": flops / sec / total_peak,
          "peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "backend": f"{jax.default_backend()} x{jax.device_count()}",
          "peak_gflops_per_device": peak / 1e9, "peak_source": peak_src}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated FILE.py:VARIANT")
  parser.add_argument("--batch", type=int, default=0, help="override every run's batch")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--peak", type=float, default=0.0,
                      help="peak FLOP/s per device (0: imagen_jax.runtime's)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="also run every config with this override (repeatable: all "
                           "together)")
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    spec, batch = args.one.rsplit("@", 1)
    print(json.dumps(one(spec, int(batch), args.steps, args.peak, tuple(args.set))))
    return
  runs = [(s, b) for s, b in RUNS if not args.only or s in args.only.split(",")]
  runs += [(s, args.batch or 8) for s in args.only.split(",") if s and s not in dict(RUNS)]
  rows, load_before = [], machine.load()
  jobs = [(spec, args.batch or batch, sets) for spec, batch in runs
          for sets in ([[]] + ([args.set] if args.set else []))]
  for spec, batch, sets in jobs:
    proc = subprocess.run([sys.executable, __file__, f"--one={spec}@{batch}",
                           f"--steps={args.steps}", f"--peak={args.peak}",
                           *[f"--set={a}" for a in sets]],
                          capture_output=True, text=True)
    if proc.returncode:
      print(f"{spec}: failed\n{proc.stderr[-2000:]}")
      continue
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    rows.append(row)
    print(f"  {row['config']} batch {batch}: {row['images_per_s']:.2f} img/s, "
          f"{row['gflops_per_s']:.1f} GFLOP/s, MFU {100 * row['mfu']:.1f}%, "
          f"compile {row['compile_s']:.0f} s, peak host {row['peak_host_mib']:.0f} MiB")
  os.makedirs(args.out, exist_ok=True)
  command = " ".join(["python benchmarks/train.py"] + sys.argv[1:])
  peaks = sorted({f"{r['peak_gflops_per_device']:.0f} GFLOP/s ({r['peak_source']})"
                  for r in rows})
  lines = ["# Train-step throughput", "",
           f"Command: `{command}`; machine: {machine.describe()}; load average "
           f"{load_before:.2f} before, {machine.load():.2f} after; jax {_jax_version()}, "
           f"XLA_FLAGS as set by imagen_jax ({_xla_flags()}). Synthetic batches, text "
           "from a cache (no encoder in the step); img/s is the mean over "
           f"{args.steps} steps after one warm-up step. MFU against the peak per device: "
           f"{'; '.join(peaks)}.", "",
           "| config | backend | params | batch | img/s | GFLOP/step | GFLOP/s | MFU | "
           "compile s | peak host MiB |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  lines += [f"| {r['config']} | {r['backend']} | {r['params']:,} | {r['batch']} | "
            f"{r['images_per_s']:.2f} | {r['gflop_per_step']:.1f} | {r['gflops_per_s']:.1f} | "
            f"{100 * r['mfu']:.1f}% | {r['compile_s']:.0f} | {r['peak_host_mib']:.0f} |"
            for r in rows]
  with open(os.path.join(args.out, "train.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  if rows:
    with open(os.path.join(args.out, "train.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, list(rows[0]))
      w.writeheader()
      w.writerows(rows)
  print("\n".join(lines))


def _jax_version() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.__version__


def _xla_flags() -> str:
  import imagen_jax  # pylint: disable=g-import-not-at-top,unused-import
  return os.environ.get("XLA_FLAGS", "").strip() or "none"


if __name__ == "__main__":
  main()
