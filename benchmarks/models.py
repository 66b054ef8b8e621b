r"""Parameters, FLOPs and activation memory per image, and CPU step times of every network.

  python benchmarks/models.py              # every config; paper scale shape-only
  python benchmarks/models.py --only smoke,emoji
  python benchmarks/models.py --before benchmarks/results/models_before_issue13

For each config variant: the parameter count (from `nnx.eval_shape`, no memory), FLOPs
per image of a forward pass and of a train step (forward + backward of an eps-MSE loss),
both from XLA's cost analysis of the jitted function lowered on abstract shapes (so the
2B model costs no memory); activation memory per image, as XLA's memory analysis of the
compiled program's temporaries (everything but parameters, inputs and outputs) at batch
1: for the train step at the training resolution (SR crops), and for one sampling
forward pass at the stage's full output resolution (where an SR stage runs when it
samples); and, for the configs small enough for this machine, the measured forward and
train-step time at a small batch. Writes benchmarks/results/models.{md,csv} and prints
the table. `--before PREFIX` adds a before -> after table against PREFIX.csv (an earlier
models.csv, e.g. of an older checkout: run this script from that checkout's directory
with PYTHONPATH pointing at it) and PREFIX.md (a paragraph saying what changed and how
the before side was measured).
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from imagen_jax import config_files
from imagen_jax.models import build_model, count_params, example_inputs

import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config file, variant, batch for timing or None for shape-only). Timed at batch 2 on
# CPU; paper-scale configs are only measured abstractly.
RUNS = (
    ("configs/base64.py", "smoke", 2), ("configs/base64.py", "demo", 2),
    ("configs/base64.py", "emoji", 2),
    ("configs/base64.py", "500m", None), ("configs/base64.py", "2b", None),
    ("configs/sr256.py", "smoke", 2), ("configs/sr256.py", "demo", 2),
    ("configs/sr256.py", "emoji", 2),
    ("configs/sr256.py", "600m", None),
    ("configs/sr1024.py", "smoke", 2), ("configs/sr1024.py", "demo", 2),
    ("configs/sr1024.py", "emoji", 2),
    ("configs/sr1024.py", "400m", None),
)


def load_config(path: str, variant: str):
  """RUNS' config, from any working directory. config_files.load puts the repo root on
  sys.path (config files import `configs.common`; a script's sys.path holds benchmarks/)."""
  return config_files.load(os.path.join(REPO, path), variant)


def sizes(config) -> tuple[int, int | None]:
  """(resolution the network runs at in training, its low-res input size; None for the
  base). SR stages may train on crops: a crop of the high-res image and the matching crop
  of the low-res one."""
  d = config.data
  if config.kind == "base":
    return d.resolution, None
  res = d.crop or d.resolution
  return res, res * d.low_resolution // d.resolution


def _temp_mib(lowered) -> float:
  """MiB of temporaries (activations, gradients in flight) of the compiled program."""
  return lowered.compile().memory_analysis().temp_size_in_bytes / 2**20


def _flops(lowered) -> float:
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def measure(path: str, variant: str, batch: int | None) -> dict[str, Any]:
  config = load_config(path, variant)
  res, low = sizes(config)
  abstract = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  n_params = count_params(params)
  b = batch or 1
  inputs = example_inputs(config.model, b, res, config.data.max_text_len, lowres=low)
  abs_inputs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)

  def forward(params, rest, *args):
    return nnx.merge(graphdef, params, rest)(*args)

  def train_step(params, rest, opt_state, *args):
    # nnx.grad, not jax.grad: dropout advances RNG counters stored in the module, which
    # NNX's transforms carry across the differentiation trace.
    model = nnx.merge(graphdef, params, rest)
    g = nnx.grad(lambda m: jnp.mean(jnp.square(m(*args) - args[0])))(model)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt = optax.adamw(1e-4)
  fwd, step = jax.jit(forward), jax.jit(train_step)
  abs_opt = jax.eval_shape(opt.init, params)
  step_lowered = step.lower(params, rest, abs_opt, *abs_inputs)
  # Sampling runs the whole image (SR stages train on crops but sample full frames).
  full = config.data.resolution
  one = example_inputs(config.model, 1, full, config.data.max_text_len,
                       lowres=None if config.kind == "base" else config.data.low_resolution)
  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), one)
  row = {"config": f"{os.path.basename(path)}:{variant}", "params": n_params,
         "resolution": res,
         "fwd_gflops_per_image": _flops(fwd.lower(params, rest, *abs_inputs)) / b / 1e9,
         "train_gflops_per_image": _flops(step_lowered) / b / 1e9,
         "train_act_mib_per_image": _temp_mib(step_lowered) / b,
         "sample_resolution": full,
         "sample_act_mib": _temp_mib(fwd.lower(params, rest, *one))}
  if batch:
    model = build_model(config.model, nnx.Rngs(0))
    _, p, r = nnx.split(model, nnx.Param, ...)
    o = opt.init(p)
    row["fwd_ms"] = _time(lambda: fwd(p, r, *inputs))
    row["train_ms"] = _time(lambda: step(p, r, o, *inputs))
    row["batch"] = batch
  return row


