"""Training logs: TensorBoard events, metrics.jsonl, a console line and progress bar, PNG
sample grids, and a loss-curve plot.

Named for what it holds (the trainer imports it as `log_lib`); it never shadows the
standard library's `logging`, since the package uses absolute imports.

* `MetricAccumulator` keeps the step metrics between log points and turns them into the
  scalars to log with one device -> host transfer per log step.
* `MetricLogger` writes them (main process only): WORKDIR/tensorboard/ event files,
  WORKDIR/metrics.jsonl (one JSON object per log step), WORKDIR/samples/*.png.
* `image_grid`, `caption_strip`, `mfu`, `read_metrics`, `plot_metrics`: pure helpers.

metrics.jsonl is strict JSON (RFC 8259 has no NaN): a non-finite float is written as the
string "NaN", "Infinity" or "-Infinity", which Python's float() reads back. A run resumed
from step S appends to the same file after dropping the lines of steps > S that the
interrupted run wrote past its last checkpoint (TensorBoard's purge_step does the same for
the event files), so every step appears once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import numpy as np

# Per-step metric keys with their own reduction; any other scalar key is averaged.
_BUCKET_SUM, _BUCKET_COUNT = "loss_sum_per_bucket", "count_per_bucket"
_SPECIAL = ("loss", "lr", "bad_steps", "skipped", "bucket_edges", _BUCKET_SUM, _BUCKET_COUNT)
# Console line: these keys, in this order, when present.
_CONSOLE = ("loss", "grad_norm", "lr", "skipped", "bad_steps", "images_per_s", "mfu")


# --- pure helpers ----------------------------------------------------------------------


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_total: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices together."""
  return flops_per_step / seconds_per_step / peak_flops_total


