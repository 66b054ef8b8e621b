"""Every `launch.py --mode` job, one module each:

  testbed_sample.py  --mode=sample of configs/gmm.py: the mixture's exact denoiser, sampled
  testbed_train.py   --mode=train of configs/gmm_denoiser.py: an MLP denoiser, scored
  build_data.py      --mode=build_data of a stage config: its TFDS dataset
  precompute.py      --mode=precompute of a stage config: the text-embedding cache
  train.py           --mode=train of a stage config (the loop is imagen_jax/train/trainer.py)
  eval_stage.py      --mode=eval of a base stage config: its checkpoints over training
  eval_reference.py  --mode=eval_reference of a base stage config: what its evaluations
                     share (reference features, the alignment model), computed once
  sample_cascade.py  --mode=sample of configs/cascade.py: prompts through the stages
  eval_cascade.py    --mode=eval of configs/cascade.py: the guidance sweep (FID, alignment)

Each module declares, as literals at its top, what it serves, and defines the job:

  MODE = "eval"                    # the --mode it runs
  KINDS = ("base",)                # the config kinds (config.kind) it accepts
  SECTIONS = {"eval": "StageEvalSettings"}
                                   # optional: config sections this mode reads beyond
                                   # its kind's, each a dataclass of this module (or
                                   # "module:Class"), checked by imagen_jax.config_checks
  def run(config, workdir): ...

`specs()` reads the declarations without importing the modules (they import JAX and the
data stack; launch.py validates the config first, so a typo fails in a second), and
`table()` is launch.py's one (kind, mode) -> job table. Adding a job is adding a module.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
_DECLARED = ("MODE", "KINDS", "SECTIONS")


@dataclasses.dataclass(frozen=True)
class JobSpec:
  module: str                 # e.g. "imagen_jax.jobs.train"
  mode: str
  kinds: tuple[str, ...]
  sections: tuple[tuple[str, str], ...] = ()   # (config path, "module:Class")

  @property
  def target(self) -> str:
    return f"{self.module}:run"


def _declarations(path: str) -> dict[str, object]:
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  found = {}
  for node in tree.body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      target = node.targets[0]
      if isinstance(target, ast.Name) and target.id in _DECLARED:
        found[target.id] = ast.literal_eval(node.value)
  return found


@functools.lru_cache(maxsize=None)
def specs() -> tuple[JobSpec, ...]:
  """The declared jobs, in module-name order."""
  out = []
  for name in sorted(os.listdir(_HERE)):
    if not name.endswith(".py") or name.startswith("_"):
      continue
    path = os.path.join(_HERE, name)
    d = _declarations(path)
    if "MODE" not in d or "KINDS" not in d:
      raise ValueError(f"{path} declares no MODE and KINDS; every module of "
                       "imagen_jax/jobs/ is a launch.py job (see the package docstring).")
    out.append(JobSpec(module=f"imagen_jax.jobs.{name[:-3]}", mode=str(d["MODE"]),
                       kinds=tuple(d["KINDS"]),
                       sections=tuple((path, cls if ":" in cls else
                                       f"imagen_jax.jobs.{name[:-3]}:{cls}")
                                      for path, cls in dict(d.get("SECTIONS", {})).items())))
  return tuple(out)


def table() -> dict[tuple[str, str], JobSpec]:
  """(config kind, mode) -> the job; two jobs may not claim the same pair."""
  out: dict[tuple[str, str], JobSpec] = {}
  for spec in specs():
    for kind in spec.kinds:
      key = (kind, spec.mode)
      if key in out:
        raise ValueError(f"{spec.module} and {out[key].module} both serve {key}.")
      out[key] = spec
  return out


def modes() -> tuple[str, ...]:
  """Every mode some job runs, in a fixed order (launch.py's --mode choices)."""
  return _ordered({s.mode for s in specs()}, ("train", "sample", "eval", "precompute",
                                               "build_data", "eval_reference"))


def modes_of(kind: str) -> tuple[str, ...]:
  """The modes a config kind can run, in pipeline order (build the data, precompute,
  train, sample, evaluate)."""
  return _ordered({mode for (k, mode) in table() if k == kind},
                  ("build_data", "precompute", "train", "sample", "eval", "eval_reference"))


def _ordered(found: set[str], order: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(m for m in order if m in found) + tuple(sorted(found - set(order)))
