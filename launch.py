r"""Runs one experiment: a config, a workdir and a mode.

  python launch.py --config=configs/FILE.py[:VARIANT] --workdir=DIR --mode=MODE \
      [--config.KEY=VALUE ...]

MODE is train, sample, eval, precompute or build_data; each config kind supports some of
them (configs/gmm.py, the analytic testbed: sample; configs/gmm_denoiser.py, a network
denoiser trained on it and scored against the exact one: train; the network configs
base64/sr256/sr1024:
build_data, which prepares their dataset, precompute, which fills the text-embedding
cache, and train; configs/cascade.py, the trained stages together: sample and eval).
Examples:

  python launch.py --config=configs/gmm.py:ring --workdir=/tmp/gmm --mode=sample
  python launch.py --config=configs/gmm.py:64d --workdir=/tmp/gmm64 --mode=sample \
      --config.diffusion.sampler.method=heun --config.diffusion.sampler.steps=18
  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=build_data
  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=precompute
  python launch.py --config=configs/base64.py:emoji --workdir=/tmp/base64 --mode=train
  python launch.py --config=configs/cascade.py:demo --workdir=/tmp/samples --mode=sample \
      --prompt="rocket, twemoji style" --prompt="red apple, openmoji style"
  python launch.py --config=configs/cascade.py:demo --workdir=/tmp/eval --mode=eval

Compiled programs are kept in a persistent compilation cache (default
~/.cache/imagen_jax/xla, or $JAX_COMPILATION_CACHE_DIR; --compilation_cache_dir=DIR to
choose, --nocompilation_cache to turn it off), so a resumed run, another sweep arm of
the same shapes or a repeated job does not compile its train step and samplers again.

Overrides can only set keys the config already has (configs are locked); a dict-valued
key is replaced whole: --config.diffusion.schedule_kw="{'logsnr_min': -20.0}".
Mistakes a user can fix (a bad flag or value, an unknown key, an unsupported mode) print
one paragraph on stderr and exit with status 2.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from typing import NoReturn

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from imagen_jax import jobs  # declarations only: no JAX, no job module imported

MODES = jobs.modes()
# (config kind, mode) -> its job, from the declarations of imagen_jax/jobs/*.py. A job's
# module is imported only after the config is validated, so a typo fails before any
# heavy import or compile.
JOBS = {key: spec.target for key, spec in jobs.table().items()}

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/FILE.py[:VARIANT].",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory; created if missing. Jobs overwrite only their own files.")
_MODE = flags.DEFINE_enum("mode", None, MODES, "What to run with the config.")
# Multi-host: TPU pods, SLURM and Open MPI clusters fill these in themselves
# (--distributed alone); elsewhere name the coordinator and this process explicitly.
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() (auto-detects TPU/SLURM/MPI).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0; implies --distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
# Prompts for a cascade's --mode=sample (they replace config.sample.prompts).
_PROMPT = flags.DEFINE_multi_string("prompt", None, "A prompt to sample (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file of prompts, one per line.")
_CACHE = flags.DEFINE_bool(
    "compilation_cache", True, "Keep compiled XLA programs on disk and reuse them.")
_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None, "Directory of the compilation cache (default: "
    "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/imagen_jax/xla).")
flags.mark_flags_as_required(["config", "workdir", "mode"])


def _fail(message: str) -> NoReturn:
  print(f"launch.py: error: {message}", file=sys.stderr)
  sys.exit(2)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}; flags need a leading -- and KEY=VALUE form.")
  config, mode, workdir = _CONFIG.value, _MODE.value, _WORKDIR.value
  if not flags.FLAGS["verbosity"].present:
    # Orbax and JAX log every checkpoint read and backend probe at INFO; keep the console
    # for our own progress (pass --verbosity=0 to see them).
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    _fail(f"--workdir={workdir} exists and is not a directory.")

  if _PROMPT.value or _PROMPTS_FILE.value:
    if "sample" not in config:
      _fail("--prompt/--prompts_file are for a cascade config's --mode=sample "
            "(configs/cascade.py).")
    with config.unlocked():
      config.sample.prompts = tuple(_PROMPT.value or ())
      config.sample.prompts_file = _PROMPTS_FILE.value or ""

  # Before anything can start a JAX backend: the package's XLA flag defaults
  # (imagen_jax/runtime.py), then multi-host setup and the compilation cache.
  from imagen_jax import runtime  # pylint: disable=g-import-not-at-top
  if _DISTRIBUTED.value or _COORDINATOR.value:
    _initialize_distributed()
  if _CACHE.value:
    runtime.enable_compilation_cache(_CACHE_DIR.value)
  else:
    runtime.disable_compilation_cache()
  from imagen_jax import config_checks  # imports JAX (the schedule/sampler registries)
  try:
    config_checks.validate(config, mode)
  except config_checks.ConfigError as e:
    _fail(str(e))

  from imagen_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  module, function = JOBS[(config.kind, mode)].split(":")
  try:
    getattr(importlib.import_module(module), function)(config, workdir)
  except UserError as e:  # a bad input found while running: the message says the fix
    _fail(str(e))


def _initialize_distributed() -> None:
  """jax.distributed.initialize before any other JAX use. CPU collectives across processes
  need gloo (the setting only affects the CPU backend, so it is harmless on GPU/TPU)."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      _fail("--coordinator_address needs --num_processes and --process_id as well.")
    kwargs = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                  process_id=_PROCESS_ID.value)
  jax.distributed.initialize(**kwargs)


