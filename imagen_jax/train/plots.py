"""The training run's loss-curve plot (loss.png): loss and grad norm against step, and
the loss per log-SNR bucket, read back from metrics.jsonl (`logging.read_metrics`)."""

from __future__ import annotations

import math
import os
from typing import Iterable

from imagen_jax.train.logging import read_metrics


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
