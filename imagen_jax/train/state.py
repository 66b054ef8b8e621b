"""The training state: one pytree holding everything a step reads and writes.

`TrainState` fields:
  step       int32 scalar, steps taken (skipped ones included, so data order stays aligned)
  params     nnx.State of the network's nnx.Param variables (float32)
  rest       the network's other state (its dropout RNG streams, with keys stored as raw
             uint32 key data so Orbax can save them). The train step reseeds dropout from
             (seed, step) and never writes `rest` back, so it is constant after init.
  opt_state  the optax state of `optim.make_optimizer`
  ema        {ema_key(decay): params-shaped nnx.State}, e.g. {"0.9999": ...}
  rng        raw uint32 key data [2] (not a typed key, so Orbax saves it); per-step keys
             are fold_in(rng, step)
  bad_steps  int32, consecutive skipped (non-finite) updates; the trainer stops on too many
  skipped    int32, skipped updates in total

`nnx.merge(graphdef, state.params, state.rest)` (or `state.ema[k]` for the params) gives
the network back.

`create_state` builds the state inside `jax.jit(init, out_shardings=...)`, so every array
is created already sharded on the mesh and never whole on one device. Every leaf's
sharding comes from the params' logical axis names (imagen_jax.sharding): EMA copies and
optimizer leaves that mirror a parameter (same path suffix and shape, e.g. Adam's mu and
nu) take that parameter's sharding; everything else (counts, factored Adafactor moments,
RNG keys, scalars) is replicated. `jax_threefry_partitionable` (on by default) makes the
random init independent of the sharding, so one seed gives the same params on any mesh.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import sharding as sharding_lib
from imagen_jax.models import build_model
from imagen_jax.train.optim import make_optimizer

Rules = Sequence[tuple[str, str | None]]

_CPU_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                     "xla_llvm_disable_expensive_passes": True}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  rest: nnx.State
  opt_state: Any
  ema: dict[str, nnx.State]
  rng: jax.Array
  bad_steps: jax.Array
  skipped: jax.Array


def ema_key(decay: float) -> str:
  """The `ema` dict key of a decay: its shortest exact decimal, e.g. "0.9999"."""
  return repr(float(decay))


def ema_decays(config) -> tuple[float, ...]:
  return tuple(float(d) for d in (config.optim.get("ema_decays") or ()))


def _raw_keys(tree: Any) -> Any:
  """Typed PRNG keys -> their uint32 key data (Orbax cannot save typed keys)."""
  def one(x):
    is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.random.key_data(x) if is_key else x
  return jax.tree.map(one, tree)


def _init_fn(config, tx) -> Callable[[], TrainState]:
  seed = int(config.train.seed)
  decays = ema_decays(config)

  def init() -> TrainState:
    k_model, k_train = jax.random.split(jax.random.key(seed))
    model = build_model(config.model, nnx.Rngs(k_model))
    _, params, rest = nnx.split(model, nnx.Param, ...)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, rest=_raw_keys(rest),
                      opt_state=tx.init(params),
                      ema={ema_key(d): jax.tree.map(jnp.copy, params) for d in decays},
                      rng=jax.random.key_data(k_train), bad_steps=zero, skipped=zero)
  return init


def _leaf_shardings(abstract: TrainState, abs_params: nnx.State, mesh: Mesh,
                    rules: Rules) -> TrainState:
  """A NamedSharding for every leaf of `abstract` (see the module docstring)."""
  param_sh = jax.tree.leaves(sharding_lib.state_shardings(abs_params, mesh, rules))
  param_paths = jax.tree_util.tree_flatten_with_path(abs_params)[0]
  if len(param_sh) != len(param_paths):
    raise ValueError(f"{len(param_paths)} parameter arrays but {len(param_sh)} shardings: "
                     "every nnx.Param must hold exactly one array.")
  table = {tuple(path): (leaf.shape, s) for (path, leaf), s in zip(param_paths, param_sh)}
  longest = max(len(p) for p in table)
  replicated = NamedSharding(mesh, PartitionSpec())

  def one(path, leaf):
    # The longest path suffix that is a parameter's path (params, ema[k], mu, nu, ...).
    for n in range(min(longest, len(path)), 0, -1):
      hit = table.get(tuple(path[-n:]))
      if hit is not None:
        return hit[1] if hit[0] == leaf.shape else replicated
    return replicated
  return jax.tree_util.tree_map_with_path(one, abstract)


def _abstract_params(config) -> tuple[nnx.GraphDef, nnx.State]:
  model = nnx.eval_shape(lambda: build_model(config.model, nnx.Rngs(0)))
  graphdef, params, _ = nnx.split(model, nnx.Param, ...)
  return graphdef, params


def abstract_state(config, mesh: Mesh, rules: Rules = sharding_lib.DEFAULT_RULES
                   ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, the TrainState as jax.ShapeDtypeStructs carrying their shardings, the
  TrainState of NamedShardings): what a checkpoint restore onto `mesh` needs. No memory."""
  graphdef, abs_params = _abstract_params(config)
  tx = make_optimizer(config.optim, int(config.train.steps))
  abstract = jax.eval_shape(_init_fn(config, tx))
  shardings = _leaf_shardings(abstract, abs_params, mesh, rules)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return graphdef, abstract, shardings


def create_state(config, mesh: Mesh, rules: Rules = sharding_lib.DEFAULT_RULES
                 ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, a fresh TrainState seeded by config.train.seed, its shardings).

  The state is initialised inside jit with out_shardings, so each device only ever
  holds its shards.
  """
  graphdef, _, shardings = abstract_state(config, mesh, rules)
  tx = make_optimizer(config.optim, int(config.train.steps))
  # Init runs once and is cheap to run but slow to compile on CPU (a random sampler per
  # parameter shape): skip XLA:CPU's costly optimisations, about 2-3x faster there.
  cpu = mesh.devices.flat[0].platform == "cpu"
  init = jax.jit(_init_fn(config, tx), out_shardings=shardings,
                 compiler_options=_CPU_FAST_COMPILE if cpu else None)
  return graphdef, init(), shardings
