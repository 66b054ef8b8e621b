"""The embedding cache: every caption encoded once, read by training instead of the encoder.

Imagen's text encoder is frozen, so T5-XXL need not run at every training step. A cache
is a directory:

  meta.json              format version, the encoder's `describe()` (spec, max_len, dim,
                         dtype, tokenizer), storage dtype, and the list of parts
  probe.npy              the encoder's output on PROBE_CAPTIONS: a cache opened for an
                         encoder whose weights differ under the same spec is refused too
  part-00000/            one per `write` call that added captions (one per process of a
                         multi-process write):
    index.npz              captions, and for each: shard, first row, number of tokens
    emb-00000.npy ...      the unpadded token embeddings of many captions, stacked [rows, dim]

Only real tokens are stored (a 10-token caption with max_len 128 costs 10 rows, not 128);
`lookup` pads them back. Parts are written into a temporary directory and renamed into
place, and meta.json is replaced atomically, so an interrupted precompute leaves the cache
as it was (a new cache starts as a valid empty one); rerunning it adds only the captions
still missing. A part renamed into place but not yet in meta.json (a multi-process write
stopped between the processes' renames and process 0's meta.json update) is complete and
adopted by the next write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Sequence

import numpy as np

from imagen_jax import multihost
from imagen_jax.errors import UserError

FORMAT = "imagen_jax.embedding_cache/1"
PROBE_CAPTIONS = ("a photograph of an astronaut riding a horse",
                  "a red panda eating bamboo in the snow")
# The probe is compared with a tolerance, not bit for bit: the same weights on another
# device or XLA version differ in the last bits; different weights differ by O(1).
PROBE_RTOL = 1e-2
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


class CacheError(UserError, ValueError):
  """An embedding cache that is missing, corrupt, or made by another encoder."""


def _storage(dtype: str):
  if dtype == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def _probe(encoder) -> np.ndarray:
  emb, mask = encoder.encode(list(PROBE_CAPTIONS))
  return np.where(mask[..., None], emb, 0.0).astype(np.float32)


def _check_encoder(meta: dict, path: str, *, expect: dict | None = None, encoder=None,
                   probe: np.ndarray | None = None) -> None:
  """Refuse a cache whose recorded encoder differs from `expect` (config keys, cheap) or
  from `encoder` (a loaded TextEncoder: also compares its output on the probe captions)."""
  want = dict(expect or {})
  if encoder is not None:
    want.update(encoder.describe())
  have = meta["encoder"]
  diff = {k: (have.get(k), want[k]) for k in want if have.get(k) != want[k]}
  if diff:
    shown = ", ".join(f"{k}: cache {a!r} vs wanted {b!r}" for k, (a, b) in diff.items())
    raise CacheError(
        f"Embedding cache {path} was made by another text encoder ({shown}). Training on it "
        "would condition on the wrong embeddings. Fix: point data.embedding_cache at a new "
        "directory (or delete this one) and rerun --mode=precompute.")
  if encoder is not None and probe is not None:
    now = _probe(encoder)
    scale = float(np.abs(probe).max()) or 1.0
    err = float(np.abs(now - probe).max()) / scale if now.shape == probe.shape else np.inf
    if err > PROBE_RTOL:
      raise CacheError(
          f"Embedding cache {path} has the same encoder spec ({have['spec']!r}) but different "
          f"weights: probe captions differ by {err:.3g} (relative; tolerance {PROBE_RTOL}). "
          "The checkpoint at that path changed since the cache was written. Fix: use a new "
          "data.embedding_cache directory and rerun --mode=precompute.")


class EmbeddingCache:
  """Read side: `lookup(captions)` / `encode(captions)` like a TextEncoder, from disk."""

  def __init__(self, path: str | os.PathLike, meta: dict):
    self.path, self.meta = os.fspath(path), meta
    enc = meta["encoder"]
    self.spec, self.max_len, self.dim = enc["spec"], int(enc["max_len"]), int(enc["dim"])
    self._rows: dict[str, tuple[int, int, int, int]] = {}
    self._shards: list[list[np.ndarray]] = []
    for p, part in enumerate(meta["parts"]):
      part_dir = os.path.join(self.path, part["dir"])
      try:
        index = np.load(os.path.join(part_dir, "index.npz"))
        shards = [np.load(os.path.join(part_dir, f"emb-{s:05d}.npy"), mmap_mode="r")
                  for s in range(part["num_shards"])]
      except (OSError, ValueError, KeyError) as e:
        raise CacheError(f"Embedding cache part {part_dir} is unreadable ({e}). Fix: delete "
                         f"{self.path} and rerun --mode=precompute.") from e
      self._shards.append(shards)
      for cap, s, start, n in zip(index["captions"], index["shard"], index["start"],
                                  index["length"]):
        self._rows[str(cap)] = (p, int(s), int(start), int(n))

  @classmethod
  def open(cls, path: str | os.PathLike, encoder=None, *,
           expect: dict | None = None) -> "EmbeddingCache":
    """Open a cache, refusing it unless it was made by `encoder` (a TextEncoder: spec,
    max_len, dtype and probe outputs compared) or matches `expect` (e.g. {"spec": ...,
    "max_len": ..., "dtype": ...} from a config, checked without loading the encoder)."""
    path = os.fspath(path)
    meta_file = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_file):
      raise CacheError(f"No embedding cache at {path} (no meta.json). Fix: run "
                       "`python launch.py --mode=precompute --config=...` first, or clear "
                       "data.embedding_cache to encode captions on the fly.")
    with open(meta_file) as f:
      meta = json.load(f)
    if meta.get("format") != FORMAT:
      raise CacheError(f"{meta_file} has format {meta.get('format')!r}, expected {FORMAT!r}; "
                       "rerun --mode=precompute into a new directory.")
    probe_file = os.path.join(path, "probe.npy")
    probe = np.load(probe_file) if encoder is not None and os.path.isfile(probe_file) else None
    _check_encoder(meta, path, expect=expect, encoder=encoder, probe=probe)
    return cls(path, meta)

  def __len__(self) -> int:
    return len(self._rows)

  def __contains__(self, caption: str) -> bool:
    return caption in self._rows

  def missing(self, captions: Iterable[str]) -> list[str]:
    return [c for c in dict.fromkeys(captions) if c not in self._rows]

  def lookup(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings [B, max_len, dim] float32, mask [B, max_len] bool) for known captions."""
    missing = self.missing(captions)
    if missing:
      raise CacheError(f"{len(missing)} caption(s) are not in the embedding cache {self.path}, "
                       f"e.g. {missing[:3]}. Fix: rerun --mode=precompute on this split.")
    emb = np.zeros((len(captions), self.max_len, self.dim), np.float32)
    mask = np.zeros((len(captions), self.max_len), bool)
    for i, cap in enumerate(captions):
      p, s, start, n = self._rows[cap]
      emb[i, :n] = self._shards[p][s][start:start + n]
      mask[i, :n] = True
    return emb, mask

  encode = lookup  # the TextEncoder interface, so the trainer can take either


