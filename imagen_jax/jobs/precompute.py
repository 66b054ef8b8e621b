"""`--mode=precompute`: encode every caption once into the embedding cache.

  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=precompute

Reads the captions of the dataset's train and eval splits (or of `data.captions_file`, one
per line, when set), encodes the ones the cache lacks with `data.text_encoder`, and adds them to the cache at `data.embedding_cache` (default:
WORKDIR/text_cache). Training then reads embeddings from there when `data.embedding_cache`
names it. Writes WORKDIR/precompute.json (what was encoded, how fast).

Multi-host: run the same command on every host with launch.py's jax.distributed flags
(--distributed, or --coordinator_address/--num_processes/--process_id). Each process
encodes its share of the missing captions into a part of the cache of its own
(imagen_jax/text/cache.py); process 0 writes meta.json, precompute.json and the summary
line. The cache directory must be on storage every host mounts at the same path.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from imagen_jax import multihost
from imagen_jax import text
from imagen_jax.data import datasets
from imagen_jax.text import cache


MODE = "precompute"
KINDS = ("base", "sr")


def read_captions(path: str) -> list[str]:
  """One caption per line (blank lines skipped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"data.captions_file={path!r} does not exist; pass an existing "
                            "text file with one caption per line.")
  with open(path, encoding="utf-8") as f:
    captions = [line.rstrip("\n") for line in f]
  captions = [c for c in captions if c.strip()]
  if not captions:
    raise ValueError(f"data.captions_file={path!r} holds no captions.")
  return captions


def cache_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.embedding_cache or os.path.join(workdir, "text_cache")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  data = config.data
  os.makedirs(workdir, exist_ok=True)
  if data.captions_file:
    captions = read_captions(data.captions_file)
  else:
    captions = datasets.captions(data, (data.train_split, data.eval_split))
  # The trainer's sample-grid prompts too, so a cache-fed run never needs the encoder.
  captions += [p for p in config.get("log", {}).get("prompts", ()) if p]
  start = time.perf_counter()
  encoder = text.encoder_from_config(data)
  load_s = time.perf_counter() - start
  path = cache_dir(config, workdir)
  start = time.perf_counter()
  summary = cache.write(path, encoder, captions, dtype=data.cache_dtype)
  encode_s = time.perf_counter() - start
  summary.update(encoder=encoder.describe(), storage_dtype=data.cache_dtype,
                 load_s=load_s, encode_s=encode_s,
                 captions_per_s=summary["added"] / encode_s if summary["added"] else None,
                 captions_from=data.captions_file or f"{data.dataset} "
                 f"{data.train_split}+{data.eval_split}")
  if not multihost.is_main():
    return summary
  with open(os.path.join(workdir, "precompute.json"), "w") as f:
    json.dump(summary, f, indent=2)
    f.write("\n")
  rate = f", {summary['captions_per_s']:.1f} captions/s" if summary["added"] else ""
  print(f"embedding cache {path}: {summary['added']} caption(s) added "
        f"({summary['tokens_added']} tokens), {summary['already_cached']} already cached, "
        f"{summary['total']} in all; encoder {encoder.spec} (dim {encoder.dim}, max_len "
        f"{encoder.max_len}){rate}")
  return summary
