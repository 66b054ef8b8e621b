"""One trainer for every cascade stage.

Modules:
  state.py          TrainState (params, optimizer, EMA, RNG, skip counters) and its
                    sharded creation / abstract shapes for restores
  optim.py          optimizers (adamw, adam, adafactor), lr schedules, clipping
  step.py           the jitted train step: diffusion loss, CFG text dropout, SR noise
                    augmentation, gradient accumulation, non-finite skips, EMA, metrics
  checkpointing.py  Orbax checkpoints of the state and the data iterator
  metrics.py        step metrics -> logged scalars (loss per log-SNR bucket, MFU)
  logging.py        TensorBoard, metrics.jsonl, console line, sample-grid PNGs
  plots.py          loss.png from metrics.jsonl
  trainer.py        the training loop behind launch.py --mode=train

Sampling (imagen_jax/sampling.py), image grids (imagen_jax/images.py) and the mesh and
batch sharding (imagen_jax/sharding.py) live outside this package: inference uses them
without importing the trainer.
"""
