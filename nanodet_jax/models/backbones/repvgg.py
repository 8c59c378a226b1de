"""RepVGG backbone (Ding et al. 2021) as NanoDet configures it, and its deploy fusion.

Training uses three branches per block (3x3 conv + BN, 1x1 conv + BN, and a BN-only
identity where shapes allow); ``deploy=True`` builds the single 3x3 conv with bias
(``rbr_reparam``) they collapse into. :func:`repvgg_model_convert` fills a deploy model
from a trained one, as NanoDet's ``repvgg_det_model_convert`` does before export.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodet_jax.models.layers import Activation, Conv2d, Sequential
from nanodet_jax.models.norm import BatchNorm2d
from nanodet_jax.weights.pytorch import model_variables

_GROUPWISE_LAYERS = tuple(range(2, 27, 2))  # the block indices the g2/g4 variants group
_G2 = {layer: 2 for layer in _GROUPWISE_LAYERS}
_G4 = {layer: 4 for layer in _GROUPWISE_LAYERS}
_A_BLOCKS, _B_BLOCKS = (2, 4, 14, 1), (4, 6, 16, 1)

# arch -> (blocks per stage, width multiplier per stage, groups per block index or None).
ARCHS: dict[str, tuple[tuple[int, ...], tuple[float, ...], dict[int, int] | None]] = {
    "A0": (_A_BLOCKS, (0.75, 0.75, 0.75, 2.5), None),
    "A1": (_A_BLOCKS, (1, 1, 1, 2.5), None),
    "A2": (_A_BLOCKS, (1.5, 1.5, 1.5, 2.75), None),
    "B0": (_B_BLOCKS, (1, 1, 1, 2.5), None),
    "B1": (_B_BLOCKS, (2, 2, 2, 4), None),
    "B1g2": (_B_BLOCKS, (2, 2, 2, 4), _G2),
    "B1g4": (_B_BLOCKS, (2, 2, 2, 4), _G4),
    "B2": (_B_BLOCKS, (2.5, 2.5, 2.5, 5), None),
    "B2g2": (_B_BLOCKS, (2.5, 2.5, 2.5, 5), _G2),
    "B2g4": (_B_BLOCKS, (2.5, 2.5, 2.5, 5), _G4),
    "B3": (_B_BLOCKS, (3, 3, 3, 5), None),
    "B3g2": (_B_BLOCKS, (3, 3, 3, 5), _G2),
    "B3g4": (_B_BLOCKS, (3, 3, 3, 5), _G4),
}


def _conv_bn(cin: int, cout: int, k: int, stride: int, pad: int, groups: int, rngs) -> Sequential:
    # PyTorch's default Conv2d / BatchNorm init: NanoDet's RepVGG does not re-initialise.
    return Sequential(
        [Conv2d(cin, cout, k, stride, pad, groups, bias=False, rngs=rngs), BatchNorm2d(cout)]
    )


class RepVGGConvModule(nnx.Module):
    """One RepVGG block: ``act(dense3x3(x) + dense1x1(x) + bn(x))``, or ``act(conv(x))``
    with the fused kernel when ``deploy``."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int = 1,
        dilation: int = 1,
        groups: int = 1,
        activation: str | None = "ReLU",
        padding_mode: str = "zeros",
        deploy: bool = False,
        *,
        rngs: nnx.Rngs,
    ):
        if kernel_size != 3 or padding != 1 or dilation != 1 or padding_mode != "zeros":
            raise ValueError("RepVGGConvModule supports a 3x3 kernel, padding 1, dilation 1")
        self.deploy = deploy
        self.groups = groups
        self.in_channels = in_channels
        self.act = Activation(activation)  # NanoDet fails on activation=None; identity here
        if deploy:
            self.rbr_reparam = Conv2d(
                in_channels, out_channels, 3, stride, 1, groups, bias=True, rngs=rngs
            )
        else:
            identity = out_channels == in_channels and stride == 1
            self.rbr_identity = BatchNorm2d(in_channels) if identity else None
            self.rbr_dense = _conv_bn(in_channels, out_channels, 3, stride, 1, groups, rngs)
            self.rbr_1x1 = _conv_bn(in_channels, out_channels, 1, stride, 0, groups, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.deploy:
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x) + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)

    def repvgg_convert(self) -> tuple[np.ndarray, np.ndarray]:
        """The equivalent 3x3 kernel (OIHW, float32) and bias of the three branches in eval
        mode, computed as NanoDet's conversion does (float32, the same order of
        operations); the two agree to ~1e-7 relative (float32 rounding), not bit for bit."""
        k3, b3 = _fuse_bn(_oihw(self.rbr_dense[0]), self.rbr_dense[1])
        k1, b1 = _fuse_bn(_oihw(self.rbr_1x1[0]), self.rbr_1x1[1])
        kernel = k3 + np.pad(k1, ((0, 0), (0, 0), (1, 1), (1, 1)))
        bias = b3 + b1
        if self.rbr_identity is not None:
            kid, bid = _fuse_bn(self._identity_kernel(), self.rbr_identity)
            kernel, bias = kernel + kid, bias + bid
        return kernel, bias

    def _identity_kernel(self) -> np.ndarray:
        # x itself as a (grouped) 3x3 conv: a 1 at the centre tap of each channel's own input.
        per_group = self.in_channels // self.groups
        kernel = np.zeros((self.in_channels, per_group, 3, 3), np.float32)
        kernel[np.arange(self.in_channels), np.arange(self.in_channels) % per_group, 1, 1] = 1
        return kernel


