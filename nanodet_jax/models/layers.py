"""Building blocks with PyTorch semantics, NHWC activations and PyTorch parameter names.

Every module stores its parameters under the names NanoDet's PyTorch modules use
(``weight``, ``bias``, ``running_mean``, ...) and containers index their children
like ``nn.Sequential`` / ``nn.ModuleList`` do, so that a model's state path joined
with dots *is* the PyTorch state_dict key (see ``convert.py``). Layout differs
only where NHWC requires it: conv kernels are HWIO here, OIHW in PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from nanodet_jax.models.norm import build_norm
from nanodet_jax.ops import (
    conv1x1,
    conv3x3,
    depthwise_conv2d,
    depthwise_conv2d_bias_act,
    pointwise_conv_bias_act,
    stem_conv_bias_act,
)
from nanodet_jax.ops.channels import interleave_channels
from nanodet_jax.ops.fused_conv import STEM_MAX_CHANNELS
from nanodet_jax.ops.pooling import max_pool_3x3_s2  # noqa: F401 - the models' import point

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def host_rng(key: jax.Array) -> np.random.Generator:
    """A numpy generator seeded by a JAX key.

    Initial values are drawn on the host: eager ``jax.random`` calls compile one
    kernel per parameter shape, which made building the model take >10 s.
    """
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def random_normal(key: jax.Array, shape: tuple[int, ...], std: float = 1.0) -> jax.Array:
    return jnp.asarray(host_rng(key).normal(0.0, std, shape), jnp.float32)


def random_uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
    return jnp.asarray(host_rng(key).uniform(-bound, bound, shape), jnp.float32)


class Buffer(nnx.Variable):
    """A non-trainable tensor that is part of the state_dict (PyTorch's register_buffer)."""


class Sequential(nnx.List):
    """``nn.Sequential``: children are addressed by position (``branch2.3.weight``)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x

    def interleaved_with(self, passthrough: jax.Array, x: jax.Array) -> jax.Array:
        """``interleave_channels(passthrough[..., :K], self(x))`` for K output channels
        (ShuffleNetV2's shuffle of ``concat``). When BatchNorm folding marked a layer
        ``stores_interleaved`` (a fused 1x1 with only identities after it), that layer's
        kernel stores the shuffled result itself."""
        layers = list(self)
        marked = next(
            (i for i, m in enumerate(layers) if getattr(m, "stores_interleaved", 0)), None
        )
        if marked is None:
            return interleave_channels(passthrough, self(x))
        for layer in layers[:marked]:
            x = layer(x)
        return layers[marked](x, interleave_with=passthrough)


ACTIVATIONS: dict[str | None, Callable[[jax.Array], jax.Array]] = {
    None: lambda x: x,
    "ReLU": jax.nn.relu,
    # NanoDet builds LeakyReLU with negative_slope=0.1 (not PyTorch's 0.01 default).
    "LeakyReLU": lambda x: jnp.where(x > 0, x, 0.1 * x),
    "ReLU6": jax.nn.relu6,
    "SELU": jax.nn.selu,
    "ELU": jax.nn.elu,
    "GELU": lambda x: jax.nn.gelu(x, approximate=False),
    "SiLU": jax.nn.silu,
    "HardSwish": jax.nn.hard_swish,
    "Hardswish": jax.nn.hard_swish,
}


class Activation(nnx.Module):
    """A parameter-free activation layer, selected by NanoDet's activation name."""

    def __init__(self, name: str | None):
        if name not in ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {name!r}; choose one of "
                f"{sorted(k for k in ACTIVATIONS if k)} (PReLU is not supported)"
            )
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.name](x)


def _torch_fans(shape_hwio: tuple[int, ...]) -> tuple[int, int]:
    kh, kw, cin_per_group, cout = shape_hwio
    receptive = kh * kw
    return cin_per_group * receptive, cout * receptive


def kaiming_normal(mode: str = "fan_out") -> Initializer:
    """``nn.init.kaiming_normal_`` for an HWIO kernel (fans computed as PyTorch does for OIHW).

    NanoDet's ``kaiming_init`` passes ``a=0``, so the gain is sqrt(2) for both
    ReLU and LeakyReLU.
    """
    gain = math.sqrt(2.0)

    def init(key, shape, dtype=jnp.float32):
        fan_in, fan_out = _torch_fans(shape)
        std = gain / math.sqrt(fan_out if mode == "fan_out" else fan_in)
        return random_normal(key, shape, std).astype(dtype)

    return init


