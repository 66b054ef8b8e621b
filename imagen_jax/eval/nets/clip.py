"""CLIP (ViT image tower + causal text tower) in Flax NNX, with Hugging Face and OpenAI loaders.

CLIP score (imagen_jax.eval.clip_score) needs CLIP's two encoders and nothing else; we write
them ourselves because transformers 5 dropped its Flax CLIP and torch stays out of the
runtime. `CLIPModel.encode_image` / `encode_text` equal transformers' `CLIPModel.
get_image_features` / `get_text_features` in eval mode: projected, not normalised.

  image  NHWC pixels -> conv patches (no bias) -> [CLS] + patches + position embedding
         -> pre-LN ("pre_layrnorm") -> pre-LN transformer layers -> LN of the CLS token
         -> visual projection (no bias)
  text   token + position embedding -> causal pre-LN layers -> final LN -> the state at the
         end-of-text token -> text projection (no bias)

Which position is "end of text" follows transformers exactly. A config with eos_token_id
== 2 (the value OpenAI's published HF configs carry; transformers keeps their old behaviour
for it) pools at argmax(ids), OpenAI's own rule, which finds <|endoftext|> because it is
the largest id of CLIP's vocabulary. Any other eos_token_id pools at the first position
holding that id (position 0 if none does).

Loaders: `load_clip_hf(dir)` reads a Hugging Face CLIPModel directory (config.json +
model.safetensors, sharded or not); `load_clip_openai(file)` reads OpenAI's original .pt
files (TorchScript, fp16) through imagen_jax.eval.nets.torch_files, without torch. Both report
every missing, unexpected or misshaped tensor by name (hf_files.check_tensors).

Parameters are float32 with logical axis names (as in imagen_jax.models.layers); `dtype`
is the compute dtype of the matmuls, with LayerNorm, softmax and the residual stream kept
in float32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imagen_jax.sharding import logical as _names
from imagen_jax.text import hf_files

Array = jax.Array

nnx.use_eager_sharding(False)  # logical names are metadata until the trainer shards

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    # OpenAI trained CLIP with x * sigmoid(1.702 x); later CLIPs (LAION) use exact GELU.
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}

LEGACY_EOS_TOKEN_ID = 2  # transformers: this value means "pool at argmax(ids)"


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The ViT image tower (names follow Hugging Face's CLIPVisionConfig where they differ)."""
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The causal text tower; `max_len` is max_position_embeddings (77 for every OpenAI CLIP)."""
  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_dim: int = 2048
  max_len: int = 77
  eos_token_id: int = LEGACY_EOS_TOKEN_ID
  layer_norm_eps: float = 1e-5
  hidden_act: str = "quick_gelu"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Both towers, the shared embedding size and the compute dtype."""
  vision: CLIPVisionConfig = CLIPVisionConfig()
  text: CLIPTextConfig = CLIPTextConfig()
  projection_dim: int = 512
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"

  def __post_init__(self):
    for name, tower in (("vision", self.vision), ("text", self.text)):
      if tower.width % tower.heads:
        raise ValueError(f"{name} width={tower.width} is not divisible by heads={tower.heads}.")
      if tower.hidden_act not in _ACTIVATIONS:
        raise ValueError(f"{name} hidden_act={tower.hidden_act!r} is not supported; use one "
                         f"of {sorted(_ACTIVATIONS)}.")
    if self.vision.image_size % self.vision.patch_size:
      raise ValueError(f"image_size={self.vision.image_size} is not a multiple of "
                       f"patch_size={self.vision.patch_size}.")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"dtype={self.dtype!r}; use 'float32' or 'bfloat16'.")

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> "CLIPConfig":
    """From a Hugging Face CLIPModel `config.json` dict; `overrides` set fields such as dtype.

    Missing keys take transformers' CLIPTextConfig / CLIPVisionConfig defaults, and the old
    `text_config_dict` / `vision_config_dict` keys win over `text_config` / `vision_config`
    as they do in transformers.
    """
    if hf.get("model_type", "clip") != "clip":
      raise ValueError(f"config.json has model_type={hf.get('model_type')!r}, not 'clip'; "
                       "pass the directory of a CLIPModel checkpoint (e.g. "
                       "openai/clip-vit-large-patch14).")
    t = {**(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
    v = {**(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
    eos = t.get("eos_token_id", 49407)  # CLIPTextConfig's default
    if isinstance(eos, (list, tuple)):
      eos = eos[0]
    text = CLIPTextConfig(
        vocab_size=t.get("vocab_size", 49408), width=t.get("hidden_size", 512),
        layers=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
        mlp_dim=t.get("intermediate_size", 2048), max_len=t.get("max_position_embeddings", 77),
        eos_token_id=int(eos), layer_norm_eps=t.get("layer_norm_eps", 1e-5),
        hidden_act=t.get("hidden_act", "quick_gelu"))
    vision = CLIPVisionConfig(
        image_size=_square(v.get("image_size", 224), "image_size"),
        patch_size=_square(v.get("patch_size", 32), "patch_size"),
        width=v.get("hidden_size", 768), layers=v.get("num_hidden_layers", 12),
        heads=v.get("num_attention_heads", 12), mlp_dim=v.get("intermediate_size", 3072),
        layer_norm_eps=v.get("layer_norm_eps", 1e-5), hidden_act=v.get("hidden_act", "quick_gelu"))
    kw = dict(vision=vision, text=text, projection_dim=hf.get("projection_dim", 512))
    kw.update(overrides)
    return cls(**kw)


def _square(value: Any, name: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"Non-square {name}={value} is not supported.")
    value = value[0]
  return int(value)


def _size(image: int, patch: int, v_width: int, v_layers: int, t_width: int,
          embed: int) -> CLIPConfig:
  # OpenAI's convention: 64-wide heads, MLP 4x the width, 12 text layers.
  return CLIPConfig(
      vision=CLIPVisionConfig(image_size=image, patch_size=patch, width=v_width,
                              layers=v_layers, heads=v_width // 64, mlp_dim=4 * v_width),
      text=CLIPTextConfig(width=t_width, heads=t_width // 64, mlp_dim=4 * t_width),
      projection_dim=embed)


# OpenAI's ViT CLIPs, as in their HF configs (openai/clip-vit-base-patch32, ...-base-patch16,
# ...-large-patch14). Parameter counts (HF CLIPModel): 151,277,313 / 149,620,737 / 427,616,513.
CLIP_SIZES: dict[str, CLIPConfig] = {
    "ViT-B/32": _size(224, 32, 768, 12, 512, 512),
    "ViT-B/16": _size(224, 16, 768, 12, 512, 512),
    "ViT-L/14": _size(224, 14, 1024, 24, 768, 768),
}


def _shape(cfg: CLIPConfig) -> tuple:
  v, t = cfg.vision, cfg.text
  return (v.image_size, v.patch_size, v.width, v.layers, t.width, t.layers, cfg.projection_dim)


def size_name(cfg: CLIPConfig) -> str | None:
  """The OpenAI model ("ViT-L/14", ...) whose shapes `cfg` has, or None for another CLIP."""
  return next((name for name, ref in CLIP_SIZES.items() if _shape(ref) == _shape(cfg)), None)


def describe(cfg: CLIPConfig) -> str:
  """A CLIP's name for tables: its OpenAI model name, or its shapes when it is none of them."""
  v = cfg.vision
  return size_name(cfg) or (f"custom ViT (patch {v.patch_size}, width {v.width}, "
                            f"{v.layers} layers, {v.image_size} px)")


def _dense(cin: int, cout: int, names: tuple[str, str], rngs: nnx.Rngs, dtype,
           use_bias: bool = True) -> nnx.Linear:
  return nnx.Linear(cin, cout, dtype=dtype, use_bias=use_bias, rngs=rngs,
                    kernel_init=nnx.initializers.normal(0.02),
                    kernel_metadata=_names(*names), bias_metadata=_names(names[1]))


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # float32 and torch's two-pass variance (see imagen_jax.text.bert).
  return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, use_fast_variance=False,
                       rngs=rngs, scale_metadata=_names("embed"), bias_metadata=_names("embed"))


def _param(shape: tuple[int, ...], names: tuple, rngs: nnx.Rngs, std: float = 0.02) -> nnx.Param:
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, jnp.float32),
                   out_sharding=names)


class EncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x += attn(LN(x)); x += mlp(LN(x))."""

  def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, act: str, dtype,
               *, rngs: nnx.Rngs):
    self.norm1 = _layer_norm(width, eps, rngs)
    self.q = _dense(width, width, ("embed", "heads"), rngs, dtype)
    self.k = _dense(width, width, ("embed", "heads"), rngs, dtype)
    self.v = _dense(width, width, ("embed", "heads"), rngs, dtype)
    self.out = _dense(width, width, ("heads", "embed"), rngs, dtype)
    self.norm2 = _layer_norm(width, eps, rngs)
    self.fc1 = _dense(width, mlp_dim, ("embed", "mlp"), rngs, dtype)
    self.fc2 = _dense(mlp_dim, width, ("mlp", "embed"), rngs, dtype)
    self.heads, self.act, self.dtype = heads, _ACTIVATIONS[act], dtype

  def __call__(self, x: Array, bias: Array | None) -> Array:
    """x [B, L, D] float32; bias None or additive [B or 1, 1, L, L] (0 or very negative)."""
    b, l, d = x.shape
    h = self.norm1(x).astype(self.dtype)
    split = lambda t: t.reshape(b, l, self.heads, d // self.heads)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
    logits = logits / math.sqrt(d // self.heads)
    if bias is not None:
      logits = logits + bias
    probs = jax.nn.softmax(logits, axis=-1)
    att = jnp.einsum("bhts,bshd->bthd", probs.astype(self.dtype), v).reshape(b, l, d)
    x = x + self.out(att).astype(jnp.float32)
    y = self.fc2(self.act(self.fc1(self.norm2(x).astype(self.dtype))))
    return x + y.astype(jnp.float32)


def _layers(width: int, heads: int, mlp_dim: int, n: int, eps: float, act: str, dtype,
            rngs: nnx.Rngs) -> nnx.List:
  return nnx.List([EncoderLayer(width, heads, mlp_dim, eps, act, dtype, rngs=rngs)
                   for _ in range(n)])


class VisionTower(nnx.Module):
  """Pixels [N, H, W, 3] (normalised as CLIP's processor does) -> pooled CLS state [N, width]."""

  def __init__(self, cfg: CLIPVisionConfig, dtype, *, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    p, w = cfg.patch_size, cfg.width
    self.patch_embed = nnx.Conv(3, w, (p, p), strides=p, padding="VALID", use_bias=False,
                                dtype=dtype, rngs=rngs,
                                kernel_init=nnx.initializers.normal(0.02),
                                kernel_metadata=_names(None, None, "conv_in", "conv_out"))
    self.class_embedding = _param((w,), ("embed",), rngs)
    self.position_embedding = _param((cfg.grid ** 2 + 1, w), (None, "embed"), rngs)
    self.pre_norm = _layer_norm(w, cfg.layer_norm_eps, rngs)
    self.layers = _layers(w, cfg.heads, cfg.mlp_dim, cfg.layers, cfg.layer_norm_eps,
                          cfg.hidden_act, dtype, rngs)
    self.post_norm = _layer_norm(w, cfg.layer_norm_eps, rngs)

  def __call__(self, pixels: Array) -> Array:
    n, h, w, c = pixels.shape
    size = self.cfg.image_size
    if (h, w, c) != (size, size, 3):  # static shape: fine under jit
      raise ValueError(f"CLIP takes {size}x{size}x3 images, got {h}x{w}x{c}; resize and crop "
                       "them with imagen_jax.eval.clip_score.preprocess.")
    x = self.patch_embed(pixels.astype(self.dtype)).astype(jnp.float32)
    x = x.reshape(n, -1, self.cfg.width)  # row-major patches, as torch's flatten(2)
    cls = jnp.broadcast_to(self.class_embedding.get_value(), (n, 1, self.cfg.width))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding.get_value()[None]
    x = self.pre_norm(x)
    for layer in self.layers:
      x = layer(x, None)
    return self.post_norm(x[:, 0])


def eos_positions(ids: Array, eos_token_id: int) -> Array:
  """Where transformers' CLIPTextModel pools each row of ids [B, L] (see module docstring)."""
  ids = jnp.asarray(ids, jnp.int32)
  if eos_token_id == LEGACY_EOS_TOKEN_ID:
    return jnp.argmax(ids, axis=-1)
  return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class TextTower(nnx.Module):
  """ids [B, L] int, mask [B, L] bool -> state at the end-of-text token [B, width]."""

  def __init__(self, cfg: CLIPTextConfig, dtype, *, rngs: nnx.Rngs):
    self.cfg, self.dtype = cfg, dtype
    self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.width, dtype=jnp.float32, rngs=rngs,
                                     embedding_init=nnx.initializers.normal(0.02),
                                     embedding_metadata=_names("vocab", "embed"))
    self.position_embedding = _param((cfg.max_len, cfg.width), (None, "embed"), rngs, 0.01)
    self.layers = _layers(cfg.width, cfg.heads, cfg.mlp_dim, cfg.layers, cfg.layer_norm_eps,
                          cfg.hidden_act, dtype, rngs)
    self.final_norm = _layer_norm(cfg.width, cfg.layer_norm_eps, rngs)

  def __call__(self, ids: Array, mask: Array | None = None) -> Array:
    b, l = ids.shape
    if l > self.cfg.max_len:  # static shape: fine under jit
      raise ValueError(f"{l} tokens exceed CLIP's context of {self.cfg.max_len}; tokenize "
                       f"with max_len={self.cfg.max_len} (CLIPTokenizer truncates).")
    ids = jnp.asarray(ids, jnp.int32)
    x = self.token_embedding(ids) + self.position_embedding.get_value()[None, :l]
    # Causal, and (as transformers combines them) blind to padded keys. With padding at
    # the end, the end-of-text state never sees padding anyway. -1e9 rather than -inf
    # keeps an all-padding row finite.
    allowed = jnp.tril(jnp.ones((l, l), bool))[None, None]
    if mask is not None:
      allowed = allowed & jnp.asarray(mask, bool)[:, None, None, :]
    bias = jnp.where(allowed, 0.0, -1e9).astype(jnp.float32)
    for layer in self.layers:
      x = layer(x, bias)
    x = self.final_norm(x)
    pos = eos_positions(ids, self.cfg.eos_token_id)
    return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


class CLIPModel(nnx.Module):
  """CLIP's image and text encoders with their projections and learned temperature."""

  def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dt = jnp.dtype(cfg.dtype)
    self.vision = VisionTower(cfg.vision, dt, rngs=rngs)
    self.text = TextTower(cfg.text, dt, rngs=rngs)
    self.visual_projection = _dense(cfg.vision.width, cfg.projection_dim, ("embed", "proj"),
                                    rngs, dt, use_bias=False)
    self.text_projection = _dense(cfg.text.width, cfg.projection_dim, ("embed", "proj"),
                                  rngs, dt, use_bias=False)
    # log of 1/0.07, CLIP's initial temperature; trained checkpoints reach log(100).
    self.logit_scale = nnx.Param(jnp.asarray(math.log(1 / 0.07), jnp.float32),
                                 out_sharding=())

  def encode_image(self, pixel_values: Array) -> Array:
    """Normalised pixels [N, S, S, 3] float -> image embeddings [N, projection_dim] float32
    (unnormalised, like transformers' get_image_features)."""
    pooled = self.vision(pixel_values)
    return self.visual_projection(pooled.astype(self.vision.dtype)).astype(jnp.float32)

  def encode_text(self, ids: Array, mask: Array | None = None) -> Array:
    """ids [N, L] (L <= 77) and mask [N, L] bool -> text embeddings [N, projection_dim]
    float32 (unnormalised, like transformers' get_text_features)."""
    pooled = self.text(ids, mask)
    return self.text_projection(pooled.astype(self.text.dtype)).astype(jnp.float32)

  def logits(self, image_embeds: Array, text_embeds: Array) -> Array:
    """exp(logit_scale) * cosine similarity [N_images, N_texts] (logits_per_image)."""
    unit = lambda e: e / jnp.linalg.norm(e, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale.get_value()) * unit(image_embeds) @ unit(text_embeds).T


def count_params(cfg: CLIPConfig) -> int:
  """Number of parameters, from shapes only (HF CLIPModel's count, logit_scale included)."""
  model = nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
  return sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------- loading

_T = lambda t: t.T  # torch Linear [out, in] -> nnx kernel [in, out]
_CONV = lambda t: t.transpose(2, 3, 1, 0)  # torch [out, in, kh, kw] -> nnx [kh, kw, in, out]


def _hf_params(cfg: CLIPConfig) -> dict[str, tuple[tuple, Callable | None]]:
  """HF tensor name -> (attribute path in CLIPModel, transform) for every parameter."""
  out: dict[str, tuple[tuple, Callable | None]] = {
      "vision_model.embeddings.class_embedding": (("vision", "class_embedding"), None),
      "vision_model.embeddings.patch_embedding.weight": (("vision", "patch_embed", "kernel"),
                                                         _CONV),
      "vision_model.embeddings.position_embedding.weight": (("vision", "position_embedding"),
                                                            None),
      "text_model.embeddings.token_embedding.weight": (("text", "token_embedding", "embedding"),
                                                       None),
      "text_model.embeddings.position_embedding.weight": (("text", "position_embedding"), None),
      "visual_projection.weight": (("visual_projection", "kernel"), _T),
      "text_projection.weight": (("text_projection", "kernel"), _T),
      "logit_scale": (("logit_scale",), None),
  }
  norms = {"vision_model.pre_layrnorm": ("vision", "pre_norm"),
           "vision_model.post_layernorm": ("vision", "post_norm"),
           "text_model.final_layer_norm": ("text", "final_norm")}
  layer_linears = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v",
                   "self_attn.out_proj": "out", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
  layer_norms = {"layer_norm1": "norm1", "layer_norm2": "norm2"}
  for tower, hf_tower, n in (("vision", "vision_model", cfg.vision.layers),
                             ("text", "text_model", cfg.text.layers)):
    for i in range(n):
      pre, path = f"{hf_tower}.encoder.layers.{i}.", (tower, "layers", i)
      for hf, ours in layer_linears.items():
        out[pre + hf + ".weight"] = (path + (ours, "kernel"), _T)
        out[pre + hf + ".bias"] = (path + (ours, "bias"), None)
      for hf, ours in layer_norms.items():
        norms[pre + hf] = path + (ours,)
  for hf, path in norms.items():
    out[hf + ".weight"] = (path + ("scale",), None)
    out[hf + ".bias"] = (path + ("bias",), None)
  return out


def _variable(model: nnx.Module, path: tuple) -> nnx.Variable:
  node = model
  for p in path:
    node = node[p] if isinstance(p, int) else getattr(node, p)
  return node


def _fill(cfg: CLIPConfig, tensors: Mapping[str, np.ndarray], source: str) -> CLIPModel:
  """A CLIPModel of `cfg` with every parameter taken from HF-named `tensors`."""
  names = _hf_params(cfg)
  model = nnx.eval_shape(lambda: CLIPModel(cfg, rngs=nnx.Rngs(0)))
  transposed = {None: lambda s: s, _T: lambda s: s[::-1],
                _CONV: lambda s: (s[3], s[2], s[0], s[1])}
  expected = {name: tuple(transposed[f](tuple(_variable(model, p).get_value().shape)))
              for name, (p, f) in names.items()}
  hf_files.check_tensors(expected, tensors, source,
                         ignore=("text_model.embeddings.position_ids",
                                 "vision_model.embeddings.position_ids"))
  for name, (p, f) in names.items():
    t = np.asarray(tensors[name], np.float32)
    _variable(model, p).set_value(jnp.asarray(f(t) if f else t))
  return model


def load_clip_hf(path: str | os.PathLike, *, dtype: str = "float32") -> CLIPModel:
  """A CLIPModel with the weights of a Hugging Face CLIP directory (config.json +
  model.safetensors, or sharded), e.g. openai/clip-vit-large-patch14. Its config is
  `model.cfg`. A missing, extra or misshaped tensor raises hf_files.CheckpointError naming it.
  """
  path = os.fspath(path)
  hf = hf_files.read_config(path)
  try:
    cfg = CLIPConfig.from_hf(hf, dtype=dtype)
  except ValueError as e:
    raise hf_files.CheckpointError(f"{path}/config.json: {e}") from e
  return _fill(cfg, hf_files.read_safetensors(path), path)


# OpenAI's original checkpoints (clip.load's ViT-B-32.pt, ...): TorchScript archives, fp16.
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_OPENAI_RENAMES = {  # OpenAI name -> HF name, outside the residual blocks
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_OPENAI_BLOCK = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1",
                 "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openai_to_hf(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Rename an OpenAI CLIP state dict to transformers' names: the fused attention in_proj
  split into q/k/v, the `x @ proj` matrices transposed into Linear weights. Unknown names
  pass through (so check_tensors reports them); OpenAI's bookkeeping entries are dropped."""
  out: dict[str, np.ndarray] = {}
  for name, t in tensors.items():
    if name in _OPENAI_EXTRAS or name.endswith(".attn_mask"):
      continue
    if name in ("visual.proj", "text_projection"):
      hf = "visual_projection.weight" if name == "visual.proj" else "text_projection.weight"
      out[hf] = np.ascontiguousarray(np.asarray(t).T)
      continue
    m = re.fullmatch(r"(visual\.)?transformer\.resblocks\.(\d+)\.(.+)", name)
    if not m:
      out[_OPENAI_RENAMES.get(name, name)] = t
      continue
    pre = f"{'vision_model' if m.group(1) else 'text_model'}.encoder.layers.{m.group(2)}."
    rest = m.group(3)
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
      kind = rest.rsplit("_", 1)[1]
      # nn.MultiheadAttention stacks q, k, v along the output axis.
      for part, proj in zip(np.split(np.asarray(t), 3, axis=0), "qkv"):
        out[f"{pre}self_attn.{proj}_proj.{kind}"] = part
      continue
    module, _, kind = rest.rpartition(".")
    out[f"{pre}{_OPENAI_BLOCK.get(module, module)}.{kind}"] = t
  return out


def _count_layers(tensors: Mapping[str, np.ndarray], prefix: str) -> int:
  found = {int(m.group(1)) for n in tensors
           if (m := re.match(re.escape(prefix) + r"(\d+)\.", n))}
  return max(found) + 1 if found else 0


def config_from_openai(tensors: Mapping[str, np.ndarray], source: str = "checkpoint",
                       *, dtype: str = "float32", head_dim: int = 64) -> CLIPConfig:
  """CLIPConfig of an OpenAI state dict, from tensor shapes as OpenAI's build_model does.
  Head counts are not in the shapes: OpenAI's ViT CLIPs all use `head_dim` 64 in both
  towers. Pooling follows OpenAI's argmax(ids) rule."""
  if any(n.startswith("visual.layer1.") for n in tensors):
    raise hf_files.CheckpointError(
        f"{source} is a ResNet CLIP (RN50, RN101, ...); only ViT CLIPs are supported. Use "
        "ViT-B-32.pt, ViT-B-16.pt or ViT-L-14.pt, or a Hugging Face CLIP directory.")
  need = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
          "token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
  missing = [n for n in need if n not in tensors]
  if missing:
    raise hf_files.CheckpointError(
        f"{source} lacks {missing}; it is not an OpenAI CLIP checkpoint (clip.load's .pt "
        "files). Pass one of those, or a Hugging Face CLIP directory.")
  conv = tensors["visual.conv1.weight"].shape  # [width, 3, patch, patch]
  grid = round((tensors["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  v_width, t_width = conv[0], tensors["ln_final.weight"].shape[0]
  mlp = lambda pre, width: tensors.get(f"{pre}resblocks.0.mlp.c_fc.weight",
                                       np.zeros((4 * width, 0))).shape[0]
  vision = CLIPVisionConfig(image_size=conv[-1] * grid, patch_size=conv[-1], width=v_width,
                            layers=_count_layers(tensors, "visual.transformer.resblocks."),
                            heads=max(1, v_width // head_dim),
                            mlp_dim=mlp("visual.transformer.", v_width))
  text = CLIPTextConfig(vocab_size=tensors["token_embedding.weight"].shape[0], width=t_width,
                        layers=_count_layers(tensors, "transformer.resblocks."),
                        heads=max(1, t_width // head_dim), mlp_dim=mlp("transformer.", t_width),
                        max_len=tensors["positional_embedding"].shape[0],
                        eos_token_id=LEGACY_EOS_TOKEN_ID)
  return CLIPConfig(vision=vision, text=text,
                    projection_dim=tensors["text_projection"].shape[1], dtype=dtype)


def load_clip_openai(path: str | os.PathLike, *, dtype: str = "float32",
                     head_dim: int = 64) -> CLIPModel:
  """A CLIPModel from one of OpenAI's original checkpoint files (`clip.load`'s ViT-B-32.pt,
  ViT-B-16.pt, ViT-L-14.pt: TorchScript, fp16 weights) or a torch.save of such a state
  dict, read without torch (imagen_jax.eval.nets.torch_files). Weights are cast to float32."""
  from imagen_jax.eval.nets import torch_files  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  tensors = torch_files.read_torch_archive(path)
  # A {"state_dict": ...} wrapper or a DataParallel module flattens with a prefix.
  for prefix in ("state_dict.", "model.", "module."):
    if tensors and all(n.startswith(prefix) for n in tensors):
      tensors = {n[len(prefix):]: t for n, t in tensors.items()}
  cfg = config_from_openai(tensors, path, dtype=dtype, head_dim=head_dim)
  return _fill(cfg, openai_to_hf(tensors), path)
