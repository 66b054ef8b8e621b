"""CLIP model and tokenizer: parity with transformers, pooling rules, loaders and their errors.

Golden files under tests/fixtures/eval/ were made by scripts/make_clip_fixtures.py with
transformers' CLIPModel / CLIPTokenizer (versions in clip_versions.json) on a tiny random
CLIP and a BPE vocabulary learned there in CLIP's file format. Measured on the 2-core CPU:
float32 max abs error 7e-7 on image and text embeddings (values reach |2.6|), 1e-6 on the
pooled outputs, 2e-5 on logits_per_image (which reach |54|: 100 x cosine).
"""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from flax import nnx
from safetensors.numpy import load_file, save_file

from imagen_jax.errors import UserError
from imagen_jax.eval.nets import clip
from imagen_jax.eval.nets.clip_tokenizer import (BOS, EOS, CLIPTokenizer, TokenizerFileError,
                                            bytes_to_unicode, read_merges, vocab_from_merges)
from imagen_jax.text.hf_files import CheckpointError

FIX = "tests/fixtures/eval"
TINY = f"{FIX}/clip_tiny"
OPENAI_PT = f"{FIX}/clip_tiny_openai.pt"


@pytest.fixture(scope="module")
def golden():
  with np.load(f"{FIX}/clip_golden.npz") as g:
    return {k: g[k] for k in g.files}


@pytest.fixture(scope="module")
def model():
  return clip.load_clip_hf(TINY)


@pytest.fixture(scope="module")
def tok():
  return CLIPTokenizer.from_dir(TINY)


@nnx.jit
def _forward(m, pixels, ids, mask):
  """Everything the parity tests compare, in one compiled call (compiles dominate)."""
  img, txt = m.encode_image(pixels), m.encode_text(ids, mask)
  return {"image_embeds": img, "text_embeds": txt, "image_pooled": m.vision(pixels),
          "text_pooled": m.text(ids, mask), "logits_per_image": m.logits(img, txt),
          "text_32": m.encode_text(ids[:, :32], mask[:, :32])}


@nnx.jit
def _text(m, ids, mask):
  return m.encode_text(ids, mask)


@nnx.jit
def _embeds(m, pixels, ids, mask):
  return {"image_embeds": m.encode_image(pixels), "text_embeds": m.encode_text(ids, mask)}


def _outputs(m, g):
  out = _forward(m, g["pixel_values"], g["ids_77"], g["mask_77"].astype(bool))
  return {k: np.asarray(v) for k, v in out.items()}


# ---------------------------------------------------------------------------- tokenizer

def test_tokenizer_matches_transformers(tok, golden):
  captions = list(golden["captions"])
  for n in (77, 16):  # 16: the long caption and the CJK one are truncated, EOS kept
    out = tok(captions, n)
    np.testing.assert_array_equal(out.ids, golden[f"ids_{n}"])
    np.testing.assert_array_equal(out.mask, golden[f"mask_{n}"].astype(bool))
  assert out.ids.dtype == np.int32 and out.mask.dtype == bool
  vocab = json.load(open(f"{TINY}/vocab.json", encoding="utf-8"))
  assert tok.vocab_size == len(vocab) == 669
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (vocab[BOS], vocab[EOS], vocab[EOS])
  # Every truncated row still ends in EOS; an empty caption is BOS EOS.
  short = tok(captions, 16)
  assert (short.ids[short.mask.sum(1) == 16, -1] == tok.eos_id).all()
  assert tok([""], 5).ids.tolist() == [[tok.bos_id, tok.eos_id] + [tok.pad_id] * 3]
  assert tok.decode(tok(["A Red   PANDA, eating!"], 77).ids[0]) == "a red panda , eating !"


def test_vocabulary_is_a_function_of_the_merges(tok, golden):
  # CLIP's vocab.json is 256 byte characters, the same with </w>, one entry per merge, then
  # <|startoftext|> <|endoftext|>; from merges alone (OpenAI's .gz case) it is rebuilt.
  vocab = json.load(open(f"{TINY}/vocab.json", encoding="utf-8"))
  assert vocab_from_merges(read_merges(f"{TINY}/merges.txt")) == vocab
  from_merges = CLIPTokenizer.from_merges(f"{TINY}/merges.txt")
  np.testing.assert_array_equal(from_merges(list(golden["captions"]), 77).ids, golden["ids_77"])
  table = bytes_to_unicode()
  assert set(table.values()) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  assert list(table.values())[:3] == ["!", '"', "#"] and table[ord(" ")] == "Ġ"


