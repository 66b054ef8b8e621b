"""benchmarks/models.py loads every config it lists when run as a script (sys.path holds
benchmarks/, not the repo root) from another working directory: it once failed on
`from configs import common` before measuring anything."""

from __future__ import annotations

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_models_benchmark_loads_its_configs_as_a_script(tmp_path):
  code = (f"import sys; sys.path[0] = {str(REPO / 'benchmarks')!r}; import models; "
          "print(len([models.load_config(p, v) for p, v, _ in models.RUNS]))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  assert int(proc.stdout.split()[-1]) >= 10  # all of RUNS: three stages, smoke to paper scale
