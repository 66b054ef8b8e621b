"""Orbax checkpoints of the training state and the data iterator, plus preemption handling.

One checkpoint is one step directory under WORKDIR/checkpoints, written by
`ocp.CheckpointManager` as three items:

  <step>/state/        the TrainState pytree (OCDBT: manifest.ocdbt and d/ at the top hold
                       the merged index, ocdbt.process_<i>/d/ the array bytes each process
                       wrote; _METADATA the tree, _sharding the save-time shardings)
  <step>/data_state/   JSON: every process's data-iterator state (see below)
  <step>/metadata/     JSON: caller metadata (config, seed, ...)
  <step>/_CHECKPOINT_METADATA, commit_success.txt   Orbax's step record

A save first writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once every item
is written (on GCS a commit_success.txt marks it instead), so a killed save leaves only a tmp
directory, which listing ignores and a later save of the same step replaces. Tmp directories
are not swept at startup: a second reader of the same workdir (an eval or sampling job) would
otherwise delete the trainer's save in flight.

Damage. A finalized step can still be unreadable (a file truncated by a crash of a
filesystem that had not synced, deleted by hand, unreadable permissions). `restore()` tries
steps newest first; a step whose restore raises is logged as a warning, remembered as bad
and skipped. Bad steps are never deleted: retention keeps them and counts only good steps
toward `keep` (so a save after the fallback never deletes the last good checkpoint in favour
of a bad one). When training reaches a bad step's number again, the save moves the bad
directory aside to `<step>.unreadable` (or `.unreadable-2`, ...) and writes the new one;
Orbax ignores those names. A new process does not know which steps are bad until its
`restore()` fails on them, so until then retention treats them like any other step.

Replica-parallel writes. Orbax's default splits every replicated array into one slice per
replica so that several hosts write it in parallel; each slice is a jitted slice op
compiled per shape, which in a single process buys nothing (the one process writes every
slice) and cost ~3 s per save of the smoke state. With one process we register Orbax's
ArrayHandler with `use_replica_parallel=False` (`_single_process_array_handler`); the
bytes on disk are the same.

Data state. Orbax writes JSON items from process 0 only, but each process has its own data
iterator, so `save` gathers every process's state (a collective) and stores
{"process_count": n, "states": [...]}; `restore` returns this process's entry, or None with
a warning when the process count changed (the data order then restarts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from imagen_jax import config_schema
from imagen_jax.errors import UserError

log = logging.getLogger(__name__)

ITEMS = ("state", "data_state", "metadata")
_ASIDE_SUFFIX = ".unreadable"


def _single_process_array_handler() -> None:
  """With one process, save each replicated array whole instead of one replica slice per
  device (module docstring). Orbax's handler registry is global; multi-process runs keep
  its default."""
  if jax.process_count() > 1:
    return
  current = ocp.type_handlers.get_type_handler(jax.Array)
  if getattr(current, "_use_replica_parallel", True) is False:
    return  # registered already
  # The default handler's array-metadata store (it records each array's shape and write
  # shape), so the files written are the default's.
  store = getattr(current, "_array_metadata_store", None)
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                                array_metadata_store=store), override=True)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  """config.ckpt: a checkpoint every `every` steps; the newest `keep` are kept, and with
  keep_every > 0 also every step divisible by it; async_save writes in the background."""

  every: int
  keep: int
  keep_every: int
  async_save: bool

  def check(self, c: config_schema.Checker) -> None:
    c.integer("every", minimum=1)
    c.integer("keep", minimum=1)
    c.integer("keep_every", minimum=0, why="(0 keeps only the newest ckpt.keep)")
    c.boolean("async_save")


class CheckpointError(UserError):
  """No usable checkpoint, or a checkpoint directory or setting that cannot work."""


def _all_processes(flag: bool, reduce=np.all) -> bool:
  """Combine a per-process flag across processes (a collective; identity in one process)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(reduce(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _allgather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.int32(data.size)))
  buf = np.zeros(int(lengths.max()), np.uint8)
  buf[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(gathered[i, :n].tobytes()) for i, n in enumerate(lengths)]


def sync_requested(flag: bool) -> bool:
  """True on every process if any process's flag is set, so all stop at the same step.

  A collective in multi-process runs: every process must call it at the same steps.
  """
  return _all_processes(flag, reduce=np.any)


def sync_flags(*flags: bool) -> tuple[bool, ...]:
  """Each flag ORed across processes, in ONE collective (the train loop calls this every
  step; one all-gather instead of one per flag)."""
  local = np.asarray(flags, np.int32)
  if jax.process_count() == 1:
    return tuple(bool(f) for f in local)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, len(flags))
  return tuple(bool(f) for f in gathered.any(0))


@dataclasses.dataclass
class _Retention:
  """Orbax preservation policy: the newest `keep` good steps, multiples of `keep_every`,
  and every step known to be bad (never deleted automatically)."""
  keep: int
  keep_every: int
  bad: set[int]

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    steps = [c.step for c in checkpoints]
    newest = set(sorted(s for s in steps if s not in self.bad)[-self.keep:])
    return [s in self.bad or s in newest or bool(self.keep_every and s % self.keep_every == 0)
            for s in steps]


