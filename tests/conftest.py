"""Suite-wide setup: 8 simulated CPU devices, so sharding tests run on a real mesh.

Set before anything imports jax (conftest is imported first); a flag the user already
passed in XLA_FLAGS wins.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
