"""imagen_jax: an Imagen-style text-to-image diffusion cascade in JAX/Flax.

Importing the package applies its XLA:CPU flag defaults before JAX starts a backend
(imagen_jax/runtime.py says which and why; IMAGEN_JAX_XLA_DEFAULTS=0 turns them off).
"""

from imagen_jax import runtime as _runtime

_runtime.apply_xla_flag_defaults()