def _check_json(name: str, value: Any) -> None:
  # Orbax writes JSON items on a background thread; fail here, with a name, instead.
  try:
    json.dumps(value)
  except (TypeError, ValueError) as e:
    raise TypeError(f"Checkpoint item {name!r} is not JSON-serialisable ({e}); pass plain "
                    "dicts, lists, strings and numbers (e.g. config.to_dict()).") from e


class Checkpointer:
  """Saves and restores TrainState + data-iterator state under one directory.

  every:      save interval in steps (`should_save`)
  keep:       newest good checkpoints kept
  keep_every: also keep every step that is a multiple of this (0: none)
  async_save: write in a background thread after the device-to-host copy; `wait()` blocks
              until the saves are durable
  """

  def __init__(self, directory: str | os.PathLike, *, every: int, keep: int,
               keep_every: int = 0, async_save: bool = True):
    if every < 1 or keep < 1 or keep_every < 0:
      raise CheckpointError(
          f"Checkpoint settings every={every}, keep={keep}, keep_every={keep_every} are "
          "invalid; set ckpt.every >= 1, ckpt.keep >= 1 and ckpt.keep_every >= 0 (0 = none).")
    self.directory = os.path.abspath(os.fspath(directory))
    self.every = int(every)
    self._bad: set[int] = set()
    self.restored_metadata: Any = None  # the metadata item of the last restore
    _single_process_array_handler()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_Retention(int(keep), int(keep_every), self._bad),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=False,  # see the module docstring
        create=True)
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    except OSError as e:
      raise CheckpointError(
          f"Cannot use checkpoint directory {self.directory} ({type(e).__name__}: {e}). Fix: "
          "choose a writable --workdir or fix the directory's permissions.") from e
    self._name_format = ocp.path.step.standard_name_format()

  # -- listing ---------------------------------------------------------------------------

  def _complete_steps(self) -> list[int]:
    """Finalized steps on disk (a save in flight is still a tmp directory), ascending."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(m.step for m in self._name_format.find_all(self.directory))

  def all_steps(self) -> list[int]:
    """Complete checkpoints on disk, ascending, without those found unreadable."""
    return [s for s in self._complete_steps() if s not in self._bad]

  def latest_step(self) -> int | None:
    """The newest complete checkpoint (None if there is none)."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  @property
  def bad_steps(self) -> list[int]:
    """Steps whose restore failed in this process (left on disk, skipped)."""
    return sorted(self._bad)

  # -- saving ----------------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    """True at multiples of `every`, unless a good checkpoint of `step` exists already."""
    step = int(step)
    return step % self.every == 0 and (step not in self._mngr.all_steps() or
                                       step in self._bad)

  def save(self, step: int, state: Any, *, data_state: dict | None,
           metadata: dict | None = None, force: bool = False) -> bool:
    """Save `state` (a pytree of jax arrays), this process's `data_state` and `metadata`.

    Every process must call it (the arrays are written collectively). Without `force` only
    at `should_save` steps; never over an existing good checkpoint of the same step.
    Returns whether a save started (asynchronous by default: see `wait`).
    """
    step = int(step)
    if not force and not self.should_save(step):
      return False
    _check_json("data_state", data_state)
    _check_json("metadata", metadata)
    if step in self._mngr.all_steps():
      if step not in self._bad:
        log.info("Checkpoint of step %d exists already in %s; not saving again.", step,
                 self.directory)
        return False
      self._set_aside(step)
    states = _allgather_json(data_state)
    data_item = {"process_count": len(states), "states": states}
    self._mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_state=ocp.args.JsonSave(data_item),
        metadata=ocp.args.JsonSave(metadata)))
    return True

  def _set_aside(self, step: int) -> None:
    """Rename a bad step's directory so a new save of that step can take its name."""
    self._mngr.wait_until_finished()  # reload() below must not drop a save in flight
    src = os.path.join(self.directory, self._name_format.build_name(step))
    dst, n = src + _ASIDE_SUFFIX, 1
    while os.path.exists(dst):
      n += 1
      dst = f"{src}{_ASIDE_SUFFIX}-{n}"
    if jax.process_index() == 0:
      os.rename(src, dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpointing_set_aside_{step}")
    log.warning("Moved the unreadable checkpoint of step %d to %s to save step %d anew; "
                "delete it when you no longer need it.", step, dst, step)
    self._bad.discard(step)
    self._mngr.reload()

  def wait(self) -> None:
    """Block until every started save is durable (raises if a background save failed)."""
    self._mngr.wait_until_finished()
    self._mngr.check_for_errors()

  def close(self) -> None:
    """Wait for saves, then release Orbax's threads."""
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restoring -------------------------------------------------------------------------

  def _restore_step(self, step: int, abstract_state: Any) -> Any:
    return self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_state=ocp.args.JsonRestore(),
        metadata=ocp.args.JsonRestore()))

  def restore(self, abstract_state: Any, *, step: int | None = None
              ) -> tuple[Any, dict | None, int]:
    """(state, this process's data_state, step) from checkpoint `step` (None: the newest
    readable one, falling back past unreadable steps with a warning each).

    `abstract_state` is the state's pytree of jax.ShapeDtypeStruct whose `.sharding` is
    for the current mesh (any mesh shape); the arrays come back with those shardings.
    The metadata item is read too (an unreadable one counts as damage) and kept in
    `self.restored_metadata`.
    """
    self.wait()  # a save of our own in flight is not yet on disk
    complete = self._complete_steps()
    if step is not None:
      if int(step) not in complete:
        raise CheckpointError(
            f"No complete checkpoint of step {step} in {self.directory} (complete steps: "
            f"{complete or 'none'}). Fix: pick one of those, or leave the step unset to take "
            "the newest.")
      candidates = [int(step)]
    else:
      candidates = [s for s in reversed(complete) if s not in self._bad]
    failures = []
    for s in candidates:
      try:
        restored = self._restore_step(s, abstract_state)
        result, error = (restored["state"], self._data_state_of(restored["data_state"], s),
                         s), None
      except Exception as e:  # pylint: disable=broad-except
        restored, error = None, e
      # Every process must agree, or they would resume from different steps.
      if _all_processes(error is None):
        self._bad.discard(s)
        self.restored_metadata = restored["metadata"]
        return result
      reason = _describe(error) if error else "failed on another process"
      failures.append(f"step {s}: {reason}")
      self._bad.add(s)
      log.warning("Checkpoint of step %d in %s could not be restored (%s); it is left in "
                  "place and skipped.", s, self.directory, reason)
    if not complete:
      raise CheckpointError(
          f"No complete checkpoint in {self.directory}. Fix: start without restoring, or point "
          "--workdir at the run whose checkpoints you mean.")
    head = (f"No checkpoint in {self.directory} could be restored" if step is None else
            f"The checkpoint of step {step} in {self.directory} could not be restored")
    raise CheckpointError(
        f"{head}: " + "; ".join(failures).rstrip(".") +
        ". Fix: if these are shape or tree mismatches, resume with the config the run was "
        "saved with (or use a new --workdir); if files are damaged or unreadable, fix their "
        "permissions, or move the checkpoints directory away to start afresh.")

  def _data_state_of(self, item: Any, step: int) -> dict | None:
    if not isinstance(item, dict) or not isinstance(item.get("states"), list):
      raise ValueError(f"the data_state item is not what save() writes: {_short(item)}")
    states = item["states"]
    if len(states) != jax.process_count():
      log.warning("The checkpoint of step %d holds the data-iterator state of %d processes; "
                  "this run has %d, so its data order restarts (training is no longer "
                  "bit-identical to an uninterrupted run).", step, len(states),
                  jax.process_count())
      return None
    return states[jax.process_index()]

  def read_metadata(self, step: int | None = None) -> Any:
    """The metadata item of `step` (default: the newest complete step), without the state."""
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise CheckpointError(f"No complete checkpoint in {self.directory}.")
    return self._mngr.restore(step, args=ocp.args.Composite(
        metadata=ocp.args.JsonRestore()))["metadata"]