def _oihw(conv: Conv2d) -> np.ndarray:
    return np.asarray(conv.weight[...], np.float32).transpose(3, 2, 0, 1)


def _fuse_bn(kernel: np.ndarray, bn: BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    f32 = lambda v: np.asarray(v[...], np.float32)  # noqa: E731
    std = np.sqrt(f32(bn.running_var) + np.float32(bn.eps))
    gamma = f32(bn.weight)
    t = (gamma / std).reshape(-1, 1, 1, 1)
    return kernel * t, f32(bn.bias) - f32(bn.running_mean) * gamma / std


class RepVGG(nnx.Module):
    """Returns the feature maps of ``out_stages`` (a subset of 1..4), strides 4/8/16/32.
    ``last_channel`` replaces stage 4's width (NanoDet's RepVGG-A0 config uses 512)."""

    def __init__(
        self,
        arch: str,
        out_stages: Sequence[int] = (1, 2, 3, 4),
        activation: str | None = "ReLU",
        deploy: bool = False,
        last_channel: int | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        if arch not in ARCHS:
            raise ValueError(f"unknown RepVGG arch {arch!r}; choose one of {list(ARCHS)}")
        if not set(out_stages) <= {1, 2, 3, 4}:
            raise ValueError(f"out_stages must be a subset of (1, 2, 3, 4), got {out_stages}")
        num_blocks, width, groups_map = ARCHS[arch]
        groups_map = groups_map or {}
        self.arch = arch
        self.out_stages = tuple(out_stages)
        self.activation = activation
        self.deploy = deploy
        cin = min(64, int(64 * width[0]))
        self.stage0 = RepVGGConvModule(
            3, cin, 3, 2, 1, activation=activation, deploy=deploy, rngs=rngs
        )
        widths = [int(64 * width[0]), int(128 * width[1]), int(256 * width[2])]
        widths.append(last_channel if last_channel else int(512 * width[3]))
        layer_idx = 1  # global block index, which the g2/g4 maps refer to
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(
                    RepVGGConvModule(
                        cin,
                        planes,
                        3,
                        2 if j == 0 else 1,
                        1,
                        groups=groups_map.get(layer_idx, 1),
                        activation=activation,
                        deploy=deploy,
                        rngs=rngs,
                    )
                )
                cin = planes
                layer_idx += 1
            setattr(self, f"stage{i + 1}", Sequential(blocks))
        self.out_channels = [widths[s - 1] for s in self.out_stages]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = self.stage0(x)
        outputs = []
        for i in range(1, 5):
            x = getattr(self, f"stage{i}")(x)
            if i in self.out_stages:
                outputs.append(x)
        return tuple(outputs)


def named_modules(node: nnx.Module, prefix: str = "") -> Iterator[tuple[str, nnx.Module]]:
    """(state_dict prefix, module) of ``node`` and every module below it, depth first."""
    yield prefix.rstrip("."), node
    for name, value in vars(node).items():
        if isinstance(value, nnx.Module) and not name.startswith("_"):
            yield from named_modules(value, f"{prefix}{name}.")


def repvgg_model_convert(model: nnx.Module, deploy_model: nnx.Module) -> nnx.Module:
    """Fill ``deploy_model`` (built with ``deploy=True``) from the trained ``model``, in place.

    Works for a bare RepVGG and for a detector with a RepVGG backbone (NanoDet's
    ``repvgg_det_model_convert``): every variable both models have (neck, head) is copied,
    and each block's ``rbr_reparam`` gets the fused kernel and bias of its three branches.
    Returns ``deploy_model``.
    """
    target = model_variables(deploy_model)
    fused: dict[str, np.ndarray] = {}
    for name, module in named_modules(model):
        if isinstance(module, RepVGGConvModule) and not module.deploy:
            kernel, bias = module.repvgg_convert()
            prefix = f"{name}." if name else ""
            fused[f"{prefix}rbr_reparam.weight"] = kernel.transpose(2, 3, 1, 0)  # -> HWIO
            fused[f"{prefix}rbr_reparam.bias"] = bias
    source = {k: v[...] for k, v in model_variables(model).items()}
    missing = [k for k in target if k not in fused and k not in source]
    if missing:
        raise ValueError(f"repvgg_model_convert: the trained model has no {missing[:5]}")
    for key, var in target.items():
        value = fused[key] if key in fused else source[key]
        if tuple(value.shape) != tuple(var[...].shape):
            raise ValueError(
                f"repvgg_model_convert: {key} is {value.shape}, deploy model has {var[...].shape}"
            )
        var[...] = jnp.asarray(value, var[...].dtype)
    return deploy_model


repvgg_det_model_convert = repvgg_model_convert  # NanoDet's name for the detector case
