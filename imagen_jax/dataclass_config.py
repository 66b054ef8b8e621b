"""Building a frozen dataclass from a config section, with unknown keys an error.

Config sections (`config.model`, a cascade's `stageK`) are read into dataclasses that
check themselves; this is the one place that turns a mapping into one, so a misspelt key
fails with the valid names instead of being ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


def field_names(cls: type) -> list[str]:
  return sorted(f.name for f in dataclasses.fields(cls))


def unknown_keys(cls: type, d: Mapping[str, Any]) -> list[str]:
  """The keys of `d` that are not fields of the dataclass `cls`, sorted."""
  return sorted(set(d) - set(field_names(cls)))


def as_dict(d: Any) -> dict[str, Any]:
  """A plain dict of a dict or ConfigDict (None: empty)."""
  if d is None:
    return {}
  return dict(d.to_dict() if hasattr(d, "to_dict") else d)


def from_mapping(cls: type[T], d: Any, *, error: type[Exception] = ValueError,
                 what: str | None = None) -> T:
  """cls(**d); keys of `d` that are not fields raise `error` naming them and the valid
  ones (`what` names the section in the message, default the class name)."""
  d = as_dict(d)
  unknown = unknown_keys(cls, d)
  if unknown:
    raise error(f"Unknown {what or cls.__name__} key(s) {unknown}; valid keys: "
                f"{field_names(cls)}.")
  return cls(**d)
