r"""The sweep driver: runs the arms of a sweep file through launch.py, then collates them.

  python experiments/sweep.py experiments/gmm_schedules.py:ring list
  python experiments/sweep.py experiments/gmm_schedules.py:ring run --jobs 2
  python experiments/sweep.py experiments/gmm_schedules.py:ring run --arm edm --arm v
  python experiments/sweep.py experiments/gmm_schedules.py:ring collate --out DIR
  python experiments/sweep.py experiments/gmm_schedules.py:ring all    # run, then collate
  python experiments/sweep.py experiments/emoji_schedules.py:cpu16 prepare  # once, on a cluster

A sweep file (experiments/*.py) holds `get_sweep(variant) -> dict`: a base config, named
arms (each a dict of config overrides), the seeds every arm runs, overrides shared by
every run (the evaluation settings, so the arms are compared alike), the launch.py modes
each run goes through and the file that marks each mode finished, and the metrics to
tabulate. `SWEEP_KEYS` below lists the keys; experiments/README.md shows an example.

A run is one (arm, seed); its workdir is ROOT/ARM/seedS (ROOT: --root, default
runs/sweeps/NAME). `run` skips the modes whose marker file exists and starts the others;
the jobs resume from their own checkpoints where they have them, so an interrupted
sweep is continued by running the same command again. On a cluster, `list` prints one
launch.py command per run: give each array task one (or `run --task I` the I-th run).
A sweep may declare `prepare` modes that run once, in ROOT/prepare, before any arm (the
image study precomputes its text-embedding cache there, which every arm then reads):
`run` and `all` do it first; on a cluster run the `prepare` action once before the array.

`collate` reads every finished run (whatever has finished so far) and writes, to --out
(default ROOT/results): results.md (the table), runs.csv (one row per run), summary.csv
(one row per arm and metric), a plot per metric (mean and 95% interval per arm), and the
curve plot the sweep names. Statistics, with N seeds per arm: the mean and a 95% t
interval (mean +- t_{0.975, N-1} s / sqrt(N)); each arm against the reference arm by
Welch's t-test, with Holm's correction over the arms compared, significant at 0.05 after
it. The table never ranks arms; it marks which differences from the reference are
significant at this N and which are not.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from typing import Any

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP_KEYS = {
    "name": "sweep name: the default root is runs/sweeps/NAME",
    "config": "base config, FILE.py[:VARIANT] relative to the repo",
    "arms": "{arm name: {config key: value}}",
    "seeds": "seeds every arm runs, e.g. (0, 1, 2)",
    "seed_keys": "config keys each seed is written to, e.g. ('train.seed',)",
    "common": "{config key: value} for every run (evaluation settings)",
    "modes": "((launch.py mode, file that marks it finished in the workdir), ...)",
    "prepare": "((launch.py mode, marker file), ...) run once per sweep before any arm, in "
               "ROOT/prepare with the common overrides: e.g. ('precompute', "
               "'precompute.json') fills the text-embedding cache every arm reads (optional)",
    "results": "the JSON file in each workdir that collate reads",
    "metrics": "{metric key in results: 'lower' or 'higher' (which is better)}",
    "floors": "{metric: the results key of its floor}, drawn in the plots (optional)",
    "curve": "(x key, y key, label[, low key, high key]) of a per-run curve to plot per "
             "arm, with the run's own band when given (optional)",
    "intervals": "{metric: (low key, high key)}: a per-run 95% interval in the results "
                 "(e.g. FID's bootstrap), used for arms with one seed (optional)",
    "grid": "results key of an image (path relative to the results file) shown per run "
            "(optional)",
    "buckets": "results key of {'buckets': [...], 'loss': [...]}: loss per log-SNR bucket, "
               "plotted per arm (optional)",
    "reference": "the arm the others are tested against",
    "describe": "one paragraph on what the sweep asks (optional)",
}
_OPTIONAL = {"floors": {}, "curve": None, "describe": "", "common": {}, "intervals": {},
             "grid": None, "buckets": None, "prepare": ()}


class SweepError(Exception):
  """A mistake in a sweep file or on the command line; the message says the fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  seed: int
  workdir: str
  overrides: dict[str, Any]


