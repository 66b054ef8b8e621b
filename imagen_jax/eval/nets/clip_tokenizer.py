"""CLIP's byte-level BPE tokenizer: captions -> Tokens(ids [B, 77], mask [B, 77]).

Reproduces transformers' CLIPTokenizer (5.x) id for id, through the `tokenizers` library
(already a dependency; its Oniguruma regexes have the \\p{L} / \\p{N} classes that Python's
`re` lacks):

  normalise  Unicode NFC, every run of whitespace -> one space, lowercase
  split      <|startoftext|> | <|endoftext|> | 's 't 're 've 'm 'll 'd | a run of letters
             | one digit | a run of other non-space characters (spaces are dropped)
  bytes      each piece's UTF-8 bytes as GPT-2's printable stand-in characters
  BPE        merges.txt's merges in rank order, `</w>` marking the last symbol of a piece
  specials   <|startoftext|> pieces <|endoftext|>; truncation to max_len keeps both; then
             pad_token (<|endoftext|> unless tokenizer_config.json names another)

CLIP's vocabulary is a function of its merges (256 byte characters, the same with `</w>`,
one entry per merge, then the two specials), so OpenAI's bpe_simple_vocab_16e6.txt.gz alone
defines it too (`from_merges`).

OpenAI's own `clip.tokenize` also runs ftfy.fix_text and html.unescape first (they only
change mojibake and HTML entities such as `&amp;`) and pads with id 0; CLIP pools at the
first end-of-text token behind a causal mask, so padding never changes an embedding.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

from imagen_jax.errors import UserError
from imagen_jax.text.tokenize import Tokens, check_texts, pack

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CONTEXT = 77  # every OpenAI CLIP's text context
END_OF_WORD = "</w>"
# The pre-tokenizer of OpenAI's simple_tokenizer.py (and of transformers' CLIPTokenizer).
SPLIT = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
         r"""|[^\s\p{L}\p{N}]+""")
OPENAI_MERGES = 49152 - 256 - 2  # merges used from bpe_simple_vocab_16e6.txt.gz


class TokenizerFileError(UserError, ValueError):
  """Tokenizer files that are missing or not CLIP's format."""


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the
  other 68 bytes (controls, space, ...) for chr(256 + k), so BPE never sees whitespace.
  The order (printable bytes first) is the order of CLIP's vocabulary."""
  keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
  table = {b: chr(b) for b in keep}
  for k, b in enumerate(b for b in range(256) if b not in table):
    table[b] = chr(256 + k)
  return table


