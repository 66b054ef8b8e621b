"""--mode=precompute and --mode=eval with two processes (jax.distributed, gloo on loopback,
as tests/train/test_trainer.py runs training) against the same job in one process, plus
imagen_jax.multihost's share arithmetic.

Two processes must reproduce one: the precompute cache holds the same captions, token
counts and embeddings bit for bit (each process forms exactly the batches one process
would), and the eval job the same samples, features and scores (see the eval test for
what makes those bit-equal)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from imagen_jax import multihost
from imagen_jax.text import cache

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_launch import launch  # pylint: disable=g-import-not-at-top,wrong-import-position


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch_processes(*args: str, processes: int = 2, devices: int = 4,
                     timeout: float = 300) -> list[subprocess.CompletedProcess]:
  """launch.py ARGS in `processes` processes of one jax.distributed job on loopback, each
  with `devices` CPU devices; waits for all."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  procs = [subprocess.Popen(
      [sys.executable, "launch.py", *args, f"--coordinator_address=127.0.0.1:{port}",
       f"--num_processes={processes}", f"--process_id={i}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(processes)]
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=timeout)
      out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return out


def assert_ok(procs) -> None:
  for i, p in enumerate(procs):
    assert p.returncode == 0, f"process {i}:\n{p.stderr[-3000:]}"


# -- shares ----------------------------------------------------------------------------

@pytest.mark.parametrize("n,align,count", [(26, 4, 2), (8, 1, 2), (3, 4, 2), (0, 1, 3),
                                           (100, 8, 3), (5, 1, 8)])