def load_sweep(spec: str) -> dict[str, Any]:
  """The dict of `get_sweep(variant)` in FILE.py[:VARIANT], checked against SWEEP_KEYS."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise SweepError(f"{spec}: no such sweep file {path!r} (paths are relative to "
                     f"{os.getcwd()}); the sweeps are experiments/*.py.")
  # A sweep file may import its neighbours (experiments/schedule_arms.py).
  folder = os.path.dirname(os.path.abspath(path))
  if folder not in sys.path:
    sys.path.insert(0, folder)
  module_spec = importlib.util.spec_from_file_location("_sweep", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise SweepError(f"{path} defines no get_sweep(variant) -> dict.")
  sweep = {**_OPTIONAL, **module.get_sweep(variant or None)}
  unknown = sorted(set(sweep) - set(SWEEP_KEYS))
  missing = sorted(set(SWEEP_KEYS) - set(sweep))
  if unknown or missing:
    raise SweepError(f"{spec}: " + "; ".join(
        ([f"unknown keys {unknown}"] if unknown else []) +
        ([f"missing keys {missing}"] if missing else [])) +
        ". A sweep's keys are: " + "; ".join(f"{k}: {v}" for k, v in SWEEP_KEYS.items()))
  if "prepare" in sweep["arms"]:
    raise SweepError(f"{spec}: an arm is named 'prepare', the name of the sweep's one-off "
                     "preparation (ROOT/prepare); rename the arm.")
  if sweep["reference"] not in sweep["arms"]:
    raise SweepError(f"{spec}: reference arm {sweep['reference']!r} is not one of the arms "
                     f"{list(sweep['arms'])}.")
  for metric, better in sweep["metrics"].items():
    if better not in ("lower", "higher"):
      raise SweepError(f"{spec}: metrics[{metric!r}] is {better!r}; say 'lower' or 'higher'.")
  return sweep


def _fill(value: Any, root: str) -> Any:
  """"{root}" in a string override stands for the sweep's root (shared caches)."""
  return value.replace("{root}", root) if isinstance(value, str) else value


def plan(sweep: dict[str, Any], root: str, arms: list[str] | None = None,
         extra: dict[str, Any] | None = None) -> list[Run]:
  """Every (arm, seed) run, arms in the file's order; `arms` selects some. `extra`
  overrides are added to every run (--set: a data directory, a checkpoint path)."""
  for arm in arms or ():
    if arm not in sweep["arms"]:
      raise SweepError(f"--arm {arm}: no such arm; the arms are {list(sweep['arms'])}.")
  runs = []
  for arm, overrides in sweep["arms"].items():
    if arms and arm not in arms:
      continue
    for seed in sweep["seeds"]:
      seeded = {key: seed for key in sweep["seed_keys"]}
      merged = {**sweep["common"], **overrides, **seeded, **(extra or {})}
      runs.append(Run(arm, int(seed), os.path.join(root, arm, f"seed{seed}"),
                      {k: _fill(v, root) for k, v in merged.items()}))
  return runs


def prepare_run(sweep: dict[str, Any], root: str,
                extra: dict[str, Any] | None = None) -> Run | None:
  """The sweep's one-off preparation (its `prepare` modes) as a run in ROOT/prepare with
  the common overrides and --set's, or None when the sweep has none."""
  if not sweep["prepare"]:
    return None
  merged = {**sweep["common"], **(extra or {})}
  return Run("prepare", 0, os.path.join(root, "prepare"),
             {k: _fill(v, root) for k, v in merged.items()})


def _value(v: Any) -> str:
  """A config override's value as launch.py (ml_collections) parses it."""
  return v if isinstance(v, str) else repr(v)


def command(sweep: dict[str, Any], run: Run, mode: str) -> list[str]:
  """The launch.py command line of one run's mode."""
  return ([sys.executable, os.path.join(REPO, "launch.py"), f"--config={sweep['config']}",
           f"--workdir={run.workdir}", f"--mode={mode}"] +
          [f"--config.{k}={_value(v)}" for k, v in run.overrides.items()])


