"""The train step: one jitted function (state, batch) -> (state, metrics) for every stage.

Per step, with key = fold_in(state.rng, state.step), so a step is a pure function of
(seed, step, batch) and resuming from a checkpoint is bit-exact:
  1. `prepare_inputs`: t and eps of the diffusion loss (from the first of three subkeys,
     drawn exactly as `objectives.diffusion_loss` draws from its key), classifier-free
     guidance text dropout (an example's whole text_mask set False, the networks' "no
     text" input), and for SR stages noise-conditioning augmentation of the low-res input
     (aug_t ~ U[0, max_t] per example or per batch, on the augmentation's own schedule
     `diffusion.noise_aug.schedule`, so a change of the diffusion schedule leaves it
     bit-identical; the network gets its log-SNR). All of it is drawn for the whole
     batch before any split into micro-batches, so `accum_steps` does not change the
     noise (dropout masks, drawn per micro-batch, do).
  2. dropout layers are reseeded from the same key (nnx.reseed).
  3. gradients of the mean loss, averaged over `accum_steps` micro-batches (lax.scan;
     accum_steps = 1 runs without the loop, which XLA:CPU runs ~2.5x slower). Micro-batch
     k holds examples k, k + A, k + 2A, ... so each stays spread over every device.
  4. if the loss or the gradient norm is not finite, nothing is applied (params,
     optimizer state and EMA stay bit-identical) and bad_steps and skipped count it;
     otherwise the optax update, then ema = d ema + (1 - d) params for every EMA decay,
     and bad_steps = 0. The step counter advances either way, which keeps the data
     order aligned with the step. (A batch with a NaN pixel exercises this path.)

Metrics (device scalars; `metrics_keys` lists them): loss (batch mean), grad_norm, lr
(of this update), skipped (0/1), bad_steps, and per log-SNR bucket the loss sum and
example count (`LOGSNR_BUCKETS`), so a logger averages per bucket over steps exactly.
A skipped step adds nothing to the buckets.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax import sharding as sharding_lib
from imagen_jax.diffusion import guidance, objectives
from imagen_jax.diffusion import schedules as schedules_lib
from imagen_jax.diffusion.schedules import Schedule
from imagen_jax.train.optim import learning_rate, make_optimizer
from imagen_jax.train.state import TrainState

Array = jax.Array

# Edges of the log-SNR buckets of the per-bucket loss: 8 bins of width 5 over [-20, 20]
# (the default schedules span [-15, 15] or less); levels outside fall in the end bins.
LOGSNR_BUCKETS = np.linspace(-20.0, 20.0, 9)
# The batch keys the step reads; anything else (captions, indices) is dropped on the host.
BATCH_KEYS = ("image", "text", "text_mask", "lowres")


# Host -> device ------------------------------------------------------------------------


def device_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, Array]:
  """The model inputs of a host batch (BATCH_KEYS only) as arrays sharded over the batch.

  Each process passes its local part; the global batch (local * process count) must
  divide by the mesh's data * fsdp size.
  """
  sh, shards = sharding_lib.batch_sharding(mesh), sharding_lib.batch_split(mesh)
  out = {}
  for k in BATCH_KEYS:
    if k not in batch:
      continue
    x = batch[k]
    if isinstance(x, jax.Array) and (not x.is_fully_addressable or x.sharding == sh):
      out[k] = x  # already a global array on the mesh
      continue
    x = np.asarray(x)
    global_b = x.shape[0] * jax.process_count()
    if global_b % shards:
      raise ValueError(f"batch[{k!r}] has global batch size {global_b}, which the mesh's "
                       f"data*fsdp = {shards} devices do not divide; change "
                       "train.batch_size or the mesh shape.")
    out[k] = jax.make_array_from_process_local_data(sh, x)
  return out


# The loss ------------------------------------------------------------------------------


def _schedule(config) -> Schedule:
  return schedules_lib.from_config(config.diffusion)


def _weighting(config) -> Callable[[Array], Array]:
  d = config.diffusion
  return objectives.get_weighting(d.weighting, **dict(d.get("weighting_kw") or {}))


def prepare_inputs(config, batch: Mapping[str, Array], rng: Array) -> dict[str, Array]:
  """Noised network inputs and loss targets for a whole batch (pure; see module doc).

  Returns x_t, logsnr, x0, eps, text, text_mask (after CFG dropout) and, for SR stages,
  lowres (noise-augmented) and aug_logsnr.
  """
  missing = [k for k in ("image", "text", "text_mask") + (("lowres",) * (config.kind == "sr"))
             if k not in batch]
  if missing:
    raise KeyError(f"Batch lacks {missing} (has {sorted(batch)}); the {config.kind!r} "
                   "stage's input pipeline must provide them.")
  schedule = _schedule(config)
  x0 = batch["image"]
  b = x0.shape[0]
  k_diff, k_text, k_aug = jax.random.split(rng, 3)
  # Drawn from k_diff as objectives.diffusion_loss draws from its key (tested).
  rng_t, rng_eps = jax.random.split(k_diff)
  t = objectives.sample_t(rng_t, b, antithetic=bool(config.train.antithetic))
  logsnr = schedule.logsnr(t)
  eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  keep = jax.random.uniform(k_text, (b,)) >= float(config.train.text_drop_prob)
  out = dict(x_t=objectives.diffuse(x0, eps, logsnr), logsnr=logsnr, x0=x0, eps=eps,
             text=batch["text"], text_mask=jnp.asarray(batch["text_mask"], bool) & keep[:, None])
  if config.kind == "sr":
    aug = guidance.NoiseAug.from_config(config.diffusion)
    k_aug_t, k_aug_eps = jax.random.split(k_aug)
    aug_t = guidance.sample_aug_t(k_aug_t, b, max_t=aug.max_t, per=aug.per)
    out["lowres"], out["aug_logsnr"] = guidance.noise_augment(k_aug_eps, batch["lowres"],
                                                              aug_t, aug.schedule)
  return out


def loss_fn(model: nnx.Module, inputs: Mapping[str, Array], *, target: str,
            weighting: Callable[[Array], Array]) -> tuple[Array, Array]:
  """(mean loss, per-example loss [B]) of the network on `prepare_inputs` output."""
  args = [inputs[k] for k in ("x_t", "logsnr", "text", "text_mask")]
  if "lowres" in inputs:
    args += [inputs["lowres"], inputs["aug_logsnr"]]
  pred = model(*args)
  per_example = objectives.weighted_mse(pred, inputs["x0"], inputs["eps"], inputs["logsnr"],
                                        target=target, weighting=weighting)
  return jnp.mean(per_example), per_example


def compute_loss(config, model: nnx.Module, batch: Mapping[str, Array], rng: Array
                 ) -> tuple[Array, Array]:
  """(per-example loss [B], log-SNR [B]) of one batch, the step's loss without dropout
  reseeding or accumulation. Pure given the model's state."""
  inputs = prepare_inputs(config, batch, rng)
  _, per_example = loss_fn(model, inputs, target=config.diffusion.target,
                           weighting=_weighting(config))
  return per_example, inputs["logsnr"]