def _short(value: Any, limit: int = 300) -> str:
  text = " ".join(str(value).split())
  return text if len(text) <= limit else text[:limit] + " ..."


def _describe(error: BaseException) -> str:
  """The root cause of a restore error, short: Orbax wraps TensorStore's message (which names
  the file and the problem) in one that prints the whole TensorStore spec."""
  root, depth = error, 0
  while (root.__cause__ or root.__context__) is not None and depth < 10:
    root, depth = root.__cause__ or root.__context__, depth + 1
  return f"{type(root).__name__}: {_short(str(root).split(' [tensorstore_spec')[0])}"


class PreemptionGuard:
  """Turns SIGTERM (and with sigint=True, the first Ctrl-C) into `requested = True`.

  The trainer checks `sync_requested(guard.requested)` at each step boundary, saves with
  force=True, waits and exits cleanly. The previous handlers come back on exit. A second
  Ctrl-C while a stop is pending interrupts as usual. Signal handlers can only be installed
  from the main thread; elsewhere the guard warns and does nothing.
  """

  def __init__(self, *, sigint: bool = False):
    self.requested = False
    self.signum: int | None = None
    self._signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    # No logging here: a handler runs between bytecodes and could deadlock on its lock.
    self.requested = True
    self.signum = signum

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard outside the main thread cannot catch signals; "
                  "SIGTERM keeps its default action.")
      return self
    for sig in self._signals:
      self._previous[sig] = signal.getsignal(sig)
      signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      # None: a handler not installed from Python; the default is the closest we can do.
      signal.signal(sig, signal.SIG_DFL if previous is None else previous)
    self._previous.clear()
