r"""Our train step vs a PyTorch train step of the same network, side by side in one run.

  python benchmarks/vs_torch.py --check                      # parity: params, outputs, loss
  python benchmarks/vs_torch.py                              # base64 demo + emoji, batch 16
  python benchmarks/vs_torch.py --only base64.py:demo --batch 16 --steps 5 --rounds 7 \
      --threads 2 --torch-layout channels_last
  python benchmarks/vs_torch.py --only base64.py:smoke --batch 4 --steps 2 --rounds 2 \
      --out /tmp/vs_torch                                    # smoke run, numbers mean nothing

Torch is only for this benchmark, never a runtime or CI dependency: install it into
.venv by hand with `pip install torch==2.13.0` (a CPU wheel; never install torchvision).
Run the timing on an idle machine; the load average before and after is recorded.

Ours: exactly benchmarks/train.py's step (state_lib.create_state +
step_lib.make_train_step, jitted, a synthetic batch of the config's shapes with random
text embeddings, the host batch put on the mesh every step). Torch: benchmarks/
torch_unet.py's port of the same U-Net, starting from the same weights, and a step doing
the same work: antithetic t, log-SNR from the config's cosine schedule, x_t = alpha x0 +
sigma eps, the config's target (eps / x0 / v) and weighting, CFG text dropout through the
mask, backward, clipping to global norm `optim.grad_clip`, torch.optim.AdamW (same lr
schedule, betas, eps, weight decay off 1-D params), a skip on a non-finite loss or norm,
and an EMA update per decay with torch._foreach ops. Torch runs eagerly (`--torch-compile`
wraps the network in torch.compile), with torch.set_num_threads(--threads); XLA uses its
own thread pool over all cores.

Timing: our step is compiled (seconds reported separately) and each side takes one
warm-up step (reported as first_step_s); then `--rounds` rounds of `--steps` steps per
side, interleaved (the order of the sides rotates every round). Reported per side: the
median img/s over rounds with its min-max; GFLOP/s and MFU from OUR XLA cost analysis of
the step (the same FLOPs for both sides: same network, same batch), MFU against `--peak`
(default: imagen_jax.runtime's, for a CPU the best float32 matmul rate XLA reaches on
it, measured at start); and the ratio ours / torch of
the medians. Writes OUT/vs_torch.{md,csv} (default benchmarks/results).

`--check` builds base64.py:smoke and :demo (and smoke with a shared text projection),
perturbs every parameter (the zero-initialised convs would make the check vacuous),
copies the params into the torch model, and asserts equal parameter counts, forward
outputs within 1e-4 (float32, NCHW and channels_last), and the same loss and gradient
norm on the same noised batch; it also checks the torch log-SNR schedule and lr schedule.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from imagen_jax import config_files
from imagen_jax.diffusion.schedules import Cosine
from imagen_jax.models import build_model, count_params
from imagen_jax import sharding
from imagen_jax.train import state as state_lib, step as step_lib
from imagen_jax.train.optim import learning_rate

try:
  import torch
except ImportError:  # main() says how to install it
  torch = None

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_inputs  # pylint: disable=g-import-not-at-top,wrong-import-position
if torch is not None:
  import torch_unet  # pylint: disable=g-import-not-at-top
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ("nchw", "channels_last")


def load_config(spec: str) -> Any:
  """A config from 'FILE.py:VARIANT' under configs/."""
  path, variant = spec.split(":")
  return config_files.load(os.path.join(REPO, "configs", path), variant)


def synthetic_batch(c, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """benchmarks/train.py's batch (step_inputs.synthetic_batch), for the base U-Net only."""
  if c.kind != "base":
    raise ValueError(f"vs_torch compares the base U-Net; config kind {c.kind!r} is not ported.")
  return step_inputs.synthetic_batch(c, batch, np.random.default_rng(seed))


# Torch side ----------------------------------------------------------------------------


