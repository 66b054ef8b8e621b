"""T5 encoder network: relative position buckets, masking, config parsing, shapes, axis names.

Parity with transformers lives in test_t5_checkpoints.py (it needs the loaders).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imagen_jax.text import t5

TINY = t5.T5_SIZES["tiny"]


def _bucket_reference(rel: int, num_buckets: int, max_distance: int) -> int:
  """The bucket formula of the T5 paper's code, written out per offset in float64."""
  half = num_buckets // 2
  out = half if rel > 0 else 0
  n = abs(rel)
  max_exact = half // 2
  if n < max_exact:
    return out + n
  large = max_exact + int(math.log(n / max_exact) / math.log(max_distance / max_exact)
                          * (half - max_exact))
  return out + min(large, half - 1)


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 64), (64, 256)])
def test_relative_position_bucket_matches_reference(num_buckets, max_distance):
  offsets = np.arange(-3 * max_distance, 3 * max_distance + 1)
  got = t5.relative_position_bucket(offsets, num_buckets=num_buckets, max_distance=max_distance)
  want = [_bucket_reference(int(r), num_buckets, max_distance) for r in offsets]
  np.testing.assert_array_equal(got, want)
  # Every bucket is used but num_buckets // 2 (a key after the query is at distance >= 1).
  assert sorted(set(got.tolist())) == [b for b in range(num_buckets) if b != num_buckets // 2]


def test_position_bias_is_the_table_at_the_buckets():
  model = t5.T5Encoder(TINY, rngs=nnx.Rngs(0))
  bias = np.asarray(model.position_bias(5))  # [1, H, q, k]
  table = np.asarray(model.relpos[...])
  for q, k in [(0, 0), (0, 4), (4, 0), (2, 3)]:
    b = t5.relative_position_bucket(np.array(k - q))
    np.testing.assert_array_equal(bias[0, :, q, k], table[b])


@nnx.jit
def _apply(model, ids, mask):
  return model(ids, mask)


def _ids_mask(lengths, length, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, TINY.vocab_size, size=(len(lengths), length))
  mask = np.arange(length)[None] < np.array(lengths)[:, None]
  return ids, mask


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_real_tokens_ignore_padding(feed_forward):
  cfg = dataclasses.replace(TINY, feed_forward=feed_forward)
  model = t5.T5Encoder(cfg, rngs=nnx.Rngs(1))
  ids, mask = _ids_mask([7, 3], 7)
  short = np.asarray(_apply(model, ids, mask))
  # 13 more positions, masked, holding arbitrary (non-pad) ids.
  long_ids = np.concatenate([ids, np.full((2, 13), 17)], 1)
  long_mask = np.concatenate([mask, np.zeros((2, 13), bool)], 1)
  long = np.asarray(_apply(model, long_ids, long_mask))
  # Masked keys get exactly zero softmax weight; only float summation order may differ.
  np.testing.assert_allclose(long[:, :7][mask], short[mask], atol=1e-5)
  # And the mask matters: unmasking the extra positions changes the real tokens.
  unmasked = np.asarray(_apply(model, long_ids, np.ones_like(long_mask)))
  assert np.abs(unmasked[:, :7][mask] - short[mask]).max() > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_output():
  cfg = dataclasses.replace(TINY, dtype="bfloat16")
  model = t5.T5Encoder(cfg, rngs=nnx.Rngs(0))
  dtypes = {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}
  ids, mask = _ids_mask([5, 2], 6)
  out = _apply(model, ids, mask)
  assert out.dtype == jnp.float32 and out.shape == (2, 6, TINY.d_model)
  # Same weights in float32: bf16 matmuls stay within a few percent of the output scale.
  ref = nnx.merge(nnx.graphdef(t5.T5Encoder(TINY, rngs=nnx.Rngs(0))), nnx.state(model))
  ref_out = np.asarray(_apply(ref, ids, mask))
  assert np.abs(np.asarray(out) - ref_out)[mask].max() < 5e-2 * np.abs(ref_out).max()


def test_jit_matches_eager():
  model = t5.T5Encoder(TINY, rngs=nnx.Rngs(2))
  ids, mask = _ids_mask([4, 6], 6)
  np.testing.assert_allclose(_apply(model, ids, mask), model(ids, mask), atol=1e-5)


def _formula_params(cfg: t5.T5Config) -> int:
  """Encoder parameters counted by hand from the architecture."""
  inner = cfg.num_heads * cfg.d_kv
  attention = 4 * cfg.d_model * inner
  ffn = (3 if cfg.gated else 2) * cfg.d_model * cfg.d_ff
  per_layer = attention + ffn + 2 * cfg.d_model  # two norm scales
  return (cfg.vocab_size * cfg.d_model + cfg.num_layers * per_layer + cfg.d_model
          + cfg.relative_attention_num_buckets * cfg.num_heads)


def test_xxl_builds_shape_only_with_the_published_size():
  cfg = t5.T5_SIZES["xxl"]
  model = nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)
  total = sum(math.prod(p.shape) for p in params)
  assert total == _formula_params(cfg) == t5.count_params(cfg)
  # T5 v1.1 XXL: 4.63B encoder parameters plus a 32128 x 4096 embedding.
  assert total == 4_762_310_656
  assert total - cfg.vocab_size * cfg.d_model == 4_630_714_368


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large", "xl"])
def test_count_params_matches_formula(size):
  assert t5.count_params(t5.T5_SIZES[size]) == _formula_params(t5.T5_SIZES[size])