# Flag parsing: absl's, with one-paragraph messages and exit status 2 for user errors. -----

def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing; a mistake in a flag, an override or the config file exits 2."""
  spec = _flag_value(argv, "config")
  if spec is not None and not os.path.isfile(spec.split(":", 1)[0]):
    _fail(f"--config={spec}: no such file {spec.split(':', 1)[0]!r} "
          f"(relative paths start from {os.getcwd()}).")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_short_flag_error(str(e)))
  except (KeyError, AttributeError) as e:
    # ml_collections raises these, without the key's path, for an override of a key the
    # config lacks; name that key.
    message = _unknown_override(argv, spec)
    if message is None:
      raise
    _fail(message)


def _flag_value(argv: list[str], name: str) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith((f"--{name}=", f"-{name}=")):
      return arg.split("=", 1)[1]
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _short_flag_error(message: str) -> str:
  """A config file whose get_config raised comes back as a whole traceback; keep its
  last frame and the exception line."""
  required = re.search(r"Flag --(\w+) must have a value other than None", message)
  if required:
    return (f"--{required.group(1)} is required. Usage: python launch.py "
            f"--config=configs/FILE.py[:VARIANT] --workdir=DIR --mode={'|'.join(MODES)}")
  head, sep, trace = message.partition(": Error whilst parsing config file")
  if not sep:
    return message
  lines = [l.strip() for l in trace.splitlines() if l.strip()]
  frames = [l for l in lines if l.startswith("File ")]
  return f"{head}: {lines[-1]}" + (f" ({frames[-1]})" if frames else "")


def _unknown_override(argv: list[str], spec: str | None) -> str | None:
  """Names the first `--config.KEY` override whose key the config does not have."""
  if spec is None:
    return None
  from imagen_jax import config_files  # pylint: disable=g-import-not-at-top
  try:  # load it again: the failed parse kept no config
    config = config_files.load(spec)
  except Exception:  # the original error is more useful than this one
    return None
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    node, parts = config, match.group(1).split(".")
    for i, part in enumerate(parts):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      where = f"under {'.'.join(parts[:i])}" if i else "at the top level"
      keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      hint = difflib.get_close_matches(part, keys, n=1)
      return (f"--config.{match.group(1)}: {spec} has no key {part!r} {where}"
              + (f" (did you mean {hint[0]!r}?)" if hint else "")
              + (f"; keys there: {', '.join(keys)}" if keys else "")
              + ". Configs are locked, so overrides can only set keys the config file "
                "defines; add new keys there"
              + (f", or replace the whole dict: --config.{'.'.join(parts[:i])}=\"{{'{part}': VALUE}}\"."
                 if i and isinstance(node, ml_collections.ConfigDict) and not keys else "."))
  return None


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
