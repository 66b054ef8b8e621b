"""T5 loaders against transformers' outputs, and T5X's on-disk layout.

Goldens: tests/fixtures/text/t5_golden.npz, from transformers 5.23 T5EncoderModel in float32
(scripts/make_text_fixtures.py), on tiny random checkpoints whose relative-bias and norm
weights were widened so a wrong bucket or a skipped norm is visible.

Tolerances: float32 parity 1e-5 (abs, plus 1e-5 relative; outputs are O(1)-O(10) after the
final norm, measured error about 4e-6 at 160 tokens, from summation order only).
bfloat16 compute: max error at most 5% of the output's max magnitude (measured about 0.8%;
bf16 keeps 8 bits of mantissa, about 0.4% per rounding).
"""

import json
import os
import shutil

import numpy as np
import pytest
from flax import nnx
from flax import serialization
from safetensors.numpy import load_file, save_file

from imagen_jax.text import t5_checkpoints as tc
from imagen_jax.text.hf_files import CheckpointError

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "text")
GOLDEN = os.path.join(FIXTURES, "t5_golden.npz")


def _fixture(name):
  path = os.path.join(FIXTURES, name)
  if not os.path.isdir(path):
    pytest.fail(f"missing fixture {path}; regenerate with scripts/make_text_fixtures.py")
  return path


def _golden(name, prefix=""):
  g = np.load(GOLDEN)
  return (g[f"{name}/{prefix}input_ids"], g[f"{name}/{prefix}attention_mask"].astype(bool),
          g[f"{name}/{prefix}last_hidden_state"])


@nnx.jit
def _apply(model, ids, mask):
  return model(ids, mask)


def _run(model, ids, mask):
  # One compiled call (cached across models of one config) instead of op-by-op dispatch.
  return np.asarray(_apply(model, ids, mask))


CASES = [("t5_v1_0", "t5_v1_0", ""), ("t5_v1_1", "t5_v1_1", ""),
         ("t5_v1_1", "t5_v1_1", "long_"), ("t5_v1_1_sharded", "t5_v1_1", "")]


@pytest.mark.parametrize("directory,golden,prefix", CASES)
def test_hf_parity_with_transformers(directory, golden, prefix):
  model = tc.load_t5_hf(_fixture(directory))
  ids, mask, want = _golden(golden, prefix)
  got = _run(model, ids, mask)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_config_comes_from_config_json():
  model = tc.load_t5_hf(_fixture("t5_v1_0"))
  assert (model.cfg.feed_forward, model.cfg.d_model, model.cfg.num_layers) == ("relu", 32, 2)
  assert tc.load_t5_hf(_fixture("t5_v1_1")).cfg.feed_forward == "gated-gelu"


def test_sharded_equals_single_file():
  ids, mask, _ = _golden("t5_v1_1", "long_")
  single = _run(tc.load_t5_hf(_fixture("t5_v1_1")), ids, mask)
  sharded = _run(tc.load_t5_hf(_fixture("t5_v1_1_sharded")), ids, mask)
  np.testing.assert_array_equal(sharded, single)


@pytest.mark.parametrize("name", ["t5_v1_0", "t5_v1_1"])
def test_bfloat16_compute_close_to_float32(name):
  ids, mask, _ = _golden(name)
  f32 = _run(tc.load_t5_hf(_fixture(name)), ids, mask)
  bf16_model = tc.load_t5_hf(_fixture(name), dtype="bfloat16")
  assert bf16_model.cfg.dtype == "bfloat16"
  bf16 = _run(bf16_model, ids, mask)
  assert bf16.dtype == np.float32
  err = np.abs(bf16 - f32)[mask].max()
  assert 0 < err <= 5e-2 * np.abs(f32[mask]).max()


def _copy_with(tmp_path, name, tensors):
  """A copy of a fixture dir whose single safetensors file holds `tensors`."""
  out = tmp_path / name
  out.mkdir()
  shutil.copy(os.path.join(_fixture(name), "config.json"), out / "config.json")
  save_file(tensors, str(out / "model.safetensors"))
  return out