def vocab_from_merges(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """CLIP's vocabulary as OpenAI builds it from the merges."""
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + END_OF_WORD for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
  return {t: i for i, t in enumerate(tokens)}


def read_merges(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
  """Merges of a merges.txt (HF) or bpe_simple_vocab_16e6.txt.gz (OpenAI): one `a b` pair
  a line after a `#version` header; `limit` keeps the first ones (OpenAI uses 48894)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TokenizerFileError(f"CLIP merges file {path!r} does not exist; pass merges.txt from "
                             "a Hugging Face CLIP directory or OpenAI's "
                             "bpe_simple_vocab_16e6.txt.gz.")
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt", encoding="utf-8") as f:
    lines = f.read().split("\n")
  if lines and "#version" in lines[0]:
    lines = lines[1:]
  merges = []
  for i, line in enumerate(lines[:limit] if limit else lines):
    if not line:
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise TokenizerFileError(f"{path} line {i + 2} is {line!r}, not a merge `a b`; it is "
                               "not a CLIP/GPT-2 merges file.")
    merges.append((parts[0], parts[1]))
  return merges


def _special(config_dir: str, key: str, default: str) -> str:
  """A special token named by tokenizer_config.json or special_tokens_map.json."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    file = os.path.join(config_dir, name)
    if os.path.isfile(file):
      with open(file, encoding="utf-8") as f:
        value = json.load(f).get(key)
      if isinstance(value, dict):
        value = value.get("content")
      if isinstance(value, str):
        return value
  return default


class CLIPTokenizer:
  """`tokenizer(texts, max_len=77) -> Tokens`, equal to transformers' CLIPTokenizer with
  padding="max_length", truncation=True (mask: 1 on BOS, pieces and EOS)."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
               pad_token: str = EOS, source: str = "CLIP tokenizer"):
    # pylint: disable=g-import-not-at-top
    import tokenizers
    from tokenizers import normalizers, pre_tokenizers, processors
    # pylint: enable=g-import-not-at-top
    for token in (BOS, EOS, pad_token):
      if token not in vocab:
        raise TokenizerFileError(f"{source} has no {token!r} in its vocabulary; it is not a "
                                 "CLIP tokenizer (or names a pad_token it lacks).")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(
        vocab=dict(vocab), merges=list(merges), continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD, fuse_unk=False, unk_token=EOS))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(), normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
        normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        # invert=True: the regex matches are the pieces; what lies between them is dropped.
        pre_tokenizers.Split(tokenizers.Regex(SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    # As in transformers, the specials typed in a caption become their ids, not text.
    tok.add_special_tokens(sorted({BOS, EOS, pad_token}))
    self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, self.bos_id), (EOS, self.eos_id)])
    self.tok, self.vocab_size, self.source = tok, len(vocab), source

  @classmethod
  def from_files(cls, vocab_file: str | os.PathLike, merges_file: str | os.PathLike, *,
                 pad_token: str = EOS) -> "CLIPTokenizer":
    """From vocab.json + merges.txt (Hugging Face's CLIP files)."""
    vocab_file = os.fspath(vocab_file)
    if not os.path.isfile(vocab_file):
      raise TokenizerFileError(f"CLIP vocabulary {vocab_file!r} does not exist; pass vocab.json "
                               "from a Hugging Face CLIP directory.")
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    return cls(vocab, read_merges(merges_file), pad_token=pad_token, source=vocab_file)

  @classmethod
  def from_merges(cls, merges_file: str | os.PathLike, *, limit: int | None = None,
                  pad_token: str = EOS) -> "CLIPTokenizer":
    """From merges alone, the vocabulary built as OpenAI does; OpenAI's .gz file holds more
    merges than CLIP uses, so for it `limit` defaults to the 48894 that CLIP uses."""
    merges_file = os.fspath(merges_file)
    if limit is None and merges_file.endswith(".gz"):
      limit = OPENAI_MERGES
    merges = read_merges(merges_file, limit)
    return cls(vocab_from_merges(merges), merges, pad_token=pad_token, source=merges_file)

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> "CLIPTokenizer":
    """From a Hugging Face CLIP directory: vocab.json + merges.txt, and the pad token named
    by tokenizer_config.json / special_tokens_map.json (default <|endoftext|>)."""
    path = os.fspath(path)
    vocab, merges = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
      found = sorted(os.listdir(path))[:12] if os.path.isdir(path) else "no such directory"
      raise TokenizerFileError(
          f"No CLIP tokenizer in {path!r} (found: {found}): it needs vocab.json and "
          "merges.txt. Download them with the model, e.g. from openai/clip-vit-large-patch14.")
    return cls.from_files(vocab, merges, pad_token=_special(path, "pad_token", EOS))

  def __call__(self, texts: Sequence[str], max_len: int = CONTEXT) -> Tokens:
    if int(max_len) < 2:
      raise ValueError(f"max_len={max_len} leaves no room for text; CLIP uses {CONTEXT}.")
    self.tok.enable_truncation(max_length=int(max_len))
    try:
      encs = self.tok.encode_batch(check_texts(texts))
    finally:
      self.tok.no_truncation()
    return pack([e.ids for e in encs], int(max_len), self.pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one row of ids, specials and padding dropped (lowercased, spaces normalised)."""
    text = self.tok.decode([int(i) for i in ids], skip_special_tokens=True)
    return text.replace(END_OF_WORD, " ").strip()
