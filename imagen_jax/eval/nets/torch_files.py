"""Reading PyTorch checkpoint files without torch.

Three layouts, each as torch itself writes it:
  - `torch.save` zip archives (torch >= 1.6): `<root>/data.pkl` pickles the object, and each
    tensor storage is a raw little-endian file `<root>/data/<key>`;
  - TorchScript archives (`torch.jit.save`): the same, plus `<root>/code/` (the TorchScript
    source) and `constants.pkl`. data.pkl pickles the module tree as `__torch__.*` objects whose
    state is a dict of attributes (parameters, buffers, submodules, ints, lists);
  - the legacy stream of `torch.save(..., _use_new_zipfile_serialization=False)` (the default
    before torch 1.6): pickles of a magic number, protocol and system info, the object, the
    storage keys, then every storage as an int64 element count followed by its bytes.

The pickle is read by a restricted Unpickler. It builds tensors (`_rebuild_tensor_v2` on typed
storages, `_rebuild_parameter`), plain containers and TorchScript module objects (as dicts),
and refuses every other class, so reading an untrusted file cannot run code the way
`torch.load(weights_only=False)` can. Tensors come back as numpy arrays that own their data
(bfloat16 as float32, which numpy has no dtype for). Sparse, quantized and non-CPU-layout
tensors and arbitrary pickled Python objects are refused with an error naming them.

`read_torch_archive(path)` is the usual entry point: `{dotted.name: np.ndarray}` of every
tensor, named like `state_dict()` keys (`net.layers.conv.weight` for a TorchScript module).
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import tarfile
import zipfile
from typing import Any, Callable, Mapping

import numpy as np

from imagen_jax.errors import UserError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001

# Storage class name (as pickled: `torch.FloatStorage`) -> numpy dtype name.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "UntypedStorage": "uint8",
}


class TorchFileError(UserError, ValueError):
  """A PyTorch file that is unreadable here: corrupt, or holding more than tensors."""


def _np_dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  """A storage named in the pickle; its bytes are read once the pickle is done (the legacy
  format stores them after it). `offset` is in elements, for legacy storage views."""
  key: str
  dtype: str
  offset: int = 0


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  size: tuple[int, ...]
  stride: tuple[int, ...]


class ScriptObject(dict):
  """A TorchScript object (`__torch__.*` class) as the dict of its attributes."""
  torch_type = "?"

  def __setstate__(self, state: Any) -> None:
    if not isinstance(state, dict):
      raise TorchFileError(
          f"TorchScript object {self.torch_type} has a custom __getstate__ (state "
          f"{type(state).__name__}); only modules whose state is their attributes are read. "
          "Fix: in Python with torch, save its state_dict() with torch.save instead.")
    self.update(state)

  def __repr__(self) -> str:
    return f"ScriptObject<{self.torch_type}>({dict.__repr__(self)})"


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualname: str) -> type:
  if qualname not in _SCRIPT_CLASSES:
    _SCRIPT_CLASSES[qualname] = type("ScriptObject", (ScriptObject,), {"torch_type": qualname})
  return _SCRIPT_CLASSES[qualname]


def _rebuild_tensor(storage, storage_offset, size, stride, *unused) -> _TensorRef:
  if not isinstance(storage, _StorageRef):
    raise TorchFileError(f"A tensor rebuilt from {type(storage).__name__}, not a storage; the "
                         "file is corrupt or not a torch checkpoint.")
  return _TensorRef(storage, int(storage_offset), tuple(map(int, size)),
                    tuple(map(int, stride)))


def _rebuild_parameter(data, *unused):  # nn.Parameter: the tensor; requires_grad is moot
  return data


def _identity(value, *unused):
  return value


# (module, name) -> callable the pickle may call. Nothing else can be constructed.
_ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,  # state dicts, with _metadata
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_genericlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _StorageType(str):
  """The pickled `torch.FloatStorage` class, standing for its dtype name."""


class _Unpickler(pickle.Unpickler):
  """Builds only what _ALLOWED, storage types and `__torch__.*` classes name."""

  def __init__(self, file, source: str):
    super().__init__(file)
    self.source = source
    self.storage_dtypes: dict[str, str] = {}  # storage key -> dtype name

  def find_class(self, module: str, name: str):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_STORAGE_DTYPES[name])
    if module.startswith("__torch__"):  # a TorchScript class: read as its attribute dict
      return _script_class(f"{module}.{name}")
    raise TorchFileError(
        f"{self.source} pickles {module}.{name}, which is not read here: only tensors, "
        "containers and TorchScript modules are (arbitrary objects would need torch and would "
        "run code from the file). Fix: load it with torch once and torch.save its "
        "state_dict(), or pass a plain state-dict / TorchScript file.")

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
      kind = pid[0] if isinstance(pid, tuple) and pid else pid
      raise TorchFileError(f"{self.source} references a persistent object of kind {kind!r}; "
                           "only tensor storages are read. Fix: save a state_dict() instead.")
    storage_type, key = pid[1], str(pid[2])
    if not isinstance(storage_type, _StorageType):
      raise TorchFileError(f"{self.source} has a storage of unknown type {storage_type!r}; "
                           "the file is corrupt or from an unsupported torch version.")
    dtype = str(storage_type)
    self.storage_dtypes.setdefault(key, dtype)
    if len(pid) == 6 and pid[5] is not None:  # legacy: a view (view key, offset, size)
      return _StorageRef(key, dtype, int(pid[5][1]))
    return _StorageRef(key, dtype)


def _materialize(obj: Any, storages: Callable[[_StorageRef], np.ndarray], memo: dict) -> Any:
  """Replace every _TensorRef in a pickled tree by its array (dicts and lists in place)."""
  if isinstance(obj, _TensorRef):
    return _tensor(obj, storages(obj.storage))
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, dict):
    memo[id(obj)] = obj
    for k, v in obj.items():
      obj[k] = _materialize(v, storages, memo)
  elif isinstance(obj, list):
    memo[id(obj)] = obj
    obj[:] = [_materialize(v, storages, memo) for v in obj]
  elif isinstance(obj, tuple):
    memo[id(obj)] = out = tuple(_materialize(v, storages, memo) for v in obj)
    return out
  return obj


def _tensor(ref: _TensorRef, flat: np.ndarray) -> np.ndarray:
  """The tensor viewed from its storage by offset, size and strides (in elements)."""
  offset = ref.offset + ref.storage.offset
  size, stride = ref.size, ref.stride
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise TorchFileError(f"Tensor with size {size} and stride {stride} is malformed; the file "
                         "is corrupt.")
  numel = int(np.prod(size, dtype=np.int64))
  if numel == 0:
    out = np.zeros(size, flat.dtype)
  else:
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= flat.size:
      raise TorchFileError(f"Tensor of size {size} (stride {stride}, offset {offset}) reads "
                           f"past its storage of {flat.size} elements; the file is truncated "
                           "or corrupt.")
    view = np.lib.stride_tricks.as_strided(flat[offset:], shape=size,
                                           strides=[s * flat.itemsize for s in stride],
                                           writeable=False)
    out = np.array(view)  # a copy: the caller owns it, and views of storage bytes end here
  if out.dtype.name == "bfloat16":
    out = out.astype(np.float32)
  return out


def _storage_array(data: bytes, dtype: str, source: str, key: str) -> np.ndarray:
  dt = _np_dtype(dtype).newbyteorder("<")
  if len(data) % dt.itemsize:
    raise TorchFileError(f"Storage {key} of {source} has {len(data)} bytes, not a multiple of "
                         f"{dt.itemsize} ({dtype}); the file is truncated or corrupt.")
  return np.frombuffer(data, dt).astype(dt.newbyteorder("="), copy=False)


def _unpickle(file, source: str) -> tuple[Any, _Unpickler]:
  """One pickle from `file` through the restricted Unpickler; any malformation is a
  TorchFileError."""
  unpickler = _Unpickler(file, source)
  try:
    return unpickler.load(), unpickler
  except TorchFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (whatever a malformed pickle raises)
    raise TorchFileError(f"Cannot unpickle {source}: {e}. The file is corrupt or not a PyTorch "
                         "file; re-download it, or pass the .pt/.pth file that torch wrote.") from e


def _zip_root(zf: zipfile.ZipFile, source: str) -> str:
  roots = sorted(n[: -len("data.pkl")] for n in zf.namelist()
                 if n.endswith("/data.pkl") and n.count("/") == 1)
  if len(roots) != 1:
    raise TorchFileError(
        f"{source} is a zip file but not a torch.save / torch.jit.save archive (it has "
        f"{'no' if not roots else len(roots)} '<root>/data.pkl' entries). Fix: pass the .pt/"
        ".pth file that torch wrote.")
  return roots[0]


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    root = _zip_root(zf, path)
    names = set(zf.namelist())
    order = root + "byteorder"
    if order in names and zf.read(order).strip() != b"little":
      raise TorchFileError(f"{path} was saved on a big-endian machine; re-save it on a "
                           "little-endian one (x86, ARM).")
    tree, _ = _unpickle(io.BytesIO(zf.read(root + "data.pkl")), path)
    cache: dict[str, np.ndarray] = {}

    def storage(ref: _StorageRef) -> np.ndarray:
      if ref.key not in cache:
        member = f"{root}data/{ref.key}"
        if member not in names:
          raise TorchFileError(f"{path} lacks storage {member}; the archive is truncated.")
        cache[ref.key] = _storage_array(zf.read(member), ref.dtype, path, ref.key)
      return cache[ref.key]

    return _materialize(tree, storage, {})


def _load_legacy(path: str) -> Any:
  with open(path, "rb") as f:
    try:
      magic = _Unpickler(f, path).load()
    except TorchFileError:
      raise
    except Exception:  # pylint: disable=broad-except  (not a pickle at all)
      magic = None
    if magic != LEGACY_MAGIC:
      raise TorchFileError(f"{path} is not a PyTorch file (no torch.save magic number). Fix: "
                           "pass a .pt/.pth file that torch wrote (tar-format files of torch "
                           "< 0.4 are not read; re-save them with a current torch).")
    protocol, _ = _unpickle(f, path)
    if protocol != LEGACY_PROTOCOL:
      raise TorchFileError(f"{path} uses torch.save protocol {protocol}, not "
                           f"{LEGACY_PROTOCOL}; re-save it with a current torch.")
    info, _ = _unpickle(f, path)
    if isinstance(info, dict) and not info.get("little_endian", True):
      raise TorchFileError(f"{path} was saved on a big-endian machine; re-save it on a "
                           "little-endian one.")
    tree, unpickler = _unpickle(f, path)
    keys, _ = _unpickle(f, path)
    keys = [str(k) for k in keys]
    storages: dict[str, np.ndarray] = {}
    for key in keys:
      dtype = unpickler.storage_dtypes.get(key)
      if dtype is None:
        raise TorchFileError(f"{path} stores storage {key} that no tensor names; the file is "
                             "corrupt.")
      head = f.read(8)
      if len(head) < 8:
        raise TorchFileError(f"{path} ends before storage {key}; the file is truncated.")
      (numel,) = struct.unpack("<q", head)
      nbytes = numel * _np_dtype(dtype).itemsize
      data = f.read(nbytes)
      if len(data) != nbytes:
        raise TorchFileError(f"{path} ends inside storage {key}; the file is truncated.")
      storages[key] = _storage_array(data, dtype, path, key)

  def storage(ref: _StorageRef) -> np.ndarray:
    if ref.key not in storages:
      raise TorchFileError(f"{path} lacks the data of storage {ref.key}; the file is "
                           "truncated.")
    return storages[ref.key]

  return _materialize(tree, storage, {})


def load_torch_file(path: str | os.PathLike) -> Any:
  """The object a PyTorch file pickles, with numpy arrays for tensors, dicts for
  OrderedDicts and `ScriptObject` dicts for TorchScript modules (see the module docstring)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise TorchFileError(f"PyTorch file {path!r} does not exist; check the path.")
  if zipfile.is_zipfile(path):
    return _load_zip(path)
  if tarfile.is_tarfile(path):
    raise TorchFileError(f"{path} is in the tar format of torch < 0.4, which is not read here. "
                         "Fix: load it with torch once and torch.save it again.")
  return _load_legacy(path)


