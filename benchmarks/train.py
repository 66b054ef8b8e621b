r"""Train-step throughput: images/s, FLOPs/s and MFU, compile time, peak memory.

  python benchmarks/train.py                         # the CPU rows below
  python benchmarks/train.py --only base64.py:demo   # one config
  python benchmarks/train.py --only base64.py:500m,sr256.py:600m --batch 8   # a GPU or TPU
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

On a GPU or TPU the same command runs each config in bfloat16 compute (`model.dtype`;
--dtype to choose) and searches its batch: from --batch it doubles, one subprocess per
try, until XLA reports RESOURCE_EXHAUSTED (or --max-batch), and reports the largest batch
that fit, with img/s per device and peak device memory (`peak_bytes_in_use`). On a CPU
it runs as it always has (the config's dtype, the given batch); `--batch-search` (with
`--dtype bfloat16`) runs the accelerator path there too, e.g. on a smoke config.
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

import batch_search
import machine
import step_inputs

# (config, batch): the configs a CPU can step in seconds.
RUNS = (("base64.py:smoke", 8), ("base64.py:demo", 16), ("base64.py:emoji", 8),
        ("sr256.py:smoke", 8), ("sr256.py:demo", 16), ("sr256.py:emoji", 8))
# Row keys only accelerator runs (or a CPU --batch-search) report, so CPU results keep
# their columns.
ACCEL_KEYS = ("dtype", "device_kind", "devices", "images_per_s_per_device",
              "peak_device_mib", "search")


class TrialFailed(RuntimeError):
  """A benchmark subprocess failed for a reason other than device memory."""


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


def resolve_dtype(dtype: str, config_dtype: str, backend: str) -> str:
  """--dtype -> the compute dtype: auto is bfloat16 on accelerators, the config's on CPU."""
  if dtype == "auto":
    return config_dtype if backend == "cpu" else "bfloat16"
  return config_dtype if dtype == "config" else dtype


def peak_device_bytes(devices) -> int | None:
  """The largest `peak_bytes_in_use` over `devices`; None where a backend keeps no
  allocator statistics (XLA:CPU)."""
  peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
  peaks = [p for p in peaks if p is not None]
  return max(peaks) if peaks else None


def one(spec: str, batch: int, steps: int, peak: float, sets: tuple[str, ...] = (),
        dtype: str = "auto", simulate_oom_above: int = 0) -> dict:
  """One config at one batch, in this process: its row, or {"oom": XLA's message} when
  the device runs out of memory."""
  import jax  # pylint: disable=g-import-not-at-top

  c = step_inputs.load_config(spec, batch)
  c.model.dtype = resolve_dtype(dtype, c.model.dtype, jax.default_backend())
  for assignment in sets:  # an explicit --set model.dtype=... wins over --dtype
    _override(c, assignment)
  label = spec + (f" [{', '.join(sets)}]" if sets else "")
  try:
    if simulate_oom_above and batch > simulate_oom_above:
      # Exercises the search's out-of-memory path on a CPU, where memory never runs out.
      raise jax.errors.JaxRuntimeError(
          f"RESOURCE_EXHAUSTED: simulated (--simulate-oom-above={simulate_oom_above})")
    row = _measure(c, batch, steps, peak)
  except Exception as e:  # pylint: disable=broad-except
    if not batch_search.is_out_of_memory(e):
      raise
    return {"config": label, "batch": batch, "oom": str(e).splitlines()[0]}
  return {"config": label, **row}


def _measure(c, batch: int, steps: int, peak: float) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import sharding
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top

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
  device_bytes = peak_device_bytes(jax.local_devices())
  return {"batch": batch, "params": int(sum(
      x.size for x in jax.tree.leaves(state.params))), "compile_s": compile_s,
          "step_s": sec, "images_per_s": batch / sec, "gflop_per_step": flops / 1e9,
          "gflops_per_s": flops / sec / 1e9, "mfu": flops / sec / total_peak,
          "peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "backend": f"{jax.default_backend()} x{jax.device_count()}",
          "peak_gflops_per_device": peak / 1e9, "peak_source": peak_src,
          "dtype": c.model.dtype, "device_kind": jax.devices()[0].device_kind,
          "devices": jax.device_count(),
          "images_per_s_per_device": batch / sec / jax.device_count(),
          "peak_device_mib": None if device_bytes is None else device_bytes / 2**20}


def _subprocess(spec: str, batch: int, sets: list[str], args) -> dict:
  """`one` in a fresh process (its own peak memory; a failed allocation leaves nothing
  behind). Raises OutOfMemory or TrialFailed."""
  proc = subprocess.run([sys.executable, __file__, f"--one={spec}@{batch}",
                         f"--steps={args.steps}", f"--peak={args.peak}",
                         f"--dtype={args.dtype}",
                         f"--simulate-oom-above={args.simulate_oom_above}",
                         *[f"--set={a}" for a in sets]],
                        capture_output=True, text=True)
  if proc.returncode:
    raise TrialFailed(proc.stderr[-2000:])
  row = json.loads(proc.stdout.strip().splitlines()[-1])
  if "oom" in row:
    raise batch_search.OutOfMemory(f"batch {batch} runs out of device memory: {row['oom']}")
  return row


def run_config(spec: str, batch: int, sets: list[str], args) -> dict:
  """One config's row: at `batch`, or at the largest batch that fits when searching."""
  tried: dict[int, dict] = {}

  def measure(b: int) -> dict:
    if b not in tried:
      tried[b] = _subprocess(spec, b, sets, args)
    return tried[b]

  search = args.batch_search
  if search is None:  # auto: search on GPUs and TPUs, which the first run reveals
    search = not measure(batch)["backend"].startswith("cpu")
  if not search:
    return measure(batch)
  found = batch_search.largest_batch(
      measure, batch, args.max_batch,
      on_trial=lambda b, what: print(f"    {spec} batch {b}: {what}", flush=True))
  return dict(found.result, search=found.stopped)