def _time(fn, reps: int = 7) -> float:
  """Median ms of `reps` calls after a compiling one: a median, since at batch 2 one slow
  call (a page fault, a thread wake-up) moved a 3-call mean by up to 2x."""
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append((time.perf_counter() - t0) * 1000)
  return statistics.median(times)


def before_after(rows, prefix: str) -> str:
  """The before -> after section for the configs in both `rows` and PREFIX.csv."""
  with open(prefix + ".csv") as f:
    before = {r["config"]: r for r in csv.DictReader(f)}
  with open(prefix + ".md") as f:
    note = f.read().strip()

  def pair(b, a, digits):
    if b in ("", None) or a in ("", None):
      return ""
    return f"{float(b):,.{digits}f} -> {float(a):,.{digits}f}"

  lines = ["| config | params | train GFLOP/img | train act. MiB/img | sampling act. MiB | "
           "CPU train ms (batch 2) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    b = before.get(r["config"])
    if b is None:
      continue
    lines.append(f"| {r['config']} | {pair(b['params'], r['params'], 0)} | "
                 f"{pair(b['train_gflops_per_image'], r['train_gflops_per_image'], 2)} | "
                 f"{pair(b['train_act_mib_per_image'], r['train_act_mib_per_image'], 1)} | "
                 f"{pair(b['sample_act_mib'], r['sample_act_mib'], 1)} | "
                 f"{pair(b.get('train_ms'), r.get('train_ms'), 0)} |")
  return note + f"\n\nBefore: `{prefix}.csv`; after: the table above.\n\n" + "\n".join(lines)


def write(rows, out_dir: str, load_before: float, before: str = "") -> str:
  os.makedirs(out_dir, exist_ok=True)
  fields = ["config", "params", "resolution", "fwd_gflops_per_image", "train_gflops_per_image",
            "train_act_mib_per_image", "sample_resolution", "sample_act_mib", "batch", "fwd_ms",
            "train_ms"]
  with open(os.path.join(out_dir, "models.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=fields)
    w.writeheader()
    w.writerows([{k: r.get(k, "") for k in fields} for r in rows])
  fmt = lambda v, p: "" if v is None else (f"{v:,.{p}f}" if isinstance(v, float) else f"{v:,}")
  lines = ["| config | params | resolution | fwd GFLOP/img | train GFLOP/img | "
           "train act. MiB/img | sampling act. MiB (resolution) | CPU fwd ms (batch) | "
           "CPU train ms (batch) |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    bt = f" ({r['batch']})" if r.get("batch") else ""
    lines.append(f"| {r['config']} | {r['params']:,} | {r['resolution']} | "
                 f"{fmt(r['fwd_gflops_per_image'], 2)} | {fmt(r['train_gflops_per_image'], 2)} | "
                 f"{fmt(r['train_act_mib_per_image'], 1)} | "
                 f"{fmt(r['sample_act_mib'], 1)} ({r['sample_resolution']}) | "
                 f"{fmt(r.get('fwd_ms'), 0)}{bt} | {fmt(r.get('train_ms'), 0)}{bt} |")
  table = "\n".join(lines)
  with open(os.path.join(out_dir, "models.md"), "w") as f:
    f.write("# Network sizes and costs\n\n"
            + machine.provenance(machine.command("models.py", sys.argv[1:]), load_before)
            + " FLOPs from XLA's cost analysis at each config's max_text_len; a train step is "
            "forward + backward + AdamW. SR networks are costed at their training crop. "
            "Activation memory is XLA's temp allocation of the compiled CPU program at "
            "batch 1 (paper configs with their remat setting): the train step at the "
            "training resolution, and one sampling forward pass at the stage's output "
            "resolution. CPU times are the median of 7 calls after a warm-up.\n\n"
            + table + "\n" + (f"\n{before_after(rows, before)}\n" if before else ""))
  return table


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
  p.add_argument("--only", default=None, help="comma-separated variants to run")
  p.add_argument("--before", default="", help="PREFIX of an earlier run's .csv and a .md note")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
  args = p.parse_args()
  only = set(args.only.split(",")) if args.only else None
  rows, load_before = [], machine.load()
  for path, variant, batch in RUNS:
    if only and variant not in only:
      continue
    t0 = time.perf_counter()
    rows.append(measure(path, variant, batch))
    print(f"{path}:{variant}: {rows[-1]['params']:,} params ({time.perf_counter() - t0:.0f} s)",
          flush=True)
  print(write(rows, args.out, load_before, args.before))


if __name__ == "__main__":
  main()
