"""The noise-schedule arms both studies compare (issue 15's list), as config overrides.

Study A (gmm_schedules.py) runs all seven; Study B (emoji_schedules.py) the first six.
`arms(resolution)` sets the shifted-cosine arm's shift for a stage of that resolution:
2 log(R / 2R) = -1.39 in log-SNR, simple diffusion's shift for an image twice the size
(the mixture has no resolution, so Study A uses the same -1.39 as a 64 px stage).
"""

from __future__ import annotations

import copy
from typing import Any

ARMS: dict[str, dict[str, Any]] = {
    "imagen": {"diffusion.schedule": "cosine", "diffusion.target": "eps",
               "diffusion.weighting": "eps"},
    "v": {"diffusion.schedule": "cosine", "diffusion.target": "v", "diffusion.weighting": "v"},
    "shifted_cosine": {"diffusion.schedule": "shifted_cosine",
                       "diffusion.schedule_kw": {"resolution": 128, "base_resolution": 64},
                       "diffusion.target": "eps", "diffusion.weighting": "eps"},
    "edm": {"diffusion.schedule": "lognormal", "diffusion.target": "v",
            "diffusion.weighting": "edm"},
    "min_snr5": {"diffusion.schedule": "cosine", "diffusion.target": "eps",
                 "diffusion.weighting": "min_snr", "diffusion.weighting_kw": {"gamma": 5.0}},
    "sigmoid": {"diffusion.schedule": "cosine", "diffusion.target": "eps",
                "diffusion.weighting": "sigmoid"},
    "sigmoid_laplace": {"diffusion.schedule": "laplace",
                        "diffusion.schedule_kw": {"mu": 0.0, "b": 1.0},
                        "diffusion.target": "eps", "diffusion.weighting": "sigmoid"},
}


def arms(resolution: int = 64, names: tuple[str, ...] | None = None
         ) -> dict[str, dict[str, Any]]:
  """A copy of ARMS (or of `names` of them, in that order), the shift set for
  `resolution`."""
  out = {n: copy.deepcopy(ARMS[n]) for n in (names or tuple(ARMS))}
  if "shifted_cosine" in out:
    out["shifted_cosine"]["diffusion.schedule_kw"] = {"resolution": 2 * resolution,
                                                      "base_resolution": resolution}
  return out