def lr_at(optim_cfg, total_steps: int, n: int) -> float:
  """imagen_jax.train.optim.learning_rate in plain Python (n = applied updates)."""
  lr, kind = float(optim_cfg.lr), optim_cfg.get("schedule", "constant")
  warmup = int(optim_cfg.get("warmup_steps", 0))
  scale = min(1.0, (n + 1.0) / warmup) if warmup else 1.0
  if kind == "cosine":
    decay = int(optim_cfg.get("decay_steps", 0)) or max(int(total_steps) - warmup, 1)
    end = float(optim_cfg.get("end_lr_frac", 0.0))
    frac = min(max((n - warmup) / decay, 0.0), 1.0)
    scale *= end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * frac))
  elif kind != "constant":
    raise ValueError(f"optim.schedule={kind!r} is not ported to the torch step.")
  return lr * scale


def torch_weighting(name: str, **kw) -> Callable:
  """objectives.WEIGHTINGS in torch: w(lambda) on the eps-MSE."""
  e = lambda l: torch.exp(-l)
  fns = {"eps": lambda l: torch.ones_like(l), "x0": e, "v": lambda l: 1.0 + e(l),
         "snr": lambda l: torch.exp(l) * e(l),
         "truncated_snr": lambda l: torch.clamp(torch.exp(l), min=1.0) * e(l),
         "min_snr": lambda l, gamma=5.0: torch.clamp(torch.exp(l), max=gamma) * e(l),
         "edm": lambda l, sigma_data=0.5: 1.0 + e(l) / sigma_data**2,
         "sigmoid": lambda l, bias=2.0: torch.sigmoid(bias - l)}
  if name not in fns:
    raise ValueError(f"weighting {name!r} is not ported to the torch step.")
  return lambda l: fns[name](l, **kw)


class TorchDiffusion:
  """The loss side of step_lib.prepare_inputs / loss_fn, in torch."""

  def __init__(self, c):
    sched = step_lib._schedule(c)  # pylint: disable=protected-access
    if not isinstance(sched, Cosine):
      raise ValueError(f"diffusion.schedule={c.diffusion.schedule!r}: only the cosine "
                       "family is ported to the torch step.")
    self.u0, self.u1, self.ubar1 = sched._u_range  # pylint: disable=protected-access
    self.shift, self.lo, self.hi = sched.shift, sched.logsnr_min, sched.logsnr_max
    self.target = c.diffusion.target
    self.weighting = torch_weighting(c.diffusion.weighting,
                                     **dict(c.diffusion.get("weighting_kw") or {}))
    self.antithetic = bool(c.train.antithetic)
    self.drop = float(c.train.text_drop_prob)

  def logsnr(self, t: Any) -> Any:
    """schedules.Cosine.logsnr: clipped by reparametrising u, then clamped."""
    d = self.u1 - self.u0
    u, ubar = self.u0 + t * d, self.ubar1 + (1.0 - t) * d
    lam = torch.where(u < 0.5, -2.0 * torch.log(torch.tan(0.5 * math.pi * u)),
                      2.0 * torch.log(torch.tan(0.5 * math.pi * ubar))) + self.shift
    return torch.clamp(lam, self.lo, self.hi)

  @staticmethod
  def alpha_sigma(logsnr: Any) -> tuple[Any, Any]:
    ls = torch.nn.functional.logsigmoid
    return torch.exp(0.5 * ls(logsnr)), torch.exp(0.5 * ls(-logsnr))

  def prepare(self, x0, text, text_mask, gen) -> dict[str, Any]:
    """t, eps, x_t and the CFG-dropped mask; x0 is [B, C, H, W] (either layout)."""
    b = x0.shape[0]
    if self.antithetic:
      t = torch.remainder(torch.rand((), generator=gen) + torch.arange(b) / b, 1.0)
    else:
      t = torch.rand(b, generator=gen)
    logsnr = self.logsnr(t)
    # Drawn NHWC and permuted: channels_last for free, one copy for NCHW.
    eps = torch.randn(b, x0.shape[2], x0.shape[3], x0.shape[1], generator=gen).permute(
        0, 3, 1, 2)
    eps = eps.contiguous(memory_format=_fmt(x0))
    alpha, sigma = self.alpha_sigma(logsnr[:, None, None, None])
    keep = torch.rand(b, generator=gen) >= self.drop
    return dict(x_t=alpha * x0 + sigma * eps, logsnr=logsnr, x0=x0, eps=eps, text=text,
                text_mask=text_mask & keep[:, None])

  def loss(self, fwd: Callable, inputs: Mapping[str, Any]) -> tuple[Any, Any]:
    """(mean loss, per-example loss) as objectives.weighted_mse."""
    pred = fwd(inputs["x_t"], inputs["logsnr"], inputs["text"], inputs["text_mask"])
    logsnr = inputs["logsnr"]
    alpha, sigma = self.alpha_sigma(logsnr[:, None, None, None])
    target = {"eps": lambda: inputs["eps"], "x0": lambda: inputs["x0"],
              "v": lambda: alpha * inputs["eps"] - sigma * inputs["x0"]}[self.target]()
    mse = torch.mean(torch.square(pred - target), dim=(1, 2, 3))
    factor = {"eps": lambda: torch.ones_like(logsnr), "x0": lambda: torch.exp(-logsnr),
              "v": lambda: 1.0 + torch.exp(-logsnr)}[self.target]()
    per_ex = mse * self.weighting(logsnr) / factor
    return per_ex.mean(), per_ex