def test_full_conditional_generation_checkpoint_loads(tmp_path):
  tensors = load_file(os.path.join(_fixture("t5_v1_1"), "model.safetensors"))
  # What T5ForConditionalGeneration adds: a decoder and an LM head, and (untied v1.1) the
  # encoder's own copy of the embedding.
  full = dict(tensors)
  full["encoder.embed_tokens.weight"] = tensors["shared.weight"]
  full["decoder.block.0.layer.0.SelfAttention.q.weight"] = np.zeros((32, 32), np.float32)
  full["decoder.final_layer_norm.weight"] = np.ones((32,), np.float32)
  full["lm_head.weight"] = np.zeros((300, 32), np.float32)
  ids, mask, want = _golden("t5_v1_1")
  got = _run(tc.load_t5_hf(_copy_with(tmp_path, "t5_v1_1", full)), ids, mask)
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=1e-5)


def test_embedding_under_the_encoder_name_only(tmp_path):
  tensors = load_file(os.path.join(_fixture("t5_v1_0"), "model.safetensors"))
  tensors["encoder.embed_tokens.weight"] = tensors.pop("shared.weight")
  ids, mask, want = _golden("t5_v1_0")
  got = _run(tc.load_t5_hf(_copy_with(tmp_path, "t5_v1_0", tensors)), ids, mask)
  np.testing.assert_allclose(got[mask], want[mask], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dropped", ["encoder.block.1.layer.1.DenseReluDense.wi_1.weight",
                                     "shared.weight"])
def test_truncated_checkpoint_names_the_missing_tensor(tmp_path, dropped):
  tensors = load_file(os.path.join(_fixture("t5_v1_1"), "model.safetensors"))
  del tensors[dropped]
  with pytest.raises(CheckpointError, match="missing") as err:
    tc.load_t5_hf(_copy_with(tmp_path, "t5_v1_1", tensors))
  assert dropped in str(err.value)


def test_misshaped_tensor_is_named(tmp_path):
  tensors = load_file(os.path.join(_fixture("t5_v1_1"), "model.safetensors"))
  name = "encoder.block.0.layer.0.SelfAttention.k.weight"
  tensors[name] = tensors[name][:16]
  with pytest.raises(CheckpointError, match="wrong shape") as err:
    tc.load_t5_hf(_copy_with(tmp_path, "t5_v1_1", tensors))
  assert name in str(err.value) and "(16, 32)" in str(err.value)


def test_relu_config_with_gated_weights_is_rejected(tmp_path):
  # A config.json that does not belong to the weights: the gated tensors are unexpected.
  out = _copy_with(tmp_path, "t5_v1_1",
                   load_file(os.path.join(_fixture("t5_v1_1"), "model.safetensors")))
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "relu"}))
  with pytest.raises(CheckpointError, match="wi_0"):
    tc.load_t5_hf(out)


def test_missing_dir_and_unsupported_activation(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    tc.load_t5_hf(tmp_path / "nope")
  out = tmp_path / "bad"
  shutil.copytree(_fixture("t5_v1_1"), out)
  cfg = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**cfg, "feed_forward_proj": "gated-mish"}))
  with pytest.raises(CheckpointError, match="gated-mish"):
    tc.load_t5_hf(out)


# --------------------------------------------------------------------------------------
# T5X


