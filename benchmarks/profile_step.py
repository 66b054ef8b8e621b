r"""Where the train step's time goes on this machine: XLA's per-op profile, by category.

  python benchmarks/profile_step.py                          # base64.py:demo, batch 16
  python benchmarks/profile_step.py --only base64.py:emoji --batch 16 --steps 3

Compiles the train step exactly as benchmarks/train.py does, runs `--steps` steps under
`jax.profiler.trace` (after a warm-up), reads the trace's XLA op events back, and sums
their wall time by op (an event per executed HLO instruction or fusion, as XLA:CPU's
runtime reports them), and by category: the op's HLO opcode read from the optimized
program (a fusion is classed by what it contains: a convolution, a dot, a reduction, a
transpose or copy, else elementwise). XLA:CPU runs convolutions asynchronously on its
Eigen thread pool: their events time only the dispatch, and the executor then waits for
them. So the table adds a row "async (waiting on convolutions)": the step's wall time
minus the summed op time, which is that wait (the trace's "ThunkExecutor::Execute (wait
for completion)" less "ThunkExecutor::Execute" measures the same thing). Shares are of
the step's wall time. Writes OUT/profile_step.md (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

import machine
import step_inputs

CATEGORIES = ("convolution", "dot", "reduction", "transpose/copy", "elementwise", "other")


def _categories(hlo_text: str) -> dict[str, str]:
  """{instruction name: category} of the optimized HLO module's entry-level ops."""
  # Fused computations: name -> the opcodes inside.
  bodies: dict[str, set[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
    if head and "=" not in line.split("{")[0]:
      current = head.group(1)
      bodies[current] = set()
      continue
    op = re.match(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*[^=]*?\s([a-z\-]+)\(", line)
    if current is not None and op:
      bodies[current].add(op.group(1))
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*[^=]*?\s([a-z\-]+)\((.*)$", line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    ops = {opcode}
    if opcode == "fusion":
      called = re.search(r"calls=%?([\w.\-]+)", rest)
      ops = bodies.get(called.group(1), set()) if called else set()
    out[name] = _classify(ops)
  return out


def _classify(ops: set[str]) -> str:
  if "convolution" in ops:
    return "convolution"
  if "dot" in ops:
    return "dot"
  if ops & {"reduce", "reduce-window", "scatter"}:
    return "reduction"
  if ops and ops <= {"transpose", "copy", "bitcast", "reshape", "parameter", "slice",
                     "concatenate", "pad", "broadcast", "tuple", "get-tuple-element",
                     "constant"}:
    return "transpose/copy"
  if ops:
    return "elementwise"
  return "other"


def _events(trace_dir: str) -> list[dict]:
  files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not files:
    raise SystemExit(f"No trace written under {trace_dir}; this jax build's profiler may "
                     "not support the CPU backend.")
  with gzip.open(max(files, key=os.path.getmtime)) as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def profile(spec: str, batch: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import sharding
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  c = step_inputs.load_config(spec, batch)
  mesh = sharding.mesh_from_config(c.mesh)
  graphdef, state, shardings = state_lib.create_state(c, mesh)
  fn = step_lib.make_train_step(c, graphdef, shardings, mesh)
  b = step_inputs.synthetic_batch(c, batch)
  dev = step_lib.device_batch(b, mesh)
  compiled = fn.jitted.lower(state, dev).compile()
  cats = _categories(compiled.as_text())
  state, m = compiled(state, dev)
  jax.block_until_ready(m)
  trace_dir = tempfile.mkdtemp(prefix="profile_step_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, dev)
    jax.block_until_ready(m)
    wall = (time.perf_counter() - start) / steps
  by_op: collections.Counter = collections.Counter()
  for e in _events(trace_dir):
    name = e["name"].split(":")[0]
    if name in cats:
      by_op[name] += e["dur"] / 1e3 / steps  # us -> ms per step
  by_cat: collections.Counter = collections.Counter()
  for name, ms in by_op.items():
    by_cat[cats[name]] += ms
  return {"wall_ms": 1e3 * wall, "by_cat": dict(by_cat), "top": by_op.most_common(15),
          "cats": {n: cats[n] for n, _ in by_op.most_common(15)}}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="base64.py:demo")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  args = p.parse_args()
  load_before = machine.load()
  sections = []
  for spec in args.only.split(","):
    r = profile(spec, args.batch, args.steps)
    total, wall = sum(r["by_cat"].values()), r["wall_ms"]
    rows = [(cat, r["by_cat"].get(cat, 0.0)) for cat in CATEGORIES]
    rows.append(("async (waiting on convolutions)", max(0.0, wall - total)))
    lines = [f"## {spec}, batch {args.batch}", "",
             f"Step wall time {wall:.0f} ms; summed synchronous op time {total:.0f} ms.",
             "", "| category | ms/step | share of the step |", "| --- | ---: | ---: |"]
    lines += [f"| {cat} | {ms:.1f} | {100 * ms / wall:.1f}% |" for cat, ms in rows]
    lines += ["", "Largest ops:", "", "| op | category | ms/step |", "| --- | --- | ---: |"]
    lines += [f"| {name} | {r['cats'][name]} | {ms:.1f} |" for name, ms in r["top"]]
    sections.append("\n".join(lines))
    print(sections[-1], flush=True)
  text = ("# Where the train step's time goes (XLA:CPU op profile)\n\n"
          + machine.provenance(machine.command("profile_step.py", sys.argv[1:]), load_before)
          + f" {args.steps} profiled steps after a warm-up.\n\n" + "\n\n".join(sections) + "\n")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "profile_step.md"), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
