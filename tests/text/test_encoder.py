"""load_text_encoder: specs, batching, padding invariance, sharding, bf16, errors."""

import os

import jax
import numpy as np
import pytest

from imagen_jax import sharding, text
from imagen_jax.text import encoder, hf_files

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "text")
CAPTIONS = ["a red cat", "grinning face with smiling eyes", "",
            "two dogs playing fetch on the beach at sunset", "x" * 40]


@pytest.fixture(scope="module")
def tiny():
  return text.load_text_encoder("random-t5:tiny", max_len=16, batch_size=4)


def test_encode_shapes_and_zero_padding(tiny):
  emb, mask = tiny.encode(CAPTIONS)
  assert emb.shape == (5, 16, 32) and emb.dtype == np.float32
  assert mask.shape == (5, 16) and mask.dtype == bool
  assert np.all(emb[~mask] == 0.0)
  assert np.all(np.abs(emb[mask]).sum(-1) > 0)
  assert mask[2].sum() == 1  # the empty caption is one EOS token


def test_batching_does_not_change_results(tiny):
  # 5 captions over batches of 4 (the last padded) vs one at a time: same numbers. The
  # remaining difference is XLA's batch-size-dependent fusion, at float32 rounding.
  emb, _ = tiny.encode(CAPTIONS)
  one = np.concatenate([tiny.encode([c])[0] for c in CAPTIONS])
  np.testing.assert_allclose(emb, one, atol=1e-5)


def test_a_short_call_is_padded_to_a_power_of_two_not_the_full_batch():
  # A training batch of 3 captions runs 4 rows, not the encoder's 64: encoding a small
  # batch must not cost a full one. Results equal the full-batch encoding (rows are
  # independent; the tolerance is float32 rounding of differently shaped fusions).
  enc = text.load_text_encoder("random-t5:tiny", max_len=16, batch_size=64)
  assert [enc.padded_rows(n) for n in (1, 3, 8, 9, 64)] == [1, 4, 8, 16, 64]
  shapes = []
  apply = enc._apply  # pylint: disable=protected-access
  enc._apply = lambda state, ids, mask: shapes.append(ids.shape) or apply(state, ids, mask)  # pylint: disable=protected-access
  emb, _ = enc.encode(CAPTIONS[:3])
  assert [s[0] for s in shapes] == [4]
  full = text.load_text_encoder("random-t5:tiny", max_len=16, batch_size=64)
  ref, _ = full.encode(CAPTIONS[:3] + ["padding row"] * 61)
  np.testing.assert_allclose(emb, ref[:3], atol=1e-5)


def test_padding_does_not_change_real_tokens(tiny):
  # Captions that fit in 16 byte tokens, so both encoders see the same real tokens.
  long = text.load_text_encoder("random-t5:tiny", max_len=48, batch_size=4)
  short = ["a red cat", "", "grinning face"]
  a, ma = tiny.encode(short)
  b, mb = long.encode(short)
  np.testing.assert_array_equal(ma, mb[:, :16])
  np.testing.assert_allclose(a[ma], b[:, :16][ma], atol=1e-5)


def test_t5_dir_spec_matches_golden():
  # The tiny v1.1 fixture through the public spec; the tokenizer is irrelevant here, so
  # the golden ids go in through encode_tokens. Tolerance as in test_t5_checkpoints.
  enc = text.load_text_encoder(f"t5:{FIXTURES}/t5_v1_1", max_len=12,
                               tokenizer=os.path.join(FIXTURES, "spiece.model"))
  gold = np.load(os.path.join(FIXTURES, "t5_golden.npz"))
  ids, mask = gold["t5_v1_1/input_ids"], gold["t5_v1_1/attention_mask"].astype(bool)
  emb = enc.encode_tokens(ids, mask)
  np.testing.assert_allclose(emb[mask], gold["t5_v1_1/last_hidden_state"][mask], atol=1e-5)
  assert enc.dim == 32 and enc.describe()["tokenizer"] == "SentencePieceTokenizer"


def test_minilm_loads_offline():
  enc = text.load_text_encoder("minilm", max_len=16, batch_size=2)
  emb, mask = enc.encode(["a cat", "a dog"])
  assert emb.shape == (2, 16, 384) and mask.sum(1).tolist() == [4, 4]


def test_bfloat16_compute_stays_close(tiny):
  bf = text.load_text_encoder("random-t5:tiny", max_len=16, batch_size=4, dtype="bfloat16")
  a, mask = tiny.encode(CAPTIONS)
  b, _ = bf.encode(CAPTIONS)
  assert b.dtype == np.float32
  # bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); two layers of matmuls and
  # softmax compound it to a few percent of the activation scale, no more.
  err = np.abs(a[mask] - b[mask]).max() / np.abs(a[mask]).max()
  assert err < 0.05, err


def test_sharded_encoder_matches_unsharded(tiny):
  # 8 simulated CPU devices (tests/conftest.py sets the XLA flag); data x FSDP x tensor.
  assert jax.device_count() == 8
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  enc = text.load_text_encoder("random-t5:tiny", max_len=16, batch_size=4, mesh=mesh)
  leaves = jax.tree.leaves(enc._state)  # pylint: disable=protected-access
  specs = {tuple(x.sharding.spec) for x in leaves}
  # Attention/MLP kernels split over both weight axes; every weight lives on the mesh.
  assert ("fsdp", "tensor") in specs and ("tensor", "fsdp") in specs, specs
  assert all(x.sharding.mesh.shape == mesh.shape for x in leaves)
  a, _ = tiny.encode(CAPTIONS)
  b, _ = enc.encode(CAPTIONS)
  np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("spec,match", [
    ("minlm", "Did you mean 'minilm'"),
    ("minilm:/x", "takes no argument"),
    ("t5", "needs a directory"),
    ("random-t5:huge", "unknown T5 size"),
    ("t5x:/nonexistent", "tokenizer"),
])
def test_bad_specs_name_the_fix(spec, match):
  with pytest.raises(ValueError, match=match):
    text.load_text_encoder(spec)


def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
  with pytest.raises(hf_files.CheckpointError, match="does not exist"):
    text.load_text_encoder(f"t5:{tmp_path}/nope")


def test_length_buckets_match_the_full_length_computation():
  # encode() runs a batch at the power of two holding its longest caption (16 here); the
  # network run at the full max_len=48 must give the same real-token embeddings.
  enc = text.load_text_encoder("random-t5:tiny", max_len=48, batch_size=4)
  captions = ["a red cat", "", "grinning face"]
  tokens = enc.tokenize(captions)
  assert encoder.bucket_length(tokens.mask, 48) == 16
  full = np.asarray(enc._apply(enc._state, tokens.ids, tokens.mask))  # pylint: disable=protected-access
  emb, mask = enc.encode(captions)
  np.testing.assert_allclose(emb[mask], full[mask], atol=1e-5)
  assert np.all(emb[:, 16:] == 0)


def test_bucket_length():
  mask = np.zeros((2, 64), bool)
  mask[0, :3] = True
  assert encoder.bucket_length(mask, 64) == 8      # at least 8
  mask[1, :9] = True
  assert encoder.bucket_length(mask, 64) == 16
  mask[1, :40] = True
  assert encoder.bucket_length(mask, 48) == 48     # capped at max_len
  assert encoder.bucket_length(np.zeros((1, 32), bool), 32) == 8