def test_shares_tile_the_items_on_batch_boundaries(n, align, count):
  parts = [multihost.share(n, align=align, index=i, count=count) for i in range(count)]
  assert [i for p in parts for i in range(n)[p]] == list(range(n))  # in order, once each
  for p in parts[:-1]:
    assert p.stop % align == 0 or p.stop == n  # every batch is one a single process forms
  chunks = [-(-len(range(n)[p]) // align) for p in parts]
  assert chunks == sorted(chunks, reverse=True) and chunks[0] - chunks[-1] <= 1
  assert n == 0 or parts[0].stop > 0  # process 0 (which writes the outputs) has a share


def test_single_process_helpers_are_identities():
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  assert multihost.gather(x) is x  # no copy, no collective
  assert multihost.share(7) == slice(0, 7)
  assert multihost.any_process(True) and not multihost.any_process(False)
  multihost.agree(["a"], "captions")
  multihost.barrier("nothing to wait for")


# -- precompute ------------------------------------------------------------------------

CAPTIONS = [f"caption {i} " + "word " * (i % 4) for i in range(22)]


def _precompute_args(workdir, captions_file, *extra):
  # Batches of 4: 22 captions + the smoke config's 4 grid prompts are 7 batches, split 4 / 3
  # (16 / 10 captions) over two processes.
  return ("--config=configs/base64.py:smoke", f"--workdir={workdir}", "--mode=precompute",
          f"--config.data.captions_file={captions_file}", "--config.data.text_batch_size=4",
          *extra)


def _rows(path) -> tuple[list[str], np.ndarray, np.ndarray]:
  """A cache's captions in part order, their token counts, and every stored row."""
  meta = json.loads((path / "meta.json").read_text())
  captions, lengths, rows = [], [], []
  for part in meta["parts"]:
    with np.load(path / part["dir"] / "index.npz") as index:
      captions += [str(c) for c in index["captions"]]
      lengths.append(index["length"])
    rows += [np.load(path / part["dir"] / f"emb-{s:05d}.npy")
             for s in range(part["num_shards"])]
  return captions, np.concatenate(lengths), np.concatenate(rows)


def _assert_same_cache(a, b) -> None:
  caps_a, len_a, rows_a = _rows(a)
  caps_b, len_b, rows_b = _rows(b)
  assert caps_a == caps_b
  np.testing.assert_array_equal(len_a, len_b)
  np.testing.assert_array_equal(rows_a, rows_b)  # bit for bit: the same batches encoded
  np.testing.assert_array_equal(np.load(a / "probe.npy"), np.load(b / "probe.npy"))
  ea, ma = cache.EmbeddingCache.open(a).lookup(caps_a)
  eb, mb = cache.EmbeddingCache.open(b).lookup(caps_a)
  np.testing.assert_array_equal(ma, mb)
  np.testing.assert_array_equal(ea, eb)


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
  """(root, the one-process cache, the two-process cache, the two-process launches)."""
  root = tmp_path_factory.mktemp("mh_precompute")
  captions = root / "captions.txt"
  captions.write_text("\n".join(CAPTIONS) + "\n")
  one = launch(*_precompute_args(root / "one", captions))
  assert one.returncode == 0, one.stderr
  two = launch_processes(*_precompute_args(root / "two", captions))
  assert_ok(two)
  return root, root / "one" / "text_cache", root / "two" / "text_cache", two


def test_two_process_precompute_equals_one(precomputed):
  _, one, two, procs = precomputed
  meta_one = json.loads((one / "meta.json").read_text())
  meta_two = json.loads((two / "meta.json").read_text())
  assert [p["count"] for p in meta_one["parts"]] == [26]
  assert [(p["dir"], p["count"]) for p in meta_two["parts"]] == [("part-00000", 16),
                                                                 ("part-00001", 10)]
  assert meta_two["encoder"] == meta_one["encoder"]
  _assert_same_cache(one, two)
  # Process 0 reports and writes precompute.json; process 1 stays quiet.
  summary = json.loads((two.parent / "precompute.json").read_text())
  assert summary["added"] == 26 and summary["processes"] == 2
  assert "26 caption(s) added" in procs[0].stdout and "caption(s) added" not in procs[1].stdout


def test_interrupted_two_process_precompute_resumes(precomputed, tmp_path):
  # What a run stopped mid-write leaves: process 0's part renamed into place but not yet
  # listed in meta.json (process 0 records the parts last), and process 1's part still a
  # temporary folder. The cache opens as it was; a rerun adopts the finished part and
  # encodes only process 1's captions.
  root, one, two, _ = precomputed
  broken = tmp_path / "text_cache"
  shutil.copytree(two, broken)
  meta = json.loads((broken / "meta.json").read_text())
  meta["parts"] = []
  (broken / "meta.json").write_text(json.dumps(meta))
  (broken / "part-00001").rename(broken / ".part-00001-interrupted")
  assert len(cache.EmbeddingCache.open(broken)) == 0

  procs = launch_processes(*_precompute_args(
      tmp_path / "rerun", root / "captions.txt",
      f"--config.data.embedding_cache={broken}"))
  assert_ok(procs)
  summary = json.loads((tmp_path / "rerun" / "precompute.json").read_text())
  assert (summary["added"], summary["already_cached"]) == (10, 16)
  meta = json.loads((broken / "meta.json").read_text())
  assert [p["count"] for p in meta["parts"]] == [16, 8, 2]  # adopted; 10 in batches of 4
  _assert_same_cache(one, broken)


# -- eval ------------------------------------------------------------------------------

# configs/base64.py:smoke's checkpoint evaluation, shrunk. Batches of 4 make the two runs do
# the same arithmetic: one process on 8 devices and two on 4 each both sample one image
# per device, and every Inception batch (8 references, 16 train images, 8 samples, split
# 4 / 4 at batch boundaries) holds the same images in either run.
EVAL = ("--config.eval.num_images=8", "--config.eval.reference_limit=8",
        "--config.eval.batch_size=4", "--config.eval.grid_size=4",
        "--config.eval.bootstrap=20", "--config.eval.kid_subsets=5",
        "--config.eval.kid_subset_size=8", "--config.eval.prompts=('rocket, twemoji style',)",
        "--config.eval.alignment.train_limit=16", "--config.eval.alignment.dim=8",
        "--config.eval.alignment.steps=20", "--config.eval.alignment.batch_size=16",
        "--config.eval.alignment.candidates=4", "--config.eval.alignment.lr=0.01")


@pytest.fixture(scope="module")
def evaluated(smoke_data, tmp_path_factory):
  """(one-process workdir, two-process workdir, the two-process launches): the same
  random-weight checkpoint evaluated by --mode=eval in each."""
  import stage_testing  # pylint: disable=g-import-not-at-top
  from imagen_jax import config_files  # pylint: disable=g-import-not-at-top
  data_dir = smoke_data[0]
  root = tmp_path_factory.mktemp("mh_eval")
  config = config_files.load(REPO / "configs/base64.py", "smoke")
  config.data.data_dir = str(data_dir)
  stage_testing.write_stage(config, str(root / "stage"), seed=0, step=10)
  args = ("--config=configs/base64.py:smoke", "--mode=eval",
          f"--config.data.data_dir={data_dir}", *EVAL)
  shutil.copytree(root / "stage", root / "one")
  shutil.copytree(root / "stage", root / "two")
  one = launch(f"--workdir={root / 'one'}", *args)
  assert one.returncode == 0, one.stderr[-3000:]
  two = launch_processes(f"--workdir={root / 'two'}", *args)
  assert_ok(two)
  return root / "one" / "eval", root / "two" / "eval", two


def test_two_process_eval_equals_one(evaluated):
  one, two, procs = evaluated
  a = json.loads((one / "results.json").read_text())
  b = json.loads((two / "results.json").read_text())
  assert a["num_images"] == b["num_images"] == 8 and a["reference_images"] == 8
  # Same samples, bit for bit (image i is drawn with the key of caption i wherever it is
  # sampled; PNGs 4-7 are process 1's, written by it), and the same Inception features of
  # them and of the real images.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for i in range(8):
    png = f"step_10/stage0_16px/{i:05d}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(two / png)),
                                  np.asarray(Image.open(one / png)), err_msg=png)
  np.testing.assert_array_equal(np.load(two / "step_10/features.npz")["features"],
                                np.load(one / "step_10/features.npz")["features"])
  for name in sorted(os.listdir(one / "cache")):
    if name.startswith("features-"):
      with np.load(one / "cache" / name) as x, np.load(two / "cache" / name) as y:
        np.testing.assert_array_equal(y["features"], x["features"], err_msg=name)
  # Equal features make every score the same computation on process 0; the tolerance
  # only allows for LAPACK/BLAS reduction order, should it ever vary between processes.
  for key in ("fid", "fid_low", "fid_high", "kid", "kid_std", "precision", "recall",
              "alignment", "r_precision", "fid_floor"):
    assert b[key] == pytest.approx(a[key], rel=1e-9, abs=1e-12), key
  settings = json.loads((two / "step_10/settings.json").read_text())
  assert settings["prompts"] == json.loads((one / "step_10/settings.json").read_text())["prompts"]
  assert settings["processes"] == 2 and settings["start_index"] == 0
  for name in ("results.md", "fid_vs_step.png", "step_10/grid_16px.png",
               "step_10/prompts/grid_16px.png"):
    assert (two / name).is_file(), name
  # Outputs and progress on process 0 only.
  assert "step 10: FID" in procs[0].stdout and "FID" not in procs[1].stdout