def _fmt(x: Any) -> Any:
  """The memory format of a 4-D tensor: channels_last or contiguous."""
  return torch.channels_last if (not x.is_contiguous()
                                 and x.is_contiguous(memory_format=torch.channels_last)) \
      else torch.contiguous_format


class TorchTrainStep:
  """The torch train step: loss, backward, clip, AdamW, EMA (see the module doc)."""

  def __init__(self, c, params: Mapping[str, Any], *, layout: str, seed: int = 0,
               optim_impl: str = "fused", compile_model: bool = False):
    self.c, self.layout = c, layout
    self.model = torch_unet.UNet(torch_unet.TorchUNetConfig.from_dict(c.model))
    torch_unet.load_jax_params(self.model, params)
    self.fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    self.model.to(memory_format=self.fmt).train()
    self.fwd = torch.compile(self.model) if compile_model else self.model
    self.diff = TorchDiffusion(c)
    o = c.optim
    if o.name not in ("adamw", "adam"):
      raise ValueError(f"optim.name={o.name!r}: only adam/adamw are ported to the torch step.")
    wd = float(o.weight_decay) if o.name == "adamw" else 0.0
    self.params = list(self.model.parameters())
    groups = [{"params": [p for p in self.params if p.ndim > 1], "weight_decay": wd},
              {"params": [p for p in self.params if p.ndim <= 1], "weight_decay": 0.0}]
    self.total_steps = int(c.train.steps)
    self.opt = torch.optim.AdamW(groups, lr=lr_at(o, self.total_steps, 0),
                                 betas=(float(o.b1), float(o.b2)), eps=float(o.eps),
                                 **{optim_impl: True})
    self.clip = float(o.get("grad_clip", 0.0))
    self.ema = {float(d): [p.detach().clone() for p in self.params]
                for d in (o.get("ema_decays") or ())}
    self.gen = torch.Generator().manual_seed(seed)
    self.applied = 0

  def batch(self, b: Mapping[str, np.ndarray]) -> tuple[Any, Any, Any]:
    """Host batch -> (x0 [B,C,H,W] in this layout, text, mask); NHWC permuted is
    already channels_last, so only NCHW copies."""
    x0 = torch.from_numpy(b["image"]).permute(0, 3, 1, 2).contiguous(memory_format=self.fmt)
    return x0, torch.from_numpy(b["text"]), torch.from_numpy(b["text_mask"])

  def __call__(self, b: Mapping[str, np.ndarray]) -> dict[str, float]:
    inputs = self.diff.prepare(*self.batch(b), self.gen)
    self.opt.zero_grad(set_to_none=True)
    loss, _ = self.diff.loss(self.fwd, inputs)
    loss.backward()
    if self.clip:
      norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip, foreach=True)
    else:
      norm = torch.linalg.vector_norm(torch.stack(
          [torch.linalg.vector_norm(p.grad) for p in self.params]))
    if not bool(torch.isfinite(loss) & torch.isfinite(norm)):
      return {"loss": loss.item(), "grad_norm": float(norm), "skipped": 1}
    for g in self.opt.param_groups:
      g["lr"] = lr_at(self.c.optim, self.total_steps, self.applied)
    self.opt.step()
    self.applied += 1
    with torch.no_grad():
      for d, ema in self.ema.items():
        torch._foreach_lerp_(ema, self.params, 1.0 - d)  # pylint: disable=protected-access
    return {"loss": loss.item(), "grad_norm": float(norm), "skipped": 0}