def test_pad_token_from_tokenizer_config(tmp_path, golden):
  # LAION / Stable Diffusion 2 CLIPs pad with "!" (id 0). Like transformers, a "!" typed in
  # a caption then also becomes that special token (the golden ids were made that way).
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(f"{TINY}/{name}", tmp_path / name)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "!"}}))
  tok = CLIPTokenizer.from_dir(tmp_path)
  assert tok.pad_id == 0
  out = tok(list(golden["captions"]), 77)
  np.testing.assert_array_equal(out.ids, golden["ids_pad_bang"])
  np.testing.assert_array_equal(out.mask, golden["mask_pad_bang"].astype(bool))
  np.testing.assert_array_equal(out.mask, golden["mask_77"].astype(bool))


def test_tokenizer_errors(tmp_path, tok):
  with pytest.raises(TokenizerFileError, match="vocab.json and merges.txt") as e:
    CLIPTokenizer.from_dir(tmp_path)
  assert isinstance(e.value, UserError)
  (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
  with pytest.raises(TokenizerFileError, match=r"line 2 is 'a b c'"):
    read_merges(tmp_path / "merges.txt")
  with pytest.raises(TokenizerFileError, match="<|startoftext|>"):
    CLIPTokenizer({"a": 0, EOS: 1}, [])
  with pytest.raises(TypeError, match="list of captions"):
    tok("a cat", 77)
  with pytest.raises(ValueError, match="max_len=1"):
    tok(["a cat"], 1)


# ---------------------------------------------------------------------------- model

def test_float32_matches_transformers(model, golden):
  out = _outputs(model, golden)
  assert out["image_embeds"].shape == (4, 16) and out["text_embeds"].shape == (10, 16)
  assert out["image_embeds"].dtype == np.float32
  # Measured 7e-7 (pooled: 1e-6); 1e-5 leaves room for other CPUs' summation order while
  # any real mistake (tanh GELU, a missing LayerNorm, HF's conv layout unflipped) is > 1e-2.
  for key in ("image_embeds", "text_embeds", "image_pooled", "text_pooled"):
    np.testing.assert_allclose(out[key], golden[key], rtol=0, atol=1e-5, err_msg=key)
  # 100 x cosine, values up to |54|: measured 2e-5.
  np.testing.assert_allclose(out["logits_per_image"], golden["logits_per_image"], rtol=0,
                             atol=2e-4)
  # Padding after EOS never reaches it (causal): the first 32 positions give the same
  # embeddings for every caption that fits in them.
  fits = golden["mask_77"].sum(1) <= 32
  assert fits.sum() >= 5
  np.testing.assert_allclose(out["text_32"][fits], out["text_embeds"][fits], rtol=0, atol=1e-5)


def test_pooling_rules_follow_transformers(model, golden):
  ids, mask = golden["raw_ids"], golden["raw_mask"].astype(bool)
  eos = model.cfg.text.eos_token_id
  # Row 0: EOS at 7; row 1: no EOS nor BOS (eos-id rule -> 0, argmax -> its largest id at
  # 5); row 2: EOS at 4 and 9 (the first wins); row 3: EOS at 6, then id-0 padding.
  assert np.asarray(clip.eos_positions(ids, eos)).tolist() == [7, 0, 4, 6]
  assert np.asarray(clip.eos_positions(ids, 2)).tolist() == [7, 5, 4, 6]
  np.testing.assert_allclose(np.asarray(_text(model, ids, mask)),
                             golden["raw_text_embeds"], rtol=0, atol=1e-5)
  cfg = dataclasses.replace(model.cfg, text=dataclasses.replace(model.cfg.text, eos_token_id=2))
  legacy = nnx.eval_shape(lambda: clip.CLIPModel(cfg, rngs=nnx.Rngs(0)))  # eager init: slow
  nnx.update(legacy, nnx.state(model))
  np.testing.assert_allclose(np.asarray(_text(legacy, ids, mask)),
                             golden["raw_text_embeds_legacy"], rtol=0, atol=1e-5)


def test_bfloat16_close_to_transformers(golden):
  model = clip.load_clip_hf(TINY, dtype="bfloat16")
  assert model.vision.layers[0].q.kernel.get_value().dtype == jnp.float32  # params stay f32
  out = _embeds(model, golden["pixel_values"], golden["ids_77"], golden["mask_77"].astype(bool))
  out = {k: np.asarray(v) for k, v in out.items()}
  cos = lambda a, b: (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  # bf16 matmuls with f32 LayerNorm/softmax/residual: measured min cosine 0.9999.
  for key in ("image_embeds", "text_embeds"):
    assert out[key].dtype == np.float32
    assert cos(out[key], golden[key]).min() > 0.999, key


def test_parameters_are_named_and_filled(model):
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(model)))
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var.get_value().ndim, path
  assert model.text.token_embedding.embedding.get_metadata()["out_sharding"] == ("vocab", "embed")
  np.testing.assert_allclose(float(model.logit_scale.get_value()), np.log(100.0), rtol=1e-6)


