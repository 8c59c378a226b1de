"""NanoDet's ``TIMMWrapper`` backbone for timm's ConvNeXt family, written natively in JAX.

NanoDet builds ``timm.create_model(model_name, features_only=True, ...)`` and keeps the
result as ``self.timm``: a feature-extraction net whose children are timm's ConvNeXt
modules flattened to ``stem_0`` (4x4 stride-4 conv), ``stem_1`` (LayerNorm over
channels), ``stages_0`` ... ``stages_3``. Only the stages up to the largest of
``out_indices`` exist there, so only those exist here. Our variable paths are the keys
of that wrapper's state_dict (``timm.stages_1.blocks.0.conv_dw.weight``,
``timm.stages_1.blocks.0.gamma``, ...). The block MLP is a pair of 1x1 convs
(``conv_mlp``: 4-D kernels, HWIO here, OIHW there) or of ``nn.Linear`` (2-D ``[out,
in]`` in both), as timm's variant defines it; on NHWC both compute the same thing.

Weights (``pretrained`` / ``checkpoint_path``) are not read at construction: building
the model reads no files (see ``backbones/pretrained.py``); training loads them at its
start through :func:`checkpoint_for_training` and :func:`load_timm_checkpoint`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nanodet_jax.models.layers import Activation, Conv2d, Sequential, normal
from nanodet_jax.models.norm import LayerNorm
from nanodet_jax.models.transformer import Linear

# timm's registered ConvNeXt definitions with the patch stem and LayerNorm (the _ols
# stems, the rms/simple-norm variants and ConvNeXt-V2's GRN are not supported).
# Variants that differ only in their classification head (tiny_hnf, large_mlp) have
# the same feature extractor.
CONVNEXT_VARIANTS: dict[str, dict[str, Any]] = {
    "convnext_atto": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320), conv_mlp=True),
    "convnext_femto": dict(depths=(2, 2, 6, 2), dims=(48, 96, 192, 384), conv_mlp=True),
    "convnext_pico": dict(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), conv_mlp=True),
    "convnext_nano": dict(depths=(2, 2, 8, 2), dims=(80, 160, 320, 640), conv_mlp=True),
    "convnext_tiny_hnf": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), conv_mlp=True),
    "convnext_tiny": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), conv_mlp=False),
    "convnext_small": dict(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768), conv_mlp=False),
    "convnext_base": dict(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024), conv_mlp=False),
    "convnext_large": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), conv_mlp=False),
    "convnext_large_mlp": dict(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536), conv_mlp=False),
    "convnext_xlarge": dict(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048), conv_mlp=False),
    "convnext_xxlarge": dict(
        depths=(3, 4, 30, 3), dims=(384, 768, 1536, 3072), conv_mlp=False, norm_eps=1e-5
    ),
}
TIMM_LN_EPS = 1e-6  # timm's LayerNorm / LayerNorm2d default (PyTorch's is 1e-5)
_INIT = normal(0.02)  # timm's ConvNeXt init: trunc_normal(std=.02) (cut at +-2: no effect)


class LayerNorm2d(LayerNorm):
    """timm's ``LayerNorm2d``: LayerNorm over the channels of a feature map (NHWC here, so
    the last axis, as ``LayerNorm``); its own type so that ONNX export knows the layout."""


def _zero_bias(conv: Conv2d | Linear) -> Conv2d | Linear:
    conv.bias[...] = jnp.zeros_like(conv.bias[...])
    return conv


class ConvMlp(nnx.Module):
    """timm's ``Mlp`` as ConvNeXt uses it: fc1 -> GELU (erf) -> fc2, no dropout."""

    def __init__(self, dim: int, hidden: int, conv: bool, *, rngs: nnx.Rngs):
        def fc(cin: int, cout: int) -> Conv2d | Linear:
            if conv:
                return _zero_bias(Conv2d(cin, cout, 1, kernel_init=_INIT, rngs=rngs))
            return Linear(cin, cout, std=0.02, rngs=rngs)  # N(0, .02) weight, zero bias

        self.fc1 = fc(dim, hidden)
        self.act = Activation("GELU")
        self.fc2 = fc(hidden, dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nnx.Module):
    """x + drop_path(gamma * mlp(norm(dwconv7x7(x)))); ``gamma`` first, as timm registers it."""

    def __init__(
        self,
        dim: int,
        kernel_size: int,
        conv_mlp: bool,
        ls_init_value: float,
        eps: float,
        drop_path: float,
        *,
        rngs: nnx.Rngs,
    ):
        self.gamma = nnx.Param(jnp.full((dim,), ls_init_value, jnp.float32))
        self.conv_dw = Conv2d(
            dim, dim, kernel_size, 1, (kernel_size - 1) // 2, groups=dim, kernel_init=_INIT,
            rngs=rngs,
        )  # fmt: skip
        _zero_bias(self.conv_dw)
        self.norm = LayerNorm2d(dim, eps) if conv_mlp else LayerNorm(dim, eps)
        self.mlp = ConvMlp(dim, 4 * dim, conv_mlp, rngs=rngs)
        # Stochastic depth: one Bernoulli draw per sample (the mask is broadcast over H, W
        # and C), scaled by 1 / keep as timm's drop_path; nnx's eval() turns it off.
        self.drop_path = (
            nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs) if drop_path > 0 else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.mlp(self.norm(self.conv_dw(x))) * self.gamma[...].astype(x.dtype)
        if self.drop_path is not None:
            y = self.drop_path(y)
        return x + y


