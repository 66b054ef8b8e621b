"""The T5 encoder stack (T5 v1.0, T5 v1.1, Flan-T5) in Flax NNX.

Why we own it: no maintained Flax T5 exists. transformers 5 dropped its Flax models, and
4.57's FlaxT5 no longer runs on current jax; T5X's is linen, tied to the T5X trainer and
gin. Imagen only needs the encoder, frozen, which is about 150 lines. It is NNX like the
rest of the codebase, so one sharding mechanism (logical names on Variables, mapped to mesh
axes by the trainer's rules) covers the diffusion networks and the text encoder alike.

The computation is exactly transformers' `T5EncoderModel` in eval mode (no dropout):
token embedding (unscaled); per layer a pre-norm self-attention and a pre-norm
feed-forward block, each added to the residual stream; a final norm. T5 specifics:
RMS norm without mean or bias, attention logits not divided by sqrt(d_kv) (T5 folds that
into the query initialisation), a relative position bias computed once from the first
layer's table and shared by every layer, and no biases in any projection.

Logical axis names (Variable metadata `out_sharding`):

  embed.embedding            ("vocab", "embed")
  relpos                     (None, "heads")      [num_buckets, num_heads]
  layers[i].attn.{q,k,v}     ("embed", "heads")   [d_model, num_heads * d_kv]
  layers[i].attn.o           ("heads", "embed")
  layers[i].mlp.wi, wi_0, wi_1   ("embed", "mlp")
  layers[i].mlp.wo           ("mlp", "embed")
  *_norm.scale               ("embed",)

Parameters are float32. `T5Config.dtype` is the compute dtype of the matmuls (float32 or
bfloat16); norms, attention logits and softmax run in float32, the residual stream is
kept in float32 (cheap next to the matmuls, and it removes the bf16 drift over 24 layers),
and the output is always float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.sharding import logical as _names

Array = jax.Array

# Logical names are metadata until a mesh exists (see models/layers.py).
nnx.use_eager_sharding(False)

# feed_forward -> (gated, activation). The activations follow transformers' T5Config:
# "gated-gelu" means the tanh approximation (its "gelu_new"), a plain "gelu" the exact one.
_FEED_FORWARD: dict[str, tuple[bool, str]] = {
    "relu": (False, "relu"),
    "gelu": (False, "gelu"),
    "silu": (False, "silu"),
    "gated-relu": (True, "relu"),
    "gated-gelu": (True, "gelu_new"),
    "gated-silu": (True, "silu"),
}

# (is_gated_act, dense_act_fn) as transformers derives them -> feed_forward.
_FROM_DERIVED: dict[tuple[bool, str], str] = {
    (False, "relu"): "relu", (False, "gelu"): "gelu", (False, "silu"): "silu",
    (True, "relu"): "gated-relu", (True, "gelu_new"): "gated-gelu", (True, "silu"): "gated-silu",
}

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """Sizes of a T5 encoder; field names follow transformers' T5Config.

  feed_forward: "relu" (T5 v1.0), "gated-gelu" (T5 v1.1, Flan-T5, mT5), or one of
  "gelu", "silu", "gated-relu", "gated-silu". dtype: compute dtype, "float32" or
  "bfloat16" (parameters stay float32).
  """
  vocab_size: int
  d_model: int
  d_kv: int
  num_heads: int
  d_ff: int
  num_layers: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  feed_forward: str = "gated-gelu"
  layer_norm_epsilon: float = 1e-6
  dtype: str = "float32"

  def __post_init__(self):
    if self.feed_forward not in _FEED_FORWARD:
      raise ValueError(f"Unsupported T5 feed_forward {self.feed_forward!r}; supported: "
                       f"{sorted(_FEED_FORWARD)}.")
    if self.dtype not in _DTYPES:
      raise ValueError(f"T5Config.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}.")

  @property
  def gated(self) -> bool:
    return _FEED_FORWARD[self.feed_forward][0]

  @property
  def activation(self) -> str:
    return _FEED_FORWARD[self.feed_forward][1]

  @property
  def compute_dtype(self) -> Any:
    return _DTYPES[self.dtype]

  @classmethod
  def from_hf(cls, config: Mapping[str, Any], *, dtype: str = "float32") -> "T5Config":
    """The config of a transformers `config.json` (T5, mT5, Flan-T5)."""
    model_type = config.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
      # UMT5 has a relative bias table in every layer; LongT5 has local attention.
      raise ValueError(f"config.json has model_type {model_type!r}; only 't5' and 'mt5' "
                       "encoders are supported.")
    proj = config.get("feed_forward_proj")
    if proj is None:
      # Some exporters write only the fields transformers derives from feed_forward_proj.
      derived = (bool(config.get("is_gated_act", False)), config.get("dense_act_fn", "relu"))
      proj = _FROM_DERIVED.get(derived, f"is_gated_act={derived[0]}, dense_act_fn={derived[1]}")
    if proj not in _FEED_FORWARD:
      raise ValueError(
          f"config.json asks for the feed-forward {proj!r}, which this T5 does not "
          f"implement; supported feed_forward_proj: {sorted(_FEED_FORWARD)}.")
    try:
      return cls(
          vocab_size=int(config["vocab_size"]), d_model=int(config["d_model"]),
          d_kv=int(config["d_kv"]), num_heads=int(config["num_heads"]),
          d_ff=int(config["d_ff"]), num_layers=int(config["num_layers"]),
          relative_attention_num_buckets=int(config.get("relative_attention_num_buckets", 32)),
          # Configs written before transformers 4.20 lack it; 128 was the fixed value then.
          relative_attention_max_distance=int(config.get("relative_attention_max_distance", 128)),
          feed_forward=proj,
          layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-6)),
          dtype=dtype)
    except KeyError as e:
      raise ValueError(f"config.json lacks {e.args[0]!r}; it is not a T5 config.") from e


def _size(d_model, d_kv, heads, d_ff, layers, vocab=32128) -> T5Config:
  return T5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, num_heads=heads, d_ff=d_ff,
                  num_layers=layers, feed_forward="gated-gelu")


# T5 v1.1 encoders as published (google/t5-v1_1-* config.json, t5x's t5_1_1 gin files);
# Flan-T5 checkpoints have the same sizes. "tiny" is for tests.
T5_SIZES: dict[str, T5Config] = {
    "tiny": _size(32, 8, 4, 64, 2, vocab=300),
    "small": _size(512, 64, 6, 1024, 8),
    "base": _size(768, 64, 12, 2048, 12),
    "large": _size(1024, 64, 16, 2816, 24),
    "xl": _size(2048, 64, 32, 5120, 24),
    "xxl": _size(4096, 64, 64, 10240, 24),
}


def relative_position_bucket(relative_position: np.ndarray, *, num_buckets: int = 32,
                             max_distance: int = 128) -> np.ndarray:
  """T5's bidirectional bucket of `key_position - query_position` (int array).

  Half the buckets are for keys after the query, half for keys before. Within a half,
  the first half of the buckets are exact distances, the rest log-spaced up to
  max_distance, beyond which everything shares the last bucket. Computed in numpy float32
  like transformers (in torch float32), since a different rounding could move a distance
  that sits exactly on a log boundary into the neighbouring bucket.
  """
  rel = np.asarray(relative_position, np.int64)
  half = num_buckets // 2
  bucket = (rel > 0).astype(np.int64) * half
  dist = np.abs(rel)
  max_exact = half // 2
  # Clamp below at max_exact so log never sees 0; those distances take the exact branch.
  far = np.maximum(dist, max_exact).astype(np.float32)
  log_ratio = np.log(far / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * np.float32(half - max_exact)).astype(np.int64)
  large = np.minimum(large, half - 1)
  return (bucket + np.where(dist < max_exact, dist, large)).astype(np.int32)


def _dense(cin: int, cout: int, names: tuple, cfg: T5Config, rngs: nnx.Rngs,
           scale: float = 1.0) -> nnx.Linear:
  init = nnx.initializers.variance_scaling(scale, "fan_in", "normal")
  return nnx.Linear(cin, cout, use_bias=False, dtype=cfg.compute_dtype, kernel_init=init,
                    rngs=rngs, kernel_metadata=_names(*names))


class RMSNorm(nnx.Module):
  """T5LayerNorm: x / sqrt(mean(x^2) + eps) * scale, in float32; no mean, no bias."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("embed",))
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(var + self.eps) * self.scale[...]


