"""Loading pretrained T5 encoders: Hugging Face directories and T5X checkpoints.

Both loaders return a `t5.T5Encoder` (its config as `.cfg`) with float32 parameters;
`dtype` only sets the compute dtype. Every tensor is checked by name and shape before
anything is built, so a truncated or mismatched checkpoint names what is wrong.

Hugging Face (`load_t5_hf`): `config.json` plus `model.safetensors` or shards listed by
`model.safetensors.index.json`, from `T5EncoderModel` or a full
`T5ForConditionalGeneration` (decoder tensors and `lm_head` are ignored). torch Linear
weights are [out, in] and are transposed; the relative bias table [buckets, heads] is
read from block 0, the only block that has one.

T5X (`load_t5x`), the layout of the published T5 v1.1 checkpoints
(gs://t5-data/pretrained_models/t5x/t5_1_1_*/checkpoint_*) as t5x/checkpoints.py writes
them: a directory with a msgpack file `checkpoint` (flax.serialization) holding
`{"version": 3, "optimizer": {"target": params, "state": ...}}` (version 0 files hold
`{"target", "state"}` directly). A large array is replaced in the msgpack by a tensorstore
spec dict, `{"driver": "zarr", "kvstore": {"driver": "file", "path":
"target.encoder.layers_0.attention.key.kernel"}, "metadata": {...}}`, whose path is
relative to the checkpoint directory (older specs put "path" beside "kvstore"; specs
written to GCS have a "gcs" kvstore, read here from the local copy); small arrays are
inline numpy. Parameter names, from t5x/examples/t5/network.py and layers.py:

  token_embedder/embedding                           [vocab, d_model]
  encoder/relpos_bias/rel_embedding                  [heads, buckets] (one per stack)
  encoder/layers_{i}/pre_attention_layer_norm/scale  [d_model]
  encoder/layers_{i}/attention/{query,key,value}/kernel   [d_model, heads * d_kv]
  encoder/layers_{i}/attention/out/kernel            [heads * d_kv, d_model]
  encoder/layers_{i}/pre_mlp_layer_norm/scale        [d_model]
  encoder/layers_{i}/mlp/{wi_0,wi_1}/kernel (v1.1) or mlp/wi/kernel (v1.0)  [d_model, d_ff]
  encoder/layers_{i}/mlp/wo/kernel                   [d_ff, d_model]
  encoder/encoder_norm/scale                         [d_model]

Kernels are [in, out] and used as they are: T5X's 1/sqrt(d_kv) on the query is only in
its initializer, so the stored query kernel already carries it (transformers' converter
copies the kernels unchanged, too). T5X checkpoints carry no config: sizes come from the
shapes, the feed-forward from whether `wi_0` exists (gated-gelu, as in every published
gated T5X checkpoint; pass `feed_forward` for another activation), and the bucket count
from the table (max_distance is 128, fixed in t5x's network.py). Newer T5X runs can write
Orbax-format checkpoints instead (a state/ directory); those are not read here.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.text import hf_files
from imagen_jax.text.hf_files import CheckpointError
from imagen_jax.text.t5 import T5Config, T5Encoder

__all__ = ["load_t5_hf", "load_t5x", "CheckpointError"]

Path = tuple  # a path into the NNX state, e.g. ("layers", 0, "attn", "q", "kernel")


def _encoder_paths(cfg: T5Config) -> dict[str, Path]:
  """Our parameter paths, keyed by a layout-neutral name used by both loaders."""
  paths = {"embed": ("embed", "embedding"), "relpos": ("relpos",),
           "final_norm": ("final_norm", "scale")}
  wi = ("wi_0", "wi_1") if cfg.gated else ("wi",)
  for i in range(cfg.num_layers):
    paths[f"{i}/attn_norm"] = ("layers", i, "attn_norm", "scale")
    paths[f"{i}/mlp_norm"] = ("layers", i, "mlp_norm", "scale")
    for name in ("q", "k", "v", "o"):
      paths[f"{i}/{name}"] = ("layers", i, "attn", name, "kernel")
    for name in wi + ("wo",):
      paths[f"{i}/{name}"] = ("layers", i, "mlp", name, "kernel")
  return paths


def _encoder_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
  """Shapes in our layout (kernels [in, out], relpos [buckets, heads]), by neutral name."""
  inner = cfg.num_heads * cfg.d_kv
  by_kind = {"embed": (cfg.vocab_size, cfg.d_model),
             "relpos": (cfg.relative_attention_num_buckets, cfg.num_heads),
             "q": (cfg.d_model, inner), "k": (cfg.d_model, inner), "v": (cfg.d_model, inner),
             "o": (inner, cfg.d_model), "wi": (cfg.d_model, cfg.d_ff),
             "wi_0": (cfg.d_model, cfg.d_ff), "wi_1": (cfg.d_model, cfg.d_ff),
             "wo": (cfg.d_ff, cfg.d_model)}
  return {key: by_kind.get(key.split("/")[-1], (cfg.d_model,))  # the rest are norm scales
          for key in _encoder_paths(cfg)}


def build_encoder(cfg: T5Config, params: dict[Path, np.ndarray]) -> T5Encoder:
  """A T5Encoder whose parameters are `params` (state path -> array, our layout), float32.

  The model is built shape-only first, so no random initialisation is spent on an XXL
  encoder whose weights are about to be replaced; `params` is emptied as it is consumed,
  so each host array can be freed once its copy exists (an XXL encoder is 19 GB).
  """
  abstract = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = []
  for path, var in nnx.to_flat_state(state):
    if path not in params:
      raise CheckpointError(f"No value for parameter {'/'.join(map(str, path))} (a loader "
                            "bug: the name mapping does not cover the model).")
    value = np.asarray(params.pop(path))
    if value.shape != tuple(var.shape):
      raise CheckpointError(f"Parameter {'/'.join(map(str, path))}: got shape {value.shape}, "
                            f"model has {tuple(var.shape)}.")
    flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ---------------------------------------------------------------------------------------
# Hugging Face


def _hf_names(cfg: T5Config) -> dict[str, tuple[str, bool]]:
  """Neutral name -> (HF tensor name, transpose?). The embedding is resolved separately."""
  names = {"relpos": ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      False),
           "final_norm": ("encoder.final_layer_norm.weight", False)}
  wi = ("wi_0", "wi_1") if cfg.gated else ("wi",)
  for i in range(cfg.num_layers):
    block = f"encoder.block.{i}.layer"
    names[f"{i}/attn_norm"] = (f"{block}.0.layer_norm.weight", False)
    names[f"{i}/mlp_norm"] = (f"{block}.1.layer_norm.weight", False)
    for name in ("q", "k", "v", "o"):
      names[f"{i}/{name}"] = (f"{block}.0.SelfAttention.{name}.weight", True)
    for name in wi + ("wo",):
      names[f"{i}/{name}"] = (f"{block}.1.DenseReluDense.{name}.weight", True)
  return names


def _hf_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape (torch layout) for every encoder tensor but the embedding."""
  ours = _encoder_shapes(cfg)
  return {name: ours[key][::-1] if transpose else ours[key]
          for key, (name, transpose) in _hf_names(cfg).items()}


