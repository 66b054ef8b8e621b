"""Tokenizers: T5 sentencepiece parity with transformers, round trips, padding, errors."""

import os

import numpy as np
import pytest

from imagen_jax.text import tokenize

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "text")

CAPTIONS = [f"{a} {n} {v} {p}"
            for a in ("a tiny", "the bright", "an orange", "one sleepy", "a striped")
            for n in ("fox", "kettle", "lighthouse", "violin", "cactus", "penguin")
            for v in ("waits", "dances", "glows", "hides")
            for p in ("near the river", "inside a box", "at midnight", "on the hill",
                      "beside a lamp")]  # 600 captions


@pytest.fixture(scope="module")
def trained_spiece(tmp_path_factory):
  """A sentencepiece model trained here on a few hundred captions, with T5's special ids."""
  import sentencepiece as spm
  prefix = str(tmp_path_factory.mktemp("sp") / "spiece")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CAPTIONS), model_prefix=prefix, vocab_size=48,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1,
      character_coverage=1.0, minloglevel=2)
  return prefix + ".model"


def test_spiece_matches_transformers_t5_tokenizer():
  # Golden ids from transformers' T5Tokenizer (scripts/make_text_fixtures.py): exact match.
  gold = np.load(os.path.join(FIXTURES, "t5_tokenizer_golden.npz"))
  tok = tokenize.SentencePieceTokenizer(os.path.join(FIXTURES, "spiece.model"))
  out = tok([str(t) for t in gold["texts"]], 16)
  np.testing.assert_array_equal(out.ids, gold["input_ids"])
  np.testing.assert_array_equal(out.mask, gold["attention_mask"].astype(bool))
  assert tok.vocab_size == 40 + 100  # sentencepiece pieces + T5's 100 sentinel ids


def test_spiece_round_trips_trained_model(trained_spiece):
  tok = tokenize.SentencePieceTokenizer(trained_spiece)
  texts = CAPTIONS[::37]
  out = tok(texts, 64)
  assert out.ids.dtype == np.int32 and out.mask.dtype == bool
  for row, mask, text in zip(out.ids, out.mask, texts):
    n = int(mask.sum())
    assert row[n - 1] == tok.eos_id and np.all(row[n:] == tok.pad_id)
    assert tok.decode(row) == text


def test_spiece_truncates_but_keeps_eos(trained_spiece):
  tok = tokenize.SentencePieceTokenizer(trained_spiece)
  out = tok([" ".join(CAPTIONS[:5])], 8)
  assert out.mask.all() and out.ids[0, -1] == tok.eos_id
  full = tok([" ".join(CAPTIONS[:5])], 256)
  np.testing.assert_array_equal(out.ids[0, :7], full.ids[0, :7])


def test_hf_tokenizer_json_pads_and_truncates():
  from imagen_jax.text import bert
  tok = tokenize.HuggingFaceTokenizer(bert.minilm_dir() / "tokenizer.json")
  out = tok(["a cat", "word " * 100], 16)
  cls, sep = 101, 102  # BERT uncased vocabulary
  assert out.ids[0, 0] == cls and out.ids[0, int(out.mask[0].sum()) - 1] == sep
  assert out.mask[1].all() and out.ids[1, -1] == sep
  assert tok.decode(out.ids[0]) == "a cat"


def test_bytes_round_trip_unicode():
  tok = tokenize.ByteTokenizer()
  texts = ["grinning face 😀", "", "naïve café"]
  out = tok(texts, 32)
  assert [tok.decode(r) for r in out.ids] == texts
  assert out.mask.sum(1).tolist() == [len(t.encode()) + 1 for t in texts]
  assert out.ids.max() < tok.vocab_size


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="spiece.model"):
    tokenize.SentencePieceTokenizer(tmp_path / "missing.model")
  with pytest.raises(TypeError, match="list of captions"):
    tokenize.ByteTokenizer()("one string", 8)
  with pytest.raises(ValueError, match="max_len"):
    tokenize.ByteTokenizer()(["x"], 1)
