"""nanodet-jax: NanoDet-Plus in JAX / Flax NNX."""

from nanodet_jax.runtime import configure_xla

configure_xla()  # before any JAX computation; see runtime.py

from nanodet_jax.model import NanoDetPlus, build_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["NanoDetPlus", "build_model", "__version__"]