# transformers ties encoder.embed_tokens to shared and saves one of the pair, usually
# shared.weight; some exporters keep only the other, or both (equal).
_EMBED_NAMES = ("shared.weight", "encoder.embed_tokens.weight")
# What a full T5ForConditionalGeneration has beyond the encoder.
_HF_IGNORE = ("decoder.", "lm_head.")


def load_t5_hf(path: str | os.PathLike, *, dtype: str = "float32") -> T5Encoder:
  """The T5 encoder of a Hugging Face checkpoint directory (float32 params, `dtype` compute).

  Raises CheckpointError naming every missing, unexpected or misshaped tensor.
  """
  path = os.fspath(path)
  try:
    cfg = T5Config.from_hf(hf_files.read_config(path), dtype=dtype)
  except CheckpointError:
    raise
  except ValueError as e:  # the config asks for something T5Encoder does not implement
    raise CheckpointError(f"{path}/config.json: {e}") from e
  tensors = hf_files.read_safetensors(path)
  embed_name = next((n for n in _EMBED_NAMES if n in tensors), _EMBED_NAMES[0])
  expected = dict(_hf_shapes(cfg))
  expected[embed_name] = (cfg.vocab_size, cfg.d_model)
  other_embed = [n for n in _EMBED_NAMES if n != embed_name]
  hf_files.check_tensors(expected, tensors, path, ignore=_HF_IGNORE + tuple(other_embed))

  paths = _encoder_paths(cfg)
  params = {paths["embed"]: tensors.pop(embed_name)}
  for key, (name, transpose) in _hf_names(cfg).items():
    params[paths[key]] = tensors[name].T if transpose else tensors[name]
    del tensors[name]  # params holds the only reference now
  return build_encoder(cfg, params)


