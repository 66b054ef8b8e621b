"""Config sections declared by the modules that use them, and the error a bad value raises.

Each config section (`optim`, `train`, `data`, `diffusion.sampler`, ...) is a frozen
dataclass in the module that reads it, whose fields are the section's keys and whose
`check` method checks their values through a `Checker`, e.g. in train/optim.py:

  @dataclasses.dataclass(frozen=True)
  class OptimSettings:
    name: str
    lr: float
    def check(self, c: config_schema.Checker) -> None:
      c.one_of("name", tuple(OPTIMIZERS))
      c.number("lr", low=0.0, strict=True)

`read(config, "optim", OptimSettings)` builds one from a config: a key the class does not
declare fails with a did-you-mean hint, a declared key without a default that the config
lacks fails, a field made with `section(Cls)` is read as a nested section, and every
error names the key by its full dotted path and says how to fix it:

  optim.name='adamm': unknown name. Did you mean 'adam'? Allowed: 'adafactor', 'adam',
  'adamw'. Fix: pass --config.optim.name=adam (or edit the config file).

So adding a config key is adding a field (and its check) where the key is used, and its
default in configs/. `imagen_jax.config_checks` says which sections each config kind has.
Imports nothing of imagen_jax, so that any module, the diffusion math included, can
declare its section.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Sequence, TypeVar

import ml_collections

T = TypeVar("T")

_MISSING = object()


class ConfigError(ValueError):
  """A config value the user can fix; `key` is its dotted path (or a flag such as --mode).

  `allowed` lists the valid values, or the valid key names when `bad_key` is set: then
  the key itself is what is wrong, and the hint is matched against its last component.
  """

  def __init__(self, key: str, value: Any, problem: str, *,
               allowed: Sequence[Any] | None = None, fix: str | None = None,
               bad_key: bool = False):
    self.key, self.value = key, value
    shown = "<missing>" if value is _MISSING else repr(value)
    msg = f"{key}={shown}: {problem}."
    hint = None
    if allowed is not None:
      wrong = key.rsplit(".", 1)[-1] if bad_key else str(value)
      close = difflib.get_close_matches(wrong, [str(a) for a in allowed], n=1)
      hint = close[0] if close else None
      if hint is not None:
        msg += f" Did you mean {hint!r}?"
      msg += " Allowed: " + ", ".join(map(repr, allowed)) + "."
    if fix is None and bad_key:
      fix = f"rename it{f' to {hint!r}' if hint else ''} or remove it in the config file"
    elif fix is None:
      flag = key if key.startswith("--") else f"--config.{key}"
      fix = f"pass {flag}={hint if hint is not None else 'VALUE'} (or edit the config file)"
    super().__init__(f"{msg} Fix: {fix}.")


def missing(path: str) -> ConfigError:
  return ConfigError(path, _MISSING, "the config has no such key", fix="add it to the config file")


def get(config: ml_collections.ConfigDict, path: str) -> Any:
  """The value at dotted `path`; a missing key is a ConfigError, not an AttributeError."""
  node = config
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise missing(path)
    node = node[part]
  return node


def is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
  """An int or float that is not a bool or NaN (infinity is a number)."""
  return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def as_dict(d: Any) -> dict[str, Any]:
  """A plain dict of a dict or ConfigDict (None: empty)."""
  if d is None:
    return {}
  return dict(d.to_dict() if hasattr(d, "to_dict") else d)


def field_names(cls: type) -> list[str]:
  return sorted(f.name for f in dataclasses.fields(cls))


def from_mapping(cls: type[T], d: Any, *, error: type[Exception] = ValueError,
                 what: str | None = None) -> T:
  """cls(**d) for code that builds a dataclass from a mapping outside `read` (a network's
  config, a cascade's stage overrides): keys of `d` that are not fields raise `error`
  naming them and the valid ones (`what` names the section, default the class name)."""
  d = as_dict(d)
  unknown = sorted(set(d) - set(field_names(cls)))
  if unknown:
    raise error(f"Unknown {what or cls.__name__} key(s) {unknown}; valid keys: "
                f"{field_names(cls)}.")
  return cls(**d)


def section(cls: type, *, optional: bool = False) -> Any:
  """A field holding the nested section `cls` (read from the key of the field's name);
  `optional`: the config may leave it out (the field is then None)."""
  meta = {"section": cls}
  return dataclasses.field(default=None, metadata=meta) if optional else dataclasses.field(
      metadata=meta)


class Checker:
  """Checks the fields of one section instance; errors name `path` + the field. `root` is
  the whole config, for the few checks that compare with another section."""

  def __init__(self, obj: Any, path: str, root: ml_collections.ConfigDict | None = None):
    self.obj, self.path, self.root = obj, path, root

  def key(self, name: str) -> str:
    """The dotted path of field `name` ("optim.lr")."""
    return f"{self.path}.{name}" if self.path else name

  def flag(self, name: str) -> str:
    """The command-line flag that sets field `name` ("--config.optim.lr")."""
    return f"--config.{self.key(name)}"

  def error(self, name: str, problem: str, **kw: Any) -> ConfigError:
    """A ConfigError for field `name` (its value is read from the instance)."""
    return ConfigError(self.key(name), getattr(self.obj, name), problem, **kw)

  def one_of(self, name: str, allowed: Sequence[Any]) -> Any:
    value = getattr(self.obj, name)
    if value not in allowed:
      raise self.error(name, f"unknown {name}", allowed=allowed)
    return value

  def integer(self, name: str, minimum: int | None = None, why: str = "") -> int:
    """An int (not a bool) >= minimum; `why` is appended to the message, e.g. "(0 = all)"."""
    value = getattr(self.obj, name)
    if not (is_int(value) and (minimum is None or value >= minimum)):
      need = "an integer" + ("" if minimum is None else f" >= {minimum}")
      raise self.error(name, f"must be {need}" + (f" {why}" if why else ""))
    return value

  def number(self, name: str, *, low: float = -math.inf, high: float = math.inf,
             strict: bool = False, why: str = "") -> float:
    """A non-NaN number >= low (> low when strict) and <= high; infinity passes when in range."""
    value = getattr(self.obj, name)
    ok = is_number(value) and (value > low if strict else value >= low) and value <= high
    if not ok:
      need = f"a number {'>' if strict else '>='} {low}" + (
          f" and <= {high}" if high != math.inf else "")
      raise self.error(name, f"must be {need}" + (f" {why}" if why else ""))
    return value

  def string(self, name: str, *, nonempty: bool = False) -> str:
    value = getattr(self.obj, name)
    if not isinstance(value, str) or (nonempty and not value):
      raise self.error(name, "must be a non-empty string" if nonempty else "must be a string")
    return value

  def boolean(self, name: str) -> bool:
    value = getattr(self.obj, name)
    if not isinstance(value, bool):
      raise self.error(name, "must be True or False")
    return value

  def one_set(self, names: Sequence[str], *, required: bool, what: str) -> str | None:
    """The one field of `names` that is set (not None): two set is an error, and so is
    none when `required` (a section whose default sets one: its keys are object-typed,
    so =None unsets one on the command line). Returns its name, or None."""
    given = [n for n in names if getattr(self.obj, n) is not None]
    if len(given) > 1:
      first, second = given[0], given[1]
      fix = (f"pass {self.flag(first)}=None to use {second} (or {self.flag(second)}=None "
             f"to keep {first})" if required else
             f"pass only one of {self.flag(first)} and {self.flag(second)}")
      raise self.error(second, f"the {what} is given one way only, and "
                               f"{self.key(first)}={getattr(self.obj, first)!r} is set too",
                       fix=fix)
    if not given and required:
      raise self.error(names[0], f"no {what} is given (set one of {', '.join(names)})",
                       fix=f"pass e.g. {self.flag(names[0])}=0.2")
    return given[0] if given else None

  def strings(self, name: str, *, nonempty: bool = True, fix: str | None = None
              ) -> tuple[str, ...]:
    """A tuple (or list) of non-empty strings, itself non-empty when `nonempty`."""
    value = getattr(self.obj, name)
    if not (isinstance(value, (tuple, list)) and (value or not nonempty) and
            all(isinstance(v, str) and v for v in value)):
      raise self.error(name, "must be a " + ("non-empty " if nonempty else "") +
                       "tuple of non-empty strings", fix=fix)
    return tuple(value)


def read(config: ml_collections.ConfigDict, path: str, cls: type[T]) -> T:
  """The section at dotted `path` of `config` as a checked `cls` (see the module doc).
  `path` "" reads the fields of `cls` from the top level, which holds other keys too."""
  fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
  if path:
    node = get(config, path)
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      raise ConfigError(path, node, "must be a section (a dict of keys)",
                        fix="restore the section in the config file")
    values = as_dict(node)
  else:
    values = {k: (as_dict(config[k]) if isinstance(config[k], ml_collections.ConfigDict)
                  else config[k]) for k in fields if k in config}
  for key in sorted(values):
    if key not in fields:
      raise ConfigError(f"{path}.{key}", values[key], f"not a key of {path} "
                        f"({cls.__module__}.{cls.__name__})", allowed=sorted(fields),
                        bad_key=True)
  kwargs = {}
  for name, f in fields.items():
    required = (f.default is dataclasses.MISSING and
                f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
    key = f"{path}.{name}" if path else name
    if name not in values:
      if required:
        raise missing(key)
      continue
    sub = f.metadata.get("section")
    kwargs[name] = read(config, key, sub) if sub else values[name]
  obj = cls(**kwargs)
  check = getattr(obj, "check", None)
  if check is not None:
    check(Checker(obj, path, config))
  return obj