# The step ------------------------------------------------------------------------------


def reseed_dropout(model: nnx.Module, rng: Array) -> None:
  """Every RNG stream of `model` restarts from `rng` (one key per stream tag)."""
  tags = sorted({node.key.tag for _, node in nnx.iter_graph(model)
                 if isinstance(node, nnx.RngStream)})
  if tags:
    keys = {tag: jax.random.fold_in(rng, i) for i, tag in enumerate(tags)}
    # Stored keys are raw uint32 data (shape [2]); put typed scalar keys in their place.
    nnx.reseed(model, policy=lambda path, key, shape: key, **keys)


def bucket_stats(per_example: Array, logsnr: Array, valid: Array) -> tuple[Array, Array]:
  """(loss sum, count) per LOGSNR_BUCKETS bin; nothing counted where `valid` is False."""
  nb = len(LOGSNR_BUCKETS) - 1
  idx = jnp.clip(jnp.searchsorted(jnp.asarray(LOGSNR_BUCKETS[1:-1]), logsnr, side="right"),
                 0, nb - 1)
  onehot = jax.nn.one_hot(idx, nb, dtype=jnp.float32) * valid
  loss = jnp.where(valid, per_example, 0.0).astype(jnp.float32)
  return jnp.sum(onehot * loss[:, None], 0), jnp.sum(onehot, 0)


