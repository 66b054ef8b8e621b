"""Logical axis names -> mesh shardings.

Every parameter of our networks and text encoders carries logical axis names (NNX Variable
metadata `out_sharding`, e.g. ("embed", "mlp")). A rule table maps each logical name to a
mesh axis, big_vision / t5x style, so one network shards as pure data parallelism, FSDP or
FSDP + tensor parallelism by changing rules, not code.

A dimension that the mesh axis does not divide stays replicated (a 3-channel conv or a
32-wide test model on 8 devices), and a mesh axis is used at most once per array.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP over weights' embed/channel axes, tensor parallelism over heads and MLP width.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"), ("conv_out", "fsdp"), ("conv_in", None),
    ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
)


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh with Auto axes; -1 in `shape` takes what is left.

  Default: every device on 'fsdp'. Auto axis types keep FSDP layouts legal (the
  `jax.make_mesh` default, Explicit, rejects some of them).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"fsdp": -1})
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes = [shape.get(a, 1) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {shape}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"{len(devices)} available; change the mesh shape in the config.")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


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
