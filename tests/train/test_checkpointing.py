"""Checkpointer: bitwise round trips, retention, restores onto other meshes, fallback past
damaged checkpoints, partial saves, preemption signals, and two processes."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from imagen_jax.errors import UserError
from imagen_jax.sharding import make_mesh
from imagen_jax.train import checkpointing
from imagen_jax.train.checkpointing import Checkpointer, CheckpointError, PreemptionGuard

# Orbax leaves the read errors of damaged checkpoints in un-awaited asyncio tasks too.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = pathlib.Path(__file__).resolve().parents[2]
DATA_STATE = {"next_index": 12, "workers": [{"pos": 3}, {"pos": 4}], "seed": 0}
METADATA = {"config": {"lr": 1e-3, "name": "toy"}, "seed": 7}


@flax.struct.dataclass
class ToyState:
  step: jax.Array
  params: dict[str, jax.Array]
  opt: tuple[jax.Array, ...]
  rng: jax.Array


def specs(fsdp: str | None = "fsdp") -> ToyState:
  """PartitionSpecs of ToyState; fsdp=None replicates everything."""
  return ToyState(step=P(), params={"w": P(fsdp), "b": P(fsdp)}, opt=(P(None, fsdp),),
                  rng=P())


def make_state(mesh, seed: int = 0) -> ToyState:
  # 64 KiB arrays: big enough that OCDBT writes them to data files, not inline in its index.
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  host = ToyState(step=jnp.int32(100 + seed),
                  params={"w": jax.random.normal(k1, (256, 64)),
                          "b": jax.random.normal(k2, (64,))},
                  opt=(jax.random.uniform(k3, (256, 64)),),
                  rng=jax.random.key_data(jax.random.key(seed + 1)))
  return jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), host, specs())


def abstract(state: ToyState, shardings: ToyState) -> ToyState:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def same_mesh(state: ToyState) -> ToyState:
  return abstract(state, jax.tree.map(lambda x: x.sharding, state))


def assert_bitwise_equal(a: ToyState, b: ToyState) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def step_dirs(directory) -> list[int]:
  return sorted(int(p) for p in os.listdir(directory) if p.isdigit())


def array_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The files holding the state's array bytes (each process's OCDBT data files)."""
  files = sorted(step_dir.glob("state/ocdbt.process_*/d/*"), key=lambda p: p.stat().st_size)
  assert files, f"Orbax's on-disk layout changed: no array data files in {step_dir}"
  return files


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"fsdp": 8})


@pytest.fixture(scope="module")
def state(mesh):
  return make_state(mesh)


def test_round_trip_is_bitwise_including_data_state_and_metadata(tmp_path, state):
  ckpt = Checkpointer(tmp_path / "ckpt", every=5, keep=3)  # asynchronous by default
  assert ckpt.latest_step() is None
  assert ckpt.save(5, state, data_state=DATA_STATE, metadata=METADATA)
  ckpt.wait()
  assert ckpt.latest_step() == 5
  # Saving a step that exists is a no-op, forced or not (the trainer does both at its end).
  assert not ckpt.save(5, state, data_state=DATA_STATE, force=True)
  assert not ckpt.should_save(5) and not ckpt.should_save(7) and ckpt.should_save(10)
  ckpt.close()

  reopened = Checkpointer(tmp_path / "ckpt", every=5, keep=3)
  target = same_mesh(state)
  restored, data_state, step = reopened.restore(target)
  assert step == 5 and data_state == DATA_STATE
  assert reopened.restored_metadata == METADATA == reopened.read_metadata()
  assert isinstance(restored, ToyState)
  assert_bitwise_equal(restored, state)
  for r, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert r.sharding == t.sharding
  reopened.close()