# ---------------------------------------------------------------------------------------
# T5X


def _t5x_names(cfg: T5Config) -> dict[str, str]:
  """Neutral name -> T5X parameter name (under `target`); kernels are already [in, out]."""
  names = {"embed": "token_embedder/embedding", "relpos": "encoder/relpos_bias/rel_embedding",
           "final_norm": "encoder/encoder_norm/scale"}
  t5x_attn = {"q": "query", "k": "key", "v": "value", "o": "out"}
  wi = ("wi_0", "wi_1") if cfg.gated else ("wi",)
  for i in range(cfg.num_layers):
    layer = f"encoder/layers_{i}"
    names[f"{i}/attn_norm"] = f"{layer}/pre_attention_layer_norm/scale"
    names[f"{i}/mlp_norm"] = f"{layer}/pre_mlp_layer_norm/scale"
    for ours, theirs in t5x_attn.items():
      names[f"{i}/{ours}"] = f"{layer}/attention/{theirs}/kernel"
    for name in wi + ("wo",):
      names[f"{i}/{name}"] = f"{layer}/mlp/{name}/kernel"
  return names


def _t5x_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
  ours = _encoder_shapes(cfg)
  return {name: ours[key][::-1] if key == "relpos" else ours[key]
          for key, name in _t5x_names(cfg).items()}


def _is_spec(leaf: Any) -> bool:
  return isinstance(leaf, Mapping) and "driver" in leaf and ("kvstore" in leaf or "path" in leaf)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """Nested dict -> {"a/b/c": leaf}; tensorstore spec dicts are leaves."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and not _is_spec(value):
      out.update(_flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def _find_msgpack(path: str) -> str:
  """The msgpack file: `path` itself, `path/checkpoint`, or that of the latest
  `path/checkpoint_<step>` (a T5X model directory)."""
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise CheckpointError(f"T5X checkpoint {path!r} does not exist; pass the directory that "
                          "holds the msgpack file `checkpoint` (e.g. .../checkpoint_1000000).")
  if os.path.isfile(os.path.join(path, "checkpoint")):
    return os.path.join(path, "checkpoint")
  steps = sorted((int(m.group(1)), d) for d in os.listdir(path)
                 if (m := re.fullmatch(r"checkpoint_(\d+)", d))
                 and os.path.isfile(os.path.join(path, d, "checkpoint")))
  if steps:
    return os.path.join(path, steps[-1][1], "checkpoint")
  if os.path.isdir(os.path.join(path, "state")):
    raise CheckpointError(
        f"{path!r} looks like an Orbax-format T5X checkpoint (a state/ directory), which is "
        "not read here; the published T5 checkpoints use the msgpack + zarr layout.")
  raise CheckpointError(
      f"{path!r} is not a T5X checkpoint: it has no msgpack file `checkpoint` and no "
      f"checkpoint_<step>/ directory (found: {sorted(os.listdir(path))[:10]}).")


def _read_target(msgpack_file: str) -> dict[str, Any]:
  """The flattened parameter tree ('target') of a T5X msgpack file."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  try:
    with open(msgpack_file, "rb") as f:
      contents = serialization.msgpack_restore(f.read())
  except Exception as e:  # msgpack raises several unrelated types on garbage
    raise CheckpointError(f"Cannot read T5X msgpack file {msgpack_file}: {e}. It is "
                          "truncated or not a T5X checkpoint; re-download it.") from e
  if not isinstance(contents, Mapping):
    raise CheckpointError(f"{msgpack_file} does not hold a T5X state dict.")
  # t5x's layout versions: 0 is a bare {"target", "state"}, >= 1 wraps it in "optimizer".
  state = contents["optimizer"] if contents.get("version", 0) and "optimizer" in contents \
      else contents
  target = state.get("target", state) if isinstance(state, Mapping) else None
  if not isinstance(target, Mapping) or "encoder" not in target:
    raise CheckpointError(f"{msgpack_file} has no target/encoder parameters (top-level keys "
                          f"{sorted(contents)}); it is not a T5 encoder-decoder checkpoint.")
  return _flatten(target)


