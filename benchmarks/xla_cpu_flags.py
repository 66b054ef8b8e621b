r"""XLA:CPU flag variants of the train step: speed, and the same losses.

  python benchmarks/xla_cpu_flags.py                          # base64 demo + emoji
  python benchmarks/xla_cpu_flags.py --only base64.py:demo --steps 8
  python benchmarks/xla_cpu_flags.py --only base64.py:demo --builtin 2 \
      --add "vector width 512::--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_prefer_vector_width=512" \
      --out benchmarks/results/xla_cpu_flags_probe     # try a flag against our default

Each variant runs in a fresh process (XLA reads its flags once, at backend start) with
XLA_FLAGS set as listed, and IMAGEN_JAX_XLA_DEFAULTS=0 so that imagen_jax adds nothing:
the train state from the config's seed, one fixed synthetic batch, `--steps` timed
steps after one warm-up. The variants take turns over `--rounds` rounds and each
reports its median img/s (min-max): this machine's speed drifts by 20-30% over minutes
(a shared cloud host), so only variants timed in alternation can be compared. A shared
compilation cache makes the later rounds cheap. It records the loss of every step; the losses of a
variant are compared with those of jaxlib's defaults, so a flag that changes the
numerics more than float32 reassociation would (relative 1e-5 over a few steps) shows.
This is the measurement behind imagen_jax/runtime.py's CPU_XLA_FLAGS. Writes
benchmarks/results/xla_cpu_flags.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import machine
import step_inputs

VARIANTS = (
    ("jaxlib defaults (YNNPACK convolutions and dots)", ""),
    ("imagen_jax default: YNNPACK off (XLA's Eigen convolutions)",
     "--xla_cpu_experimental_ynn_fusion_type="),
    ("YNNPACK dots only", "--xla_cpu_experimental_ynn_fusion_type=individual_dot"),
    ("XNNPACK convolutions", "--xla_cpu_experimental_ynn_fusion_type= "
     "--xla_cpu_experimental_xnn_fusion_type=individual_convolution"),
    ("oneDNN", "--xla_cpu_use_onednn=true"),
    ("oneDNN, YNNPACK off", "--xla_cpu_use_onednn=true --xla_cpu_experimental_ynn_fusion_type="),
)


def one(spec: str, batch: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import sharding
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  c = step_inputs.load_config(spec, batch)
  mesh = sharding.mesh_from_config(c.mesh)
  graphdef, state, shardings = state_lib.create_state(c, mesh)
  fn = step_lib.make_train_step(c, graphdef, shardings, mesh)
  b = step_inputs.synthetic_batch(c, batch)
  losses = []
  state, m = fn(state, b)
  losses.append(float(m["loss"]))
  start = time.perf_counter()
  for _ in range(steps):
    state, m = fn(state, b)
    losses.append(float(m["loss"]))  # a host read per step, as the trainer's logging
  sec = (time.perf_counter() - start) / steps
  return {"images_per_s": batch / sec, "losses": losses,
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--only", default="base64.py:demo,base64.py:emoji")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  p.add_argument("--builtin", type=int, default=len(VARIANTS),
                 help="run the first N built-in variants (2: jaxlib defaults, the loss "
                      "reference, and imagen_jax's default)")
  p.add_argument("--add", action="append", default=[], metavar="LABEL::FLAGS",
                 help="another variant: a label and its whole XLA_FLAGS (repeatable)")
  p.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if not 1 <= args.builtin <= len(VARIANTS):
    p.error(f"--builtin {args.builtin}: 1 to {len(VARIANTS)} (the first is the loss reference)")
  bad = [a for a in args.add if "::" not in a]
  if bad:
    p.error(f"--add {bad[0]!r}: write LABEL::FLAGS, e.g. 'width 512::--xla_cpu_prefer_vector_width=512'")
  variants = VARIANTS[:args.builtin] + tuple(tuple(a.split("::", 1)) for a in args.add)
  if args.one:
    print(json.dumps(one(args.one, args.batch, args.steps)))
    return
  load_before, rows = machine.load(), []
  failed: dict[tuple[str, str], str] = {}  # (config, variant) -> the last line of its error
  with tempfile.TemporaryDirectory() as cache:
    for spec in args.only.split(","):
      runs: dict[str, list[dict]] = {label: [] for label, _ in variants}
      for rnd in range(args.rounds):
        for label, flags in variants:
          env = {**os.environ, "XLA_FLAGS": flags, "IMAGEN_JAX_XLA_DEFAULTS": "0",
                 "JAX_COMPILATION_CACHE_DIR": cache,
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
          proc = subprocess.run([sys.executable, __file__, f"--one={spec}",
                                 f"--batch={args.batch}", f"--steps={args.steps}"],
                                capture_output=True, text=True, env=env)
          if proc.returncode:
            print(f"{spec} {label}: failed\n{proc.stderr[-1500:]}")
            failed[(spec, label)] = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            continue
          r = json.loads(proc.stdout.strip().splitlines()[-1])
          runs[label].append(r)
          print(f"{spec} round {rnd + 1} | {label}: {r['images_per_s']:.2f} img/s, "
                f"losses {r['losses']}", flush=True)
      ref = runs[variants[0][0]]
      ref_speed = statistics.median(r["images_per_s"] for r in ref)
      for label, flags in variants:
        if not runs[label]:
          continue
        speeds = [r["images_per_s"] for r in runs[label]]
        rel = max(abs(a - b) / abs(b) for a, b in zip(runs[label][0]["losses"],
                                                       ref[0]["losses"]))
        rows.append({"config": spec, "variant": label, "flags": flags or "(none)",
                     "images_per_s": statistics.median(speeds), "min": min(speeds),
                     "max": max(speeds), "speedup": statistics.median(speeds) / ref_speed,
                     "loss_rel_diff": rel, "jax": runs[label][0]["jax"]})
  lines = ["# XLA:CPU flags on the train step", "",
           f"Command: `{machine.command('xla_cpu_flags.py', sys.argv[1:])}`;"
           f" machine: {machine.describe()}; jax {rows[0]['jax'] if rows else '?'}; load "
           f"average {load_before:.2f} before, {machine.load():.2f} after. Batch "
           f"{args.batch}, {args.steps} timed steps after a warm-up, each variant in a fresh "
           "process; the variants alternate over "
           f"{args.rounds} rounds; img/s is the median (min-max) over rounds. 'loss diff' is the largest relative difference of the per-step losses "
           f"({args.steps + 1} steps from the same seed and batch) from jaxlib's defaults.",
           "", "| config | variant | XLA_FLAGS | img/s | vs jaxlib defaults | loss diff |",
           "| --- | --- | --- | ---: | ---: | ---: |"]
  lines += [f"| {r['config']} | {r['variant']} | `{r['flags']}` | {r['images_per_s']:.2f} "
            f"({r['min']:.2f}-{r['max']:.2f}) | {r['speedup']:.2f}x | {r['loss_rel_diff']:.1e} |"
            for r in rows]
  if failed:
    lines += ["", "Variants that failed (XLA_FLAGS as listed in the command):", ""]
    lines += [f"- {spec}, {label}: `{err[-300:]}`" for (spec, label), err in failed.items()]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "xla_cpu_flags.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