def _micro_batches(inputs: dict[str, Array], accum: int, mesh: Mesh) -> dict[str, Array]:
  """[B, ...] -> [accum, B / accum, ...]; micro-batch k = examples k, k + accum, ..."""
  b = inputs["x0"].shape[0]
  if b % accum:
    raise ValueError(f"Batch size {b} does not divide into train.accum_steps={accum} "
                     "micro-batches; change train.batch_size or accum_steps.")
  if (b // accum) % sharding_lib.batch_split(mesh):
    raise ValueError(f"Micro-batches of {b // accum} examples (batch {b} / accum_steps "
                     f"{accum}) do not divide over the mesh's data*fsdp = "
                     f"{sharding_lib.batch_split(mesh)} devices; change train.batch_size, "
                     "accum_steps or the mesh.")
  sh = NamedSharding(mesh, PartitionSpec(None, sharding_lib.BATCH_AXES))

  def split(x):
    x = x.reshape((b // accum, accum) + x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, sh)
  return jax.tree.map(split, inputs)


def accumulate_grads(graphdef: nnx.GraphDef, params: nnx.State, rest: nnx.State,
                     inputs: Mapping[str, Array], *, accum: int, mesh: Mesh, target: str,
                     weighting: Callable[[Array], Array]) -> tuple[nnx.State, Array]:
  """(mean gradient of the loss over `accum` micro-batches, per-example loss [B]).

  `inputs` is `prepare_inputs` output for the whole batch; `rest` the network's non-param
  state (its RNG streams advance through the micro-batches).
  """
  def micro(carry, mb):
    acc, rest = carry
    # Fresh Variables at this trace level (NNX refuses ones from the enclosing trace).
    model = nnx.merge(graphdef, jax.tree.map(lambda p: p, params), rest)
    (_, per_ex), g = nnx.value_and_grad(
        lambda m: loss_fn(m, mb, target=target, weighting=weighting), has_aux=True)(model)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    return (jax.tree.map(jnp.add, acc, g), rest), per_ex

  zeros = jax.tree.map(jnp.zeros_like, params)
  if accum == 1:
    # No loop: XLA:CPU runs convolutions inside a while loop several times slower.
    (total, _), per_ex = micro((zeros, rest), dict(inputs))
    return total, per_ex
  (total, _), per_ex = jax.lax.scan(micro, (zeros, rest), _micro_batches(dict(inputs), accum,
                                                                         mesh))
  # Back to batch order: per_ex[k, i] is example i * accum + k.
  return jax.tree.map(lambda g: g / accum, total), per_ex.swapaxes(0, 1).reshape(-1)


def ema_update(ema: Mapping[str, Any], params: Any) -> dict[str, Any]:
  """ema[k] <- d ema[k] + (1 - d) params, with d = float(k) (keys from `ema_key`)."""
  return {k: jax.tree.map(lambda e, p, d=float(k): d * e + (1.0 - d) * p, e, params)
          for k, e in ema.items()}


def make_train_step(config, graphdef: nnx.GraphDef, state_shardings: TrainState, mesh: Mesh,
                    *, compiler_options: dict[str, Any] | None = None
                    ) -> Callable[[TrainState, Mapping[str, Any]], tuple[TrainState, dict]]:
  """step_fn(state, host_batch) -> (state, metrics); the state is donated.

  `step_fn.jitted(state, device_batch(...))` is the jitted function itself (for
  lowering, cost analysis, or batches already on the mesh). `compiler_options` go to
  jax.jit (e.g. {"xla_llvm_disable_expensive_passes": True} compiles faster on CPU).
  """
  tx = make_optimizer(config.optim, int(config.train.steps))
  lr_fn = learning_rate(config.optim, int(config.train.steps))
  loss_kw = dict(target=config.diffusion.target, weighting=_weighting(config))
  accum = int(config.train.get("accum_steps", 1) or 1)

  def step(state: TrainState, batch: dict[str, Array]) -> tuple[TrainState, dict]:
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    k_inputs, k_dropout = jax.random.split(key)
    inputs = prepare_inputs(config, batch, k_inputs)

    # merge reuses the given Variables and reseeding mutates them: pass copies, so the
    # state's own `rest` (raw keys) is returned unchanged.
    model = nnx.merge(graphdef, state.params, jax.tree.map(lambda x: x, state.rest))
    reseed_dropout(model, k_dropout)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    grads, per_ex = accumulate_grads(graphdef, state.params, rest, inputs, accum=accum,
                                     mesh=mesh, **loss_kw)

    loss, grad_norm = jnp.mean(per_ex), optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A non-finite step keeps the old trees bit for bit (select, not arithmetic).
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    bad = 1 - ok.astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        ema=keep(ema_update(state.ema, params), state.ema),
        bad_steps=jnp.where(ok, 0, state.bad_steps + 1).astype(jnp.int32),
        skipped=state.skipped + bad)
    loss_sum, count = bucket_stats(per_ex, inputs["logsnr"], ok)
    # optax's count is the number of applied updates: step - skipped.
    metrics = dict(loss=loss, grad_norm=grad_norm,
                   lr=jnp.asarray(lr_fn(state.step - state.skipped), jnp.float32),
                   skipped=bad, bad_steps=new_state.bad_steps,
                   loss_sum_per_bucket=loss_sum, count_per_bucket=count)
    return new_state, metrics

  replicated = NamedSharding(mesh, PartitionSpec())
  jitted = jax.jit(step, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=0,
                   compiler_options=compiler_options)

  def step_fn(state: TrainState, batch: Mapping[str, Any]) -> tuple[TrainState, dict]:
    return jitted(state, device_batch(batch, mesh))

  step_fn.jitted = jitted
  return step_fn


def metrics_keys() -> tuple[str, ...]:
  """Names of the step's metrics."""
  return ("loss", "grad_norm", "lr", "skipped", "bad_steps", "loss_sum_per_bucket",
          "count_per_bucket")