def _kvstore_driver(spec: Mapping) -> str:
  kvstore = spec.get("kvstore", {})
  return kvstore.get("driver", "file") if isinstance(kvstore, Mapping) else str(kvstore)


def _zarr_path(spec: Mapping, ckpt_dir: str, name: str) -> str:
  """The local directory of a spec's zarr array, its relative path resolved against the
  checkpoint directory as t5x does. Specs written to GCS name a bucket; their arrays sit
  under the same relative path in any local copy (gsutil cp -r), so that is read instead."""
  kvstore = spec.get("kvstore", {})
  rel = kvstore.get("path") if isinstance(kvstore, Mapping) else None
  rel = rel or spec.get("path")  # tensorstore < 0.1.14 specs keep the path outside kvstore
  if not rel:
    raise CheckpointError(f"T5X tensor {name}: tensorstore spec without a path: {dict(spec)}.")
  local = os.path.join(ckpt_dir, rel)
  if not os.path.isdir(local) and os.path.isabs(rel):
    local = os.path.join(ckpt_dir, os.path.basename(rel.rstrip("/")))
  return local


def _open_zarr(spec: Mapping, ckpt_dir: str, name: str):
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  local = _zarr_path(spec, ckpt_dir, name)
  if not os.path.isdir(local):
    where = "" if _kvstore_driver(spec) in ("file", "gfile") else (
        f" (the spec names a {_kvstore_driver(spec)} kvstore; it is read from the local copy)")
    raise CheckpointError(
        f"T5X tensor {name}: its zarr array {local} is missing{where}. The checkpoint is "
        "incomplete; copy the whole checkpoint directory "
        "(gsutil -m cp -r gs://.../checkpoint_N .).")
  try:
    return ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": local}},
                   open=True).result()
  except Exception as e:  # tensorstore reports its failures as ValueError or RuntimeError
    raise CheckpointError(f"T5X tensor {name}: cannot open zarr array {local}: {e}") from e


def _read_zarr(spec: Mapping, ckpt_dir: str, name: str) -> np.ndarray:
  store = _open_zarr(spec, ckpt_dir, name)
  try:
    return np.asarray(store.read().result())
  except Exception as e:  # a truncated chunk file, a failed decompression
    raise CheckpointError(f"T5X tensor {name}: cannot read zarr array "
                          f"{_zarr_path(spec, ckpt_dir, name)}: {e}") from e


def _leaf_shape(leaf: Any, ckpt_dir: str, name: str) -> tuple[int, ...] | None:
  if _is_spec(leaf):
    shape = leaf.get("metadata", {}).get("shape")
    if shape is None:  # only the zarr metadata has it
      shape = _open_zarr(leaf, ckpt_dir, name).shape
    return tuple(int(s) for s in shape)
  return tuple(np.shape(leaf)) if leaf is not None else None


