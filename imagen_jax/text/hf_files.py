"""Reading Hugging Face checkpoint directories without torch or transformers.

A directory holds `config.json` and either `model.safetensors` or shards listed by
`model.safetensors.index.json` (`weight_map`: tensor name -> shard file). Tensors come back
as numpy arrays (bfloat16 ones as float32, which numpy has no dtype for).

`check_tensors` is the one place where a checkpoint is compared against what a model
expects, so every loader reports a truncated or mismatched file the same way: every
missing, unexpected and misshaped tensor by name, and what to do.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import numpy as np

from imagen_jax.errors import UserError

SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


class CheckpointError(UserError, ValueError):
  """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


def read_config(path: str | os.PathLike) -> dict:
  """`config.json` of a checkpoint directory."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"Checkpoint directory {path!r} does not exist; pass the directory "
                          "that holds config.json and model.safetensors.")
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise CheckpointError(f"{path!r} has no config.json; it is not a Hugging Face checkpoint "
                          "directory (save one with save_pretrained).")
  try:
    with open(cfg_file) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); re-download or re-save it.") from e


def safetensors_files(path: str | os.PathLike) -> list[str]:
  """The safetensors file(s) of a directory: one file, or every shard of the index."""
  path = os.fspath(path)
  single, index = os.path.join(path, SAFETENSORS), os.path.join(path, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"{index} has no weight_map; re-save the checkpoint.")
    files = sorted(set(weight_map.values()))
    missing = [s for s in files if not os.path.isfile(os.path.join(path, s))]
    if missing:
      raise CheckpointError(f"{index} lists shard(s) {missing} that are not in {path!r}; "
                            "the download is incomplete, fetch the missing shards.")
    return [os.path.join(path, s) for s in files]
  if os.path.isfile(single):
    return [single]
  found = sorted(os.listdir(path)) if os.path.isdir(path) else []
  raise CheckpointError(
      f"No {SAFETENSORS} or {INDEX} in {path!r} (found: {found[:10]}). PyTorch .bin "
      "checkpoints are not read (that would need torch); convert them once with "
      "transformers: Model.from_pretrained(dir).save_pretrained(dir, safe_serialization=True).")


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a checkpoint directory (or of one .safetensors file) as numpy."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  files = [path] if path.endswith(".safetensors") else safetensors_files(path)
  tensors: dict[str, np.ndarray] = {}
  for file in files:
    try:
      tensors.update(load_file(file))
    except (SafetensorError, OSError, ValueError) as e:
      if "bf16" in str(e).lower() or "bfloat16" in str(e).lower():
        tensors.update(_load_bf16(file))
        continue
      raise CheckpointError(f"Cannot read {file}: {e}. The file is truncated or not "
                            "safetensors; re-download it.") from e
  return tensors


def _load_bf16(file: str) -> dict[str, np.ndarray]:
  """safetensors' numpy reader rejects bfloat16; read through ml_dtypes (a jax dependency)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  out = {}
  with safe_open(file, framework="flax") as f:
    for name in f.keys():
      out[name] = np.asarray(f.get_tensor(name)).astype(ml_dtypes.bfloat16).astype(np.float32)
  return out


def check_tensors(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, np.ndarray],
                  source: str, *, ignore: Iterable[str] = ()) -> None:
  """Raise CheckpointError naming every missing, unexpected or misshaped tensor.

  `expected` maps checkpoint names to shapes; names in `ignore` (e.g. a decoder's tensors
  in a full T5 checkpoint) may be present without being unexpected.
  """
  ignore = tuple(ignore)
  missing = sorted(set(expected) - set(found))
  unexpected = sorted(n for n in set(found) - set(expected)
                      if not any(n.startswith(p) for p in ignore))
  misshaped = sorted(f"{n}: file {tuple(found[n].shape)}, model {tuple(s)}"
                     for n, s in expected.items()
                     if n in found and tuple(found[n].shape) != tuple(s))
  if not (missing or unexpected or misshaped):
    return
  lines = [f"Checkpoint {source} does not fit the model built from its config:"]
  for title, items in (("missing", missing), ("unexpected", unexpected),
                       ("wrong shape", misshaped)):
    if items:
      shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
      lines.append(f"  {len(items)} {title}: {shown}")
  lines.append("  Fix: check that config.json belongs to these weights, and that the download "
               "is complete (missing tensors usually mean a truncated or partial checkpoint).")
  raise CheckpointError("\n".join(lines))
