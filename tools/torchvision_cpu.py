"""Import torchvision beside a CPU-only torch, for its model definitions (state_dict key names).

The only torchvision wheel matching torch 2.13 on the registry is a CUDA build: its
compiled ``_C.so`` links libtorch_cuda, fails to load against the CPU torch, and
``import torchvision`` then stops on ``operator torchvision::nms does not exist``
(its Python side registers fake kernels for that operator at import). Defining the
``nms`` / ``qnms`` schemas first, with a plain CPU kernel, lets the import finish;
``torchvision.models`` then works (no weights can be downloaded here).

Install it without letting pip replace torch::

    pip install --no-deps torchvision==0.28.0 pillow

Use: ``torchvision = import_torchvision()`` (tests load this file by path; tools run
it from this directory).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections import OrderedDict

# Kept alive for the process: the operator definitions are dropped with the Library object.
_LIBRARY = None


def _torch_nms():
    """tools/reference.py's greedy NMS (torchvision's CPU-kernel semantics), loaded by path so
    that this file works whether or not tools/ is on ``sys.path``."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference.py")
    spec = importlib.util.spec_from_file_location("_nanodet_jax_tools_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.torch_nms


def _has_nms() -> bool:
    import torch

    try:
        torch.ops.torchvision.nms  # noqa: B018  (raises if the operator is not defined)
    except (AttributeError, RuntimeError):
        return False
    return True


def define_cpu_ops() -> None:
    """Define ``torchvision::nms`` / ``qnms`` unless torchvision's own ops can provide them."""
    global _LIBRARY
    import torch

    # A CUDA torch loads torchvision's compiled ops itself; defining them too would clash.
    if _LIBRARY is not None or torch.version.cuda is not None or _has_nms():
        return
    library = torch.library.Library("torchvision", "DEF")
    library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    # Only the schema: torchvision's import registers a fake kernel for it, nothing runs it.
    library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    library.impl("nms", _torch_nms(), "CPU")
    _LIBRARY = library


def import_torchvision() -> types.ModuleType:
    """``import torchvision`` that works with the CPU torch; raises ImportError if it cannot."""
    if "torchvision" in sys.modules and hasattr(sys.modules["torchvision"], "models"):
        return sys.modules["torchvision"]
    try:
        define_cpu_ops()
        import torchvision
    except Exception as e:  # a missing wheel, or a build that still fails to import
        raise ImportError(
            f"torchvision is not importable ({type(e).__name__}: {e}); install it with "
            "`pip install --no-deps torchvision==0.28.0 pillow`"
        ) from e
    # Its ops check asks whether _C.so loaded; the nms defined above is what it would give.
    torchvision.extension._has_ops = lambda: True
    return torchvision


TORCHVISION_BUILDERS = {
    "0.5x": "shufflenet_v2_x0_5",
    "1.0x": "shufflenet_v2_x1_0",
    "1.5x": "shufflenet_v2_x1_5",
    "2.0x": "shufflenet_v2_x2_0",
}


def seeded_shufflenet_state_dict(model_size: str, seed: int) -> OrderedDict:
    """torchvision's ShuffleNetV2 state_dict (its keys, order, shapes, dtypes) with values
    drawn from ``np.random.RandomState(seed)`` in key order.

    Not torchvision's init: that leaves BatchNorm at weight 1, bias 0, mean 0, var 1, under
    which a swapped or dropped BatchNorm tensor would go unnoticed; and a legacy numpy
    stream keeps the values the same across torch / torchvision releases.
    """
    import numpy as np
    import torch

    tv = import_torchvision()
    reference = getattr(tv.models, TORCHVISION_BUILDERS[model_size])(weights=None).state_dict()
    rng = np.random.RandomState(seed)
    out = OrderedDict()
    for key, tensor in reference.items():
        shape = tuple(tensor.shape)
        if key.endswith("num_batches_tracked"):
            value = np.asarray(rng.randint(1, 1000), np.int64)
        elif key.endswith("running_var"):
            value = rng.uniform(0.5, 2.0, shape)
        elif key.endswith("running_mean"):
            value = rng.normal(0.0, 0.2, shape)
        elif tensor.ndim == 1 and not key.startswith("fc."):  # BatchNorm affine
            value = (
                rng.uniform(0.5, 1.5, shape)
                if key.endswith("weight")
                else rng.normal(0.0, 0.2, shape)
            )
        else:  # conv / fc weights: N(0, 1 / fan_in), so the outputs stay O(1)
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
        out[key] = torch.from_numpy(np.asarray(value).astype(tensor.numpy().dtype))
    return out


if __name__ == "__main__":
    tv = import_torchvision()
    keys = list(tv.models.shufflenet_v2_x1_0(weights=None).state_dict())
    print(f"torchvision {tv.__version__}: shufflenet_v2_x1_0 has {len(keys)} state_dict keys")