def write(path: str | os.PathLike, encoder, captions: Iterable[str], *,
          dtype: str = "float32", rows_per_shard: int = 1 << 20, progress: bool = True,
          batch_size: int | None = None) -> dict[str, Any]:
  """Encode the captions the cache lacks and add them as a new part; returns a summary.

  Creates the cache if needed; refuses (CacheError) a cache made by another encoder.

  In a multi-process run (jax.distributed) every process calls this with the same
  captions: each encodes a contiguous share of the missing ones (boundaries on multiples
  of the batch size, so every batch is the one a single process would encode) into a
  part of its own, and process 0 lists the parts in meta.json once all are in place. The
  cache holds the same captions, rows and embeddings as a one-process cache, split over
  more parts. A part renamed into place before an interruption is complete; the next
  write adopts it (`_adopt_orphans`), so a rerun encodes only what is still missing. The
  directory must be on storage every process sees.
  """
  if dtype not in STORAGE_DTYPES:
    raise ValueError(f"Cache dtype {dtype!r}: choose one of {STORAGE_DTYPES}.")
  path = os.fspath(path)
  captions = list(dict.fromkeys(captions))  # unique, first-seen order
  for c in captions[:1] + captions[-1:]:
    if not isinstance(c, str):
      raise TypeError(f"Captions must be str, got {type(c).__name__}: {c!r}.")
  main = multihost.is_main()
  # Process 0 creates (or checks and repairs) the cache first; then every process opens it.
  prepared = _on_every_process(lambda: _prepare(path, encoder, dtype) if main else None, path)
  cache = _on_every_process(lambda: prepared if main else _open_checked(path, encoder, dtype),
                            path)
  meta = cache.meta
  todo = cache.missing(captions)
  first = _next_part_number(path, meta)
  multihost.agree(todo + [f"first part {first}"], f"the captions missing from {path}")
  summary = {"path": path, "requested": len(captions), "added": len(todo),
             "already_cached": len(captions) - len(todo)}
  if multihost.process_count() > 1:
    summary["processes"] = multihost.process_count()
  if not todo:
    summary.update(total=sum(p["count"] for p in meta["parts"]), tokens_added=0)
    return summary

  batch_size = batch_size or encoder.batch_size
  mine = todo[multihost.share(len(todo), align=batch_size)]
  part_name = f"part-{first + multihost.process_index():05d}"

  def write_mine() -> list[int]:
    if not mine:
      return [0, 0, 0]
    tmp = tempfile.mkdtemp(prefix=f".{part_name}-", dir=path)
    try:
      stats = _write_part(tmp, encoder, mine, _storage(dtype), rows_per_shard,
                          progress and main, batch_size)
      os.rename(tmp, os.path.join(path, part_name))
    except BaseException:
      shutil.rmtree(tmp, ignore_errors=True)
      raise
    return [len(mine), stats["num_shards"], stats["tokens"]]

  stats = multihost.gather(np.asarray([_on_every_process(write_mine, path)], np.int64))
  new_parts = [{"dir": f"part-{first + p:05d}", "count": int(count), "num_shards": int(shards),
                "tokens": int(tokens)}
               for p, (count, shards, tokens) in enumerate(stats) if count]
  meta["parts"].extend(new_parts)
  if main:
    _write_json(os.path.join(path, "meta.json"), meta)
  multihost.barrier(f"embedding_cache_written_{first}")  # the cache is whole on return
  summary.update(total=sum(p["count"] for p in meta["parts"]),
                 tokens_added=sum(p["tokens"] for p in new_parts))
  return summary