def normal(std: float) -> Initializer:
    return lambda key, shape, dtype=jnp.float32: random_normal(key, shape, std).astype(dtype)


def torch_default_conv_init() -> Initializer:
    """``nn.Conv2d``'s own reset_parameters: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))."""

    def init(key, shape, dtype=jnp.float32):
        fan_in, _ = _torch_fans(shape)
        bound = 1.0 / math.sqrt(fan_in)
        return random_uniform(key, shape, bound).astype(dtype)

    return init


class Conv2d(nnx.Module):
    """``nn.Conv2d`` on NHWC inputs; ``weight`` is HWIO ``[kh, kw, cin // groups, cout]``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool = True,
        *,
        kernel_init: Initializer | None = None,
        bias_init: float | None = None,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by {groups}")
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.groups = groups
        self.depthwise = groups == in_channels == out_channels and groups > 1
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        init = kernel_init or torch_default_conv_init()
        self.weight = nnx.Param(init(rngs.params(), shape, jnp.float32))
        if bias:
            if bias_init is None:
                bound = 1.0 / math.sqrt(_torch_fans(shape)[0])
                value = random_uniform(rngs.params(), (out_channels,), bound)
            else:
                value = jnp.full((out_channels,), bias_init, jnp.float32)
            self.bias = nnx.Param(value)
        else:
            self.bias = None
        # Set by BatchNorm folding, in inference copies only (``fusable_epilogue``): the
        # bias, and ``activation`` moved here from the layer after the folded norm, are
        # the kernel's epilogue, and ``weight`` holds kernel and bias in the fused op's
        # layout (depthwise: [R*R + 1, 1, 1, C]; dense: [1, 1, R*R*C + 1, K]).
        self.fuse_epilogue = False
        self.activation: str | None = None
        self.max_pool = False  # a stem's 3x3 / 2 max pool, also moved here (ShuffleNetV2)
        self.input_channel_offset = 0  # a fused 1x1 reading channels offset.. of its input
        self.stores_interleaved = False  # a fused 1x1 storing a channel shuffle (Sequential)

    @property
    def pointwise(self) -> bool:
        """A dense 1x1 convolution with stride 1 and no padding (a dot over channels)."""
        return self.groups == 1 and self.kernel_size == 1 and self.stride == 1 and not self.padding

    @property
    def fusable_epilogue(self) -> bool:
        """One the fused inference kernels run: depthwise, stride-1 1x1, or a stem (few
        input channels)."""
        if self.depthwise or self.pointwise:
            return True
        return (
            self.groups == 1 and self.weight.shape[2] <= STEM_MAX_CHANNELS and self.kernel_size <= 7
        )

    def __call__(self, x: jax.Array, interleave_with: jax.Array | None = None) -> jax.Array:
        """``interleave_with``: see ``Sequential.interleaved_with`` (fused 1x1 only)."""
        if interleave_with is not None and not (self.fuse_epilogue and self.pointwise):
            raise ValueError("interleave_with needs a fused 1x1 convolution (BatchNorm folding)")
        if self.fuse_epilogue:
            wb, act = self.weight[...], ACTIVATIONS[self.activation]
            if self.depthwise:
                return depthwise_conv2d_bias_act(
                    x, wb, self.stride, self.padding, self.activation, act
                )
            if self.pointwise:
                return pointwise_conv_bias_act(
                    x, wb, self.activation, act, channel_offset=self.input_channel_offset,
                    interleave_with=interleave_with,
                )  # fmt: skip
            return stem_conv_bias_act(
                x, wb, self.kernel_size, self.stride, self.padding, self.activation, act,
                max_pool=self.max_pool,
            )  # fmt: skip
        kernel = self.weight[...].astype(x.dtype)
        if self.depthwise:
            y = depthwise_conv2d(x, kernel, self.stride, self.padding)
        elif self.groups == 1 and kernel.shape[:2] == (3, 3) and self.stride == self.padding == 1:
            y = conv3x3(x, kernel)  # the aux head's layers: Winograd on CPU
        elif self.pointwise:
            y = conv1x1(x, kernel)  # XLA's, with a C++ weight gradient on CPU
        else:
            if self.groups == 1 and x.shape[-1] < 4:
                # XLA:CPU's convolution is ~7x slower with 3 input channels (the RGB
                # stem) than with 4; a zero channel and zero weights change nothing.
                extra = 4 - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
                kernel = jnp.pad(kernel, ((0, 0), (0, 0), (0, extra), (0, 0)))
            pad = ((self.padding, self.padding), (self.padding, self.padding))
            y = lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(self.stride, self.stride),
                padding=pad,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class Scale(nnx.Module):
    """A learnable scalar multiplier (NanoDet's ``Scale``)."""

    def __init__(self, value: float = 1.0):
        self.scale = nnx.Param(jnp.asarray(value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.scale[...].astype(x.dtype)


class ConvModule(nnx.Module):
    """NanoDet's ConvModule with order (conv, norm, act); norm is named ``bn`` or ``gn``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        groups: int = 1,
        bias: bool | str = "auto",
        norm_cfg: dict | None = None,
        activation: str | None = "ReLU",
        *,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        with_bias = norm_cfg is None if bias == "auto" else bool(bias)
        self.conv = Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            groups,
            with_bias,
            kernel_init=kernel_init or kaiming_normal("fan_out"),
            bias_init=0.0,
            rngs=rngs,
        )
        self.norm_name = None
        norm = build_norm(norm_cfg, out_channels)
        if norm is not None:
            self.norm_name, layer = norm
            setattr(self, self.norm_name, layer)
        self.act = Activation(activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.norm_name is not None:
            x = getattr(self, self.norm_name)(x)
        # A folded inference copy may apply the activation in the convolution already.
        return x if self.conv.activation is not None else self.act(x)


class DepthwiseConvModule(nnx.Module):
    """NanoDet's DepthwiseConvModule: depthwise -> dwnorm -> act -> pointwise -> pwnorm -> act."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool | str = "auto",
        norm_cfg: dict | None = None,
        activation: str | None = "ReLU",
        *,
        kernel_init: Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        # NanoDet's module always normalises (its forward fails without a norm),
        # so "auto" means no conv bias.
        norm_cfg = norm_cfg or {"type": "BN"}
        with_bias = bias is True
        init = kernel_init or kaiming_normal("fan_out")
        self.depthwise = Conv2d(
            in_channels,
            in_channels,
            kernel_size,
            stride,
            padding,
            groups=in_channels,
            bias=with_bias,
            kernel_init=init,
            bias_init=0.0,
            rngs=rngs,
        )
        self.pointwise = Conv2d(
            in_channels,
            out_channels,
            1,
            bias=with_bias,
            kernel_init=init,
            bias_init=0.0,
            rngs=rngs,
        )
        self.dwnorm = build_norm(norm_cfg, in_channels)[1]
        self.pwnorm = build_norm(norm_cfg, out_channels)[1]
        self.act = Activation(activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        # A folded inference copy may apply the activations in the convolutions already.
        x = self.dwnorm(self.depthwise(x))
        x = x if self.depthwise.activation is not None else self.act(x)
        x = self.pwnorm(self.pointwise(x))
        return x if self.pointwise.activation is not None else self.act(x)


def upsample_bilinear_2x(x: jax.Array) -> jax.Array:
    """``nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)`` on NHWC.

    With half-pixel centres every output pixel mixes its two nearest inputs with
    weights 3/4 and 1/4; at the borders PyTorch clamps the source index, which
    is the same as replicating the edge row/column.
    """

    def along(axis: int, v: jax.Array) -> jax.Array:
        n = v.shape[axis]
        first = lax.slice_in_dim(v, 0, 1, axis=axis)
        last = lax.slice_in_dim(v, n - 1, n, axis=axis)
        prev = jnp.concatenate([first, lax.slice_in_dim(v, 0, n - 1, axis=axis)], axis=axis)
        nxt = jnp.concatenate([lax.slice_in_dim(v, 1, n, axis=axis), last], axis=axis)
        even = 0.25 * prev + 0.75 * v
        odd = 0.75 * v + 0.25 * nxt
        stacked = jnp.stack([even, odd], axis=axis + 1)
        shape = list(v.shape)
        shape[axis] = 2 * n
        return stacked.reshape(shape)

    return along(2, along(1, x))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def concat_channels(xs: Sequence[jax.Array]) -> jax.Array:
    return jnp.concatenate(list(xs), axis=-1)
