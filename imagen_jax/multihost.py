"""Helpers for jobs that split independent work over the processes of a `jax.distributed`
run (evaluation and text precompute; training shards one global batch instead).

Such a job gives each process a contiguous block of the items (`share`), lets it work on
its block with its own devices and no collectives, then collects the per-item results in
item order (`gather`) so that process 0 can reduce them (FID needs every sample's
features) and write outputs once (`is_main`). The collectives are
jax.experimental.multihost_utils's (process_allgather, sync_global_devices), which run on
every backend, CPU included (gloo; see launch.py), rather than hand-written ones.

Every function is a plain no-op in a single process, so single-process jobs behave as
before. In several processes each collective here (gather, agree, any_process, barrier)
must be called by every process the same number of times, in the same order: guard
process-dependent branches with `any_process` / `agree` rather than with local state.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import jax
import numpy as np

from imagen_jax.errors import UserError


class MultihostError(UserError, ValueError):
  """The processes of a job disagree on what they should share out."""


def process_count() -> int:
  return jax.process_count()


def process_index() -> int:
  return jax.process_index()


def is_main() -> bool:
  """Whether this process writes the job's outputs (process 0)."""
  return jax.process_index() == 0


def share(n: int, *, align: int = 1, index: int | None = None,
          count: int | None = None) -> slice:
  """This process's contiguous block of n items: the blocks of processes 0, 1, ... tile
  [0, n) in order and differ in size by at most one chunk of `align` items, the larger
  ones first (so process 0's is empty only when n is 0).

  Block boundaries fall on multiples of `align` (a batch size): each process then forms
  exactly the batches a single process would, so per-item results that depend on what
  shares a batch (a bucketed padding length) match one process bit for bit.
  """
  index = jax.process_index() if index is None else index
  count = jax.process_count() if count is None else count
  if align < 1:
    raise ValueError(f"align must be >= 1, got {align}.")
  chunks = -(-n // align)
  q, r = divmod(chunks, count)
  lo = index * q + min(index, r)
  hi = lo + q + (index < r)
  return slice(min(n, lo * align), min(n, hi * align))


def gather(x: np.ndarray) -> np.ndarray:
  """Every process's rows of x, concatenated along axis 0 in process order, returned on
  every process (a collective). Shares may differ in length (0 included); their other
  dimensions and dtype must agree."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  if x.dtype.itemsize == 8 and x.ndim:
    # JAX without jax_enable_x64 would narrow int64/float64 to 32 bits; their bytes as
    # pairs of uint32 words travel exactly.
    words = np.ascontiguousarray(x).view(np.uint32)
    return gather(words).view(x.dtype)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  lengths = np.asarray(multihost_utils.process_allgather(np.int64(x.shape[0]))).reshape(-1)
  if not lengths.max():
    return x[:0]
  padded = np.zeros((int(lengths.max()), *x.shape[1:]), x.dtype)
  padded[:x.shape[0]] = x
  stacked = np.asarray(multihost_utils.process_allgather(padded, tiled=False))
  return np.concatenate([stacked[p, :n] for p, n in enumerate(lengths)]).astype(x.dtype)


def any_process(flag: bool) -> bool:
  """True on every process if flag is true on any (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def agree(values: Sequence[str], what: str) -> None:
  """Raise MultihostError on every process unless all processes hold the same `values` (a
  collective): e.g. the items they are about to share out, read from files that should
  be the same everywhere."""
  if jax.process_count() == 1:
    return
  digest = hashlib.sha256("\n".join(values).encode("utf-8")).digest()
  digests = gather(np.frombuffer(digest, np.uint8)[None])
  if not (digests == digests[0]).all():
    raise MultihostError(
        f"The processes of this job do not agree on {what} ({len(values)} on process "
        f"{jax.process_index()}). Every process must see the same files: put the workdir, "
        "caches and data on storage every host mounts (the same path everywhere).")


def barrier(name: str) -> None:
  """Wait until every process reaches the barrier of this name (no-op in one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)
