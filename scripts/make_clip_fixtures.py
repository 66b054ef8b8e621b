r"""Golden fixtures for CLIP (imagen_jax.eval.nets.clip*), made with transformers' PyTorch CLIP.

Never run by CI; its outputs are committed under tests/fixtures/eval/. It needs PyTorch,
transformers, Pillow and torchmetrics, which are not dependencies of imagen_jax, so run it
from a separate venv:

  python3 -m venv /tmp/fixvenv
  /tmp/fixvenv/bin/pip install torch==2.13.0     # the CPU wheel; never torchvision
  /tmp/fixvenv/bin/pip install transformers safetensors tokenizers pillow torchmetrics
  /tmp/fixvenv/bin/python scripts/make_clip_fixtures.py --out tests/fixtures/eval

No CLIP weights or vocabulary can be downloaded here, so everything is tiny and random but
in the exact formats of the real files:

  clip_tiny/                  a random transformers CLIPModel (vision: 32px, patch 8, width
                              32, 2 layers, 4 heads; text: width 32, 2 layers, 4 heads, 77
                              positions; projection 16; quick_gelu) saved by save_pretrained
                              (config.json + model.safetensors), plus vocab.json/merges.txt
                              of a byte-level BPE learned here on fixed captions (CLIP's
                              layout: 256 bytes, 256 bytes + </w>, one entry per merge,
                              <|startoftext|>, <|endoftext|>), tokenizer_config.json and
                              preprocessor_config.json
  clip_tiny_openai.pt         the same weights under OpenAI's names (visual.conv1.weight,
                              ...resblocks.N.attn.in_proj_weight, visual.proj, ...), fp16
                              where OpenAI's checkpoints are, written by torch.save
  clip_golden.npz             CLIPTokenizer ids/masks (max_length 77 and 16, and with pad
                              token "!"), CLIPImageProcessor
                              (PIL backend) pixel values of uint8 images of odd sizes,
                              get_image_features / get_text_features, pooled outputs,
                              logits_per_image, text features of hand-made ids under both
                              pooling rules, and torchmetrics' clip_score on 4 pairs
The versions used are recorded in clip_versions.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"

# Captions the BPE is learned from (so common words become single tokens).
TRAIN = [f"{adj} {noun} {verb} {place}"
         for adj in ("a red", "the small", "one happy", "an old", "a blue", "some green")
         for noun in ("cat", "dog", "robot", "flower", "house", "panda", "astronaut")
         for verb in ("sits", "runs", "sleeps", "is eating bamboo")
         for place in ("in the garden", "on a table", "under the moon", "in the snow")]
TRAIN += ["a photograph of an astronaut riding a horse", "grinning face with smiling eyes",
          "it's a photo, isn't it? we'll see what they've done", "café crème brûlée",
          "numbers 0 1 2 3 4 5 6 7 8 9"]

# Tokenizer cases: punctuation, case, whitespace runs, contractions, digits, accents (NFC
# composed and decomposed), emoji, CJK, specials typed in text, empty, and truncation.
CAPTIONS = [
    "a photograph of an astronaut riding a horse",
    "A Red   PANDA,\teating bamboo... in the SNOW!!",
    "grinning face with smiling eyes 😀",
    "Café crème brûlée, naïve Ünïcödé — cafe\u0301",
    "it's 2024: don't stop (we'll see) #tags @user 3.14159 and 1,000,000",
    "",
    "   leading and trailing spaces \n\r\n line\u00a0breaks   ",
    "日本語のテキスト and 中文",
    "an old robot <|endoftext|> sleeps <|startoftext|>",
    "a very long caption " + "with many repeated words " * 20,
]
SCORE_CAPTIONS = ["a red cat sits in the garden", "the small dog runs on a table",
                  "one happy robot sleeps under the moon", "an old panda in the snow"]
IMAGE_SHAPES = [(20, 27, 3), (75, 50, 3), (32, 32, 3), (45, 100, 3)]  # up, down, same, wide

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu")
TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                   num_hidden_layers=2, num_attention_heads=4, hidden_act="quick_gelu")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte table in CLIP's vocabulary order (printable bytes first)."""
  keep = (list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256)))
  table = {b: chr(b) for b in keep}
  extra = [b for b in range(256) if b not in table]
  table.update({b: chr(256 + k) for k, b in enumerate(extra)})
  return table