def test_async_save_survives_donation_of_the_saved_arrays(tmp_path, mesh):
  state = make_state(mesh, seed=1)
  expected = jax.tree.map(np.array, state)  # host copies
  ckpt = Checkpointer(tmp_path, every=1, keep=2, async_save=True)
  ckpt.save(1, state, data_state=None)
  # The next train step donates the state: the background write must not see new values.
  # (JAX usually reuses the buffers; it copies instead while Orbax still holds them.)
  state = jax.jit(lambda s: jax.tree.map(lambda x: x * 0 + 1, s), donate_argnums=0)(state)
  ckpt.wait()
  restored, data_state, _ = ckpt.restore(same_mesh(state))
  assert data_state is None and ckpt.restored_metadata is None
  assert_bitwise_equal(restored, expected)
  ckpt.close()


def test_keep_newest_plus_multiples_of_keep_every(tmp_path, state):
  ckpt = Checkpointer(tmp_path, every=1, keep=2, keep_every=4)
  for step in range(1, 10):
    assert ckpt.save(step, state, data_state={"step": step})
  ckpt.wait()
  assert step_dirs(tmp_path) == [4, 8, 9]
  assert ckpt.all_steps() == [4, 8, 9]
  ckpt.close()


@pytest.mark.parametrize("target", ["data2_fsdp4", "single_device"])
def test_restore_onto_another_mesh(tmp_path, state, target):
  ckpt = Checkpointer(tmp_path, every=1, keep=1, async_save=False)
  ckpt.save(3, state, data_state=DATA_STATE)
  if target == "single_device":
    device = jax.devices()[5]
    shardings = jax.tree.map(lambda _: SingleDeviceSharding(device), state)
  else:
    new_mesh = make_mesh({"data": 2, "fsdp": 4})
    shardings = jax.tree.map(lambda s: NamedSharding(new_mesh, s), specs(),
                             is_leaf=lambda x: isinstance(x, P))
  restored, _, _ = ckpt.restore(abstract(state, shardings))
  assert_bitwise_equal(restored, state)
  for r, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert r.sharding == s
  if target != "single_device":
    w = restored.params["w"]
    assert w.sharding.mesh.shape["fsdp"] == 4
    assert {sh.data.shape for sh in w.addressable_shards} == {(64, 64)}
  ckpt.close()


def _truncate_array_file(step_dir: pathlib.Path) -> None:
  biggest = array_files(step_dir)[-1]
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)


def _delete_array_file(step_dir: pathlib.Path) -> None:
  array_files(step_dir)[-1].unlink()


def _delete_data_state(step_dir: pathlib.Path) -> None:
  shutil.rmtree(step_dir / "data_state")


def _garble_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "metadata" / "metadata").write_text('{"config": {"lr": ')


def _garble_tree_metadata(step_dir: pathlib.Path) -> None:
  (step_dir / "state" / "_METADATA").write_text('{"tree_metadata": {')


