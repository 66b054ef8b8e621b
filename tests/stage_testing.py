"""Writes stage checkpoints for cascade tests without training them.

A checkpoint in exactly the trainer's format (imagen_jax.train.checkpointing, with the
config as metadata), whose params and EMA are random: a fresh network ends in zero convs
and would predict the same thing whatever the prompt. Built on the host from the
abstract TrainState, so nothing is compiled.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from imagen_jax import config_files
from imagen_jax import sharding as sharding_lib
from imagen_jax.train import checkpointing
from imagen_jax.train import state as state_lib


def random_weights(abstract, rng: np.random.Generator):
  """N(0, 1/fan_in) kernels, scales near 1, small vectors; zeros for integer leaves."""
  def draw(path, leaf):
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    if not np.issubdtype(leaf.dtype, np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    noise = rng.standard_normal(leaf.shape).astype(leaf.dtype)
    if name == "scale":
      return 1.0 + 0.05 * noise
    if leaf.ndim <= 1:
      return 0.05 * noise
    return noise / np.sqrt(np.prod(leaf.shape[:-1]))
  return jax.tree_util.tree_map_with_path(draw, abstract)


def write_stage(config, workdir: str, seed: int = 0, step: int = 0) -> str:
  """A checkpoint (of `step`) of `config` with random weights under workdir/checkpoints."""
  mesh = sharding_lib.mesh_from_config(config.mesh)
  _, abstract, _ = state_lib.abstract_state(config, mesh)
  rng = np.random.default_rng(seed)
  weights = random_weights(abstract.params, rng)
  host = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
  host = host.replace(params=weights, ema={k: weights for k in host.ema})
  state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), host, abstract)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, keep=100,
                                    async_save=False)
  ckpt.save(step, state, data_state=None, metadata={"config": config.to_dict()}, force=True)
  ckpt.close()
  return workdir


def smoke_stages(root: str, data_dir: str = "") -> list[str]:
  """Three chained smoke stages: base 16px -> SR 16->32 -> SR 32->64."""
  base = config_files.load("configs/base64.py", "smoke")
  sr1 = config_files.load("configs/sr256.py", "smoke")
  sr1.data.update(low_resolution=16, resolution=32)
  sr2 = config_files.load("configs/sr1024.py", "smoke")
  sr2.data.update(low_resolution=32, resolution=64)
  paths = []
  for k, c in enumerate((base, sr1, sr2)):
    if data_dir:
      c.data.data_dir = data_dir
    paths.append(write_stage(c, os.path.join(root, f"stage{k}"), seed=k))
  return paths