def flatten_tensors(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  """Every array in a nested dict/list tree as {dotted.path: array}; other leaves (ints,
  flags, strings of TorchScript attributes) are dropped."""
  out: dict[str, np.ndarray] = {}

  def walk(node: Any, name: str, seen: tuple) -> None:
    if isinstance(node, np.ndarray):
      if name in out:
        raise TorchFileError(f"Two tensors flatten to the name {name!r}; read the file with "
                             "load_torch_file instead.")
      out[name] = node
      return
    if id(node) in seen:  # a reference cycle (possible in general pickles): stop
      return
    if isinstance(node, Mapping):
      items = node.items()
    elif isinstance(node, (list, tuple)):
      items = enumerate(node)
    else:
      return
    for k, v in items:
      walk(v, f"{name}.{k}" if name else str(k), seen + (id(node),))

  walk(tree, prefix, ())
  return out


def read_torch_archive(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a `torch.save` file (zip or legacy) or TorchScript archive, as
  `{dotted.name: np.ndarray}`: a state dict's own keys, or `state_dict()`-style names of a
  TorchScript module's parameters and buffers."""
  return flatten_tensors(load_torch_file(path))


def is_torchscript(path: str | os.PathLike) -> bool:
  """Whether `path` is a TorchScript archive (written by torch.jit.save)."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    root = _zip_root(zf, path)
    return any(n.startswith(root + "code/") for n in zf.namelist())