def to_uint8(images: Any) -> np.ndarray:
  """uint8 images from uint8 ones, or from floats in [-1, 1] (clipped, rounded)."""
  x = np.asarray(images)
  if x.dtype == np.uint8:
    return x
  x = (np.clip(x.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5
  return np.round(x).astype(np.uint8)


def image_grid(images: Any, ncols: int | None = None, pad: int = 2, pad_value: int = 0,
               upscale: int = 1) -> np.ndarray:
  """Tiles [N, H, W, C] images (float in [-1, 1] or uint8; C = 1 or 3) into one uint8
  [H', W', 3] image, row-major, `pad` pixels of `pad_value` around and between tiles.

  ncols defaults to ceil(sqrt(N)); upscale repeats pixels (nearest) so that 16x16
  samples are visible in TensorBoard.
  """
  x = to_uint8(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"image_grid wants [N, H, W, 1 or 3] images, got shape {x.shape}.")
  if x.shape[-1] == 1:
    x = np.repeat(x, 3, axis=-1)
  if upscale > 1:
    x = x.repeat(upscale, axis=1).repeat(upscale, axis=2)
  n, h, w, _ = x.shape
  ncols = max(1, min(n, ncols or math.ceil(math.sqrt(n))))
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((pad + nrows * (h + pad), pad + ncols * (w + pad), 3), pad_value, np.uint8)
  for i in range(n):
    r, c = divmod(i, ncols)
    top, left = pad + r * (h + pad), pad + c * (w + pad)
    grid[top:top + h, left:left + w] = x[i]
  return grid


def caption_strip(grid: np.ndarray, captions: Sequence[str], *, font_size: int = 11,
                  background: int = 255) -> np.ndarray:
  """The grid with a legend below it, one line per caption numbered in the grid's
  row-major order ("1: ...", "2: ..."); the canvas widens to fit the longest line.

  A legend rather than per-tile labels: at 16-64 px a tile holds too few characters.
  """
  from PIL import Image, ImageDraw, ImageFont

  try:
    font = ImageFont.load_default(size=font_size)
  except TypeError:  # Pillow < 10.1: fixed-size bitmap font
    font = ImageFont.load_default()
  lines = [f"{i + 1}: {c}" for i, c in enumerate(captions)]
  probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  boxes = [probe.textbbox((0, 0), s, font=font) for s in lines] or [(0, 0, 0, 0)]
  line_h = max(b[3] - b[1] for b in boxes) + 3
  text_w = max(b[2] for b in boxes) + 8
  h, w = grid.shape[:2]
  canvas = Image.new("RGB", (max(w, text_w), h + line_h * len(lines) + 6), (background,) * 3)
  canvas.paste(Image.fromarray(np.asarray(grid, np.uint8)), (0, 0))
  draw = ImageDraw.Draw(canvas)
  ink = (0, 0, 0) if background > 127 else (255, 255, 255)
  for i, s in enumerate(lines):
    draw.text((4, h + 3 + i * line_h), s, fill=ink, font=font)
  return np.asarray(canvas)


def _json_value(v: Any) -> Any:
  """A JSON-safe scalar: ints stay ints; non-finite floats become strings."""
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  f = float(v)
  if math.isfinite(f):
    return f
  return "NaN" if math.isnan(f) else ("Infinity" if f > 0 else "-Infinity")


def read_metrics(jsonl_path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl sorted by step, the last one kept where a step
  repeats; string values ("NaN", "Infinity") read back as floats. [] if no file."""
  if not os.path.exists(jsonl_path):
    return []
  by_step: dict[int, dict[str, Any]] = {}
  with open(jsonl_path) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:  # a line cut short by a crash
        continue
      out = {}
      for k, v in rec.items():
        if isinstance(v, str):
          try:
            v = float(v)
          except ValueError:
            pass
        out[k] = v
      by_step[int(out["step"])] = out
  return [by_step[s] for s in sorted(by_step)]


def plot_metrics(jsonl_path: str, out_png: str) -> str | None:
  """Plots loss (and grad norm) and the per-bucket losses against step into a PNG.

  Returns out_png, or None when the file has no records. Uses matplotlib's Agg canvas
  directly, so the process's global backend is left alone.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  recs = read_metrics(jsonl_path)
  if not recs:
    return None

  def series(key):
    pts = [(r["step"], r[key]) for r in recs
           if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return ([p[0] for p in pts], [p[1] for p in pts])

  buckets = sorted({k for r in recs for k in r if k.startswith("loss/bucket_")},
                   key=bucket_sort_key)
  panels = 2 if buckets else 1
  fig = Figure(figsize=(6.5 * panels, 4.2))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, panels, 1)
  ax.plot(*series("loss"), label="loss", color="C0")
  if any("grad_norm" in r for r in recs):
    ax2 = ax.twinx()
    ax2.plot(*series("grad_norm"), label="grad_norm", color="C1", alpha=0.5, lw=0.8)
    ax2.set_ylabel("grad norm", color="C1")
  ax.set_xlabel("step")
  ax.set_ylabel("loss", color="C0")
  ax.set_title("training loss")
  _log_scale_if_positive(ax, series("loss")[1])
  if buckets:
    bx = fig.add_subplot(1, 2, 2)
    for i, key in enumerate(buckets):
      bx.plot(*series(key), label=_bucket_label(key), color=_cmap(i, len(buckets)))
    bx.set_xlabel("step")
    bx.set_ylabel("loss")
    bx.set_title("loss per log-SNR bucket")
    bx.legend(fontsize=7, title="log-SNR", title_fontsize=7)
    _log_scale_if_positive(bx, [v for k in buckets for v in series(k)[1]])
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
  fig.savefig(out_png, dpi=100)
  return out_png


def bucket_sort_key(key: str) -> tuple[float, str]:
  lo = key[len("loss/bucket_"):].rsplit("_", 1)[0]
  try:
    return float(lo), key
  except ValueError:
    return math.inf, key


def _bucket_label(key: str) -> str:
  parts = key[len("loss/bucket_"):].rsplit("_", 1)
  return f"[{parts[0]}, {parts[1]})" if len(parts) == 2 else parts[0]


def _cmap(i: int, n: int):
  from matplotlib import colormaps
  return colormaps["viridis"](i / max(n - 1, 1))


def _log_scale_if_positive(ax, values: Iterable[float]) -> None:
  values = list(values)
  if values and min(values) > 0:
    ax.set_yscale("log")


def _fmt_edge(v: float) -> str:
  return f"{v:g}"


# --- accumulation ----------------------------------------------------------------------


class MetricAccumulator:
  """Step metrics between two log points -> the scalars to log.

  `add(metrics)` keeps each step's dict of device arrays (no transfer, so the host never
  waits on the device between log points); `result(seconds)` fetches them all with one
  `jax.device_get` and reduces:

    loss             mean of the per-step loss over steps not skipped
    loss/bucket_A_B  sum(loss_sum_per_bucket) / sum(count_per_bucket) over those steps:
                     the mean loss of the examples whose log-SNR fell in [A, B); buckets
                     with no example are omitted
    lr               the last step's
    bad_steps        the max (a running count of consecutive bad steps)
    skipped          the total of the per-step 0/1 flags
    other scalars    (grad_norm, ...) the mean over steps not skipped
    seconds_per_step, images_per_s, flops_per_s, mfu   from `seconds` (the wall time of
                     the steps since the last result), images_per_step, flops_per_step and
                     peak_flops (all devices together)

  Bucket edges come from `bucket_edges` or, failing that, a "bucket_edges" entry in the
  metrics; without either, buckets are named by index (loss/bucket_0, ...).
  """

  def __init__(self, *, peak_flops: float | None = None, images_per_step: int | None = None,
               flops_per_step: float | None = None,
               bucket_edges: Sequence[float] | None = None):
    self.peak_flops = peak_flops
    self.images_per_step = images_per_step
    self.flops_per_step = flops_per_step
    self.bucket_edges = None if bucket_edges is None else [float(e) for e in bucket_edges]
    self._steps: list[Mapping[str, Any]] = []
    self._last_time = time.perf_counter()

  def __len__(self) -> int:
    return len(self._steps)

  def add(self, metrics: Mapping[str, Any]) -> None:
    self._steps.append(dict(metrics))

  def reset(self) -> None:
    self._steps = []
    self._last_time = time.perf_counter()

  def result(self, seconds: float | None = None) -> dict[str, float]:
    """The scalars since the last result (then starts over). `seconds` defaults to the
    wall time since the last result or reset."""
    now = time.perf_counter()
    if seconds is None:
      seconds = now - self._last_time
    steps = jax.device_get(self._steps)  # the one transfer of this log step
    self._steps, self._last_time = [], now
    return self._reduce(steps, seconds)

  def _reduce(self, steps: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    out: dict[str, float] = {}
    n = len(steps)
    if n == 0:
      return out
    skipped = np.array([float(np.sum(s.get("skipped", 0))) for s in steps])
    good = [s for s, k in zip(steps, skipped) if k == 0]

    def mean(key):
      vals = [float(np.mean(s[key])) for s in good if key in s]
      return float(np.mean(vals)) if vals else math.nan

    if any("loss" in s for s in steps):
      out["loss"] = mean("loss")
    if any(_BUCKET_SUM in s for s in steps):
      sums = sum((np.asarray(s[_BUCKET_SUM], np.float64) for s in good), 0.0)
      counts = sum((np.asarray(s[_BUCKET_COUNT], np.float64) for s in good), 0.0)
      edges = self.bucket_edges
      if edges is None:
        edges = next((list(map(float, s["bucket_edges"])) for s in steps
                      if "bucket_edges" in s), None)
      for i in np.flatnonzero(np.asarray(counts) > 0):
        name = (f"loss/bucket_{_fmt_edge(edges[i])}_{_fmt_edge(edges[i + 1])}"
                if edges is not None else f"loss/bucket_{i}")
        out[name] = float(sums[i] / counts[i])
    for key in sorted({k for s in steps for k in s} - set(_SPECIAL)):
      if all(np.ndim(s[key]) == 0 for s in steps if key in s):
        out[key] = mean(key)
    if any("lr" in s for s in steps):
      out["lr"] = float(next(s["lr"] for s in reversed(steps) if "lr" in s))
    if any("bad_steps" in s for s in steps):
      out["bad_steps"] = int(max(int(np.max(s.get("bad_steps", 0))) for s in steps))
    out["skipped"] = int(skipped.sum())
    if seconds and seconds > 0:
      per_step = seconds / n
      out["seconds_per_step"] = per_step
      if self.images_per_step:
        out["images_per_s"] = self.images_per_step / per_step
      if self.flops_per_step:
        out["flops_per_s"] = self.flops_per_step / per_step
        if self.peak_flops:
          out["mfu"] = mfu(self.flops_per_step, per_step, self.peak_flops)
    return out


# --- writing ---------------------------------------------------------------------------


class MetricLogger:
  """Writes scalars, images and text of the main process; elsewhere every method is a
  no-op. `initial` is the step a resumed run starts from (see the module docstring)."""

  def __init__(self, workdir: str, *, is_main: bool = True, total_steps: int | None = None,
               initial: int = 0, console: bool = True, progress: bool = True):
    self.workdir = workdir
    self.is_main = is_main
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self.samples_dir = os.path.join(workdir, "samples")
    self._writer = None
    self._bar = None
    self._console = console
    if not is_main:
      return
    from tensorboardX import SummaryWriter

    os.makedirs(workdir, exist_ok=True)
    if initial > 0:
      self._purge_jsonl(initial)
    # purge_step drops events the interrupted run logged past its last checkpoint.
    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=initial if initial > 0 else None)
    if progress:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True,
                       file=sys.stderr, desc="train")

  def _purge_jsonl(self, step: int) -> None:
    if not os.path.exists(self.jsonl_path):
      return
    with open(self.jsonl_path) as f:
      lines = f.readlines()
    keep = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) <= step:
          keep.append(line if line.endswith("\n") else line + "\n")
      except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        continue  # a line cut short by a crash
    if len(keep) != len(lines):
      tmp = self.jsonl_path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.jsonl_path)

  def _print(self, line: str) -> None:
    if not self._console:
      return
    if self._bar is not None:
      self._bar.write(line)
    else:
      print(line, flush=True)

  def scalars(self, step: int, values: Mapping[str, Any]) -> None:
    """One log step: TensorBoard scalars, a metrics.jsonl line, a console line."""
    if not self.is_main:
      return
    values = {k: _json_value(v) for k, v in values.items()}
    for k, v in values.items():
      self._writer.add_scalar(k, float(v), step)  # float() reads "NaN" back
    self._writer.flush()
    rec = {"step": int(step), "time": round(time.time(), 3), **values}
    with open(self.jsonl_path, "a") as f:
      f.write(json.dumps(rec, allow_nan=False) + "\n")
    shown = [f"{k} {_fmt_console(k, values[k])}" for k in _CONSOLE if k in values]
    self._print(f"step {step}" + "".join(" | " + s for s in shown))
    if self._bar is not None:
      self._bar.update(max(0, int(step) - self._bar.n))

  def image(self, step: int, name: str, image: np.ndarray) -> str | None:
    """A uint8 [H, W, 3] image to TensorBoard and WORKDIR/samples/{name}_{step:07d}.png;
    returns the PNG's path (None off the main process)."""
    if not self.is_main:
      return None
    from PIL import Image

    img = to_uint8(image)
    self._writer.add_image(name, img, step, dataformats="HWC")
    self._writer.flush()
    os.makedirs(self.samples_dir, exist_ok=True)
    path = os.path.join(self.samples_dir, f"{name.replace('/', '_')}_{int(step):07d}.png")
    Image.fromarray(img).save(path)
    return path

  def text(self, step: int, name: str, text: str) -> None:
    if self.is_main:
      self._writer.add_text(name, text, step)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def __enter__(self) -> MetricLogger:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _fmt_console(key: str, v: Any) -> str:
  if isinstance(v, str):
    return v
  if key == "mfu":
    return f"{100 * v:.2f}%"
  if key == "images_per_s":
    return f"{v:.1f} img/s"
  if isinstance(v, int):
    return str(v)
  return f"{v:.4g}"
