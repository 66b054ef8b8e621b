"""Step metrics between two log points -> the scalars the trainer logs: mean loss, loss
per log-SNR bucket, learning rate, bad/skipped steps, throughput and MFU.

`MetricAccumulator.add` keeps each step's device arrays (no transfer between log points);
`result` fetches them with one `jax.device_get` and reduces. Writing them is
`logging.MetricLogger`'s job.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

# Per-step metric keys with their own reduction; any other scalar key is averaged.
_BUCKET_SUM, _BUCKET_COUNT = "loss_sum_per_bucket", "count_per_bucket"
_SPECIAL = ("loss", "lr", "bad_steps", "skipped", "bucket_edges", _BUCKET_SUM, _BUCKET_COUNT)


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_total: float) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices together."""
  return flops_per_step / seconds_per_step / peak_flops_total


def _fmt_edge(v: float) -> str:
  return f"{v:g}"


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