DAMAGE = {"truncated_array_file": _truncate_array_file,
          "garbled_tree_metadata": _garble_tree_metadata,
          "deleted_array_file": _delete_array_file,
          "missing_data_state": _delete_data_state,
          "unreadable_metadata": _garble_metadata}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_latest_falls_back_and_training_goes_on(tmp_path, state, caplog, damage):
  ckpt = Checkpointer(tmp_path, every=10, keep=2)
  for step in (10, 20):
    ckpt.save(step, state, data_state={"step": step}, metadata=METADATA)
  ckpt.close()
  DAMAGE[damage](tmp_path / "20")

  ckpt = Checkpointer(tmp_path, every=10, keep=2)
  assert ckpt.latest_step() == 20  # complete as far as a listing can tell
  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    restored, data_state, step = ckpt.restore(same_mesh(state))
  assert step == 10 and data_state == {"step": 10}
  assert_bitwise_equal(restored, state)
  assert any("step 20" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert ckpt.bad_steps == [20] and ckpt.latest_step() == 10
  assert (tmp_path / "20").is_dir()  # left in place

  # Training resumes past the bad step: keep=2 counts good steps only, so step 10 survives.
  assert ckpt.save(30, state, data_state={"step": 30})
  ckpt.wait()
  assert step_dirs(tmp_path) == [10, 20, 30]
  assert ckpt.restore(same_mesh(state))[1:] == ({"step": 30}, 30)
  ckpt.close()


def test_saving_a_bad_steps_number_again_moves_the_bad_one_aside(tmp_path, state):
  ckpt = Checkpointer(tmp_path, every=10, keep=3)
  for step in (10, 20):
    ckpt.save(step, state, data_state={"step": step})
  ckpt.wait()
  _truncate_array_file(tmp_path / "20")
  assert ckpt.restore(same_mesh(state))[2] == 10
  assert ckpt.should_save(20)  # the resumed run reaches step 20 again
  assert ckpt.save(20, state, data_state={"step": 20})
  ckpt.wait()
  assert (tmp_path / "20.unreadable" / "state").is_dir()  # kept, renamed, not deleted
  assert ckpt.restore(same_mesh(state))[1:] == ({"step": 20}, 20)
  assert ckpt.bad_steps == []
  ckpt.close()


def test_partial_save_is_ignored(tmp_path, state):
  ckpt = Checkpointer(tmp_path, every=10, keep=2)
  ckpt.save(10, state, data_state={"step": 10})
  ckpt.close()
  # What a process killed mid-save leaves: the step's tmp directory, never renamed.
  partial = tmp_path / "20.orbax-checkpoint-tmp"
  shutil.copytree(tmp_path / "10", partial)
  _truncate_array_file(partial)

  ckpt = Checkpointer(tmp_path, every=10, keep=2)
  assert ckpt.latest_step() == 10 and ckpt.should_save(20)
  assert ckpt.restore(same_mesh(state))[2] == 10
  assert ckpt.save(20, state, data_state={"step": 20})  # replaces the partial one
  ckpt.wait()
  assert ckpt.restore(same_mesh(state))[1:] == ({"step": 20}, 20)
  ckpt.close()


def test_no_checkpoint_at_all(tmp_path, state):
  ckpt = Checkpointer(tmp_path / "checkpoints", every=10, keep=2)
  assert ckpt.latest_step() is None
  with pytest.raises(CheckpointError, match="No complete checkpoint") as info:
    ckpt.restore(same_mesh(state))
  assert isinstance(info.value, UserError) and "Fix" in str(info.value)
  ckpt.close()


def test_nothing_restorable_names_each_step_and_the_fix(tmp_path, state):
  ckpt = Checkpointer(tmp_path, every=10, keep=2, async_save=False)
  for step in (10, 20):
    ckpt.save(step, state, data_state=None)
    _delete_data_state(tmp_path / str(step))
  with pytest.raises(CheckpointError) as info:
    ckpt.restore(same_mesh(state))
  message = str(info.value)
  assert "step 20" in message and "step 10" in message
  assert "permissions" in message and "move the checkpoints directory away" in message
  assert step_dirs(tmp_path) == [10, 20]  # nothing deleted
  ckpt.close()


def test_a_changed_model_is_reported_not_silently_skipped(tmp_path, state):
  ckpt = Checkpointer(tmp_path, every=10, keep=2, async_save=False)
  ckpt.save(10, state, data_state=None)
  wider = state.replace(params={**state.params, "b": jnp.zeros((128,))})
  with pytest.raises(CheckpointError, match="resume with the config"):
    ckpt.restore(same_mesh(wider))
  ckpt.close()


def test_explicit_step(tmp_path, state):
  ckpt = Checkpointer(tmp_path, every=10, keep=3, async_save=False)
  for step in (10, 20):
    ckpt.save(step, state, data_state={"step": step})
  assert ckpt.restore(same_mesh(state), step=10)[1:] == ({"step": 10}, 10)
  with pytest.raises(CheckpointError, match=r"No complete checkpoint of step 15.*\[10, 20\]"):
    ckpt.restore(same_mesh(state), step=15)
  _delete_array_file(tmp_path / "20")
  with pytest.raises(CheckpointError, match="The checkpoint of step 20 .* could not be restored"):
    ckpt.restore(same_mesh(state), step=20)  # an explicit step does not fall back
  ckpt.close()


def test_data_state_of_another_process_count_is_dropped_with_a_warning(tmp_path, state,
                                                                         caplog):
  ckpt = Checkpointer(tmp_path, every=10, keep=2, async_save=False)
  ckpt.save(10, state, data_state={"step": 10})
  item = tmp_path / "10" / "data_state" / "metadata"
  saved = json.loads(item.read_text())
  assert saved == {"process_count": 1, "states": [{"step": 10}]}
  item.write_text(json.dumps({"process_count": 2, "states": [{"step": 10}, {"step": 10}]}))
  with caplog.at_level(logging.WARNING, logger=checkpointing.__name__):
    _, data_state, step = ckpt.restore(same_mesh(state))
  assert step == 10 and data_state is None
  assert any("2 processes" in r.getMessage() for r in caplog.records)
  ckpt.close()


def test_bad_inputs_fail_at_the_call(tmp_path, state):
  with pytest.raises(CheckpointError, match="ckpt.keep >= 1"):
    Checkpointer(tmp_path, every=10, keep=0)
  ckpt = Checkpointer(tmp_path, every=10, keep=2)
  with pytest.raises(TypeError, match="'data_state' is not JSON-serialisable"):
    ckpt.save(10, state, data_state={"blob": b"\x00"})
  assert ckpt.latest_step() is None
  ckpt.close()


def test_preemption_guard_turns_sigterm_into_a_flag(monkeypatch):
  calls = []
  previous = lambda signum, frame: calls.append(signum)
  signal.signal(signal.SIGTERM, previous)
  try:
    with PreemptionGuard() as guard:
      assert not guard.requested
      os.kill(os.getpid(), signal.SIGTERM)
      for _ in range(200):  # the handler runs at the next bytecode boundary
        if guard.requested:
          break
        time.sleep(0.005)
      assert guard.requested and guard.signum == signal.SIGTERM
      assert checkpointing.sync_requested(guard.requested) is True
    assert signal.getsignal(signal.SIGTERM) is previous and calls == []
    assert checkpointing.sync_requested(False) is False
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_preemption_guard_sigint_second_ctrl_c_interrupts():
  previous = signal.getsignal(signal.SIGINT)
  with PreemptionGuard(sigint=True) as guard:
    signal.raise_signal(signal.SIGINT)
    assert guard.requested and guard.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is previous


_TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid = int(sys.argv[2])
    jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=pid)
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from imagen_jax.sharding import make_mesh
    from imagen_jax.train import checkpointing

    mesh = make_mesh({"fsdp": 8})
    sharding = NamedSharding(mesh, P("fsdp"))
    full = np.arange(64 * 16, dtype=np.float32).reshape(64, 16)
    w = jax.make_array_from_callback(full.shape, sharding, lambda i: full[i])
    ckpt = checkpointing.Checkpointer(sys.argv[3], every=1, keep=2)
    ckpt.save(1, {"w": w}, data_state={"pid": pid}, metadata={"m": 1})
    ckpt.wait()
    target = {"w": jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=sharding)}
    restored, data_state, step = ckpt.restore(target)
    ok = all(np.array_equal(np.asarray(s.data), full[s.index])
             for s in restored["w"].addressable_shards)
    print("RESULT", json.dumps({"pid": pid, "data_state": data_state, "step": step, "ok": ok,
                                "any": checkpointing.sync_requested(pid == 1),
                                "meta": ckpt.restored_metadata}))
    ckpt.close()
""")


def test_two_processes_keep_their_own_data_state(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "PYTHONPATH": str(REPO)}
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_SCRIPT, f"127.0.0.1:{port}",
                             str(pid), str(tmp_path / "ckpt")], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for pid in (0, 1)]
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT", 1)[1]))
  for pid, r in enumerate(results):
    assert r == {"pid": pid, "data_state": {"pid": pid}, "step": 1, "ok": True, "any": True,
                 "meta": {"m": 1}}
  saved = json.loads((tmp_path / "ckpt" / "1" / "data_state" / "metadata").read_text())
  assert saved == {"process_count": 2, "states": [{"pid": 0}, {"pid": 1}]}
