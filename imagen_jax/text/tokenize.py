"""Tokenizers for the frozen text encoders: captions -> fixed-length ids + padding mask.

All three share one call, `tokenizer(texts, max_len) -> Tokens(ids [B, max_len] int32,
mask [B, max_len] bool)`, so an encoder never needs to know which kind it was given:

  SentencePieceTokenizer  T5's `spiece.model` (user supplied). Like T5 / transformers'
                          T5Tokenizer: pieces, truncated to max_len - 1, then EOS, then PAD.
  HuggingFaceTokenizer    a Hugging Face `tokenizer.json` read by the `tokenizers` library
                          with its own special tokens (BERT / MiniLM: [CLS] pieces [SEP],
                          then [PAD]; a T5 tokenizer.json: pieces, </s>, then <pad>).
  ByteTokenizer           ByT5-style UTF-8 bytes (id = byte + 3); needs no file, so the
                          randomly initialised T5 used by tests and smoke runs has one.

Imagen used T5 with 128 tokens; the mask is what lets the U-Net's cross-attention ignore
padding, so every tokenizer returns it rather than leaving callers to compare with pad ids.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Protocol, Sequence

import numpy as np


class Tokens(NamedTuple):
  ids: np.ndarray   # [B, L] int32
  mask: np.ndarray  # [B, L] bool, True on real tokens (EOS / [CLS] / [SEP] included)


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int

  def __call__(self, texts: Sequence[str], max_len: int) -> Tokens: ...


def check_texts(texts: Sequence[str]) -> list[str]:
  """A list of caption strings (TypeError naming the bad one); every tokenizer's input
  check, the CLIP tokenizer's included."""
  if isinstance(texts, str):
    raise TypeError("Tokenizers take a list of captions, not one string; wrap it: [text].")
  texts = list(texts)
  for i, t in enumerate(texts):
    if not isinstance(t, str):
      raise TypeError(f"Caption {i} is {type(t).__name__}, not str: {t!r}.")
  return texts


def _check_max_len(max_len: int, minimum: int) -> None:
  if int(max_len) < minimum:
    raise ValueError(f"max_len={max_len} leaves no room for text; use at least {minimum} "
                     "(Imagen used 128 T5 tokens).")


def pack(rows: list[list[int]], max_len: int, pad_id: int) -> Tokens:
  """Token id rows -> Tokens [N, max_len] (ids padded with pad_id, mask True on tokens)."""
  ids = np.full((len(rows), max_len), pad_id, np.int32)
  mask = np.zeros((len(rows), max_len), bool)
  for i, row in enumerate(rows):
    ids[i, :len(row)] = row
    mask[i, :len(row)] = True
  return Tokens(ids, mask)


def _require_file(path: str | os.PathLike, what: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} not found at {path!r}; pass the path of an existing file.")
  return path


class SentencePieceTokenizer:
  """T5's tokenizer: a sentencepiece model, EOS appended, padded with id 0.

  `extra_ids` (100 for every published T5) are sentinel ids appended after the
  sentencepiece vocabulary; they only matter for the vocabulary size.
  """

  def __init__(self, model_file: str | os.PathLike, extra_ids: int = 100):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.path = _require_file(model_file, "SentencePiece model (T5's spiece.model)")
    self.sp = spm.SentencePieceProcessor(model_file=self.path)
    self.eos_id = int(self.sp.eos_id())
    self.pad_id = int(self.sp.pad_id())
    if self.eos_id < 0 or self.pad_id < 0:
      raise ValueError(
          f"{self.path} defines no EOS or PAD piece (eos_id={self.eos_id}, pad_id="
          f"{self.pad_id}); T5 models need both (train with pad_id=0 eos_id=1 unk_id=2).")
    self.vocab_size = int(self.sp.get_piece_size()) + extra_ids

  def __call__(self, texts: Sequence[str], max_len: int) -> Tokens:
    _check_max_len(max_len, 2)
    rows = self.sp.encode(check_texts(texts))
    rows = [r[:max_len - 1] + [self.eos_id] for r in rows]
    return pack(rows, max_len, self.pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one row of ids; PAD, EOS and sentinel ids are dropped."""
    n = self.sp.get_piece_size()
    return self.sp.decode([int(i) for i in ids if int(i) not in (self.pad_id, self.eos_id)
                           and int(i) < n])


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json`; its post-processor adds the special tokens, and
  truncation keeps them (BERT: [CLS] ... [SEP]; T5: ... </s>)."""

  def __init__(self, tokenizer_json: str | os.PathLike):
    import tokenizers  # pylint: disable=g-import-not-at-top
    self.path = _require_file(tokenizer_json, "tokenizer.json")
    self.tok = tokenizers.Tokenizer.from_file(self.path)
    # The file may carry its own padding/truncation settings; ours are set per call.
    self.tok.no_padding()
    self.tok.no_truncation()
    pads = [self.tok.token_to_id(p) for p in ("[PAD]", "<pad>")]
    self.pad_id = next((int(p) for p in pads if p is not None), 0)
    self.vocab_size = int(self.tok.get_vocab_size())

  def __call__(self, texts: Sequence[str], max_len: int) -> Tokens:
    _check_max_len(max_len, 3)
    self.tok.enable_truncation(max_length=max_len)
    try:
      encs = self.tok.encode_batch(check_texts(texts))
    finally:
      self.tok.no_truncation()
    return pack([e.ids for e in encs], max_len, self.pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


class ByteTokenizer:
  """ByT5's scheme: id = UTF-8 byte + 3 (0 PAD, 1 EOS, 2 UNK); EOS appended."""

  pad_id = 0
  eos_id = 1
  offset = 3
  vocab_size = 256 + 3

  def __call__(self, texts: Sequence[str], max_len: int) -> Tokens:
    _check_max_len(max_len, 2)
    rows = [[b + self.offset for b in t.encode("utf-8")][:max_len - 1] + [self.eos_id]
            for t in check_texts(texts)]
    return pack(rows, max_len, self.pad_id)

  def decode(self, ids: Sequence[int]) -> str:
    data = bytes(int(i) - self.offset for i in ids if int(i) >= self.offset)
    return data.decode("utf-8", errors="replace")
