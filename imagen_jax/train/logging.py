"""Training logs: TensorBoard events, metrics.jsonl, a console line and progress bar, and
PNG sample grids (`MetricLogger`, main process only).

Named for what it holds (the trainer imports it as `log_lib`); it never shadows the
standard library's `logging`, since the package uses absolute imports. What is logged is
reduced by `metrics.MetricAccumulator`; loss.png is drawn by `plots.plot_metrics`; image
grids come from `imagen_jax.images`.

metrics.jsonl is strict JSON (RFC 8259 has no NaN): a non-finite float is written as the
string "NaN", "Infinity" or "-Infinity", which Python's float() reads back. A run resumed
from step S appends to the same file after dropping the lines of steps > S that the
interrupted run wrote past its last checkpoint (TensorBoard's purge_step does the same for
the event files), so every step appears once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Mapping

import numpy as np

from imagen_jax import config_schema
from imagen_jax.images import to_uint8

@dataclasses.dataclass(frozen=True)
class LogSettings:
  """config.log: scalars every `every` steps; an EMA sample grid of `prompts` at guidance
  `guidance` every sample_every steps (0 = none); MFU against peak_flops per device (0:
  the device's own, imagen_jax/runtime.py)."""

  every: int
  sample_every: int
  guidance: float
  peak_flops: float
  prompts: tuple[str, ...]

  def check(self, c: config_schema.Checker) -> None:
    c.integer("every", minimum=1)
    c.integer("sample_every", minimum=0, why="(0 = no sample grids)")
    c.number("guidance", low=0.0)
    c.number("peak_flops", low=0.0)
    c.strings("prompts", fix=f"pass e.g. {c.flag('prompts')}=\"('red apple, twemoji style',)\"")


# Console line: these keys, in this order, when present.
_CONSOLE = ("loss", "grad_norm", "lr", "skipped", "bad_steps", "images_per_s", "mfu")


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
