r"""Where the real training loop's time goes: the input batch (images and captions) and
the train step, with the captions encoded at every step or read from the embedding cache.

  python benchmarks/train_loop.py --data_dir data/tfds
  python benchmarks/train_loop.py --data_dir data/tfds --only base64.py:study --steps 20

benchmarks/train.py and vs_torch.py time the step on a synthetic batch whose text is
already embedded; the trainer's loop also pulls each batch from the grain pipeline, which,
unless data.embedding_cache is set, runs the frozen text encoder on the batch's captions
(imagen_jax/text: MiniLM for the emoji configs). This times both halves on the built
emoji_cascade dataset at each config's resolution (build it with --mode=build_data):
`--steps` batches of the pipeline with the encoder, the same from the cache (filled by
the precompute job into a temporary directory unless --embedding_cache names one), and
`--steps` train steps, each after warm-up. The loop's img/s is batch / (batch time + step
time): the trainer runs them one after the other. Writes OUT/train_loop.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import machine
import step_inputs


def _per_batch(it, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return (time.perf_counter() - start) / steps


def measure(spec: str, data_dir: str, cache: str, steps: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from imagen_jax import config_files, sharding, text as text_lib  # pylint: disable=g-import-not-at-top
  from imagen_jax.data import datasets, pipeline  # pylint: disable=g-import-not-at-top
  from imagen_jax.jobs import precompute  # pylint: disable=g-import-not-at-top
  from imagen_jax.train import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  path, variant = spec.split(":")
  c = config_files.load(os.path.join(step_inputs.REPO, "configs", path), variant)
  batch = int(c.train.batch_size)  # the config's own, as its training runs
  c.data.data_dir = data_dir
  source = datasets.data_source(c.data, c.data.train_split)

  def batches(text):
    return iter(pipeline.make_pipeline(c.data, source, stage="base", batch_size=batch,
                                       seed=0, worker_count=0, text=text))

  on_the_fly = _per_batch(batches(text_lib.text_source(c.data)), steps, warmup=3)
  c.data.embedding_cache = cache
  if not os.path.exists(os.path.join(cache, "meta.json")):
    precompute.run(c, tempfile.mkdtemp(prefix="train_loop_precompute_"))
  it = batches(text_lib.text_source(c.data))
  cached = _per_batch(it, steps, warmup=3)

  mesh = sharding.mesh_from_config(c.mesh)
  graphdef, state, shardings = state_lib.create_state(c, mesh)
  fn = step_lib.make_train_step(c, graphdef, shardings, mesh)
  dev = step_lib.device_batch(next(it), mesh)
  for _ in range(2):
    state, m = fn(state, dev)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for _ in range(steps):
    state, m = fn(state, dev)
  jax.block_until_ready(m)
  step = (time.perf_counter() - start) / steps
  return {"spec": spec, "batch": batch, "resolution": int(c.data.resolution),
          "encoder": str(c.data.text_encoder), "on_the_fly_ms": 1e3 * on_the_fly,
          "cached_ms": 1e3 * cached, "step_ms": 1e3 * step,
          "loop_ips_encode": batch / (on_the_fly + step),
          "loop_ips_cache": batch / (cached + step)}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", required=True, help="TFDS data_dir holding emoji_cascade")
  p.add_argument("--only", default="base64.py:study,base64.py:study16")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--embedding_cache", default="",
                 help="a cache from --mode=precompute (default: filled in a temporary dir)")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"))
  args = p.parse_args()
  load_before = machine.load()
  cache = args.embedding_cache or os.path.join(tempfile.mkdtemp(prefix="train_loop_"), "cache")
  rows = [measure(spec, os.path.abspath(args.data_dir), cache, args.steps)
          for spec in args.only.split(",")]
  lines = ["| config | px | batch | text encoder | batch, encoded (ms) | batch, cached (ms) "
           "| step (ms) | loop img/s, encoded | loop img/s, cached | speed-up |",
           "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(
        f"| {r['spec']} | {r['resolution']} | {r['batch']} | {r['encoder']} "
        f"| {r['on_the_fly_ms']:.0f} | {r['cached_ms']:.0f} | {r['step_ms']:.0f} "
        f"| {r['loop_ips_encode']:.1f} | {r['loop_ips_cache']:.1f} "
        f"| {r['loop_ips_cache'] / r['loop_ips_encode']:.2f}x |")
  table = "\n".join(lines)
  print(table)
  text = ("# The training loop: input batch (text encoded or cached) and train step\n\n"
          + machine.provenance(machine.command("train_loop.py", sys.argv[1:]), load_before)
          + f" {args.steps} batches and {args.steps} steps per measurement, after warm-up; "
          "emoji_cascade at each config's resolution, worker_count 0 (the configs' own).\n\n"
          + table + "\n")
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "train_loop.md"), "w") as f:
    f.write(text)


if __name__ == "__main__":
  main()