def _finished(path: str) -> bool:
  """A marker file exists, and if it is JSON with a "complete" key (the trainer's
  train_summary.json, also written when a time limit or preemption stops it), that is true."""
  if not os.path.exists(path):
    return False
  if path.endswith(".json"):
    try:
      with open(path) as f:
        record = json.load(f)
    except (OSError, json.JSONDecodeError):
      return False
    if isinstance(record, dict) and "complete" in record:
      return bool(record["complete"])
  return True


def _modes(sweep: dict[str, Any], run: Run) -> tuple:
  return sweep["prepare"] if run.arm == "prepare" else sweep["modes"]


def pending_modes(sweep: dict[str, Any], run: Run) -> list[str]:
  return [mode for mode, marker in _modes(sweep, run)
          if not _finished(os.path.join(run.workdir, marker))]


def execute(sweep: dict[str, Any], run: Run) -> tuple[Run, str, float]:
  """Runs the run's unfinished modes in order; returns (run, status, seconds)."""
  start = time.perf_counter()
  todo = pending_modes(sweep, run)
  if not todo:
    return run, "skipped (finished)", 0.0
  os.makedirs(run.workdir, exist_ok=True)
  for mode in todo:
    log = os.path.join(run.workdir, f"launch_{mode}.log")
    with open(log, "a") as f:
      f.write(f"\n$ {shlex.join(command(sweep, run, mode))}\n")
      f.flush()
      rc = subprocess.call(command(sweep, run, mode), cwd=REPO, stdout=f,
                           stderr=subprocess.STDOUT)
    if rc:
      return run, f"FAILED: {mode} exited {rc}; see {log}", time.perf_counter() - start
  return run, "done", time.perf_counter() - start


def run_all(sweep: dict[str, Any], runs: list[Run], jobs: int) -> int:
  """Runs `runs`, `jobs` at a time; returns how many failed."""
  failed = 0
  with concurrent.futures.ThreadPoolExecutor(max(1, jobs)) as pool:
    futures = [pool.submit(execute, sweep, r) for r in runs]
    for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
      run, status, seconds = future.result()
      failed += status.startswith("FAILED")
      print(f"[{i}/{len(runs)}] {run.arm} seed {run.seed}: {status}"
            + (f" in {seconds:.0f} s" if seconds else ""), flush=True)
  return failed


# Statistics. -------------------------------------------------------------------------

def interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
  """(mean, half-width of the t interval at `level`); the half-width is NaN for N < 2."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, np.float64)
  n = values.size
  if n < 2:
    return float(np.mean(values)), float("nan")
  half = stats.t.ppf(0.5 + level / 2, n - 1) * np.std(values, ddof=1) / np.sqrt(n)
  return float(np.mean(values)), float(half)


def holm(pvalues: dict[str, float]) -> dict[str, float]:
  """Holm-adjusted p-values (step-down, monotone), for comparisons made together."""
  names = sorted(pvalues, key=pvalues.get)
  adjusted, running = {}, 0.0
  for i, name in enumerate(names):
    running = max(running, min(1.0, (len(names) - i) * pvalues[name]))
    adjusted[name] = running
  return adjusted


def compare(sweep: dict[str, Any], values: dict[str, np.ndarray], metric: str
            ) -> dict[str, tuple[float, str]]:
  """Each arm against the reference on `metric`: {arm: (Holm p, verdict)}."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ref = values.get(sweep["reference"], np.array([]))
  raw = {}
  for arm, v in values.items():
    if arm != sweep["reference"] and len(v) >= 2 and len(ref) >= 2:
      if np.std(v) == 0 and np.std(ref) == 0:
        raw[arm] = 0.0 if np.mean(v) != np.mean(ref) else 1.0
      else:
        raw[arm] = float(stats.ttest_ind(v, ref, equal_var=False).pvalue)
  out = {}
  for arm, p in holm(raw).items():
    if p >= 0.05:
      out[arm] = (p, "n.s.")
    else:
      lower = np.mean(values[arm]) < np.mean(ref)
      better = lower == (sweep["metrics"][metric] == "lower")
      out[arm] = (p, "better" if better else "worse")
  return out