def test_input_shape_errors(model):
  with pytest.raises(ValueError, match="32x32x3 images, got 24x32x3"):
    model.encode_image(np.zeros((1, 24, 32, 3), np.float32))
  with pytest.raises(ValueError, match="78 tokens exceed CLIP's context of 77"):
    model.encode_text(np.zeros((1, 78), np.int32), np.ones((1, 78), bool))


def test_named_sizes_have_hf_parameter_counts():
  # HF CLIPModel(config) parameter counts (transformers 5.23, checked in the fixture venv);
  # shapes only, nothing is allocated.
  assert clip.count_params(clip.CLIP_SIZES["ViT-B/32"]) == 151_277_313
  assert clip.count_params(clip.CLIP_SIZES["ViT-L/14"]) == 427_616_513
  b16, l14 = clip.CLIP_SIZES["ViT-B/16"], clip.CLIP_SIZES["ViT-L/14"]
  assert (b16.vision.patch_size, b16.vision.grid, b16.projection_dim) == (16, 14, 512)
  assert (l14.vision.width, l14.vision.heads, l14.text.width, l14.text.heads) == (1024, 16,
                                                                                   768, 12)


def test_config_from_hf():
  # The layout of openai/clip-vit-large-patch14's config.json (abridged): the legacy
  # eos_token_id 2, and the old *_config_dict keys that win over *_config.
  hf = {"model_type": "clip", "projection_dim": 768,
        "text_config": {"hidden_size": 512, "eos_token_id": 2},
        "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072,
                             "num_attention_heads": 12, "eos_token_id": 2},
        "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 24, "num_attention_heads": 16,
                               "patch_size": 14}}
  assert clip.CLIPConfig.from_hf(hf) == clip.CLIP_SIZES["ViT-L/14"]
  assert clip.CLIPConfig.from_hf({}).text.eos_token_id == 49407  # CLIPTextConfig default
  with pytest.raises(ValueError, match="model_type='siglip'"):
    clip.CLIPConfig.from_hf({"model_type": "siglip"})
  with pytest.raises(ValueError, match="Non-square"):
    clip.CLIPConfig.from_hf({"vision_config": {"image_size": [224, 160]}})
  with pytest.raises(ValueError, match="hidden_act"):
    clip.CLIPConfig.from_hf({"text_config": {"hidden_act": "swish"}})


# ---------------------------------------------------------------------------- loaders

@pytest.fixture(scope="module")
def tensors():
  return load_file(f"{TINY}/model.safetensors")


def _write(path, tensors):
  path.mkdir(parents=True, exist_ok=True)
  shutil.copy(f"{TINY}/config.json", path / "config.json")
  save_file(tensors, str(path / "model.safetensors"))
  return path


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path, tensors):
  t = dict(tensors)
  gone = "vision_model.encoder.layers.1.self_attn.k_proj.bias"
  del t[gone]
  with pytest.raises(CheckpointError, match=r"1 missing: " + gone.replace(".", r"\.")):
    clip.load_clip_hf(_write(tmp_path / "missing", t))

  t = dict(tensors)
  t["text_model.encoder.layers.0.mlp.fc1.weight"] = np.zeros((64, 31), np.float32)
  t["text_model.encoder.layers.7.mlp.fc1.bias"] = np.zeros(64, np.float32)
  t["text_model.embeddings.position_ids"] = np.arange(77)[None]  # old checkpoints: ignored
  with pytest.raises(CheckpointError) as e:
    clip.load_clip_hf(_write(tmp_path / "bad", t))
  msg = str(e.value)
  assert "text_model.encoder.layers.0.mlp.fc1.weight: file (64, 31), model (64, 32)" in msg
  assert "unexpected: text_model.encoder.layers.7.mlp.fc1.bias" in msg
  assert "position_ids" not in msg and isinstance(e.value, UserError)

  with pytest.raises(CheckpointError, match="no config.json"):
    clip.load_clip_hf(tmp_path)