# Our side ------------------------------------------------------------------------------


class OurTrainStep:
  """benchmarks/train.py's step: create_state + make_train_step, compiled once."""

  def __init__(self, c, batch: Mapping[str, np.ndarray]):
    self.b = batch
    c.train.batch_size = batch["image"].shape[0]
    self.mesh = sharding.mesh_from_config(c.mesh)
    graphdef, self.state, shardings = state_lib.create_state(c, self.mesh)
    fn = step_lib.make_train_step(c, graphdef, shardings, self.mesh)
    # The initial params, for the torch side (before the state is donated).
    self.init_params = jax.tree.map(np.asarray, nnx.to_pure_dict(self.state.params))
    self.n_params = int(sum(x.size for x in jax.tree.leaves(self.state.params)))
    start = time.perf_counter()
    self.compiled = fn.jitted.lower(self.state, step_lib.device_batch(batch, self.mesh)).compile()
    self.compile_s = time.perf_counter() - start
    cost = self.compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    self.flops = float(cost.get("flops", 0.0))

  def __call__(self, steps: int = 1) -> None:
    for _ in range(steps):
      self.state, m = self.compiled(self.state, step_lib.device_batch(self.b, self.mesh))
    jax.block_until_ready(m)


# Parity check --------------------------------------------------------------------------


def _perturbed_model(c, seed: int = 1, scale: float = 0.05):
  """Our network with N(0, scale^2) added to every parameter (zero-init ones included)."""
  model = build_model(c.model, nnx.Rngs(0))
  leaves, tdef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  leaves = [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tdef, leaves))
  return model