def run_intervals(sweep: dict[str, Any], results, arms: list[str]
                  ) -> dict[tuple[str, str], tuple[float, float]]:
  """{(metric, arm): (low, high)} for arms with one run and a per-run interval."""
  out = {}
  for m, (lo_key, hi_key) in sweep["intervals"].items():
    for a in arms:
      mine = [res for r, res in results if r.arm == a]
      if len(mine) == 1 and lo_key in mine[0] and hi_key in mine[0]:
        out[(m, a)] = (float(mine[0][lo_key]), float(mine[0][hi_key]))
  return out


def overlap_verdict(sweep: dict[str, Any], metric: str, mine: tuple[float, float],
                    ref: tuple[float, float] | None, mean: float, ref_values) -> str:
  """With one run per arm: 'better'/'worse' only when the two 95% intervals do not
  overlap (a conservative test: disjoint 95% intervals mean p < 0.006 for normal
  estimates, which also covers Holm's correction over up to 8 arms), else 'n.s.'."""
  if ref is None or ref_values is None or len(ref_values) != 1:
    return "no reference interval"
  if mine[0] <= ref[1] and ref[0] <= mine[1]:
    return "n.s. (intervals overlap)"
  lower = mean < float(ref_values[0])
  return "better" if lower == (sweep["metrics"][metric] == "lower") else "worse"


def _fmt_interval(value: float, low: float, high: float) -> str:
  digits = 4 if abs(value) < 10 else 1
  return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# Collation. --------------------------------------------------------------------------

def read_results(sweep: dict[str, Any], runs: list[Run]) -> list[tuple[Run, dict[str, Any]]]:
  """(run, results) of every run whose results file exists."""
  out = []
  for run in runs:
    path = os.path.join(run.workdir, sweep["results"])
    if os.path.exists(path):
      with open(path) as f:
        out.append((run, json.load(f)))
  return out


def _fmt(mean: float, half: float) -> str:
  digits = 4 if abs(mean) < 10 else 2
  return f"{mean:.{digits}f}" + ("" if np.isnan(half) else f" ± {half:.{digits}f}")


def protocol_lines(results: list[tuple[Run, dict[str, Any]]]) -> list[str]:
  """The evaluation protocol the arms' results record (resize, N, Inception and CLIP
  hashes; imagen_jax/eval/evaluators.py): one line when the arms share it, else a warning
  listing each, since their numbers are then not comparable."""
  seen: dict[str, list[str]] = {}
  for run, res in results:
    if res.get("protocol"):
      line = "; ".join(f"{k} `{v}`" for k, v in res["protocol"].items())
      seen.setdefault(line, []).append(f"{run.arm}/seed{run.seed}")
  if not seen:
    return []
  if len(seen) == 1:
    return [f"Protocol: {next(iter(seen))}.", ""]
  return (["**The runs were evaluated under different protocols; their numbers are not "
           "comparable:**", ""] + [f"- {', '.join(who)}: {line}" for line, who in seen.items()]
          + [""])