def write_t5x(hf_dir, out, *, kvstore="file", inline_1d=True):
  """Writes a HF T5 encoder checkpoint in T5X's layout (t5x/checkpoints.py, version 3).

  msgpack `checkpoint` = {"version": 3, "optimizer": {"target": params, "state": {...}}};
  each array a zarr directory named by its dotted path, referenced by a tensorstore spec
  with a relative path; 1-D arrays inline when `inline_1d`. A decoder entry points at a
  zarr array that is never written, so reading it would fail. Returns the zarr paths.
  """
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  hf = load_file(os.path.join(hf_dir, "model.safetensors"))
  cfg = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  enc = {"relpos_bias": {"rel_embedding": hf[
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].T},
         "encoder_norm": {"scale": hf["encoder.final_layer_norm.weight"]}}
  for i in range(cfg["num_layers"]):
    b = f"encoder.block.{i}.layer"
    mlp = {n: {"kernel": hf[f"{b}.1.DenseReluDense.{n}.weight"].T}
           for n in ("wi", "wi_0", "wi_1", "wo") if f"{b}.1.DenseReluDense.{n}.weight" in hf}
    enc[f"layers_{i}"] = {
        "pre_attention_layer_norm": {"scale": hf[f"{b}.0.layer_norm.weight"]},
        "attention": {t: {"kernel": hf[f"{b}.0.SelfAttention.{h}.weight"].T}
                      for h, t in (("q", "query"), ("k", "key"), ("v", "value"), ("o", "out"))},
        "pre_mlp_layer_norm": {"scale": hf[f"{b}.1.layer_norm.weight"]},
        "mlp": mlp}
  target = {"token_embedder": {"embedding": hf["shared.weight"]}, "encoder": enc,
            "decoder": {"decoder_norm": {"scale": np.ones(cfg["d_model"], np.float32)}}}
  os.makedirs(out, exist_ok=True)
  written = {}

  def spec(name, arr):
    rel = name.replace("/", ".")
    kv = {"driver": "file", "path": rel} if kvstore == "file" else \
        {"driver": "gcs", "bucket": "t5x-dummy-bucket", "path": rel}
    meta = {"shape": list(arr.shape), "chunks": list(arr.shape), "compressor": {"id": "gzip"},
            "dtype": "<f4"}
    if not name.startswith("target/decoder"):
      store = ts.open({"driver": "zarr", "kvstore": {"driver": "file",
                                                      "path": os.path.join(out, rel)},
                       "metadata": meta}, create=True).result()
      store.write(np.asarray(arr, np.float32)).result()
      written[name] = os.path.join(out, rel)
    return {"driver": "zarr", "dtype": "float32", "kvstore": kv, "metadata": meta}

  def convert(tree, prefix):
    return {k: convert(v, f"{prefix}/{k}") if isinstance(v, dict) else
            (v if (inline_1d and v.ndim == 1 and "decoder" not in prefix) else
             spec(f"{prefix}/{k}", v)) for k, v in tree.items()}

  contents = {"version": 3, "optimizer": {"target": convert(target, "target"),
                                          "state": {"step": np.array(1000000)}}}
  with open(os.path.join(out, "checkpoint"), "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  return written


@pytest.mark.parametrize("name,kvstore,inline_1d", [
    ("t5_v1_1", "file", True), ("t5_v1_0", "file", False), ("t5_v1_1", "gcs", False)])
def test_t5x_matches_hf(tmp_path, name, kvstore, inline_1d):
  ckpt = tmp_path / "checkpoint_1000000"
  write_t5x(_fixture(name), str(ckpt), kvstore=kvstore, inline_1d=inline_1d)
  ids, mask, _ = _golden(name)
  hf_model = tc.load_t5_hf(_fixture(name))
  # The step dir and its parent model dir (latest checkpoint_<step>) both work.
  for path in (ckpt, tmp_path):
    t5x_model = tc.load_t5x(path)
    assert t5x_model.cfg == hf_model.cfg
    np.testing.assert_allclose(_run(t5x_model, ids, mask), _run(hf_model, ids, mask), atol=1e-6)


def test_t5x_missing_zarr_array_is_named(tmp_path):
  written = write_t5x(_fixture("t5_v1_1"), str(tmp_path))
  name = "target/encoder/layers_1/mlp/wo/kernel"
  shutil.rmtree(written[name])
  with pytest.raises(CheckpointError, match="missing") as err:
    tc.load_t5x(tmp_path)
  assert "encoder/layers_1/mlp/wo/kernel" in str(err.value)


def test_t5x_missing_tensor_in_msgpack_is_named(tmp_path):
  write_t5x(_fixture("t5_v1_1"), str(tmp_path))
  with open(tmp_path / "checkpoint", "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  del contents["optimizer"]["target"]["encoder"]["layers_0"]["attention"]["value"]
  with open(tmp_path / "checkpoint", "wb") as f:
    f.write(serialization.msgpack_serialize(contents))
  with pytest.raises(CheckpointError, match="encoder/layers_0/attention/value/kernel"):
    tc.load_t5x(tmp_path)


def test_t5x_not_a_checkpoint(tmp_path):
  with pytest.raises(CheckpointError, match="does not exist"):
    tc.load_t5x(tmp_path / "nope")
  with pytest.raises(CheckpointError, match="no msgpack file"):
    tc.load_t5x(tmp_path)
  (tmp_path / "checkpoint").write_bytes(b"\x00garbage")
  with pytest.raises(CheckpointError, match="msgpack"):
    tc.load_t5x(tmp_path)


def test_t5x_feed_forward_override(tmp_path):
  write_t5x(_fixture("t5_v1_1"), str(tmp_path))
  assert tc.load_t5x(tmp_path, feed_forward="gated-silu").cfg.activation == "silu"
  with pytest.raises(ValueError, match="gated"):
    tc.load_t5x(tmp_path, feed_forward="relu")