def _infer_t5x_config(shapes: Mapping[str, tuple[int, ...]], source: str, *, dtype: str,
                      feed_forward: str | None) -> T5Config:
  """Sizes from tensor shapes; CheckpointError naming the tensor the sizes need."""
  def need(name):
    if name not in shapes:
      raise CheckpointError(f"T5X checkpoint {source} has no {name}, which every T5 encoder "
                            "has; the checkpoint is incomplete or not a T5.")
    return shapes[name]
  vocab, d_model = need("token_embedder/embedding")
  heads, buckets = need("encoder/relpos_bias/rel_embedding")
  inner = need("encoder/layers_0/attention/query/kernel")[1]
  gated = "encoder/layers_0/mlp/wi_0/kernel" in shapes
  d_ff = need(f"encoder/layers_0/mlp/{'wi_0' if gated else 'wi'}/kernel")[1]
  layer_ids = {int(m.group(1)) for n in shapes if (m := re.match(r"encoder/layers_(\d+)/", n))}
  num_layers = max(layer_ids) + 1
  if inner % heads:
    raise CheckpointError(f"T5X checkpoint {source}: query width {inner} is not a multiple of "
                          f"the {heads} heads of the relative bias table.")
  if feed_forward is None:
    feed_forward = "gated-gelu" if gated else "relu"
  cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
                 d_ff=d_ff, num_layers=num_layers, relative_attention_num_buckets=buckets,
                 feed_forward=feed_forward, dtype=dtype)
  if cfg.gated != gated:
    raise ValueError(f"feed_forward={feed_forward!r} is {'' if cfg.gated else 'not '}gated, "
                     f"but checkpoint {source} has {'wi_0/wi_1' if gated else 'a single wi'}.")
  return cfg


def load_t5x(path: str | os.PathLike, *, dtype: str = "float32",
             feed_forward: str | None = None) -> T5Encoder:
  """The T5 encoder of a T5X checkpoint (float32 params, `dtype` compute).

  path: a checkpoint directory (with the msgpack file `checkpoint` and the zarr arrays), the
  msgpack file itself, or a T5X model directory (its latest checkpoint_<step> is used).
  feed_forward: overrides the activation, which T5X checkpoints do not record (default:
  gated-gelu when the checkpoint has wi_0/wi_1, else relu). Only the encoder's arrays are
  read, so the decoder and optimizer state of a full checkpoint cost nothing.
  """
  msgpack_file = _find_msgpack(os.fspath(path))
  ckpt_dir = os.path.dirname(msgpack_file)
  leaves = {n: v for n, v in _read_target(msgpack_file).items()
            if n.startswith(("encoder/", "token_embedder/"))}
  remote = sorted({_kvstore_driver(v) for v in leaves.values() if _is_spec(v)} - {"file", "gfile"})
  if remote:
    logging.info("T5X checkpoint %s was written to %s; reading its zarr arrays from the local "
                 "copy beside the msgpack file.", ckpt_dir, "/".join(remote))
  shapes = {n: _leaf_shape(v, ckpt_dir, n) for n, v in leaves.items()}
  cfg = _infer_t5x_config(shapes, ckpt_dir, dtype=dtype, feed_forward=feed_forward)
  found = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items() if s is not None}
  hf_files.check_tensors(_t5x_shapes(cfg), found, ckpt_dir)

  paths = _encoder_paths(cfg)
  params = {}
  for key, name in _t5x_names(cfg).items():
    leaf = leaves[name]
    value = _read_zarr(leaf, ckpt_dir, name) if _is_spec(leaf) else np.asarray(leaf)
    if value.shape != shapes[name]:
      raise CheckpointError(f"T5X tensor {name}: its zarr array has shape {value.shape}, but "
                            f"the msgpack spec says {shapes[name]}; the checkpoint is corrupt.")
    # bfloat16 checkpoints come back as ml_dtypes arrays; the model keeps float32.
    value = value.astype(np.float32, copy=False)
    params[paths[key]] = value.T if key == "relpos" else value
  return build_encoder(cfg, params)

