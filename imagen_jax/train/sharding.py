"""The training mesh from a config, and the checks that must pass before compiling.

The logical-name rules and the state shardings themselves live in `imagen_jax.sharding`
(the text encoders use them too, and they must not import `train`); this module adds what
only training needs: the mesh of `config.mesh`, the batch layout over it, and errors that
say how to fix a mesh or batch size that does not fit the devices.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import sharding
from imagen_jax.errors import UserError

# The batch dimension is split over these mesh axes (FSDP shards data too, ZeRO-style).
BATCH_AXES = ("data", "fsdp")


class MeshError(UserError, ValueError):
  """A mesh or batch size that does not fit the devices."""


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """{axis: size} with -1 resolved; MeshError when the sizes cannot tile the devices."""
  shape = {a: int(mesh_cfg[a]) for a in sharding.MESH_AXES}
  bad = {a: s for a, s in shape.items() if s == 0 or s < -1}
  if bad:
    raise MeshError(f"mesh sizes {bad} are invalid: use positive sizes or -1 for 'the rest'.")
  free = [a for a, s in shape.items() if s == -1]
  if len(free) > 1:
    raise MeshError(f"mesh {shape} has more than one -1; set all but one axis, e.g. "
                    "--config.mesh.fsdp=1.")
  fixed = math.prod(s for s in shape.values() if s != -1)
  if num_devices % fixed:
    raise MeshError(f"mesh {shape} needs a multiple of {fixed} devices, {num_devices} are "
                    f"available. Fix: choose mesh sizes whose product divides {num_devices} "
                    "(e.g. --config.mesh.data=-1 --config.mesh.fsdp=1 --config.mesh.tensor=1).")
  if free:
    shape[free[0]] = num_devices // fixed
  if math.prod(shape.values()) != num_devices:
    raise MeshError(f"mesh {shape} uses {math.prod(shape.values())} of {num_devices} devices; "
                    "make the sizes multiply to the device count, or set one axis to -1.")
  return shape


def mesh_from_config(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  return sharding.make_mesh(mesh_shape(mesh_cfg, len(devices)), devices)


def batch_split(mesh: Mesh) -> int:
  """How many ways the batch dimension is split on this mesh."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, *, accum_steps: int = 1,
                process_count: int | None = None) -> None:
  """MeshError unless the global batch splits evenly into micro-batches, processes and the
  mesh's batch axes."""
  process_count = jax.process_count() if process_count is None else process_count
  split = batch_split(mesh)
  micro = batch_size // accum_steps if accum_steps else 0
  if accum_steps < 1 or batch_size % accum_steps:
    raise MeshError(f"train.batch_size={batch_size} does not split into train.accum_steps="
                    f"{accum_steps} micro-batches; make it a multiple.")
  if micro % split or batch_size % process_count:
    need = math.lcm(split * accum_steps, process_count)
    raise MeshError(
        f"train.batch_size={batch_size} (micro-batch {micro}) does not divide over the mesh's "
        f"batch axes {dict((a, mesh.shape[a]) for a in BATCH_AXES)} and {process_count} "
        f"process(es). Fix: use a multiple of {need}, e.g. --config.train.batch_size="
        f"{need * max(1, round(batch_size / need))}.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
