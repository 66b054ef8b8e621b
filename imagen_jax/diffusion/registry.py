"""Name -> implementation lookup shared by the schedule, weighting and sampler registries."""

from __future__ import annotations

import difflib
from typing import Mapping, TypeVar

V = TypeVar("V")


def lookup(registry: Mapping[str, V], name: str, what: str) -> V:
  """registry[name], or a ValueError naming the valid choices and the closest one."""
  if name in registry:
    return registry[name]
  hint = difflib.get_close_matches(str(name), list(registry), n=1)
  raise ValueError(
      f"Unknown {what} {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
      + f"; choose one of {sorted(registry)}.")
