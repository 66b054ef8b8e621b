r"""One 3x3 convolution, forward and both gradients, in XLA:CPU and in PyTorch, interleaved.

  python benchmarks/conv_vs_torch.py                       # 16x64x64, 64 -> 64 channels
  python benchmarks/conv_vs_torch.py --batch 16 --size 32 --cin 128 --cout 128

The U-Net step's largest FLOP share is 3x3 convolutions; this isolates one to tell whether
the step's gap to PyTorch (benchmarks/vs_torch.py) is in the convolution kernels or around
them, and in which of the three. Parts: the forward, the input gradient, the weight
gradient, and all three as one call. Ours: lax.conv_general_dilated in NHWC/HWIO (the
layout of our U-Net), each part jitted on its own (the gradients by jax.vjp), under
imagen_jax's XLA:CPU flags. Torch: F.conv2d, torch.nn.grad.conv2d_input / conv2d_weight,
and autograd for all three, in NCHW and channels_last, torch.set_num_threads(--threads).
Outputs are checked equal first (1e-3 of the largest entry). Each callable takes one
warm-up call, then --rounds rounds of --calls calls, the order rotating per round;
reported: the median ms per call with min-max, and torch's time over ours.
Writes OUT/conv_vs_torch.md (default benchmarks/results). Torch is only for benchmarks:
`pip install torch==2.13.0` into .venv by hand.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import imagen_jax  # noqa: F401  (its XLA:CPU defaults, as in training)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # pylint: disable=g-import-not-at-top,wrong-import-position

try:
  import torch
except ImportError:
  torch = None


PARTS = ("forward", "input gradient", "weight gradient", "all three")


def jax_side(x: np.ndarray, w: np.ndarray, g: np.ndarray) -> dict[str, Callable]:
  """Part -> a callable running it once (blocking): our conv in NHWC/HWIO, as the U-Net
  calls it, its two gradients by jax.vjp (XLA drops the unused forward), and all three."""
  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  # Every part takes (x, w, g) so that all four are called alike; the forward ignores g.
  fns = {"forward": jax.jit(lambda x, w, g: conv(x, w)),
         "input gradient": jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)),
         "weight gradient": jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)),
         "all three": jax.jit(lambda x, w, g: (lambda y, vjp: (y, *vjp(g)))(
             *jax.vjp(conv, x, w)))}
  a = [jnp.asarray(v) for v in (x, w, g)]
  return {k: (lambda f=f: jax.block_until_ready(f(*a))) for k, f in fns.items()}


def torch_side(x: np.ndarray, w: np.ndarray, g: np.ndarray, layout: str
               ) -> dict[str, Callable]:
  """The same parts in torch: F.conv2d, torch.nn.grad.conv2d_input / conv2d_weight (the
  kernels autograd calls), and forward + backward through autograd."""
  fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
  wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).contiguous(memory_format=fmt)
  gt = torch.from_numpy(g.transpose(0, 3, 1, 2).copy()).contiguous(memory_format=fmt)
  F, grad = torch.nn.functional, torch.nn.grad
  xa, wa = xt.clone().requires_grad_(True), wt.clone().requires_grad_(True)

  def forward():
    with torch.no_grad():
      return F.conv2d(xt, wt, padding=1)

  def all_three():
    xa.grad = wa.grad = None
    y = F.conv2d(xa, wa, padding=1)
    y.backward(gt)
    return y, xa.grad, wa.grad

  return {"forward": forward,
          "input gradient": lambda: grad.conv2d_input(xt.shape, wt, gt, padding=1),
          "weight gradient": lambda: grad.conv2d_weight(xt, wt.shape, gt, padding=1),
          "all three": all_three}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--cin", type=int, default=64)
  p.add_argument("--cout", type=int, default=64)
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  args = p.parse_args()
  if torch is None:
    sys.exit("torch is not installed: `.venv/bin/pip install torch==2.13.0` (CPU wheel; "
             "benchmarks only, never a runtime dependency).")
  load_before = machine.load()
  torch.set_num_threads(args.threads or os.cpu_count())
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.size, args.size, args.cin), np.float32)
  w = (rng.standard_normal((3, 3, args.cin, args.cout)) / np.sqrt(9 * args.cin)).astype(np.float32)
  g = rng.standard_normal((args.batch, args.size, args.size, args.cout), np.float32)
  sides = {"ours (XLA, NHWC)": jax_side(x, w, g),
           "torch NCHW": torch_side(x, w, g, "nchw"),
           "torch channels_last": torch_side(x, w, g, "channels_last")}
  # Every side computes the same thing: compare each part's outputs with ours (float32
  # sums of 576+ terms in different orders: 1e-3 of the largest entry covers them).
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)  # activations, from NCHW
  hwio = lambda t: t.detach().numpy().transpose(2, 3, 1, 0)  # kernels, from OIHW
  y, dx, dw = (np.asarray(v) for v in sides["ours (XLA, NHWC)"]["all three"]())
  ours = {"y": y, "dx": dx, "dw": dw, "forward": y, "input gradient": dx, "weight gradient": dw}
  for name, side in list(sides.items())[1:]:
    ty, tdx, tdw = side["all three"]()
    theirs = {"y": nhwc(ty), "dx": nhwc(tdx), "dw": hwio(tdw),
              "forward": nhwc(side["forward"]()), "input gradient": nhwc(side["input gradient"]()),
              "weight gradient": hwio(side["weight gradient"]())}
    for what, b in theirs.items():
      err = np.abs(ours[what] - b).max() / np.abs(b).max()
      if err > 1e-3:
        sys.exit(f"{name} {what} differs from ours: max relative error {err:.2e}")
  calls = [(s_, p_) for s_ in sides for p_ in PARTS]
  times: dict[tuple[str, str], list[float]] = {c: [] for c in calls}
  for s_, p_ in calls:
    sides[s_][p_]()  # warm-up (compilation for ours)
  for r in range(args.rounds):
    for s_, p_ in calls[r % len(calls):] + calls[:r % len(calls)]:
      t0 = time.perf_counter()
      for _ in range(args.calls):
        sides[s_][p_]()
      times[(s_, p_)].append((time.perf_counter() - t0) / args.calls * 1e3)
  gflop = 2 * args.batch * args.size**2 * 9 * args.cin * args.cout / 1e9  # one conv
  med = {c: statistics.median(t) for c, t in times.items()}
  cmd = machine.command("conv_vs_torch.py", sys.argv[1:])
  names = list(sides)
  lines = ["# One 3x3 convolution and its gradients: XLA:CPU vs PyTorch", "",
           f"Command: `{cmd}`; machine: {machine.describe()}; torch {torch.__version__} "
           f"({torch.get_num_threads()} threads), jax {jax.__version__}; load average "
           f"{load_before:.2f} before, {machine.load():.2f} after. Input "
           f"{args.batch}x{args.size}x{args.size}x{args.cin} -> {args.cout} channels, "
           f"{gflop:.2f} GFLOP per convolution; {args.rounds} interleaved rounds of "
           f"{args.calls} calls of each part on each side; ms per call, median (min-max) "
           "over rounds; ratio = torch ms / ours ms (above 1: ours faster).", "",
           "| part | " + " | ".join(names) + " | ratio vs NCHW | ratio vs channels_last |",
           "| --- |" + " ---: |" * (len(names) + 2)]
  for p_ in PARTS:
    cells = [f"{med[(n, p_)]:.1f} ({min(times[(n, p_)]):.1f}-{max(times[(n, p_)]):.1f})"
             for n in names]
    mine = med[(names[0], p_)]
    lines.append(f"| {p_} | " + " | ".join(cells) + f" | {med[(names[1], p_)] / mine:.2f} | "
                 f"{med[(names[2], p_)] / mine:.2f} |")
  text = "\n".join(lines) + "\n"
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "conv_vs_torch.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
