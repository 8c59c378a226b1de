"""Inference models with BatchNorm folded into the convolutions before it.

In eval mode ``bn(conv(x))`` is one convolution with kernel ``w * s`` and bias
``b * s + (beta - mean * s)``, ``s = gamma / sqrt(var + eps)`` per output channel. The
folded model skips one pass over every normalised activation (what the ONNX export and
NanoDet's deployment runtimes do too); ``Predictor`` runs it. A folded depthwise, 1x1
or stem convolution also takes over the activation after its norm where the module allows
it (``_fuse_epilogue``): on CPU the C++ kernels then apply bias and activation as they
store each output vector.

Which convolution a BatchNorm follows is declared, never guessed: folding is only right
when the convolution's output feeds nothing but that BatchNorm. Three places declare it:

* ``Sequential``: a ``Conv2d`` directly followed by a BatchNorm;
* ``ConvModule`` / ``DepthwiseConvModule`` (their ``bn`` / ``dwnorm`` / ``pwnorm``);
* any module with a class attribute ``BN_FOLDS = (("conv_attr", "bn_attr"), ...)``
  naming pairs its ``__call__`` applies back to back (a new backbone adds one line).

A BatchNorm no pair names (RepVGG's identity branch, a norm after a sum) stays as it is.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodet_jax.models.frozen import FrozenBatchNorm2d
from nanodet_jax.models.layers import (
    Activation,
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    Sequential,
)
from nanodet_jax.models.norm import BatchNorm2d
from nanodet_jax.ops.depthwise_ffi import fused_depthwise_weights
from nanodet_jax.ops.epilogue import EPILOGUE_ACTIVATIONS
from nanodet_jax.ops.fused_conv import fused_dense_weights

NORMS = (BatchNorm2d, FrozenBatchNorm2d)


class FoldedNorm(nnx.Module):
    """Stands where a BatchNorm was folded into the convolution before it: the identity."""

    def __call__(self, x: Any) -> Any:
        return x


def _f64(v: Any) -> np.ndarray:
    return np.asarray(v[...], np.float64)


def folded_conv_hwio(
    conv: Conv2d, bn: BatchNorm2d | FrozenBatchNorm2d | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """HWIO kernel and bias of ``bn(conv(x))`` as one convolution (float64 maths,
    float32 result; ``bn`` None: the convolution's own). The output channel is HWIO's
    last axis for grouped and depthwise kernels alike."""
    kernel = _f64(conv.weight)
    bias = None if conv.bias is None else _f64(conv.bias)
    if bn is not None:
        scale = _f64(bn.weight) / np.sqrt(_f64(bn.running_var) + bn.eps)
        kernel = kernel * scale
        shift = _f64(bn.bias) - _f64(bn.running_mean) * scale
        bias = shift if bias is None else bias * scale + shift
    return kernel.astype(np.float32), None if bias is None else bias.astype(np.float32)


def _fold_into(conv: Conv2d, bn: BatchNorm2d | FrozenBatchNorm2d) -> None:
    kernel, bias = folded_conv_hwio(conv, bn)
    conv.weight = nnx.Param(jnp.asarray(kernel))
    # nnx.data: a conv built without a bias holds None, which nnx records as static.
    conv.bias = nnx.data(nnx.Param(jnp.asarray(bias)))


def _pairs(module: Any) -> list[tuple[str | int, str | int]]:
    """(conv key, norm key) pairs of ``module`` that may be folded."""
    if isinstance(module, Sequential):
        return [(i, i + 1) for i in range(len(module) - 1)]
    if isinstance(module, ConvModule):
        return [("conv", module.norm_name)] if module.norm_name else []
    if isinstance(module, DepthwiseConvModule):
        return [("depthwise", "dwnorm"), ("pointwise", "pwnorm")]
    return list(getattr(type(module), "BN_FOLDS", ()))


def _get(module: Any, key: str | int) -> Any:
    return module[key] if isinstance(key, int) else getattr(module, key, None)


def _set(module: Any, key: str | int, value: Any) -> None:
    if isinstance(key, int):
        module[key] = value
    else:
        setattr(module, key, value)


def _children(module: Any) -> list[Any]:
    if isinstance(module, nnx.List):
        return list(module)
    return [v for v in vars(module).values() if isinstance(v, (nnx.Module, nnx.List))]


def _fuse_epilogue(module: Any, conv: Conv2d, norm_key: str | int) -> None:
    """Let a folded depthwise, 1x1 or stem ``conv`` (``Conv2d.fusable_epilogue``) apply
    its bias, and the activation ``module`` applies right after the norm, as the kernel's
    epilogue (``ops.depthwise_conv2d_bias_act``, ``ops.fused_conv``). ConvModule and
    DepthwiseConvModule skip their activation when their convolution has one; in a
    Sequential the activation layer is replaced by the identity. Elsewhere (``BN_FOLDS``,
    or ``module`` None: a convolution's own bias with no norm) only the bias moves."""
    if not conv.fusable_epilogue:
        return
    kernel, bias = conv.weight[...], conv.bias[...]
    fused = (
        fused_depthwise_weights(kernel, bias)
        if conv.depthwise
        else fused_dense_weights(kernel, bias)
    )
    conv.weight = nnx.Param(fused)
    conv.bias = None
    conv.fuse_epilogue = True
    if isinstance(module, Sequential):
        nxt = norm_key + 1
        act = module[nxt] if nxt < len(module) else None
    elif isinstance(module, (ConvModule, DepthwiseConvModule)):
        act = module.act
    else:
        return
    if isinstance(act, Activation) and act.name is not None and act.name in EPILOGUE_ACTIVATIONS:
        conv.activation = act.name
        if isinstance(module, Sequential):
            module[norm_key + 1] = Activation(None)


def _fold_tree(module: Any) -> int:
    count = 0
    for conv_key, norm_key in _pairs(module):
        conv, norm = _get(module, conv_key), _get(module, norm_key)
        if isinstance(conv, Conv2d) and isinstance(norm, NORMS):
            _fold_into(conv, norm)
            _set(module, norm_key, FoldedNorm())
            _fuse_epilogue(module, conv, norm_key)
            count += 1
    for child in _children(module):
        count += _fold_tree(child)
    _fuse_stem_max_pool(module)  # after the children: conv1 is folded by then
    _read_split_in_place(module)
    _store_interleaved(module)
    return count


def _store_interleaved(module: Any) -> None:
    """A module declaring ``INTERLEAVED_BRANCH = "name"`` shuffles the output of its
    Sequential ``name`` with a passthrough (``Sequential.interleaved_with``): let the
    Sequential's last convolution store the shuffle when it is a fused 1x1 whose
    activation moved in with it, i.e. only identities follow it."""
    name = getattr(type(module), "INTERLEAVED_BRANCH", None)
    seq = getattr(module, name, None) if name else None
    if not isinstance(seq, Sequential):
        return
    layers = list(seq)
    convs = [i for i, m in enumerate(layers) if isinstance(m, Conv2d)]
    if not convs:
        return
    conv, rest = layers[convs[-1]], layers[convs[-1] + 1 :]
    identities = all(
        isinstance(m, FoldedNorm) or (isinstance(m, Activation) and m.name is None) for m in rest
    )
    if conv.fuse_epilogue and conv.pointwise and identities:
        conv.stores_interleaved = True


def _read_split_in_place(module: Any) -> None:
    """A stride-1 module declaring ``SPLIT_INPUT_BRANCH = "name"`` feeds the Sequential
    ``name`` the second half of its input's channels, unless the Sequential's first
    convolution has ``input_channel_offset`` set to that half: set it once that
    convolution is a fused 1x1, which then reads the channels in place (no slice)."""
    name = getattr(type(module), "SPLIT_INPUT_BRANCH", None)
    seq = getattr(module, name, None) if name else None
    if getattr(module, "stride", 1) != 1 or not isinstance(seq, Sequential) or not len(seq):
        return
    conv = seq[0]
    if isinstance(conv, Conv2d) and conv.fuse_epilogue and conv.pointwise:
        conv.input_channel_offset = conv.weight.shape[2] - 1  # its C: the first half's size


def _fuse_stem_max_pool(module: Any) -> None:
    """A module declaring ``STEM_MAX_POOL = "name"`` applies ``max_pool_3x3_s2`` to the
    output of its Sequential ``name`` unless that Sequential's first convolution has
    ``max_pool`` set: set it once the convolution is a fused stem whose activation (if
    any) moved in with it, i.e. nothing runs between it and the pool."""
    name = getattr(type(module), "STEM_MAX_POOL", None)
    seq = getattr(module, name, None) if name else None
    if not isinstance(seq, Sequential) or not isinstance(seq[0], Conv2d):
        return
    conv = seq[0]
    rest = [m for m in list(seq)[1:] if not isinstance(m, FoldedNorm)]
    if (
        conv.fuse_epilogue
        and not conv.depthwise
        and conv.kernel_size > 1
        and all(isinstance(m, Activation) and m.name is None for m in rest)
    ):
        conv.max_pool = True


def fold_batchnorm(model: nnx.Module) -> tuple[nnx.Module, int]:
    """An eval-mode copy of ``model`` with every declared conv -> BatchNorm pair folded,
    and the number folded; ``model`` itself is not changed. The copy is for inference
    only: its parameters no longer map onto the PyTorch state_dict."""
    folded = nnx.merge(*nnx.split(model))  # a deep copy (no shared arrays are mutated)
    folded.eval()
    count = _fold_tree(folded)
    # Convolutions with a bias of their own and no norm (the heads' output convolutions)
    # get the bias epilogue too; what follows them stays as it is.
    for _, conv in nnx.iter_modules(folded):
        if isinstance(conv, Conv2d) and not conv.fuse_epilogue and conv.bias is not None:
            _fuse_epilogue(None, conv, None)  # returns at once unless fusable_epilogue
    return folded, count