def test_sharded_checkpoint_loads(tmp_path, tensors, model):
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for file, part in shards.items():
    save_file({n: tensors[n] for n in part}, str(tmp_path / file))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {n: f for f, part in shards.items() for n in part}}))
  shutil.copy(f"{TINY}/config.json", tmp_path / "config.json")
  sharded = clip.load_clip_hf(tmp_path)
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)),
                            nnx.to_flat_state(nnx.state(sharded))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))


def test_openai_checkpoint_matches_hf(model, tensors):
  # The fixture is the HF weights renamed to OpenAI's layout (fused in_proj, x @ proj
  # matrices, fp16 where OpenAI's files are), written by torch.save.
  oa = clip.load_clip_openai(OPENAI_PT, head_dim=8)  # the tiny model's heads are 8 wide
  assert oa.cfg.text.eos_token_id == 2  # OpenAI pools at argmax(ids)
  assert dataclasses.replace(oa.cfg, text=model.cfg.text) == model.cfg
  half = {"patch_embed", "q", "k", "v", "out", "fc1", "fc2", "visual_projection",
          "text_projection"}
  ours, theirs = nnx.to_flat_state(nnx.state(model)), dict(nnx.to_flat_state(nnx.state(oa)))
  for path, var in ours:
    want = np.asarray(var.get_value())
    if half & set(map(str, path)):
      want = want.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(theirs[path].get_value(), want, err_msg=str(path))


def _openai_shapes():
  """Zero arrays with the names and shapes of OpenAI's ViT-B/32 (only those the config
  reads), to check the shape inference without a real file."""
  z = lambda *s: np.zeros(s, np.float16)
  return {"visual.conv1.weight": z(768, 3, 32, 32), "visual.positional_embedding": z(50, 768),
          "visual.proj": z(768, 512), "token_embedding.weight": z(49408, 512),
          "positional_embedding": z(77, 512), "ln_final.weight": z(512),
          "text_projection": z(512, 512),
          **{f"visual.transformer.resblocks.{i}.mlp.c_fc.weight": z(3072, 768) for i in range(12)},
          **{f"transformer.resblocks.{i}.mlp.c_fc.weight": z(2048, 512) for i in range(12)}}


def test_openai_config_inference_and_errors():
  # OpenAI's convention without head_dim: 64-wide heads, so ViT-B/32 comes out exactly.
  cfg = clip.config_from_openai(_openai_shapes())
  assert dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, eos_token_id=2)) == \
      clip.CLIP_SIZES["ViT-B/32"]
  with pytest.raises(CheckpointError, match="ResNet CLIP"):
    clip.config_from_openai({"visual.layer1.0.conv1.weight": np.zeros(1)})
  with pytest.raises(CheckpointError, match="not an OpenAI CLIP checkpoint"):
    clip.config_from_openai({"visual.conv1.weight": np.zeros((8, 3, 4, 4))})
  renamed = clip.openai_to_hf({"transformer.resblocks.3.attn.in_proj_bias": np.arange(6.0),
                               "visual.transformer.resblocks.0.ln_2.weight": np.ones(2),
                               "transformer.resblocks.0.attn_mask": np.zeros((2, 2)),
                               "context_length": np.array(77), "mystery.weight": np.ones(1)})
  assert sorted(renamed) == ["mystery.weight",
                             "text_model.encoder.layers.3.self_attn.k_proj.bias",
                             "text_model.encoder.layers.3.self_attn.q_proj.bias",
                             "text_model.encoder.layers.3.self_attn.v_proj.bias",
                             "vision_model.encoder.layers.0.layer_norm2.weight"]
  assert renamed["text_model.encoder.layers.3.self_attn.k_proj.bias"].tolist() == [2.0, 3.0]