def collate(sweep: dict[str, Any], runs: list[Run], out: str, spec: str) -> str:
  """Writes the table, CSVs and plots of the finished runs to `out`; returns the table."""
  results = read_results(sweep, runs)
  if not results:
    raise SweepError(f"No finished runs under {os.path.dirname(runs[0].workdir) if runs else '?'}"
                     f" (no {sweep['results']} yet); run the sweep first.")
  os.makedirs(out, exist_ok=True)
  arms = [a for a in sweep["arms"] if any(r.arm == a for r, _ in results)]
  metrics = list(sweep["metrics"])
  by_arm = {m: {a: np.array([float(res[m]) for r, res in results if r.arm == a])
                for a in arms} for m in metrics}

  with open(os.path.join(out, "runs.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["arm", "seed", *metrics, *sweep["floors"].values()])
    for run, res in results:
      w.writerow([run.arm, run.seed, *[res[m] for m in metrics],
                  *[res.get(k, "") for k in sweep["floors"].values()]])

  verdicts = {m: compare(sweep, by_arm[m], m) for m in metrics}
  own = run_intervals(sweep, results, arms)
  summary = []
  for m in metrics:
    for a in arms:
      mean, half = interval(by_arm[m][a])
      low, high = mean - half, mean + half
      p, verdict = verdicts[m].get(a, (float("nan"), "reference" if a == sweep["reference"]
                                       else "too few seeds"))
      if (m, a) in own:  # one seed: the run's own interval, compared by overlap
        low, high = own[(m, a)]
        if a != sweep["reference"]:
          verdict = overlap_verdict(sweep, m, own[(m, a)], own.get((m, sweep["reference"])),
                                    mean, by_arm[m].get(sweep["reference"]))
      summary.append({"metric": m, "arm": a, "n": len(by_arm[m][a]), "mean": mean,
                      "ci95_half": half, "ci95_low": low, "ci95_high": high,
                      "p_holm_vs_reference": p, "verdict": verdict})
  with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, list(summary[0]))
    w.writeheader()
    w.writerows(summary)

  lines = ["| arm | overrides | N | " + " | ".join(
      f"{m} ({sweep['metrics'][m]} is better) | vs {sweep['reference']}" for m in metrics) + " |",
           "| --- | --- | ---: | " + " | ".join("---: | ---" for _ in metrics) + " |"]
  for a in arms:
    over = ", ".join(f"{k}={_value(v)}" for k, v in sweep["arms"][a].items()) or "(base)"
    cells = []
    for m in metrics:
      row = next(s for s in summary if s["metric"] == m and s["arm"] == a)
      verdict = row["verdict"] if np.isnan(row["p_holm_vs_reference"]) else (
          f"{row['verdict']} (p={row['p_holm_vs_reference']:.2g})")
      if (m, a) in own:
        cells += [_fmt_interval(row["mean"], row["ci95_low"], row["ci95_high"]), verdict]
      else:
        cells += [_fmt(row["mean"], row["ci95_half"]), verdict]
    lines.append(f"| {a} | {over} | {len(by_arm[metrics[0]][a])} | " + " | ".join(cells) + " |")
  table = "\n".join(lines)

  plots = [_plot_metric(sweep, by_arm[m], results, m, out) for m in metrics]
  if sweep["curve"]:
    plots.append(_plot_curve(sweep, results, arms, out))
  if sweep["buckets"]:
    plots.append(_plot_buckets(sweep, results, arms, out))
  grids = _copy_grids(sweep, results, out) if sweep["grid"] else []
  floors = []
  for m, key in sweep["floors"].items():
    vals = [float(res[key]) for _, res in results if key in res]
    if vals:
      floors.append(f"{m} floor ({key}): {np.mean(vals):.4f} (mean over runs)")
  seeds = sorted({r.seed for r, _ in results})
  head = [f"# Sweep {sweep['name']}", "", sweep["describe"], "",
          f"Sweep `{spec}`, base config `{sweep['config']}`; {len(results)} finished runs "
          f"of {len(runs)} planned, seeds {seeds}. Shared overrides: "
          + (", ".join(f"`{k}={_value(v)}`" for k, v in sweep["common"].items()) or "none")
          + ".", "",
          "Each cell: mean ± half-width of the 95% t interval over the arm's seeds (N). "
          f"'vs {sweep['reference']}': Welch's t-test against the reference arm, p Holm-"
          "corrected over the arms compared; 'better'/'worse' only where p < 0.05, else "
          "'n.s.' (not significant at this N: do not rank those arms). Arms are listed in "
          "the sweep file's order, not ranked."
          + (" A cell with [low, high] is an arm with one run: its own 95% interval "
             "(the evaluation's, e.g. FID's bootstrap over samples), and the verdict is by "
             "overlap: 'better'/'worse' only when the arm's and the reference's intervals "
             "are disjoint." if own else ""), ""]
  images = [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in plots]
  for label, name in grids:
    images += ["", f"{label}:", "", f"![{name}]({name})"]
  text = "\n".join(head + [table, ""] + ([", ".join(floors) + ".", ""] if floors else [])
                   + protocol_lines(results) + images) + "\n"
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text)
  return table


def _figure(size=(7, 4)):
  # Figure + Agg canvas, not pyplot: no global state and no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=size)
  FigureCanvasAgg(fig)
  return fig