def learn_bpe(captions: list[str], num_merges: int) -> list[tuple[str, str]]:
  """Greedy BPE over CLIP's pieces: merge the most frequent adjacent pair (ties by the
  pair's text), `</w>` on each piece's last symbol, as OpenAI's vocabulary was made."""
  from tokenizers import Regex, normalizers, pre_tokenizers  # pylint: disable=g-import-not-at-top
  norm = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                               normalizers.Lowercase()])
  split = pre_tokenizers.Split(Regex(
      r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
      r"""|[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True)
  table = bytes_to_unicode()
  words = collections.Counter()
  for c in captions:
    for piece, _ in split.pre_tokenize_str(norm.normalize_str(c)):
      chars = [table[b] for b in piece.encode("utf-8")]
      words[tuple(chars[:-1] + [chars[-1] + "</w>"])] += 1
  merges = []
  for _ in range(num_merges):
    pairs = collections.Counter()
    for w, n in words.items():
      for a, b in zip(w, w[1:]):
        pairs[(a, b)] += n
    if not pairs:
      break
    (a, b), _ = max(pairs.items(),
                    key=lambda kv: (kv[1], [-ord(ch) for ch in kv[0][0] + kv[0][1]]))
    merges.append((a, b))
    merged = collections.Counter()
    for w, n in words.items():
      out, i = [], 0
      while i < len(w):
        if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
          out.append(a + b)
          i += 2
        else:
          out.append(w[i])
          i += 1
      merged[tuple(out)] += n
    words = merged
  return merges


def write_tokenizer(path: str) -> dict[str, int]:
  merges = learn_bpe(TRAIN, 300)
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
  assert len(set(tokens)) == len(tokens), "a merge result repeats a byte token"
  vocab = {t: i for i, t in enumerate(tokens)}
  with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
  # As openai/clip-vit-*'s tokenizer_config.json: pad with <|endoftext|>, 77 tokens.
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "bos_token": BOS, "eos_token": EOS,
               "unk_token": EOS, "pad_token": EOS, "model_max_length": 77,
               "do_lower_case": True}, f, indent=2)
  print(f"tokenizer: {len(merges)} merges, vocab {len(vocab)}")
  return vocab


def to_openai(sd: dict, cfg) -> dict:
  """HF CLIPModel state dict -> OpenAI clip.model.CLIP names, fp16 where OpenAI's
  convert_weights leaves fp16 (conv, linear, attention and projection weights)."""
  import torch  # pylint: disable=g-import-not-at-top
  half = lambda t: t.detach().clone().half()
  full = lambda t: t.detach().clone().float()
  vis = "vision_model.embeddings."
  out = {"visual.class_embedding": full(sd[vis + "class_embedding"]),
         "visual.positional_embedding": full(sd[vis + "position_embedding.weight"]),
         "visual.conv1.weight": half(sd[vis + "patch_embedding.weight"]),
         "visual.proj": half(sd["visual_projection.weight"].T),
         "token_embedding.weight": full(sd["text_model.embeddings.token_embedding.weight"]),
         "positional_embedding": full(sd["text_model.embeddings.position_embedding.weight"]),
         "text_projection": half(sd["text_projection.weight"].T),
         "logit_scale": full(sd["logit_scale"]),
         # OpenAI's JIT checkpoints carry these three; loaders drop them.
         "input_resolution": torch.tensor(cfg.vision_config.image_size),
         "context_length": torch.tensor(cfg.text_config.max_position_embeddings),
         "vocab_size": torch.tensor(cfg.text_config.vocab_size)}
  for hf, oa in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                 ("vision_model.post_layernorm", "visual.ln_post"),
                 ("text_model.final_layer_norm", "ln_final")):
    for k in ("weight", "bias"):
      out[f"{oa}.{k}"] = full(sd[f"{hf}.{k}"])
  towers = (("vision_model", "visual.transformer", cfg.vision_config.num_hidden_layers),
            ("text_model", "transformer", cfg.text_config.num_hidden_layers))
  for hf_tower, oa_tower, n in towers:
    for i in range(n):
      h, o = f"{hf_tower}.encoder.layers.{i}.", f"{oa_tower}.resblocks.{i}."
      for k in ("weight", "bias"):
        out[o + f"attn.in_proj_{k}"] = half(torch.cat(
            [sd[h + f"self_attn.{p}_proj.{k}"] for p in "qkv"], 0))
        out[o + f"attn.out_proj.{k}"] = half(sd[h + f"self_attn.out_proj.{k}"])
        out[o + f"mlp.c_fc.{k}"] = half(sd[h + f"mlp.fc1.{k}"])
        out[o + f"mlp.c_proj.{k}"] = half(sd[h + f"mlp.fc2.{k}"])
        out[o + f"ln_1.{k}"] = full(sd[h + f"layer_norm1.{k}"])
        out[o + f"ln_2.{k}"] = full(sd[h + f"layer_norm2.{k}"])
  return out


def images() -> list[np.ndarray]:
  """Smooth gradients plus noise: bicubic overshoot and the crop offsets both show."""
  rng = np.random.default_rng(0)
  out = []
  for h, w, c in IMAGE_SHAPES:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin(xx / 3.0 + yy / 5.0)], -1)
    out.append(np.clip(base + rng.normal(0, 30, (h, w, c)), 0, 255).astype(np.uint8))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures/eval")
  args = parser.parse_args()
  import PIL  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchmetrics  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from torchmetrics.functional.multimodal import clip_score  # pylint: disable=g-import-not-at-top
  from transformers import (  # pylint: disable=g-import-not-at-top
      CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer)

  torch.set_num_threads(1)  # deterministic reductions
  torch.manual_seed(0)
  tiny = os.path.join(args.out, "clip_tiny")
  shutil.rmtree(tiny, ignore_errors=True)
  os.makedirs(tiny)
  vocab = write_tokenizer(tiny)
  tok = CLIPTokenizer.from_pretrained(tiny)
  assert tok.pad_token_id == vocab[EOS] and tok.eos_token_id == vocab[EOS]

  cfg = CLIPConfig(text_config=dict(TINY_TEXT, vocab_size=len(vocab), bos_token_id=vocab[BOS],
                                    eos_token_id=vocab[EOS], pad_token_id=vocab[EOS]),
                   vision_config=TINY_VISION, projection_dim=16)
  model = CLIPModel(cfg).eval()
  with torch.no_grad():
    # Random init leaves LayerNorms at (1, 0) and tiny embeddings; widen them so a missing
    # norm, a swapped scale/bias or a wrong position shows in the outputs.
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
      elif "embedding" in name:
        p.copy_(torch.randn_like(p) * 0.5)
    model.logit_scale.fill_(float(np.log(100.0)))  # trained CLIPs reach the clamp, 100
  model.save_pretrained(tiny, safe_serialization=True)
  proc_img = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
  proc_img.save_pretrained(tiny)
  torch.save(to_openai(model.state_dict(), cfg), os.path.join(args.out, "clip_tiny_openai.pt"))

  golden: dict[str, np.ndarray] = {"captions": np.array(CAPTIONS),
                                   "score_captions": np.array(SCORE_CAPTIONS)}
  for n in (77, 16):
    enc = tok(CAPTIONS, padding="max_length", max_length=n, truncation=True, return_tensors="np")
    golden[f"ids_{n}"] = enc["input_ids"].astype(np.int32)
    golden[f"mask_{n}"] = enc["attention_mask"].astype(np.int32)
  # The tokenizer.json route must agree with vocab.json + merges.txt.
  tmp = os.path.join(args.out, "_tok_json")
  tok.save_pretrained(tmp)
  tok2 = CLIPTokenizer.from_pretrained(tmp)
  enc2 = tok2(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="np")
  assert (enc2["input_ids"] == golden["ids_77"]).all()
  shutil.rmtree(tmp)
  # A tokenizer_config.json naming pad_token "!" (as LAION's and Stable Diffusion 2's do):
  # transformers pads with its id and also treats a typed "!" as that special token.
  os.makedirs(tmp)
  for name in ("vocab.json", "merges.txt"):
    shutil.copy(os.path.join(tiny, name), tmp)
  with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "CLIPTokenizer", "pad_token": "!"}, f)
  enc3 = CLIPTokenizer.from_pretrained(tmp)(CAPTIONS, padding="max_length", max_length=77,
                                            truncation=True, return_tensors="np")
  golden["ids_pad_bang"] = enc3["input_ids"].astype(np.int32)
  golden["mask_pad_bang"] = enc3["attention_mask"].astype(np.int32)
  shutil.rmtree(tmp)

  imgs = images()
  for i, im in enumerate(imgs):
    golden[f"image_{i}"] = im
  pixels = proc_img(images=imgs, return_tensors="pt")["pixel_values"]  # [N, 3, S, S]
  golden["pixel_values"] = pixels.permute(0, 2, 3, 1).numpy().astype(np.float32)

  ids = torch.tensor(golden["ids_77"], dtype=torch.long)
  mask = torch.tensor(golden["mask_77"], dtype=torch.long)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    golden["logits_per_image"] = out.logits_per_image.numpy()
    golden["image_embeds"] = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    golden["text_embeds"] = model.get_text_features(input_ids=ids,
                                                    attention_mask=mask).pooler_output.numpy()
    golden["image_pooled"] = model.vision_model(pixel_values=pixels).pooler_output.numpy()
    golden["text_pooled"] = model.text_model(input_ids=ids,
                                             attention_mask=mask).pooler_output.numpy()

    # Hand-made ids for the two pooling rules: a normal row; a row with no <|endoftext|>
    # and no <|startoftext|> (the eos-id rule pools at 0, the legacy argmax rule at its
    # largest id); a row with <|endoftext|> twice (the first counts); a row padded with id
    # 0 after it, as tokenizers with pad_token "!" do.
    v, e, b = len(vocab), vocab[EOS], vocab[BOS]
    rng = np.random.default_rng(1)
    raw = rng.integers(1, v - 3, size=(4, 12))
    raw[[0, 2, 3], 0] = b
    raw[0, 7:] = e
    raw[1, 5] = v - 3
    raw[2, 4], raw[2, 9:] = e, e
    raw[3, 6], raw[3, 7:] = e, 0
    raw_mask = np.ones_like(raw)
    raw_mask[0, 8:], raw_mask[2, 10:], raw_mask[3, 7:] = 0, 0, 0
    golden["raw_ids"], golden["raw_mask"] = raw.astype(np.int32), raw_mask.astype(np.int32)
    rid, rmask = torch.tensor(raw), torch.tensor(raw_mask)
    golden["raw_text_embeds"] = model.get_text_features(
        input_ids=rid, attention_mask=rmask).pooler_output.numpy()
    model.text_model.eos_token_id = 2  # transformers' legacy rule: pool at argmax(ids)
    golden["raw_text_embeds_legacy"] = model.get_text_features(
        input_ids=rid, attention_mask=rmask).pooler_output.numpy()
    model.text_model.eos_token_id = e

  # torchmetrics' clip_score on 4 (image, caption) pairs, exactly as a user would call it
  # with this model: uint8 CHW tensors, captions padded to the longest.
  processor = CLIPProcessor(image_processor=proc_img, tokenizer=tok)
  chw = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in imgs]

  class Features(torch.nn.Module):
    """transformers 5 returns ModelOutputs from get_*_features; torchmetrics 1.9 expects
    tensors, so unwrap them (pooler_output is the projected embedding)."""

    def __init__(self, m):
      super().__init__()
      self.m, self.config = m, m.config

    def get_image_features(self, *a, **k):
      return self.m.get_image_features(*a, **k).pooler_output

    def get_text_features(self, *a, **k):
      return self.m.get_text_features(*a, **k).pooler_output

  with torch.no_grad():
    score = clip_score(chw, SCORE_CAPTIONS, lambda: (Features(model), processor))
    img_e = model.get_image_features(pixel_values=pixels).pooler_output
    txt = tok(SCORE_CAPTIONS, padding=True, return_tensors="pt")
    txt_e = model.get_text_features(**txt).pooler_output
  cos = torch.nn.functional.cosine_similarity(img_e, txt_e, dim=-1)
  golden["score_pairs"] = (100 * cos).numpy().astype(np.float32)
  golden["clip_score"] = np.float32(score.item())
  print("clip_score", score.item(), "pairs", golden["score_pairs"])

  # How far the torchvision backend (transformers' default when torchvision is installed)
  # would be from PIL's bicubic: emulated with torch's antialiased bicubic on the same sizes.
  diffs = []
  for im in imgs:
    h, w = im.shape[:2]
    s = 32
    nh, nw = (int(s * h / w), s) if w <= h else (s, int(s * w / h))
    t = torch.from_numpy(im).permute(2, 0, 1)[None].float()
    r = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True,
                                        align_corners=False).round().clamp(0, 255)
    pil = np.asarray(PIL.Image.fromarray(im).resize((nw, nh), PIL.Image.BICUBIC), np.float32)
    diffs.append(np.abs(r[0].permute(1, 2, 0).numpy() - pil).max())
  print("torch bicubic-aa vs PIL bicubic, max |diff| in uint8 levels per image:", diffs)

  np.savez_compressed(os.path.join(args.out, "clip_golden.npz"), **golden)
  with open(os.path.join(args.out, "clip_versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
               "torchmetrics": torchmetrics.__version__, "pillow": PIL.__version__,
               "script": "scripts/make_clip_fixtures.py"}, f, indent=2)
  sizes = {n: os.path.getsize(os.path.join(tiny, n)) for n in sorted(os.listdir(tiny))}
  print("clip_tiny files:", sizes)


if __name__ == "__main__":
  main()