def _on_every_process(fn, path: str):
  """fn() on this process; if it raised an Exception on any process, raise on every one
  (a collective), so no process waits forever for a failed one."""
  error, out = None, None
  try:
    out = fn()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  if multihost.any_process(error is not None):
    if error is not None:
      raise error
    raise CacheError(f"Another process of this job failed while writing the embedding cache "
                     f"{path}; its message says why.")
  return out


def _open_checked(path: str, encoder, dtype: str) -> EmbeddingCache:
  cache = EmbeddingCache.open(path, encoder)
  if cache.meta["dtype"] != dtype:
    raise CacheError(f"Cache {path} stores {cache.meta['dtype']}, not {dtype}; keep "
                     f"--config.data.cache_dtype={cache.meta['dtype']} or use a new directory.")
  return cache


def _prepare(path: str, encoder, dtype: str) -> EmbeddingCache:
  """Open the cache at path (checking its encoder and dtype, adopting finished orphan
  parts), or create an empty one: probe.npy, then meta.json with no parts."""
  if os.path.isfile(os.path.join(path, "meta.json")):
    cache = _open_checked(path, encoder, dtype)
    if _adopt_orphans(path, cache.meta):
      _write_json(os.path.join(path, "meta.json"), cache.meta)
      cache = EmbeddingCache(path, cache.meta)
    return cache
  if os.path.isdir(path) and os.listdir(path):
    raise CacheError(f"{path} exists, is not empty and is not an embedding cache; refusing to "
                     "write into it. Fix: choose an empty or new data.embedding_cache directory.")
  os.makedirs(path, exist_ok=True)
  meta = {"format": FORMAT, "encoder": encoder.describe(), "dtype": dtype, "parts": []}
  np.save(os.path.join(path, "probe.npy"), _probe(encoder))
  _write_json(os.path.join(path, "meta.json"), meta)
  return EmbeddingCache(path, meta)