def test_published_v1_1_sizes():
  got = {k: (c.d_model, c.d_ff, c.num_heads, c.d_kv, c.num_layers, c.vocab_size)
         for k, c in t5.T5_SIZES.items() if k != "tiny"}
  assert got == {"small": (512, 1024, 6, 64, 8, 32128), "base": (768, 2048, 12, 64, 12, 32128),
                 "large": (1024, 2816, 16, 64, 24, 32128), "xl": (2048, 5120, 32, 64, 24, 32128),
                 "xxl": (4096, 10240, 64, 64, 24, 32128)}
  assert all(c.feed_forward == "gated-gelu" for c in t5.T5_SIZES.values())


ALLOWED_AXES = {None, "vocab", "embed", "heads", "mlp"}


@pytest.mark.parametrize("feed_forward", ["gated-gelu", "relu"])
def test_every_param_has_logical_axes(feed_forward):
  cfg = dataclasses.replace(TINY, feed_forward=feed_forward)
  model = nnx.eval_shape(lambda: t5.T5Encoder(cfg, rngs=nnx.Rngs(0)))
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert len(flat) == 3 + cfg.num_layers * (6 + (3 if cfg.gated else 2))
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert isinstance(names, tuple) and len(names) == len(var.shape), (path, names)
    assert set(names) <= ALLOWED_AXES, (path, names)
  by_path = {path: var.get_metadata()["out_sharding"] for path, var in flat}
  assert by_path[("embed", "embedding")] == ("vocab", "embed")
  assert by_path[("layers", 0, "attn", "q", "kernel")] == ("embed", "heads")
  assert by_path[("layers", 0, "attn", "o", "kernel")] == ("heads", "embed")
  assert by_path[("layers", 1, "mlp", "wo", "kernel")] == ("mlp", "embed")
  assert by_path[("relpos",)] == (None, "heads")
  assert by_path[("final_norm", "scale")] == ("embed",)


HF_V1_1 = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "num_heads": 6, "d_ff": 1024,
           "num_layers": 8, "num_decoder_layers": 8, "feed_forward_proj": "gated-gelu",
           "relative_attention_num_buckets": 32, "layer_norm_epsilon": 1e-6, "model_type": "t5"}


def test_config_from_hf():
  cfg = t5.T5Config.from_hf(HF_V1_1)
  assert cfg == dataclasses.replace(t5.T5_SIZES["small"])
  assert cfg.relative_attention_max_distance == 128  # absent from old configs
  assert (cfg.gated, cfg.activation) == (True, "gelu_new")
  v1_0 = t5.T5Config.from_hf({**HF_V1_1, "feed_forward_proj": "relu"}, dtype="bfloat16")
  assert (v1_0.gated, v1_0.activation, v1_0.dtype) == (False, "relu", "bfloat16")
  assert t5.T5Config.from_hf({**HF_V1_1, "feed_forward_proj": "gated-silu"}).activation == "silu"
  # Exporters that write only the derived fields.
  derived = {k: v for k, v in HF_V1_1.items() if k != "feed_forward_proj"}
  assert t5.T5Config.from_hf({**derived, "is_gated_act": True,
                              "dense_act_fn": "gelu_new"}).feed_forward == "gated-gelu"
  assert t5.T5Config.from_hf({**derived, "dense_act_fn": "relu"}).feed_forward == "relu"


@pytest.mark.parametrize("bad,match", [
    ({"feed_forward_proj": "gated-mish"}, "gated-mish"),
    ({"feed_forward_proj": "relu-gelu"}, "relu-gelu"),
    ({"model_type": "umt5"}, "umt5"),
])
def test_config_from_hf_rejects_what_it_cannot_run(bad, match):
  with pytest.raises(ValueError, match=match):
    t5.T5Config.from_hf({**HF_V1_1, **bad})


def test_config_missing_key_and_bad_dtype():
  with pytest.raises(ValueError, match="d_kv"):
    t5.T5Config.from_hf({k: v for k, v in HF_V1_1.items() if k != "d_kv"})
  with pytest.raises(ValueError, match="float16"):
    dataclasses.replace(TINY, dtype="float16")
