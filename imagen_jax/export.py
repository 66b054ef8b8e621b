"""A trained stage as one small file: its config and sampling weights, without the
optimizer state, the other EMAs or the data iterator that a training checkpoint holds.

  python -m imagen_jax.export runs/study/v/seed0 assets/emoji32_v.npz [--step 1000] \
      [--dtype float16]

The file is a NumPy .npz: `config` (the stage's config as JSON), `meta` (where it came
from: source, step, weights, storage dtype, jax version) and one array per leaf of the
sampling weights (`params/<path>`) and of the network's non-parameter state
(`rest/<path>`). Anything that takes a stage's workdir also takes such a file (imagen_jax.cascade.load_stage): a cascade
config's `stages`, `--mode=sample`, the eval jobs. Floating-point leaves are stored as
`--dtype` (float32 by default: bit-exact; float16 halves the file, and loading casts back
to the network's dtype). For the 2.2M-parameter demo network it is 8.8 MB in float32
against 33.3 MB for the checkpoint it comes from (Study B's v arm at step 500:
`python -m imagen_jax.export runs/sweeps/emoji_schedules_cpu/v/seed0 v.npz`), 4.4 MB in
float16 (assets/emoji32_base.npz).

Written with numpy rather than Orbax because the file is meant to travel (a repo asset, a
shared result) and be read anywhere without a checkpoint's directory layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import jax
import numpy as np

FORMAT = "imagen_jax.export/1"


def _flat(tree: Any, prefix: str) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
          for path, leaf in leaves}


DTYPES = ("float32", "float16")


def save(stage: Any, path: str, *, dtype: str = "float32") -> str:
  """Writes `stage` (an imagen_jax.cascade.Stage) to `path` (.npz), atomically, its
  floating-point leaves stored as `dtype` (one of DTYPES)."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose one of {DTYPES}.")
  meta = {"format": FORMAT, "source": stage.source, "step": int(stage.step),
          "weights": stage.weights, "dtype": dtype, "jax": jax.__version__}
  arrays = {k: (v.astype(np.dtype(dtype)) if np.issubdtype(v.dtype, np.floating)
                else v)
            for k, v in {**_flat(stage.params, "params/"), **_flat(stage.rest, "rest/")}.items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, config=np.asarray(json.dumps(stage.config.to_dict())),
           meta=np.asarray(json.dumps(meta)), **arrays)
  os.replace(tmp, path)
  return path


def read(path: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, np.ndarray]]:
  """(config dict, meta, {"params/..." / "rest/...": array}) of an exported stage."""
  try:
    with np.load(path, allow_pickle=False) as z:
      config = json.loads(str(z["config"]))
      meta = json.loads(str(z["meta"]))
      arrays = {k: z[k] for k in z.files if k not in ("config", "meta")}
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path} is not a stage exported by imagen_jax.export ({e}). Fix: "
                     "export one with python -m imagen_jax.export WORKDIR OUT.npz.") from e
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} has format {meta.get('format')!r}, not {FORMAT!r}.")
  return config, meta, arrays


def fill(abstract: Any, arrays: dict[str, np.ndarray], prefix: str, path: str) -> Any:
  """The tree of `abstract` (ShapeDtypeStructs with shardings) with the file's arrays,
  placed on their shardings; a missing or misshapen leaf names itself."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for key_path, a in leaves:
    key = prefix + jax.tree_util.keystr(key_path)
    if key not in arrays:
      raise ValueError(f"{path} lacks {key}: it was exported from another network than its "
                       "config describes.")
    x = arrays[key]
    if tuple(x.shape) != tuple(a.shape):
      raise ValueError(f"{path}: {key} has shape {x.shape}, the network wants {a.shape}.")
    out.append(jax.device_put(x.astype(a.dtype), a.sharding))
  return jax.tree_util.tree_unflatten(treedef, out)


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("stage", help="a training workdir (or its checkpoints/ directory)")
  p.add_argument("out", help="the .npz to write")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--weights", default="ema", choices=("ema", "params"))
  p.add_argument("--dtype", default="float32", choices=DTYPES,
                 help="storage dtype of the weights (float16 halves the file)")
  args = p.parse_args(argv)
  from imagen_jax import cascade  # pylint: disable=g-import-not-at-top
  try:
    stage = cascade.load_stage(args.stage, step=args.step, weights=args.weights)
  except cascade.CascadeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  save(stage, args.out, dtype=args.dtype)
  size = os.path.getsize(args.out)
  print(f"wrote {args.out}: step {stage.step}, {stage.weights} weights, "
        f"{size / 2**20:.1f} MiB")
  return 0


if __name__ == "__main__":
  sys.exit(main())
