r"""The losses of N train steps on one fixed batch, for checking that a change which should
not alter the maths (a fused op, a new layout) leaves training where it was.

  python benchmarks/loss_parity.py --only base64.py:demo --steps 10 --out /tmp/after.json
  python benchmarks/loss_parity.py --compare /tmp/before.json /tmp/after.json

Run it once from the commit before the change and once after, then compare: the report
gives the largest relative difference of the losses and gradient norms. A float32
reordering moves them by ~1e-7 relative over 10 steps; a wrong term moves them at once.
One device, the config's initialisation (train.seed) and step; the batch is
step_inputs.synthetic_batch's seeded draw, the same at every step.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def losses(spec: str, batch: int, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import step_inputs  # pylint: disable=g-import-not-at-top
  from imagen_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  c = step_inputs.load_config(spec, batch)
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  graphdef, state, shardings = state_lib.create_state(c, mesh)
  fn = step_lib.make_train_step(c, graphdef, shardings, mesh)
  b = step_inputs.synthetic_batch(c, batch)
  out = {"config": spec, "batch": batch, "loss": [], "grad_norm": []}
  for _ in range(steps):
    state, m = fn(state, b)
    out["loss"].append(float(m["loss"]))
    out["grad_norm"].append(float(m["grad_norm"]))
  return out


def compare(a: dict, b: dict) -> dict:
  """Largest relative difference per metric."""
  return {k: float(np.max(np.abs(np.subtract(a[k], b[k])) / np.abs(a[k])))
          for k in ("loss", "grad_norm")}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--only", default="base64.py:demo", help="FILE.py:VARIANT")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", help="write the losses here (JSON)")
  p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
  args = p.parse_args(argv)
  if args.compare:
    runs = [json.load(open(f)) for f in args.compare]
    if runs[0]["config"] != runs[1]["config"] or len(runs[0]["loss"]) != len(runs[1]["loss"]):
      sys.exit(f"{args.compare[0]} and {args.compare[1]} are not the same run: "
               "rerun both with the same --only, --batch and --steps.")
    print(json.dumps(compare(*runs)))
    return 0
  result = losses(args.only, args.batch, args.steps)
  text = json.dumps(result)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
