r"""Sampler quality against an exact denoiser: schedules x methods x NFE on Gaussian mixtures.

  python benchmarks/samplers.py            # full table (5.5 minutes on 2 idle CPU cores
                                           # before the 3M warm-up rows, a third more runs)
  python benchmarks/samplers.py --quick    # a smoke-sized subset, under a minute

A Gaussian mixture has a closed-form Bayes-optimal denoiser E[x0 | x_t]
(`imagen_jax.diffusion.testbed`), so whatever separates the samples from the data is the
sampler's discretisation error (plus sampling noise). For every mixture x schedule x
grid x method x NFE budget this draws samples with `samplers.sample` and measures:

* sw:          sliced 2-Wasserstein distance to a fresh data draw of the same size;
               compare with the noise floor `sw_floor`, the SW between two independent
               data draws (mean over 8 draws; no sampler can beat it reliably);
* mean_err:    ||mean(x) - m|| against the mixture's exact mean;
* cov_rel_err: ||cov(x) - C||_F / ||C||_F against its exact covariance;
* ode_err:     deterministic methods only: RMS over samples of ||x_i - x_ref_i||, where
               x_ref solves the same probability-flow ODE from the same initial noise with
               dpmpp_3m and `--ref-steps` levels uniform in log-SNR over the schedule's
               range (blank for ddpm);
* nfe:         denoiser calls actually made (heun spends 2 steps - 1, so it gets
               steps_for_nfe(budget) steps and an odd NFE);
* wall_s:      run time of the compiled sampler (compile time is in compile_s).

Every method and schedule starts from the same noise key, so comparisons are paired.
dpmpp_3m runs with each form of its second-order warm-up step (`samplers.WARMUPS`):
"dpmpp_3m" is the default, "dpmpp_3m/<form>" the others; samplers.md compares them in
a section of its own, which adds budgets of 3 and 4 NFE for those rows only.
Schedules use their own time spacing (grid="t"); cosine is repeated on a grid uniform in
log-SNR ("cosine/logsnr-grid"). Outputs, in --out (default benchmarks/results/):
samplers.csv, samplers.md (SW and ODE-error tables) and samplers.png (SW vs NFE).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import math
import os
import shlex
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.ticker
import numpy as np
from tqdm import tqdm

import machine

from imagen_jax.diffusion import samplers, schedules, testbed

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the Agg backend)

Array = jax.Array
Row = dict[str, Any]

# Row label -> (sampler method, its options). 3M is run with every warm-up form: the
# default under its own name, the others as "dpmpp_3m/<form>".
VARIANTS: dict[str, tuple[str, tuple[tuple[str, Any], ...]]] = {
    "ddim": ("ddim", ()), "ddpm": ("ddpm", ()), "dpmpp_2m": ("dpmpp_2m", ()),
    "dpmpp_3m": ("dpmpp_3m", ()),
    **{f"dpmpp_3m/{w}": ("dpmpp_3m", (("warmup", w),)) for w in samplers.WARMUPS[1:]},
    "heun": ("heun", ()),
}
METHODS = tuple(VARIANTS)
WARMUP_ROWS = tuple(m for m in METHODS if m.startswith("dpmpp_3m"))
# Extra budgets run for the 3M rows only (shown in the warm-up section, not the main
# tables): at 3 NFE the warm-up step is the last one before x0_hat, where its form counts.
WARMUP_NFES = (3, 4)
STOCHASTIC = frozenset({"ddpm"})  # no single ODE solution to compare against
REF_METHOD, REF_GRID = "dpmpp_3m", "logsnr"  # default warm-up: at 2000 steps the form is moot
# Fixed seeds: one noise key shared by every run; data, projections and floor draws apart.
NOISE_SEED, DATA_SEED, SW_SEED, FLOOR_SEED = 0, 1, 2, 3
SW_PROJECTIONS = 256
FLOOR_DRAWS = 8  # the floor is noisy (2-D: mode counts), so average several draws
CSV_FIELDS = ("mixture", "dim", "schedule", "grid", "method", "nfe_budget", "steps", "nfe",
              "sw", "sw_floor", "mean_err", "cov_rel_err", "ode_err", "compile_s", "wall_s")


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  name: str
  build: Callable[[], testbed.GaussianMixture]
  samples: int


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
  label: str
  name: str
  grid: str = "t"
  kwargs: tuple[tuple[str, Any], ...] = ()

  def build(self) -> schedules.Schedule:
    return schedules.get_schedule(self.name, **dict(self.kwargs))


SCHEDULE_SPECS = (
    ScheduleSpec("cosine", "cosine"),
    ScheduleSpec("linear", "linear"),
    ScheduleSpec("sigmoid", "sigmoid"),
    ScheduleSpec("edm", "edm"),
    ScheduleSpec("shifted_cosine@256", "shifted_cosine", kwargs=(("resolution", 256),)),
    ScheduleSpec("cosine/logsnr-grid", "cosine", grid="logsnr"),
)
QUICK_SCHEDULES = ("cosine", "edm")


def mixture_specs(samples_2d: int, samples_64d: int) -> tuple[MixtureSpec, ...]:
  return (MixtureSpec("ring (2-D)", testbed.ring_mixture, samples_2d),
          MixtureSpec("random (64-D)", functools.partial(testbed.random_mixture, dim=64),
                      samples_64d))


# Sampling -------------------------------------------------------------------------------

def run_sampler(gmm: testbed.GaussianMixture, schedule: schedules.Schedule, n: int,
                method: str, steps: int, grid: str, **kw) -> tuple[Array, int, float, float]:
  """Compiles and runs one sampler; returns (samples, nfe, compile_s, wall_s)."""
  fn = jax.jit(functools.partial(samplers.sample, gmm.denoise, schedule, shape=(n, gmm.dim),
                                 method=method, steps=steps, grid=grid, **kw))
  rng = jax.random.key(NOISE_SEED)
  t0 = time.perf_counter()
  compiled = fn.lower(rng).compile()
  t1 = time.perf_counter()
  out = jax.block_until_ready(compiled(rng))
  t2 = time.perf_counter()
  return out.x, int(out.nfe), t1 - t0, t2 - t1


class SlicedW2:
  """`testbed.sliced_wasserstein(x, data, rng, num_projections)` against fixed data.

  Same directions and formula, but the data projections are sorted once and NumPy does
  the sorting (XLA:CPU sorts an [8192, 256] array about 10x slower, which dominated the
  run time); `MixtureContext.create` checks it against the testbed function.
  """

  def __init__(self, data: Array, rng: Array, num_projections: int = SW_PROJECTIONS):
    dirs = jax.random.normal(rng, (data.shape[1], num_projections))
    self.dirs = np.asarray(dirs / jnp.linalg.norm(dirs, axis=0, keepdims=True))
    self.sorted_data = np.sort(np.asarray(data) @ self.dirs, axis=0)

  def __call__(self, x: Array) -> float:
    px = np.sort(np.asarray(x) @ self.dirs, axis=0)
    return float(np.sqrt(np.mean(np.square(px - self.sorted_data))))


@dataclasses.dataclass
class MixtureContext:
  """Per-mixture state shared by all its runs: data, SW to it, floor, cached references."""
  spec: MixtureSpec
  gmm: testbed.GaussianMixture
  sw_to_data: SlicedW2
  sw_floor: float                     # mean over FLOOR_DRAWS independent data draws
  floor_range: tuple[float, float]    # their min and max
  ref_steps: int
  refs: dict[tuple[float, float], Array] = dataclasses.field(default_factory=dict)

  @classmethod
  def create(cls, spec: MixtureSpec, ref_steps: int) -> "MixtureContext":
    gmm = spec.build()
    data = gmm.sample(jax.random.key(DATA_SEED), spec.samples)
    sw = SlicedW2(data, jax.random.key(SW_SEED))
    others = [gmm.sample(jax.random.key(FLOOR_SEED + i), spec.samples) for i in range(FLOOR_DRAWS)]
    floors = [sw(o) for o in others]
    expected = float(testbed.sliced_wasserstein(others[0], data, jax.random.key(SW_SEED),
                                                SW_PROJECTIONS))
    assert math.isclose(floors[0], expected, rel_tol=1e-4), (floors[0], expected)
    return cls(spec, gmm, sw, float(np.mean(floors)), (min(floors), max(floors)), ref_steps)

  def reference(self, schedule: schedules.Schedule) -> Array:
    """High-accuracy ODE solution from the shared noise; depends only on the log-SNR range."""
    key = (schedule.logsnr_min, schedule.logsnr_max)
    if key not in self.refs:
      self.refs[key] = run_sampler(self.gmm, schedule, self.spec.samples, REF_METHOD,
                                   self.ref_steps, REF_GRID)[0]
    return self.refs[key]


def rms_distance(x: Array, ref: Array) -> float:
  """RMS over samples of the Euclidean distance ||x_i - ref_i||."""
  return float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(x - ref), axis=-1))))


def run_config(ctx: MixtureContext, sched: ScheduleSpec, label: str, nfe_budget: int) -> Row:
  """Samples one configuration (a VARIANTS label) and measures it against data and the
  reference."""
  schedule = sched.build()
  method, options = VARIANTS[label]
  steps = samplers.steps_for_nfe(method, nfe_budget)
  x, nfe, compile_s, wall_s = run_sampler(ctx.gmm, schedule, ctx.spec.samples, method,
                                          steps, sched.grid, **dict(options))
  mean_err, cov_err = testbed.moment_errors(x, ctx.gmm)
  return dict(mixture=ctx.spec.name, dim=ctx.gmm.dim, schedule=sched.label, grid=sched.grid,
              method=label, nfe_budget=nfe_budget, steps=steps, nfe=nfe, sw=ctx.sw_to_data(x),
              sw_floor=ctx.sw_floor, mean_err=float(mean_err), cov_rel_err=float(cov_err),
              ode_err=None if label in STOCHASTIC else rms_distance(x, ctx.reference(schedule)),
              compile_s=compile_s, wall_s=wall_s)


# Outputs --------------------------------------------------------------------------------

def write_csv(rows: Sequence[Row], path: str) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if r[k] is None else f"{r[k]:.6g}" if isinstance(r[k], float) else r[k])
                  for k in CSV_FIELDS})


def _fmt(v: float | None) -> str:
  return "" if v is None else f"{v:.3g}"


def _table(rows: Sequence[Row], key: str, methods: Sequence[str], nfes: Sequence[int],
           floor: float | None = None) -> list[str]:
  """Markdown table: rows schedule x method, columns NFE budget; best per schedule bold;
  values at or below `floor` get a trailing '*'."""
  cell = {(r["schedule"], r["method"], r["nfe_budget"]): r[key] for r in rows}
  scheds = list(dict.fromkeys(r["schedule"] for r in rows))
  lines = ["| schedule | method | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
           "| --- | --- |" + " ---: |" * len(nfes)]
  for s in scheds:
    best = {n: min((v for (ss, _, nn), v in cell.items()
                    if ss == s and nn == n and v is not None and math.isfinite(v)),
                   default=None) for n in nfes}
    for meth in methods:
      if not any(cell.get((s, meth, n)) is not None for n in nfes):
        continue
      vals = []
      for n in nfes:
        v = cell.get((s, meth, n))
        txt = _fmt(v) + ("*" if floor is not None and v is not None and v <= floor else "")
        vals.append(f"**{txt}**" if v is not None and v == best[n] else txt)
      lines.append(f"| {s} | {meth} | " + " | ".join(vals) + " |")
  return lines


def warmup_summary(rows: Sequence[Row]) -> list[str]:
  """Markdown table per mixture and NFE: in how many schedules the default 3M warm-up
  has the lower ODE error, and the other form's error over the default's."""
  default = WARMUP_ROWS[0]
  cell = {(r["mixture"], r["schedule"], r["nfe_budget"], r["method"]): r["ode_err"]
          for r in rows if r["method"] in WARMUP_ROWS}
  lines = ["| mixture | NFE | other form | default lower in | other / default ODE error: "
           "geometric mean | min | max |", "| --- | ---: | --- | ---: | ---: | ---: | ---: |"]
  for mix in dict.fromkeys(r["mixture"] for r in rows):
    for n in sorted({k[2] for k in cell if k[0] == mix}):
      for other in WARMUP_ROWS[1:]:
        ratio = np.array([cell[mix, s, n, other] / v for (m, s, nn, meth), v in cell.items()
                          if m == mix and nn == n and meth == default
                          and (mix, s, n, other) in cell])
        if ratio.size:
          lines.append(f"| {mix} | {n} | `{other}` | {int(np.sum(ratio > 1))} of {ratio.size} | "
                       f"{np.exp(np.mean(np.log(ratio))):.4f} | {ratio.min():.4f} | "
                       f"{ratio.max():.4f} |")
  return lines


def write_markdown(all_rows: Sequence[Row], path: str, command: str, load_before: float,
                   total_s: float,
                   ref_steps: int, floor_ranges: dict[str, tuple[float, float]],
                   nfes: Sequence[int]) -> None:
  """Main tables over the `nfes` budgets; the warm-up section over every budget run."""
  nfes = sorted(nfes)
  rows = [r for r in all_rows if r["nfe_budget"] in nfes]
  heun = sorted({r["nfe"] for r in rows if r["method"] == "heun"})
  out = ["# Sampler quality on Gaussian mixtures (exact denoiser)", "",
         machine.provenance(command, load_before) + f" Wall time {total_s:.0f} s.", "",
         "Sliced 2-Wasserstein distance (SW, lower is better) between samples and a fresh "
         "data draw of the same size; every run starts from the same noise. Bold: best "
         "method per schedule and NFE; `*`: at or below the noise floor (the floor varies between "
         "draws, and all deterministic runs share one noise draw, so they can land below it). "
         "Columns are NFE "
         f"budgets; heun spends 2 steps - 1 calls, so its cells use NFE {heun}.", ""]
  for mix in dict.fromkeys(r["mixture"] for r in rows):
    mrows = [r for r in rows if r["mixture"] == mix]
    floor, (lo, hi) = mrows[0]["sw_floor"], floor_ranges[mix]
    out += [f"## {mix}", "",
            f"Noise floor: SW between two independent data draws of the same size = "
            f"{floor:.3g} (mean of {FLOOR_DRAWS} draws against the data; range {lo:.3g} to "
            f"{hi:.3g}).", ""]
    out += _table(mrows, "sw", METHODS, nfes, floor) + [""]
  out += ["## ODE error", "",
          "RMS over samples of ||x - x_ref||, x_ref from the same noise by "
          f"{REF_METHOD} with {ref_steps} steps uniform in log-SNR over the schedule's range "
          "(deterministic methods only).", ""]
  for mix in dict.fromkeys(r["mixture"] for r in rows):
    mrows = [r for r in rows if r["mixture"] == mix and r["ode_err"] is not None]
    out += [f"### {mix}", ""] + _table(mrows, "ode_err", METHODS, nfes) + [""]
  if len(WARMUP_ROWS) > 1 and any(r["method"] in WARMUP_ROWS[1:] for r in all_rows):
    forms = ", ".join(f"`{m}` ({w})" for m, w in zip(WARMUP_ROWS, samplers.WARMUPS))
    wrows = [r for r in all_rows if r["method"] in WARMUP_ROWS]
    wnfes = sorted({r["nfe_budget"] for r in wrows})
    out += ["## DPM-Solver++(3M) warm-up", "",
            "3M's second step, the first with one history point, is second order. Its forms "
            f"(`warmup=`): {forms}; the first is the default. taylor integrates the linear "
            "extrapolation of x0_hat exactly, as k-diffusion's `sample_dpmpp_3m_sde` (eta = 0) "
            "does; midpoint is 2M's step. The runs are the same as above, plus "
            f"NFE {', '.join(map(str, WARMUP_NFES))} for these two rows only: with 3 levels the "
            "warm-up step is the last one before x0_hat. Per NFE: the number of schedules in "
            "which the default has the lower ODE error, and the other form's ODE error over "
            "the default's (above 1: the default is better).", ""]
    out += warmup_summary(wrows) + [""]
    for mix in dict.fromkeys(r["mixture"] for r in wrows):
      mrows = [r for r in wrows if r["mixture"] == mix]
      out += [f"### {mix}: ODE error", ""] + _table(mrows, "ode_err", WARMUP_ROWS, wnfes) + [""]
      out += [f"### {mix}: sliced Wasserstein", ""] + _table(
          mrows, "sw", WARMUP_ROWS, wnfes, mrows[0]["sw_floor"]) + [""]
  with open(path, "w") as f:
    f.write("\n".join(out))


def plot(rows: Sequence[Row], path: str, clip: float = 30.0) -> None:
  """SW vs NFE, log-log: rows = mixtures, columns = schedules, one line per method.

  The y axis stops at `clip` x the noise floor so that divergent runs do not squash the
  rest; points above it are drawn as triangles on the top edge.
  """
  mixes = list(dict.fromkeys(r["mixture"] for r in rows))
  scheds = list(dict.fromkeys(r["schedule"] for r in rows))
  nfes = sorted({r["nfe_budget"] for r in rows})
  fig, axes = plt.subplots(len(mixes), len(scheds), figsize=(2.9 * len(scheds) + 0.6, 2.7 * len(mixes) + 0.6),
                           sharex=True, sharey="row", squeeze=False, constrained_layout=True)
  colors = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for i, mix in enumerate(mixes):
    floor = next(r["sw_floor"] for r in rows if r["mixture"] == mix)
    top = clip * floor
    bottom = 0.7 * min([floor] + [r["sw"] for r in rows if r["mixture"] == mix])
    for j, s in enumerate(scheds):
      ax = axes[i, j]
      sel = [r for r in rows if r["mixture"] == mix and r["schedule"] == s]
      for meth in METHODS:
        pts = sorted((r["nfe"], r["sw"]) for r in sel if r["method"] == meth)
        if not pts:
          continue
        x, y = np.array(pts).T
        y = np.where(np.isfinite(y), y, np.inf)
        style = "o:" if "/" in meth else "o-"  # a non-default variant of a method
        ax.plot(x, np.minimum(y, top), style, ms=3, color=colors[meth], label=meth)
        over = y > top
        ax.plot(x[over], np.full(over.sum(), top), "^", ms=7, color=colors[meth])
      ax.axhline(floor, color="k", ls="--", lw=1, label="noise floor")
      ax.set(xscale="log", yscale="log", ylim=(bottom, top * 1.15))
      ax.set_xticks(nfes, [str(n) for n in nfes])
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
      ax.grid(True, which="both", alpha=0.3)
      if i == 0:
        ax.set_title(s, fontsize=10)
      if i == len(mixes) - 1:
        ax.set_xlabel("NFE")
      if j == 0:
        ax.set_ylabel(f"{mix}\nsliced W2")
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncol=len(labels) if len(scheds) > 2 else 3,
             fontsize=9)
  fig.suptitle(f"Sampler SW vs NFE (exact mixture denoiser); triangles: above {clip:g}x floor",
               fontsize=11)
  fig.savefig(path, dpi=110)
  plt.close(fig)


# Driver ---------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true",
                 help="NFE 5,20, 1024 samples, cosine and edm only, 500 reference steps")
  p.add_argument("--out", default=None, help="output folder (default benchmarks/results, "
                 "or benchmarks/results/quick with --quick)")
  p.add_argument("--nfe", default=None, help="comma-separated NFE budgets (default 5,10,20,50,100)")
  p.add_argument("--samples", type=int, default=None,
                 help="samples per run for every mixture (default 8192 for 2-D, 4096 for 64-D)")
  p.add_argument("--ref-steps", type=int, default=None, help="reference solver steps (default 2000)")
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  here = os.path.dirname(os.path.abspath(__file__))
  out_dir = args.out or os.path.join(here, "results", "quick" if args.quick else "")
  nfes = [int(n) for n in args.nfe.split(",")] if args.nfe else ([5, 20] if args.quick else
                                                                  [5, 10, 20, 50, 100])
  n2, n64 = (1024, 1024) if args.quick else (8192, 4096)
  if args.samples:
    n2 = n64 = args.samples
  ref_steps = args.ref_steps or (500 if args.quick else 2000)
  specs = [s for s in SCHEDULE_SPECS if not args.quick or s.label in QUICK_SCHEDULES]
  os.makedirs(out_dir, exist_ok=True)

  start, load_before = time.perf_counter(), machine.load()
  mixes = mixture_specs(n2, n64)
  plan = [(m, s, meth, n) for m in mixes for s in specs for meth in METHODS for n in nfes]
  plan += [(m, s, meth, n) for m in mixes for s in specs
           for meth in WARMUP_ROWS for n in WARMUP_NFES if n not in nfes]
  contexts: dict[str, MixtureContext] = {}
  rows = []
  for mix, sched, meth, n in tqdm(plan, desc="sampler runs", unit="run"):
    if mix.name not in contexts:
      contexts[mix.name] = MixtureContext.create(mix, ref_steps)
    rows.append(run_config(contexts[mix.name], sched, meth, n))
  total = time.perf_counter() - start

  command = shlex.join(["python", "benchmarks/samplers.py", *(sys.argv[1:] if argv is None else argv)])
  write_csv(rows, os.path.join(out_dir, "samplers.csv"))
  write_markdown(rows, os.path.join(out_dir, "samplers.md"), command, load_before,
                 total, ref_steps,
                 {name: ctx.floor_range for name, ctx in contexts.items()}, nfes)
  plot([r for r in rows if r["nfe_budget"] in nfes], os.path.join(out_dir, "samplers.png"))
  print(f"{len(rows)} runs in {total:.0f} s; wrote samplers.csv/.md/.png to {out_dir}")


if __name__ == "__main__":
  main()
