"""nanodet-jax: NanoDet (NanoDet-Plus) in JAX / Flax NNX.

The stable entry points are re-exported here and imported lazily, so that
``import nanodet_jax`` neither imports JAX nor changes any process setting (XLA flags
are applied by the command-line entry points, see ``runtime.py``)::

    config = nanodet_jax.load_config("configs/nanodet_plus_m.py", ["--config.seed=1"])
    model = nanodet_jax.build_model(config, with_aux=False)
    nanodet_jax.convert.load_torch_weights(model, "nanodet-plus-m_320.pth")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
_EXPORTS = {
    "load_config": ("nanodet_jax.config.loading", "load_config"),
    "build_model": ("nanodet_jax.models", "build_model"),
    "NanoDetPlus": ("nanodet_jax.models.detectors.nanodet_plus", "NanoDetPlus"),
}
_SUBMODULES = ("convert",)
__all__ = [*_EXPORTS, *_SUBMODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        return getattr(importlib.import_module(module), attr)
    if name in _SUBMODULES:
        return importlib.import_module(f"nanodet_jax.{name}")
    raise AttributeError(f"module 'nanodet_jax' has no attribute {name!r}")
