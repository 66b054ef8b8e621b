r"""Text encoders: parameter counts (shape-only, up to T5-XXL) and encode throughput.

  python benchmarks/text.py                  # counts + CPU throughput rows
  python benchmarks/text.py --only counts    # parameter counts only (seconds)

Counts come from `nnx.eval_shape` (no memory), so the 4.6B-parameter XXL encoder costs
nothing. Throughput is `TextEncoder.encode` on fixed captions, tokenization included and
compilation excluded (one warm-up call first), in captions per second. A batch runs at the
power-of-two length holding its longest caption ("run length"), not at max_len: the
typical row uses ~17-token captions (run at 32); the "long" rows fill max_len. Writes
benchmarks/results/text.{md,csv} and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time

import jax
from flax import nnx

from imagen_jax import text
from imagen_jax.text import bert, t5
from imagen_jax.text.encoder import bucket_length

import machine

# (spec, dtype, batch, max_len, caption kind, batches timed). MiniLM is the offline
# default; random T5s of the published v1.1 sizes give T5 timings without weights (the
# same FLOPs as trained ones). Their byte tokens make a typical caption ~70 tokens (run at
# 128), where T5's sentencepiece would give ~20.
THROUGHPUT = (
    ("minilm", "float32", 64, 64, "typical", 5),
    ("minilm", "float32", 64, 64, "long", 3),
    ("minilm", "float32", 64, 128, "long", 2),
    ("minilm", "bfloat16", 64, 64, "typical", 3),
    ("random-t5:small", "float32", 64, 128, "typical", 3),
    ("random-t5:base", "float32", 32, 128, "typical", 2),
)
CAPTIONS = {
    "typical": "a photograph of {} red pandas eating bamboo in the snow, oil painting",
    "long": "a photograph of {} " + "very " * 150 + "red pandas",
}


def counts() -> list[dict]:
  rows = []
  minilm = bert.load_bert_hf(bert.minilm_dir())
  n = sum(x.size for x in jax.tree.leaves(nnx.state(minilm, nnx.Param)))
  rows.append({"encoder": "minilm (BERT L6 H384)", "params": n, "width": 384})
  for size, cfg in t5.T5_SIZES.items():
    model = nnx.eval_shape(lambda c=cfg: t5.T5Encoder(c, rngs=nnx.Rngs(0)))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    rows.append({"encoder": f"t5 v1.1 {size}", "params": n, "width": cfg.d_model})
  return rows


def throughput() -> list[dict]:
  rows = []
  for spec, dtype, batch, max_len, kind, reps in THROUGHPUT:
    enc = text.load_text_encoder(spec, dtype=dtype, batch_size=batch, max_len=max_len)
    captions = [CAPTIONS[kind].format(i) for i in range(batch)]
    run_len = bucket_length(enc.tokenize(captions).mask, max_len)
    enc.encode(captions)  # compile
    start = time.perf_counter()
    for _ in range(reps):
      enc.encode(captions)
    sec = (time.perf_counter() - start) / reps
    rows.append({"encoder": spec, "dtype": dtype, "batch": batch, "max_len": max_len,
                 "run_len": run_len, "captions_per_s": batch / sec, "ms_per_batch": 1000 * sec})
    print(f"  {spec} {dtype} batch {batch} max_len {max_len} run at {run_len}: "
          f"{batch / sec:.1f} captions/s")
  return rows


def write(out: str, count_rows: list[dict], tput_rows: list[dict], load_before: float) -> None:
  os.makedirs(out, exist_ok=True)
  lines = ["# Text encoders", "",
           machine.provenance(machine.command("text.py", sys.argv[1:]), load_before), "",
           "| encoder | params | width |", "| --- | ---: | ---: |"]
  lines += [f"| {r['encoder']} | {r['params']:,} | {r['width']} |" for r in count_rows]
  if tput_rows:
    lines += ["", "| encoder | dtype | batch | max_len | run length | captions/s | ms/batch |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['encoder']} | {r['dtype']} | {r['batch']} | {r['max_len']} | "
              f"{r['run_len']} | "
              f"{r['captions_per_s']:.1f} | {r['ms_per_batch']:.0f} |" for r in tput_rows]
  with open(os.path.join(out, "text.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "text.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, ["table", "encoder", "params", "width", "dtype", "batch", "max_len",
                           "run_len", "captions_per_s", "ms_per_batch"])
    w.writeheader()
    for r in count_rows:
      w.writerow({"table": "params", **r})
    for r in tput_rows:
      w.writerow({"table": "throughput", **r})
  print("\n".join(lines))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", choices=("counts", "all"), default="all")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()
  load_before = machine.load()
  count_rows = counts()
  tput_rows = throughput() if args.only == "all" else []
  write(args.out, count_rows, tput_rows, load_before)


if __name__ == "__main__":
  main()