class ConvNeXtStage(nnx.Module):
    """Optional downsample (LayerNorm2d, 2x2 stride-2 conv), then the blocks."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        stride: int,
        drop_paths: Sequence[float],
        block_args: dict[str, Any],
        *,
        rngs: nnx.Rngs,
    ):
        if in_dim != out_dim or stride > 1:
            conv = _zero_bias(Conv2d(in_dim, out_dim, stride, stride, kernel_init=_INIT, rngs=rngs))
            self.downsample = Sequential([LayerNorm2d(in_dim, block_args["eps"]), conv])
        else:
            self.downsample = None  # timm's nn.Identity: no state_dict entries
        self.blocks = Sequential(
            [ConvNeXtBlock(out_dim, drop_path=p, **block_args, rngs=rngs) for p in drop_paths]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.downsample is not None:
            x = self.downsample(x)
        return self.blocks(x)


class ConvNeXtFeatures(nnx.Module):
    """timm's ``FeatureListNet`` over ConvNeXt: ``stem_0``, ``stem_1``, ``stages_<i>``."""

    def __init__(
        self,
        in_channels: int,
        depths: Sequence[int],
        dims: Sequence[int],
        kernel_sizes: Sequence[int],
        out_indices: Sequence[int],
        drop_path_rate: float,
        block_args: dict[str, Any],
        *,
        rngs: nnx.Rngs,
    ):
        self.out_indices = tuple(out_indices)
        self.stem_0 = _zero_bias(Conv2d(in_channels, dims[0], 4, 4, kernel_init=_INIT, rngs=rngs))
        self.stem_1 = LayerNorm2d(dims[0], block_args["eps"])
        # timm's per-block drop-path rates: linspace(0, rate) over all blocks of all four
        # stages (also those the feature net leaves out), split per stage.
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.num_stages = max(self.out_indices) + 1
        start, prev = 0, dims[0]
        for i in range(self.num_stages):
            stage_args = dict(block_args, kernel_size=kernel_sizes[i])
            stage = ConvNeXtStage(
                prev, dims[i], 1 if i == 0 else 2, rates[start : start + depths[i]], stage_args,
                rngs=rngs,
            )  # fmt: skip
            setattr(self, f"stages_{i}", stage)
            start, prev = start + depths[i], dims[i]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = self.stem_1(self.stem_0(x))
        outs = []
        for i in range(self.num_stages):
            x = getattr(self, f"stages_{i}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)


def _check_variant(model_name: str) -> dict[str, Any]:
    if model_name not in CONVNEXT_VARIANTS:
        raise ValueError(
            f"TIMMWrapper: model_name {model_name!r} is not supported natively; supported: "
            f"{', '.join(CONVNEXT_VARIANTS)} (timm's ConvNeXt with the patch stem)"
        )
    return dict(CONVNEXT_VARIANTS[model_name])


class TIMMWrapper(nnx.Module):
    """NanoDet's ``TIMMWrapper`` (``features_only=True``) for the ConvNeXt family.

    The keyword arguments after ``in_channels`` are the ``timm.create_model`` keywords
    NanoDet passes through; ``depths`` / ``dims`` / ``conv_mlp`` override the variant's
    definition as they do in timm. A None is timm's default (``create_model`` drops None
    keywords; so ``ls_init_value: None`` keeps layer scale at 1e-6). Returns the NHWC
    features of ``out_indices`` (strides 4, 8, 16, 32 for indices 0-3) in index order,
    like timm.
    """

    def __init__(
        self,
        model_name: str,
        features_only: bool = True,
        pretrained: bool = True,  # NanoDet's default (see checkpoint_for_training)
        checkpoint_path: str = "",
        in_channels: int = 3,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        drop_path_rate: float | None = None,
        ls_init_value: float | None = None,
        depths: Sequence[int] | None = None,
        dims: Sequence[int] | None = None,
        conv_mlp: bool | None = None,
        kernel_sizes: int | Sequence[int] = 7,
        norm_eps: float | None = None,
        output_stride: int = 32,
        *,
        rngs: nnx.Rngs,
    ):
        variant = _check_variant(model_name)
        if not features_only:
            raise ValueError(
                "TIMMWrapper: only features_only=True is supported (a detector backbone "
                "returns feature maps, not classification logits)"
            )
        if output_stride != 32:
            raise ValueError(
                "TIMMWrapper: output_stride must be 32 (dilated ConvNeXt stages are not "
                f"supported), got {output_stride}"
            )
        depths = tuple(depths if depths is not None else variant["depths"])
        dims = tuple(dims if dims is not None else variant["dims"])
        if len(depths) != 4 or len(dims) != 4:
            raise ValueError(f"TIMMWrapper: depths and dims need 4 stages, got {depths}, {dims}")
        indices = sorted({int(i) for i in out_indices})
        if not indices or not set(indices) <= {0, 1, 2, 3}:
            raise ValueError(f"TIMMWrapper: out_indices must be a subset of 0-3, got {out_indices}")
        if isinstance(kernel_sizes, int):
            kernel_sizes = (kernel_sizes,) * 4
        self.model_name = model_name
        self.pretrained = bool(pretrained)
        self.checkpoint_path = checkpoint_path or ""
        eps = norm_eps if norm_eps is not None else variant.get("norm_eps", TIMM_LN_EPS)
        block_args = dict(
            conv_mlp=variant["conv_mlp"] if conv_mlp is None else bool(conv_mlp),
            ls_init_value=1e-6 if ls_init_value is None else float(ls_init_value),
            eps=float(eps),
        )
        self.timm = ConvNeXtFeatures(
            in_channels, depths, dims, tuple(kernel_sizes), indices, float(drop_path_rate or 0.0),
            block_args, rngs=rngs,
        )  # fmt: skip
        self.out_channels = [dims[i] for i in indices]
        self.strides = [4 * 2**i for i in indices]

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        return self.timm(x)


_TIMM_STATE_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")  # timm's preference
_DROPPED = ("head.", "norm_pre.")  # the classifier: not part of the feature net


def timm_feature_keys(state: Mapping[str, Any]) -> dict[str, Any]:
    """A timm ConvNeXt state_dict keyed as our backbone's variables (``timm.stem_0.weight``).

    Takes the feature net's own keys (``stem_0.weight``: what timm's ``checkpoint_path``
    loads when ``features_only``), a whole classification model's (``stem.0.weight``,
    ``stages.1.blocks.0.gamma``; its ``head.*`` / ``norm_pre.*`` are dropped), or ours
    (``timm.stem_0.weight``); wrapper prefixes ``module.`` / ``_orig_mod.`` are removed.
    """
    for key in _TIMM_STATE_KEYS:
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    out = {}
    for k, v in state.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        k = k.removeprefix("timm.")
        if k.startswith(_DROPPED):
            continue
        out["timm." + re.sub(r"^(stem|stages)\.(\d+)\.", r"\1_\2.", k)] = v
    return out


def load_timm_checkpoint(backbone: TIMMWrapper, weights: str | os.PathLike | Mapping[str, Any]):
    """Load a timm-format ConvNeXt state_dict (a .pth / .safetensors path or a mapping) into
    ``backbone`` in place, by the key rule of :func:`timm_feature_keys`.

    Stages the feature net leaves out (beyond ``max(out_indices)``) are ignored; any other
    missing, unexpected or mis-shaped tensor raises ``WeightMismatchError`` naming it.
    """
    from nanodet_jax.weights.pytorch import load_torch_weights, read_torch_file

    source = "a state_dict"
    if isinstance(weights, (str, os.PathLike)):
        source = os.fspath(weights)
        if source.endswith(".safetensors"):
            from safetensors.numpy import load_file  # timm's hub format

            weights = load_file(source)
        else:
            weights = read_torch_file(source)
    state = timm_feature_keys(weights)
    kept = {f"timm.stages_{i}." for i in range(backbone.timm.num_stages)}
    state = {
        k: v for k, v in state.items()
        if not k.startswith("timm.stages_") or k.startswith(tuple(kept))
    }  # fmt: skip
    hint = (
        f"checkpoint_path takes timm's {backbone.model_name} weights (keys stem.0.* / "
        "stages.N.*, or the feature net's stem_0.* / stages_N.*)"
    )
    return load_torch_weights(backbone, state, source=f"timm backbone {source}", hint=hint)


def checkpoint_for_training(backbone_cfg: Mapping[str, Any]) -> str | None:
    """The timm checkpoint a TIMMWrapper config asks training to start from, or None.

    NanoDet's ``pretrained=True`` downloads timm's ImageNet weights; nothing is downloaded
    here, so it needs ``checkpoint_path`` (which, as in timm, is loaded after and so wins
    over ``pretrained`` anyway).
    """
    path = backbone_cfg.get("checkpoint_path") or ""
    if path:
        return os.path.expanduser(os.fspath(path))
    if backbone_cfg.get("pretrained", True):
        name = backbone_cfg.get("model_name", "convnext_*")
        raise FileNotFoundError(
            "model.arch.backbone.pretrained=True asks for timm's ImageNet "
            f"{name} weights, which timm downloads from the internet; nothing is downloaded "
            "here. Pass a local timm checkpoint file (e.g. the pytorch_model.bin / "
            f"model.safetensors of timm/{name}.* on the Hugging Face hub): "
            "--config.model.arch.backbone.checkpoint_path=/path/to/file, or train from "
            "random init with --config.model.arch.backbone.pretrained=False"
        )
    return None