def check_one(spec: str, overrides: Mapping[str, Any] | None = None, batch: int = 3
              ) -> dict[str, Any]:
  """Parity of one config: the measured numbers, and `ok` if all are within tolerance."""
  c = load_config(spec)
  c.model.update(dict(overrides or {}))
  c.model.dropout = 0.0  # the two sides' dropout masks cannot match
  model = _perturbed_model(c)
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  n_jax = count_params(model)
  out: dict[str, Any] = {"config": spec + (f" {dict(overrides)}" if overrides else ""),
                         "params_jax": n_jax}

  rng = np.random.default_rng(0)
  r, text_len = c.model.image_size, c.data.max_text_len
  x = rng.standard_normal((batch, r, r, c.model.in_channels)).astype(np.float32)
  logsnr = rng.uniform(-10, 10, batch).astype(np.float32)
  text = rng.standard_normal((batch, text_len, c.model.text_dim)).astype(np.float32)
  # Full, partial and empty (CFG-dropped: only null tokens attended) masks.
  mask = np.ones((batch, text_len), bool)
  mask[1 % batch, text_len // 2:] = False
  mask[2 % batch] = False
  y_jax = np.asarray(model(jnp.asarray(x), jnp.asarray(logsnr), jnp.asarray(text),
                           jnp.asarray(mask)))
  out["max_abs_out"] = float(np.abs(y_jax).max())

  for layout in LAYOUTS:
    tstep = TorchTrainStep(c, params, layout=layout, optim_impl="foreach")
    tm = tstep.model.eval()
    out["params_torch"] = torch_unet.count_params(tm)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=tstep.fmt)
    with torch.no_grad():
      y = tm(xt, torch.from_numpy(logsnr), torch.from_numpy(text), torch.from_numpy(mask))
    out[f"max_abs_diff_{layout}"] = float(np.abs(y.permute(0, 2, 3, 1).numpy() - y_jax).max())

  # Loss and gradient norm on the same noised batch (our prepare_inputs, both losses).
  b = synthetic_batch(c, batch)
  b["text_mask"][0, text_len // 2:] = False
  inputs = step_lib.prepare_inputs(c, {k: jnp.asarray(v) for k, v in b.items()},
                                   jax.random.PRNGKey(3))
  weighting = step_lib._weighting(c)  # pylint: disable=protected-access
  (loss_j, _), grads = nnx.value_and_grad(
      lambda m: step_lib.loss_fn(m, inputs, target=c.diffusion.target, weighting=weighting),
      has_aux=True)(model)
  gn_j = float(optax.tree.norm(grads))
  tstep = TorchTrainStep(c, params, layout="nchw", optim_impl="foreach")
  t_in = {k: torch.from_numpy(np.array(v)) for k, v in inputs.items()}
  for k in ("x_t", "x0", "eps"):
    t_in[k] = t_in[k].permute(0, 3, 1, 2).contiguous()
  loss_t, _ = tstep.diff.loss(tstep.model, t_in)
  loss_t.backward()
  gn_t = float(torch.linalg.vector_norm(torch.stack(
      [torch.linalg.vector_norm(p.grad) for p in tstep.params])))
  out.update(loss_rel_diff=abs(loss_t.item() - float(loss_j)) / abs(float(loss_j)),
             grad_norm_rel_diff=abs(gn_t - gn_j) / gn_j)

  # The torch schedule and lr schedule against ours.
  t = np.linspace(0.0, 1.0, 1001, dtype=np.float32)
  sched = step_lib._schedule(c)  # pylint: disable=protected-access
  ls_j = np.asarray(sched.logsnr(jnp.asarray(t)))
  out["logsnr_max_abs_diff"] = float(np.abs(tstep.diff.logsnr(torch.from_numpy(t)).numpy()
                                            - ls_j).max())
  lr_fn = learning_rate(c.optim, int(c.train.steps))
  out["lr_max_rel_diff"] = max(abs(lr_at(c.optim, int(c.train.steps), n) - float(lr_fn(n)))
                               / float(lr_fn(n)) for n in range(0, 60))

  ok = (out["params_jax"] == out["params_torch"]
        and max(out["max_abs_diff_nchw"], out["max_abs_diff_channels_last"]) < 1e-4
        and out["loss_rel_diff"] < 1e-5 and out["grad_norm_rel_diff"] < 1e-4
        and out["logsnr_max_abs_diff"] < 1e-4 and out["lr_max_rel_diff"] < 1e-6)
  out["ok"] = ok
  return out


def check() -> bool:
  torch.set_num_threads(1)  # a check, not a benchmark: leave the other core alone
  runs = [("base64.py:smoke", None), ("base64.py:demo", None),
          ("base64.py:smoke", {"text_proj_dim": 16})]
  ok = True
  for spec, over in runs:
    r = check_one(spec, over)
    ok &= r["ok"]
    print(f"{'OK  ' if r['ok'] else 'FAIL'} {r['config']}: params jax {r['params_jax']:,} "
          f"torch {r['params_torch']:,}; max |out| {r['max_abs_out']:.3f}, max abs diff "
          f"nchw {r['max_abs_diff_nchw']:.2e} channels_last "
          f"{r['max_abs_diff_channels_last']:.2e} (< 1e-4); loss rel diff "
          f"{r['loss_rel_diff']:.1e} (< 1e-5), grad norm rel diff "
          f"{r['grad_norm_rel_diff']:.1e} (< 1e-4); log-SNR max diff "
          f"{r['logsnr_max_abs_diff']:.1e}; lr rel diff {r['lr_max_rel_diff']:.1e}")
  return ok


# Benchmark -----------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
  import machine  # pylint: disable=g-import-not-at-top
  return {"cpu": machine.describe(), "cores": os.cpu_count()}


def bench_config(spec: str, args, layouts: tuple[str, ...]) -> list[dict[str, Any]]:
  """Interleaved rounds of our step and the torch step(s) for one config."""
  c = load_config(spec)
  b = synthetic_batch(c, args.batch)
  print(f"{spec} batch {args.batch}: compiling our step ...", flush=True)
  ours = OurTrainStep(c, b)
  sides: dict[str, Callable[[], None]] = {"ours": ours}
  info = {"ours": {"layout": "nhwc", "compile_s": ours.compile_s, "params": ours.n_params}}
  for layout in layouts:
    t = TorchTrainStep(c, ours.init_params, layout=layout, optim_impl=args.torch_optim,
                       compile_model=args.torch_compile)
    sides[f"torch_{layout}"] = lambda t=t: t(b)
    info[f"torch_{layout}"] = {"layout": layout, "compile_s": float("nan"),
                               "params": torch_unet.count_params(t.model)}
    if info[f"torch_{layout}"]["params"] != ours.n_params:
      raise ValueError(f"{spec}: torch has {info[f'torch_{layout}']['params']:,} params, "
                       f"ours {ours.n_params:,}; the port is out of date.")
  for name, fn in sides.items():  # warm-up (torch.compile, if on, happens here)
    start = time.perf_counter()
    fn()
    info[name]["first_step_s"] = time.perf_counter() - start
    if name != "ours" and args.torch_compile:
      info[name]["compile_s"] = info[name]["first_step_s"]
  names = list(sides)
  ips: dict[str, list[float]] = {n: [] for n in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      for _ in range(args.steps):
        sides[name]()
      ips[name].append(args.batch * args.steps / (time.perf_counter() - start))
    print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
        f"{n} {ips[n][-1]:.2f} img/s" for n in names), flush=True)
  med = {n: statistics.median(v) for n, v in ips.items()}
  rows = []
  for n in names:
    gflops = ours.flops / 1e9 * med[n] / args.batch
    rows.append({"config": spec, "side": n, "layout": info[n]["layout"], "batch": args.batch,
                 "params": info[n]["params"], "threads": torch.get_num_threads()
                 if n != "ours" else "xla", "compile_s": info[n]["compile_s"],
                 "first_step_s": info[n]["first_step_s"], "img_s_median": med[n],
                 "img_s_min": min(ips[n]), "img_s_max": max(ips[n]),
                 "gflop_per_step": ours.flops / 1e9, "gflops_s": gflops,
                 "mfu": gflops * 1e9 / args.peak,
                 "ours_over_torch": med["ours"] / med[n] if n != "ours" else float("nan")})
  del ours, sides
  return rows


