"""The largest batch that fits in device memory: double from a start until XLA runs out of
memory, keep the last batch that fit.

`largest_batch(measure, start, limit)` calls `measure(batch)` (one benchmark at that batch,
returning its result) at start, 2 x start, 4 x start, ... A `measure` that runs out of
device memory raises XLA's RESOURCE_EXHAUSTED error (`jax.errors.JaxRuntimeError`), or
`OutOfMemory` when the benchmark ran in a subprocess that reported it; any other error is
a real failure and propagates, so a bug never passes for a full device.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class OutOfMemory(RuntimeError):
  """A benchmark (possibly in another process) ran out of device memory."""


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is the device running out of memory: our OutOfMemory, or an XLA
  runtime error that says RESOURCE_EXHAUSTED (compile-time on TPU, allocation on GPU) or
  out of memory (some GPU allocation failures come back as INTERNAL)."""
  if isinstance(error, OutOfMemory):
    return True
  from jax.errors import JaxRuntimeError  # pylint: disable=g-import-not-at-top
  if not isinstance(error, JaxRuntimeError):
    return False
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


@dataclasses.dataclass(frozen=True)
class Found(Generic[T]):
  """The largest batch that fit, its measurement, and why the search stopped there."""
  batch: int
  result: T
  stopped: str  # "512 ran out of memory" or "limit 4096 reached"


def largest_batch(measure: Callable[[int], T], start: int, limit: int,
                  on_trial: Callable[[int, str], None] | None = None) -> Found[T]:
  """Doubles the batch from `start` while `measure` fits and the batch stays <= `limit`.

  Raises OutOfMemory if `start` itself does not fit (the fix: a smaller start).
  `on_trial(batch, "fits" | "out of memory")` reports each try as it ends.
  """
  if start < 1 or limit < start:
    raise ValueError(f"batch search from {start} up to {limit}: need 1 <= start <= limit "
                     "(pass a smaller --batch or a larger --max-batch).")
  best: tuple[int, T] | None = None
  batch = start
  while batch <= limit:
    try:
      result = measure(batch)
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      if on_trial:
        on_trial(batch, "out of memory")
      if best is None:
        raise OutOfMemory(f"batch {start} already runs out of device memory; start the "
                          f"search lower (--batch {max(1, start // 2)}). XLA said: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
      return Found(best[0], best[1], f"{batch} ran out of memory")
    if on_trial:
      on_trial(batch, "fits")
    best = (batch, result)
    batch *= 2
  return Found(best[0], best[1], f"limit {limit} reached")
