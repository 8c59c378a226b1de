"""A model prepared for repeated jitted inference calls.

Two costs a plain ``jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))`` pays on
every call, and that ``InferenceModel`` removes:

* BatchNorm as its own pass over each normalised activation: folded into the convolution
  before it (:mod:`nanodet_jax.models.batchnorm_folding`);
* flattening the nnx ``State`` into the call's arguments: ~0.2 ms per 100 arrays on this
  CPU, 2-5 ms for NanoDet-Plus-m (645 arrays), as much as a third of its batch-1 forward.
  The state's arrays are flattened once and passed as a list; the treedef rebuilds the
  module inside the trace, where it costs nothing at run time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from nanodet_jax.models.batchnorm_folding import fold_batchnorm

log = logging.getLogger("nanodet_jax")


class InferenceModel:
    """An eval-mode copy of ``model`` (BatchNorm folded unless ``fold_bn`` is False) whose
    :meth:`jit` functions take the weights as one flat list of arrays. ``dtype`` (e.g.
    ``jnp.bfloat16``) casts the parameters (``nnx.Param``; BatchNorm statistics, where
    not folded, stay float32) for reduced-precision inference."""

    def __init__(self, model: nnx.Module, fold_bn: bool = True, dtype: Any = None):
        if fold_bn:
            model, folded = fold_batchnorm(model)
            log.debug(f"inference model: {folded} BatchNorms folded into their convolutions")
        else:
            model = nnx.merge(*nnx.split(model))
            model.eval()
        if dtype is not None:
            graphdef, params, rest = nnx.split(model, nnx.Param, ...)
            params = jax.tree.map(lambda p: p.astype(dtype), params)
            model = nnx.merge(graphdef, params, rest)
        self.set_module(model)

    def set_module(self, module: nnx.Module) -> None:
        """Prepare ``module`` (an inference copy, e.g. this one's with a fusion switched
        off: ``benchmarks/fusions.py``) in place of the current one."""
        self.graphdef, self.state = nnx.split(module)
        self.arrays, self._treedef = jax.tree.flatten(self.state)

    def merge(self, arrays: list[jax.Array]) -> nnx.Module:
        """The module for ``arrays`` (this model's, or traced ones inside a jit)."""
        return nnx.merge(self.graphdef, jax.tree.unflatten(self._treedef, arrays))

    def jit(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn(module, *args)`` jitted, called as ``f(*args)`` with this model's weights."""
        jitted = jax.jit(lambda arrays, *args: fn(self.merge(arrays), *args))
        return lambda *args: jitted(self.arrays, *args)
