"""Suite-wide setup: 8 simulated CPU devices, so sharding tests run on a real mesh; a
persistent XLA compilation cache shared by this session's processes; fixtures that run
once per session even across xdist workers; and the order the slow modules run in.

Set before anything imports jax (conftest is imported first); a flag or cache directory
the user already set in the environment wins.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable

import pytest

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

# The persistent compilation cache of the processes the tests launch. The end-to-end tests
# run launch.py subprocesses that compile the same smoke programs again and again (train
# step, init, sampler, text encoder); with the cache only the first launch of a config
# compiles them (a 20-step base smoke train run: ~2 min -> ~50 s on 2 cores). One directory
# per session, made here in the first process (the xdist controller, or the only process)
# and inherited through the environment by the xdist workers and every subprocess they
# start; deleted when the session ends, so no session reads another's executables. An
# executable loaded from the cache is the one compiling the same program gives: results are
# bit-identical (the kill -9 resume test compares bits across such runs). Concurrent writers
# are safe: JAX writes an entry only when it is absent, and a reader of a half-written entry
# fails to decompress it, warns and compiles instead.
_CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"
_OWN_CACHE_ENV = "IMAGEN_JAX_TEST_XLA_CACHE"  # set with the directory when we made it
if _CACHE_DIR_ENV not in os.environ:
  os.environ[_CACHE_DIR_ENV] = tempfile.mkdtemp(prefix="imagen_jax_test_xla_cache_")
  os.environ[_OWN_CACHE_ENV] = os.environ[_CACHE_DIR_ENV]
  # Every program, not only those that took over a second to compile: a smoke run's many
  # small programs add up.
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
_OWNS_CACHE_DIR = _OWN_CACHE_ENV in os.environ and "PYTEST_XDIST_WORKER" not in os.environ


def pytest_configure(config):
  del config
  if os.environ.get(_OWN_CACHE_ENV) == os.environ.get(_CACHE_DIR_ENV):
    # Not in the test processes themselves: what they compile in-process is seldom
    # compiled again anywhere, and writing each program out costs time.
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_enable_compilation_cache", False)


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE_DIR:
    shutil.rmtree(os.environ[_OWN_CACHE_ENV], ignore_errors=True)


# Work done once per session, shared by xdist workers. ---------------------------------


def _session_root(tmp_path_factory) -> pathlib.Path:
  """A directory of this session that every xdist worker sees: the controller's basetemp
  (each worker's basetemp is a folder in it), or the basetemp without xdist."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def run_once(tmp_path_factory) -> Callable[[str, Callable[[pathlib.Path], Any]], tuple]:
  """run_once(name, make) -> (directory, result): make(directory) runs once per session,
  in whichever worker asks first (the others wait for it), and its JSON-serialisable
  result is handed to every later caller. A make that raises leaves nothing behind: the
  next caller tries again (and reports its own failure). Callers must only read the
  directory."""
  root = _session_root(tmp_path_factory) / "run_once"
  root.mkdir(exist_ok=True)

  def run(name: str, make: Callable[[pathlib.Path], Any]) -> tuple[pathlib.Path, Any]:
    directory, done = root / name, root / f"{name}.json"
    with _file_lock(root / f"{name}.lock"):
      if not done.exists():
        shutil.rmtree(directory, ignore_errors=True)  # a failed attempt's leftovers
        directory.mkdir()
        done.with_suffix(".tmp").write_text(json.dumps(make(directory)))
        done.with_suffix(".tmp").rename(done)
      return directory, json.loads(done.read_text())

  return run


@pytest.fixture(scope="session")
def smoke_data(run_once):
  """The base64 and sr256 smoke datasets, built by launch.py --mode=build_data into one
  data_dir: (data_dir, {"base64": (workdir, proc), "sr256": (workdir, proc)}), where
  proc is the build run's CompletedProcess. Shared by the data and trainer tests."""
  from test_launch import as_result, completed, launch  # pylint: disable=g-import-not-at-top

  def make(root):
    runs = {}
    for name in ("base64", "sr256"):
      proc = launch(f"--config=configs/{name}.py:smoke", f"--workdir={root / name}",
                    "--mode=build_data", f"--config.data.data_dir={root / 'tfds'}")
      assert proc.returncode == 0, proc.stderr
      runs[name] = as_result(proc)
    return runs

  root, runs = run_once("smoke_data", make)
  return root / "tfds", {name: (root / name, completed(r)) for name, r in runs.items()}


# Order and distribution. ------------------------------------------------------------------

# The slowest modules, slowest first (measured with -n 2 on the 2-core machine: the first
# three take 5-14 minutes of a worker each, the rest one to three). They start first, so
# that the short modules fill in at the end on whichever worker is free; modules not named
# here follow in collection order. A hint for balance only: reorder it when times change.
SLOW_FIRST = (
    "tests/train/test_trainer.py",
    "tests/diffusion/test_samplers.py",
    "tests/train/test_step.py",
    "tests/test_cascade.py",
    "tests/models/test_unet.py",
    "tests/test_eval_job.py",
    "tests/test_sweep.py",
    "tests/models/test_efficient_unet.py",
    "tests/test_sampling.py",
    "tests/models/test_layers.py",
    "tests/diffusion/test_testbed.py",
)


def _module_path(nodeid: str) -> str:
  return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {path: i for i, path in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(_module_path(item.nodeid), len(rank)))  # stable


def _dist_chosen(config) -> bool:
  args = [*config.invocation_params.args, *os.environ.get("PYTEST_ADDOPTS", "").split(),
          *config.getini("addopts")]
  return any(a == "--dist" or a.startswith("--dist=") for a in args)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
  """With -n and no --dist: whole modules to whichever worker is free, in collection order
  (SLOW_FIRST first). A module's fixtures then run once (xdist's default, load, splits
  modules over workers, which sets up their module fixtures on each), and the longest
  modules do not start last. An explicit --dist wins."""
  if config.getoption("dist") != "load" or _dist_chosen(config):
    return None
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class ByModule(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      return _module_path(nodeid)

  config.option.loadscopereorder = False  # keep the collection order
  return ByModule(config, log)