def table(rows: list[dict], accel: bool) -> list[str]:
  """The results table: today's CPU columns, or with `accel` the accelerator columns."""
  if not accel:
    return ["| config | backend | params | batch | img/s | GFLOP/step | GFLOP/s | MFU | "
            "compile s | peak host MiB |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"] + [
                f"| {r['config']} | {r['backend']} | {r['params']:,} | {r['batch']} | "
                f"{r['images_per_s']:.2f} | {r['gflop_per_step']:.1f} | "
                f"{r['gflops_per_s']:.1f} | {100 * r['mfu']:.1f}% | {r['compile_s']:.0f} | "
                f"{r['peak_host_mib']:.0f} |" for r in rows]
  lines = ["| config | device | dtype | params | batch | img/s | img/s per device | "
           "GFLOP/step | GFLOP/s | MFU | compile s | peak device MiB | peak host MiB |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
           "| ---: |"]
  for r in rows:
    batch = f"{r['batch']}" + (f" ({r['search']})" if r.get("search") else "")
    lines.append(
        f"| {r['config']} | {r['device_kind']} x{r['devices']} | {r['dtype']} | "
        f"{r['params']:,} | {batch} | {r['images_per_s']:.2f} | "
        f"{r['images_per_s_per_device']:.2f} | {r['gflop_per_step']:.1f} | "
        f"{r['gflops_per_s']:.1f} | {100 * r['mfu']:.1f}% | {r['compile_s']:.0f} | "
        f"{_mib(r.get('peak_device_mib'))} | "
        f"{r['peak_host_mib']:.0f} |")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated FILE.py:VARIANT")
  parser.add_argument("--batch", type=int, default=0,
                      help="override every run's (global) batch; where the batch is "
                           "searched, the batch it starts from")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--peak", type=float, default=0.0,
                      help="peak FLOP/s per device (0: imagen_jax.runtime's)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="also run every config with this override (repeatable: all "
                           "together)")
  parser.add_argument("--dtype", default="auto",
                      choices=("auto", "config", "float32", "bfloat16"),
                      help="compute dtype (model.dtype): auto = bfloat16 on GPUs/TPUs and "
                           "the config's own on CPU; config = always the config's")
  parser.add_argument("--batch-search", action=argparse.BooleanOptionalAction,
                      default=None,
                      help="double the batch until the device runs out of memory and "
                           "report the largest that fit (default: on for GPUs/TPUs, off "
                           "on CPU)")
  parser.add_argument("--max-batch", type=int, default=4096,
                      help="the batch search stops here")
  # Testing the accelerator path on a CPU: batches above N fail as out of memory.
  parser.add_argument("--simulate-oom-above", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    spec, batch = args.one.rsplit("@", 1)
    print(json.dumps(one(spec, int(batch), args.steps, args.peak, tuple(args.set),
                         args.dtype, args.simulate_oom_above)))
    return
  runs = [(s, b) for s, b in RUNS if not args.only or s in args.only.split(",")]
  runs += [(s, args.batch or 8) for s in args.only.split(",") if s and s not in dict(RUNS)]
  rows, load_before = [], machine.load()
  jobs = [(spec, args.batch or batch, sets) for spec, batch in runs
          for sets in ([[]] + ([args.set] if args.set else []))]
  for spec, batch, sets in jobs:
    try:
      row = run_config(spec, batch, sets, args)
    except TrialFailed as e:
      print(f"{spec}: failed\n{e}")
      continue
    except batch_search.OutOfMemory as e:
      print(f"{spec}: {e}")
      continue
    rows.append(row)
    accel_row = args.batch_search or not row["backend"].startswith("cpu")
    extra = (f", {row['images_per_s_per_device']:.2f} img/s per device, peak device "
             f"{_mib(row['peak_device_mib'])} MiB, {row['dtype']}") if accel_row else ""
    print(f"  {row['config']} batch {row['batch']}: {row['images_per_s']:.2f} img/s, "
          f"{row['gflops_per_s']:.1f} GFLOP/s, MFU {100 * row['mfu']:.1f}%, "
          f"compile {row['compile_s']:.0f} s, peak host {row['peak_host_mib']:.0f} MiB"
          f"{extra}", flush=True)
  # CPU runs keep their columns; GPU/TPU rows (or a CPU --batch-search) add dtype,
  # device, img/s per device, peak device memory and how the batch search ended.
  accel = bool(args.batch_search) or any(not r["backend"].startswith("cpu") for r in rows)
  if not accel:
    rows = [{k: v for k, v in r.items() if k not in ACCEL_KEYS} for r in rows]
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
           f"{'; '.join(peaks)}." + (
               " batch: the global batch; where searched, the largest that fit, "
               "doubling from --batch, and in parentheses where the search stopped. "
               "Peak device MiB: the largest peak_bytes_in_use of the local devices "
               "(n/a where the backend keeps no allocator statistics)." if accel else ""),
           ""] + table(rows, accel)
  with open(os.path.join(args.out, "train.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  if rows:
    with open(os.path.join(args.out, "train.csv"), "w", newline="") as f:
      keys = list(dict.fromkeys(k for r in rows for k in r))
      w = csv.DictWriter(f, keys, restval="")
      w.writeheader()
      w.writerows(rows)
  print("\n".join(lines))


def _mib(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.0f}"


def _jax_version() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.__version__


def _xla_flags() -> str:
  import imagen_jax  # pylint: disable=g-import-not-at-top,unused-import
  return os.environ.get("XLA_FLAGS", "").strip() or "none"


if __name__ == "__main__":
  main()