def _plot_metric(sweep, values: dict[str, np.ndarray], results, metric: str, out: str) -> str:
  fig = _figure((max(5.0, 1.1 * len(values) + 2), 4))
  ax = fig.subplots()
  for i, (arm, v) in enumerate(values.items()):
    mean, half = interval(v)
    ax.scatter(np.full(len(v), i), v, s=12, color="0.6", zorder=2)
    ax.errorbar([i], [mean], yerr=None if np.isnan(half) else [[half], [half]], fmt="o",
                color="C0", capsize=5, zorder=3)
  key = sweep["floors"].get(metric)
  if key:
    floor = [float(res[key]) for _, res in results if key in res]
    if floor:
      ax.axhline(np.mean(floor), color="C3", ls="--", lw=1, label="noise floor")
      ax.legend(loc="best")
  everything = np.concatenate(list(values.values()))
  if np.all(everything > 0) and everything.max() > 50 * everything.min():
    ax.set_yscale("log")  # arms orders of magnitude apart
  ax.set_xticks(range(len(values)))
  ax.set_xticklabels(list(values), rotation=30, ha="right")
  ax.set_ylabel(f"{metric} ({sweep['metrics'][metric]} is better)")
  ax.set_title(f"{sweep['name']}: {metric}, mean and 95% interval (dots: seeds)")
  fig.tight_layout()
  path = os.path.join(out, f"{metric}.png")
  fig.savefig(path, dpi=110)
  return path


def _plot_curve(sweep, results, arms: list[str], out: str) -> str:
  x_key, y_key, label, *band = sweep["curve"]
  fig = _figure((7, 4.5))
  ax = fig.subplots()
  for i, arm in enumerate(arms):
    mine = [res for r, res in results if r.arm == arm]
    ys = np.array([res[y_key] for res in mine], np.float64)
    x = np.asarray(mine[0][x_key], np.float64)
    stats_ = [interval(ys[:, j]) for j in range(ys.shape[1])]
    mean = np.array([s[0] for s in stats_])
    low = mean - np.array([s[1] for s in stats_])
    high = mean + np.array([s[1] for s in stats_])
    if len(mine) == 1 and band and all(k in mine[0] for k in band):
      low, high = (np.asarray(mine[0][k], np.float64) for k in band)
    ax.plot(x, mean, marker="o", ms=3, color=f"C{i}", label=f"{arm} (N={len(ys)})")
    if not np.all(np.isnan(low)):
      ax.fill_between(x, np.maximum(low, mean * 1e-3), high, color=f"C{i}", alpha=0.15)
  ax.set_yscale("log")
  ax.set_xlabel(x_key)
  ax.set_ylabel(label)
  ax.set_title(f"{sweep['name']}: mean and 95% interval"
               + (" (one run: its own interval)" if band else " over seeds"))
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out, f"{y_key}.png")
  fig.savefig(path, dpi=110)
  return path


def _plot_buckets(sweep, results, arms: list[str], out: str) -> str:
  """Loss per log-SNR bucket, one line per arm (mean over its runs). Each arm's loss is
  in its own target and weighting, so compare the shapes, not the levels across arms."""
  key = sweep["buckets"]
  fig = _figure((7, 4.5))
  ax = fig.subplots()
  names = None
  for i, arm in enumerate(arms):
    recs = [res[key] for r, res in results if r.arm == arm and res.get(key)]
    if not recs:
      continue
    names = recs[0]["buckets"]
    loss = np.mean([rec["loss"] for rec in recs], axis=0)
    ax.plot(range(len(loss)), loss, marker="o", ms=3, color=f"C{i}", label=arm)
  if names:
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([f"[{n.replace('_', ', ')})" for n in names], rotation=30, ha="right")
  ax.set_yscale("log")
  ax.set_xlabel("log-SNR bucket")
  ax.set_ylabel("training loss (each arm's own weighting)")
  ax.set_title(f"{sweep['name']}: loss per log-SNR bucket at the end of training")
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = os.path.join(out, "loss_by_logsnr.png")
  fig.savefig(path, dpi=110)
  return path


