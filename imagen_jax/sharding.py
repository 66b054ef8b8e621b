"""Logical axis names -> mesh shardings.

Every parameter of our networks and text encoders carries logical axis names (NNX Variable
metadata `out_sharding`, e.g. ("embed", "mlp")). A rule table maps each logical name to a
mesh axis, big_vision / t5x style, so one network shards as pure data parallelism, FSDP or
FSDP + tensor parallelism by changing rules, not code.

A dimension that the mesh axis does not divide stays replicated (a 3-channel conv or a
32-wide test model on 8 devices), and a mesh axis is used at most once per array.

The mesh itself comes from a config's `mesh` section (`mesh_from_config`; -1 takes the
devices left, resolved in `mesh_shape` only), and every batch, in training and in
sampling, is split over BATCH_AXES (`batch_sharding`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import config_schema
from imagen_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over these mesh axes (FSDP shards data too, ZeRO-style).
BATCH_AXES = ("data", "fsdp")

# FSDP over weights' embed/channel axes, tensor parallelism over heads and MLP width.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"), ("conv_out", "fsdp"), ("conv_in", None),
    ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
)


def logical(*names: str | None) -> dict[str, tuple]:
  """The metadata that gives a variable logical axis names, for the networks' layers:
  nnx.Linear(..., kernel_metadata=logical("embed", "mlp"))."""
  return {"out_sharding": tuple(names)}


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """config.mesh: the sizes of the (data, fsdp, tensor) axes, -1 for the remaining
  devices; against the devices they are checked by `mesh_shape` at run time."""

  data: int
  fsdp: int
  tensor: int

  def check(self, c: config_schema.Checker) -> None:
    for axis in ("data", "fsdp", "tensor"):
      size = c.integer(axis)
      if size == 0 or size < -1:
        raise c.error(axis, "must be a positive size or -1 (the rest)")


class MeshError(UserError, ValueError):
  """A mesh or batch size that does not fit the devices."""


def mesh_shape(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
  """{axis: size} with -1 resolved (axes missing from mesh_cfg are 1); MeshError when the
  sizes cannot tile the devices."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise MeshError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}.")
  shape = {a: int(mesh_cfg[a]) if a in mesh_cfg else 1 for a in MESH_AXES}
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


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes; -1 in `shape` takes what is left.

  Default: every device on 'fsdp'. Auto axis types keep FSDP layouts legal (the
  `jax.make_mesh` default, Explicit, rejects some of them).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(dict(shape or {"fsdp": -1}), len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES,
              axis_types=auto)


def mesh_from_config(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh of a config's `mesh` section ({data, fsdp, tensor}; one may be -1)."""
  devices = list(jax.devices() if devices is None else devices)
  return make_mesh({a: int(mesh_cfg[a]) for a in MESH_AXES}, devices)


def batch_split(mesh: Mesh) -> int:
  """How many ways the batch dimension is split on this mesh."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


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


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> PartitionSpec:
  """The PartitionSpec of one array from its logical names (None names -> replicated)."""
  if names is None:
    return PartitionSpec()
  if len(names) != len(shape):
    raise ValueError(f"Logical names {tuple(names)} do not match shape {tuple(shape)}.")
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or dim % mesh.shape[axis] != 0:
      spec.append(None)
      continue
    used.add(axis)
    spec.append(axis)
  return PartitionSpec(*spec)


def _names(var: nnx.Variable) -> tuple | None:
  meta = var.get_metadata()
  return meta.get("out_sharding") or meta.get("sharding_names") or meta.get("sharding")


def state_shardings(state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> Any:
  """A tree of NamedShardings matching an NNX State (abstract or concrete)."""
  def one(var):
    spec = logical_to_spec(_names(var), var.get_value().shape, mesh, rules)
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: Any, mesh: Mesh,
                rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES) -> Any:
  """Place every array of an NNX State on the mesh according to its logical names."""
  shardings = state_shardings(state, mesh, rules)
  return jax.tree.map(lambda var, s: var.replace(jax.device_put(var.get_value(), s)), state,
                      shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