_PART = re.compile(r"^part-(\d{5,})$")


def _next_part_number(path: str, meta: dict) -> int:
  """One past the highest part number listed or on disk, so new parts never collide."""
  numbers = [int(m.group(1)) for name in [p["dir"] for p in meta["parts"]] + os.listdir(path)
             if (m := _PART.match(name))]
  return max(numbers, default=-1) + 1


def _adopt_orphans(path: str, meta: dict) -> list[str]:
  """Add to meta the finished parts meta.json does not list: a multi-process write whose
  processes renamed their parts into place but stopped before process 0 recorded them
  (a part is renamed only once complete). Returns their names."""
  listed = {p["dir"] for p in meta["parts"]}
  adopted = []
  for name in sorted(os.listdir(path), key=lambda n: (len(n), n)):
    part_dir = os.path.join(path, name)
    if not _PART.match(name) or name in listed or not os.path.isdir(part_dir):
      continue
    try:
      with np.load(os.path.join(part_dir, "index.npz")) as index:
        count, tokens = len(index["captions"]), int(index["length"].sum())
    except (OSError, ValueError, KeyError) as e:
      raise CacheError(f"Embedding cache part {part_dir} is unreadable ({e}). Fix: delete "
                       f"that folder and rerun --mode=precompute.") from e
    shards = len([f for f in os.listdir(part_dir) if f.startswith("emb-")])
    meta["parts"].append({"dir": name, "count": count, "num_shards": shards, "tokens": tokens})
    adopted.append(name)
  return adopted


def _write_part(out: str, encoder, captions: list[str], dtype: np.dtype, rows_per_shard: int,
                progress: bool, batch_size: int) -> dict[str, int]:
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  shard_of = np.zeros(len(captions), np.int32)
  start_of = np.zeros(len(captions), np.int64)
  length_of = np.zeros(len(captions), np.int32)
  buf: list[np.ndarray] = []
  rows, shard, tokens = 0, 0, 0

  def flush():
    nonlocal buf, rows, shard
    np.save(os.path.join(out, f"emb-{shard:05d}.npy"),
            np.concatenate(buf) if buf else np.zeros((0, encoder.dim), dtype))
    buf, rows, shard = [], 0, shard + 1

  bar = tqdm(total=len(captions), desc="encoding captions", unit="cap", disable=not progress)
  for i in range(0, len(captions), batch_size):
    chunk = captions[i:i + batch_size]
    emb, mask = encoder.encode(chunk)
    for j, (e, m) in enumerate(zip(emb, mask)):
      n = int(m.sum())
      if not m[:n].all():  # tokenizers put real tokens first; storing a prefix relies on it
        raise ValueError(f"Caption {chunk[j]!r}: mask is not a prefix of real tokens.")
      if rows + n > rows_per_shard and rows:
        flush()
      shard_of[i + j], start_of[i + j], length_of[i + j] = shard, rows, n
      buf.append(e[:n].astype(dtype))
      rows += n
      tokens += n
    bar.update(len(chunk))
  bar.close()
  flush()
  np.savez(os.path.join(out, "index.npz"), captions=np.array(captions, dtype=str),
           shard=shard_of, start=start_of, length=length_of)
  return {"num_shards": shard, "tokens": tokens}