def _copy_grids(sweep, results, out: str) -> list[tuple[str, str]]:
  """Copies each run's grid image into out as ARM_seedS.png; returns (label, file name)."""
  import shutil  # pylint: disable=g-import-not-at-top
  copied = []
  for run, res in results:
    rel = res.get(sweep["grid"])
    src = os.path.join(run.workdir, os.path.dirname(sweep["results"]), rel) if rel else ""
    if rel and os.path.isfile(src):
      name = f"{run.arm}_seed{run.seed}{os.path.splitext(src)[1]}"
      shutil.copyfile(src, os.path.join(out, name))
      copied.append((f"{run.arm} (seed {run.seed}, step {res.get('step', '?')})", name))
  return copied


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("sweep", help="experiments/FILE.py[:VARIANT]")
  p.add_argument("action", choices=("list", "prepare", "run", "collate", "all"))
  p.add_argument("--root", default="", help="runs go to ROOT/ARM/seedS "
                 "(default runs/sweeps/NAME)")
  p.add_argument("--arm", action="append", default=None, help="only this arm (repeatable)")
  p.add_argument("--task", type=int, default=None,
                 help="run only the TASK-th run of the list (0-based; a cluster array index)")
  p.add_argument("--jobs", type=int, default=1, help="runs at a time on this machine")
  p.add_argument("--out", default="", help="collate's output directory (default ROOT/results)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override for every run, e.g. data.data_dir=/data/tfds "
                 "(repeatable; a run's workdir does not depend on it)")
  args = p.parse_args(argv)
  try:
    sweep = load_sweep(args.sweep)
    root = os.path.abspath(args.root or os.path.join("runs", "sweeps", sweep["name"]))
    extra = {}
    for item in args.set:
      key, eq, value = item.partition("=")
      if not eq or not key:
        raise SweepError(f"--set {item!r}: write KEY=VALUE, e.g. --set data.data_dir=/data.")
      extra[key] = value
    runs = plan(sweep, root, args.arm, extra)
    prep = prepare_run(sweep, root, extra)
    if args.task is not None:
      if not 0 <= args.task < len(runs):
        raise SweepError(f"--task {args.task}: the sweep has {len(runs)} runs (0..{len(runs) - 1}).")
      runs = [runs[args.task]]
    if args.action == "list":
      if prep is not None:
        todo = pending_modes(sweep, prep)
        status = "finished" if not todo else f"to run: {', '.join(todo)}"
        print(f"# [prepare] once, before any run ({status})")
        for mode, _ in sweep["prepare"]:
          print(shlex.join(command(sweep, prep, mode)))
      for i, run in enumerate(runs):
        todo = pending_modes(sweep, run)
        status = "finished" if not todo else f"to run: {', '.join(todo)}"
        print(f"# [{i}] {run.arm} seed {run.seed} ({status})")
        for mode, _ in sweep["modes"]:
          print(shlex.join(command(sweep, run, mode)))
      return 0
    failed = 0
    if prep is not None and args.action in ("prepare", "run", "all"):
      if args.task is not None and pending_modes(sweep, prep):
        # Array tasks would race to write the same cache: prepare once, then submit.
        raise SweepError(f"--task {args.task}: the sweep's preparation "
                         f"({', '.join(pending_modes(sweep, prep))}) has not run; run "
                         f"`python experiments/sweep.py {args.sweep} prepare` (with the same "
                         "--root and --set) once before the array tasks.")
      _, status, seconds = execute(sweep, prep)
      print(f"[prepare] {status}" + (f" in {seconds:.0f} s" if seconds else ""), flush=True)
      if status.startswith("FAILED"):
        print("The preparation failed; fix it and run the same command again.",
              file=sys.stderr)
        return 1
    if args.action in ("run", "all"):
      failed = run_all(sweep, runs, args.jobs)
    if args.action in ("collate", "all"):
      out = os.path.abspath(args.out or os.path.join(root, "results"))
      print(collate(sweep, plan(sweep, root, args.arm, extra), out, args.sweep))
      print(f"wrote {out}/results.md")
    if failed:
      print(f"{failed} run(s) failed; their logs are named above. Fix and run the same "
            "command again: finished runs are skipped.", file=sys.stderr)
    return 1 if failed else 0
  except SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