def write_results(rows: list[dict[str, Any]], env: dict[str, Any], out: str) -> str:
  os.makedirs(out, exist_ok=True)
  lines = ["# Our train step vs PyTorch (same U-Net, same batch)", "",
           f"Command: `{env['command']}`", "",
           f"CPU: {env['cpu']}, {env['cores']} cores; torch {env['torch']} "
           f"(set_num_threads {env['threads']}, AdamW {env['torch_optim']}"
           f"{', torch.compile' if env['torch_compile'] else ', eager'}), jax {env['jax']}, "
           f"flax {env['flax']}; load average (1/5/15 min) before {env['load_before']}, "
           f"after {env['load_after']}.", "",
           f"{env['rounds']} interleaved rounds of {env['steps']} steps per side (order "
           "rotating); img/s is the median over rounds (min-max). GFLOP/s and MFU use our "
           "XLA cost analysis of the step for both sides (same network and batch); MFU "
           f"against {env['peak'] / 1e9:g} GFLOP/s. ratio = ours / torch (medians).", "",
           "| config | side | layout | batch | params | img/s (min-max) | GFLOP/step | "
           "GFLOP/s | MFU | ours/torch | compile s | first step s |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
  fmt = lambda v, f: "-" if isinstance(v, float) and math.isnan(v) else format(v, f)
  lines += [f"| {r['config']} | {r['side']} | {r['layout']} | {r['batch']} | {r['params']:,} "
            f"| {r['img_s_median']:.2f} ({r['img_s_min']:.2f}-{r['img_s_max']:.2f}) | "
            f"{r['gflop_per_step']:.1f} | {r['gflops_s']:.1f} | {100 * r['mfu']:.1f}% | "
            f"{fmt(r['ours_over_torch'], '.2f')} | {fmt(r['compile_s'], '.1f')} | "
            f"{r['first_step_s']:.2f} |" for r in rows]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(out, "vs_torch.md"), "w") as f:
    f.write(text)
  if rows:
    keys = ("cpu", "cores", "torch", "jax", "load_before", "load_after", "command")
    with open(os.path.join(out, "vs_torch.csv"), "w", newline="") as f:
      w = csv.DictWriter(f, list(rows[0]) + list(keys))
      w.writeheader()
      w.writerows([{**r, **{k: env[k] for k in keys}} for r in rows])
  return text


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="parity check only")
  parser.add_argument("--only", default="base64.py:demo,base64.py:emoji",
                      help="comma-separated FILE.py:VARIANT (base U-Net configs)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5, help="steps per side per round")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--threads", type=int, default=0,
                      help="torch.set_num_threads (0: os.cpu_count())")
  parser.add_argument("--torch-layout", default="both", choices=LAYOUTS + ("both",))
  parser.add_argument("--torch-optim", default="fused", choices=("fused", "foreach"),
                      help="torch.optim.AdamW implementation")
  parser.add_argument("--torch-compile", action="store_true",
                      help="torch.compile the network (its compile is the first step)")
  parser.add_argument("--peak", type=float, default=0.0,
                      help="peak FLOP/s of the CPU (0: imagen_jax.runtime's measured one)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  if torch is None:
    sys.exit("vs_torch needs torch: `.venv/bin/pip install torch==2.13.0` (never torchvision).")
  if args.check:
    sys.exit(0 if check() else 1)

  torch.set_num_threads(args.threads or os.cpu_count())
  if not args.peak:
    from imagen_jax import runtime  # pylint: disable=g-import-not-at-top
    args.peak = runtime.measured_cpu_flops()
  layouts = LAYOUTS if args.torch_layout == "both" else (args.torch_layout,)
  env = {**machine_info(), "torch": torch.__version__, "jax": jax.__version__,
         "flax": flax.__version__, "threads": torch.get_num_threads(),
         "torch_optim": args.torch_optim, "torch_compile": args.torch_compile,
         "steps": args.steps, "rounds": args.rounds, "peak": args.peak,
         "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
         "load_before": "/".join(f"{x:.2f}" for x in os.getloadavg())}
  rows = []
  for spec in [s for s in args.only.split(",") if s]:
    rows += bench_config(spec, args, layouts)
  env["load_after"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
  print(write_results(rows, env, args.out))


if __name__ == "__main__":
  main()
