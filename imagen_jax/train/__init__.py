"""One trainer for every cascade stage.

Modules:
  state.py          TrainState (params, optimizer, EMA, RNG, skip counters) and its
                    sharded creation / abstract shapes for restores
  optim.py          optimizers (adamw, adam, adafactor), lr schedules, clipping
  step.py           the jitted train step: diffusion loss, CFG text dropout, SR noise
                    augmentation, gradient accumulation, non-finite skips, EMA, metrics
  checkpointing.py  Orbax checkpoints of the state and the data iterator
  logging.py        metrics, throughput and MFU logging
  samples.py        EMA sample grids during training
  sharding.py       mesh and sharding rules of the trainer
  trainer.py        the training loop behind launch.py --mode=train
"""