class SelfAttention(nnx.Module):
  """Multi-head self-attention with an additive bias (relative positions + mask)."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    # No 1/sqrt(d_kv) on the logits, so the query starts that much smaller instead.
    self.q = _dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs, scale=1.0 / cfg.d_kv)
    self.k = _dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
    self.v = _dense(cfg.d_model, inner, ("embed", "heads"), cfg, rngs)
    self.o = _dense(inner, cfg.d_model, ("heads", "embed"), cfg, rngs)
    self.heads, self.d_kv, self.dtype = cfg.num_heads, cfg.d_kv, cfg.compute_dtype

  def __call__(self, x: Array, pos_bias: Array, mask_bias: Array) -> Array:
    """x [B, L, D] (compute dtype), pos_bias [1, H, L, L], mask_bias [B, 1, 1, L] -> [B, L, D]."""
    b, length, _ = x.shape
    split = lambda t: t.reshape(b, length, self.heads, self.d_kv)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    # The biases stay separate until here, so no [B, H, L, L] tensor outlives a layer.
    weights = jax.nn.softmax(logits + pos_bias + mask_bias, axis=-1).astype(self.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    return self.o(out.reshape(b, length, self.heads * self.d_kv))


class FeedForward(nnx.Module):
  """wo(act(wi x)), or wo(act(wi_0 x) * wi_1 x) when gated (T5 v1.1)."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.gated = cfg.gated
    self.act = _ACTIVATIONS[cfg.activation]
    if self.gated:
      self.wi_0 = _dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
      self.wi_1 = _dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    else:
      self.wi = _dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), cfg, rngs)
    self.wo = _dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), cfg, rngs)
    self.dtype = cfg.compute_dtype

  def __call__(self, x: Array) -> Array:
    if self.gated:
      h = self.act(self.wi_0(x).astype(jnp.float32)) * self.wi_1(x).astype(jnp.float32)
    else:
      h = self.act(self.wi(x).astype(jnp.float32))
    return self.wo(h.astype(self.dtype))


