"""Loading a config file outside launch.py (tests, benchmarks, notebooks).

`load("configs/base64.py:smoke")` returns what `--config=configs/base64.py:smoke` gives
launch.py (before overrides): the file's `get_config(variant)`.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import ml_collections


def load(path: str | os.PathLike, variant: str | None = None) -> ml_collections.ConfigDict:
  """`path` may carry the variant after a colon ("configs/sr256.py:smoke")."""
  path = os.fspath(path)
  if variant is None and ":" in os.path.basename(path):
    path, variant = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Config file {path!r} does not exist.")
  # Config files import their shared sections as `from configs import common`: the folder
  # above configs/ must be importable, as it is for launch.py (its own folder).
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  name = "_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)