class T5Layer(nnx.Module):
  """Pre-norm self-attention, then pre-norm feed-forward, each added to the residual."""

  def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
    self.attn = SelfAttention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
    self.mlp = FeedForward(cfg, rngs)
    self.dtype = cfg.compute_dtype

  def __call__(self, x: Array, pos_bias: Array, mask_bias: Array) -> Array:
    h = self.attn(self.attn_norm(x).astype(self.dtype), pos_bias, mask_bias)
    x = x + h.astype(jnp.float32)
    return x + self.mlp(self.mlp_norm(x).astype(self.dtype)).astype(jnp.float32)


class T5Encoder(nnx.Module):
  """T5 encoder: token ids [B, L] int and mask [B, L] bool -> hidden states [B, L, d_model]
  float32 (transformers' `last_hidden_state`).

  Outputs at real tokens do not depend on padded positions; outputs at padded positions
  are computed but meaningless. The config is kept as `.cfg`.
  """

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=jnp.float32, rngs=rngs,
                           embedding_init=nnx.initializers.normal(1.0),
                           embedding_metadata=_names("vocab", "embed"))
    # One table for the whole stack: transformers keeps it in layer 0, T5X beside the layers.
    self.relpos = nnx.Param(
        jax.random.normal(rngs.params(), (cfg.relative_attention_num_buckets, cfg.num_heads))
        * cfg.d_model ** -0.5, out_sharding=(None, "heads"))
    self.layers = nnx.List([T5Layer(cfg, rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

  def position_bias(self, length: int) -> Array:
    """Relative position bias [1, H, L, L] float32 (query rows, key columns)."""
    pos = np.arange(length)
    buckets = relative_position_bucket(
        pos[None, :] - pos[:, None], num_buckets=self.cfg.relative_attention_num_buckets,
        max_distance=self.cfg.relative_attention_max_distance)
    # buckets is a trace-time constant: lengths are static under jit.
    table = self.relpos[...].astype(jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def __call__(self, ids: Array, mask: Array | None = None) -> Array:
    ids = jnp.asarray(ids, jnp.int32)
    b, length = ids.shape
    mask = jnp.ones((b, length), bool) if mask is None else jnp.asarray(mask).astype(bool)
    # Masked keys get the most negative float32 added, as in transformers; a query then
    # gives them exactly zero weight as long as one real key exists.
    mask_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]
    pos_bias = self.position_bias(length)
    x = self.embed(ids)
    for layer in self.layers:
      x = layer(x, pos_bias, mask_bias)
    return self.final_norm(x)


def count_params(cfg: T5Config) -> int:
  """Number of encoder parameters (embedding included), from shapes only."""
  model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
