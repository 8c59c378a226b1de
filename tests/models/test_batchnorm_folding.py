"""BatchNorm folded into the convolutions for inference: the same function, fewer passes.

Every fold path (Sequential, ConvModule, DepthwiseConvModule, the backbones' ``BN_FOLDS``
pairs, torchvision's FrozenBatchNorm2d) on small modules with random statistics, and
through ``InferenceModel``; ``tools/check_folding.py`` runs every config of the zoo.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax import lax

from nanodet_jax.models.backbones.efficientnet_lite import MBConvBlock
from nanodet_jax.models.backbones.ghostnet import ConvBnAct, GhostBottleneck
from nanodet_jax.models.backbones.mobilenetv2 import InvertedResidual
from nanodet_jax.models.backbones.repvgg import RepVGGConvModule
from nanodet_jax.models.backbones.resnet import BasicBlock, Bottleneck
from nanodet_jax.models.backbones.shufflenetv2 import ShuffleV2Block
from nanodet_jax.models.batchnorm_folding import NORMS, FoldedNorm, fold_batchnorm
from nanodet_jax.models.frozen import freeze_batch_norms
from nanodet_jax.models.inference import InferenceModel
from nanodet_jax.models.layers import (
    Activation,
    Conv2d,
    ConvModule,
    DepthwiseConvModule,
    Sequential,
    max_pool_3x3_s2,
)
from nanodet_jax.models.norm import BatchNorm2d, GroupNorm
from nanodet_jax.ops import ffi_build

TOL = 1e-5  # relative to the largest output magnitude


def randomize_norms(model: nnx.Module, seed: int = 0) -> None:
    """Statistics and affine parameters far from the identity init, so a fold shows."""
    rng = np.random.default_rng(seed)
    for _, m in nnx.iter_modules(model):
        if isinstance(m, NORMS):
            c = m.weight[...].shape[0]
            m.weight[...] = rng.uniform(0.5, 1.5, c).astype(np.float32)
            m.bias[...] = rng.normal(0.0, 0.3, c).astype(np.float32)
            m.running_mean[...] = rng.normal(0.0, 0.3, c).astype(np.float32)
            m.running_var[...] = rng.uniform(0.3, 2.0, c).astype(np.float32)


def count(model: nnx.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for _, m in nnx.iter_modules(model))


def frozen_basic_block(rngs: nnx.Rngs) -> BasicBlock:
    block = BasicBlock(8, 8, rngs=rngs)
    freeze_batch_norms(block)  # torchvision's FCOS backbone
    return block


MODULES = {
    # name: (module factory, norms expected to stay[, input channels if not 8])
    "ConvModule": (lambda r: ConvModule(8, 8, 3, 1, 1, norm_cfg={"type": "BN"}, rngs=r), 0),
    "ConvModule-GN": (
        lambda r: ConvModule(8, 8, 3, 1, 1, norm_cfg={"type": "GN", "num_groups": 2}, rngs=r),
        0,
    ),
    "DepthwiseConvModule": (
        lambda r: DepthwiseConvModule(8, 12, 3, 2, 1, activation="LeakyReLU", rngs=r),
        0,
    ),
    "ShuffleV2Block-s2": (lambda r: ShuffleV2Block(8, 16, 2, "ReLU", rngs=r), 0),
    "ShuffleV2Block-s1": (lambda r: ShuffleV2Block(16, 16, 1, "ReLU", rngs=r), 0, 16),
    "GhostBottleneck-s2": (lambda r: GhostBottleneck(8, 16, 12, 3, 2, rngs=r), 0),
    "ConvBnAct": (lambda r: ConvBnAct(8, 8, 3, rngs=r), 0),
    "BasicBlock-frozen": (frozen_basic_block, 0),
    "Bottleneck": (lambda r: Bottleneck(8, 2, rngs=r), 0),
    "MBConvBlock": (lambda r: MBConvBlock(8, 8, 3, 1, 6, rngs=r), 0),
    "InvertedResidual": (lambda r: InvertedResidual(8, 8, 1, 6, rngs=r), 0),
    # The identity branch's BatchNorm follows no convolution: it stays.
    "RepVGGConvModule": (lambda r: RepVGGConvModule(8, 8, rngs=r), 1),
    # Stems on the RGB image (the fused stem kernel): ShuffleNetV2's conv1, a 7x7 one.
    "Stem-Sequential": (
        lambda r: Sequential(
            [Conv2d(3, 24, 3, 2, 1, bias=False, rngs=r), BatchNorm2d(24), Activation("ReLU")]
        ),
        0,
        3,
    ),
    "Stem-ConvModule-7x7": (
        lambda r: ConvModule(
            3, 16, 7, 2, 3, norm_cfg={"type": "BN"}, activation="LeakyReLU", rngs=r
        ),
        0,
        3,
    ),  # fmt: skip
}
# Convolutions whose bias (and, where the module allows, activation) the fused inference
# kernels apply: depthwise, stride-1 1x1 and stem convolutions with a folded norm.
FUSED = {
    "DepthwiseConvModule": 2,
    "ShuffleV2Block-s2": 5,
    "ShuffleV2Block-s1": 3,
    "GhostBottleneck-s2": 7,
    "Bottleneck": 3,  # its 3x3 has only 2 input channels here: the stem kernel takes it
    "MBConvBlock": 3,
    "InvertedResidual": 3,
    "RepVGGConvModule": 1,
    "Stem-Sequential": 1,
    "Stem-ConvModule-7x7": 1,
}


@pytest.mark.parametrize("name", list(MODULES))
def test_folded_module_computes_the_same(name):
    factory, staying, *cin = MODULES[name]
    module = factory(nnx.Rngs(0))
    randomize_norms(module)
    module.eval()
    norms = count(module, NORMS)
    folded, n = fold_batchnorm(module)
    assert n == norms - staying and count(folded, NORMS) == staying
    assert count(folded, FoldedNorm) == n
    assert count(module, NORMS) == norms  # the original is untouched
    x = np.random.default_rng(1).normal(size=(2, 9, 11, *(cin or [8]))).astype(np.float32)
    want, got = np.asarray(module(x)), np.asarray(folded(x))
    assert np.abs(got - want).max() <= TOL * np.abs(want).max(), name
    if n:  # the kernels really changed (with near-identity norms a no-op would pass)
        convs = lambda m: {
            p: c.weight[...] for p, c in nnx.iter_modules(m) if isinstance(c, Conv2d)
        }  # noqa: E731
        before, after = convs(module), convs(folded)
        assert before.keys() == after.keys()
        assert any(not np.array_equal(before[k], after[k]) for k in before)
    if name == "ConvModule-GN":
        assert count(folded, GroupNorm) == 1
    # Every folded depthwise / 1x1 convolution applies its bias in the kernel's epilogue
    # (NanoDet's 1x1 convolutions are all stride 1; ResNet's stride-2 shortcut is not fused).
    fused = [c for _, c in nnx.iter_modules(folded) if isinstance(c, Conv2d) and c.fuse_epilogue]
    assert len(fused) == FUSED.get(name, 0) and all(c.bias is None for c in fused), name
    if name.startswith("Stem"):
        assert fused[0].activation == ("ReLU" if name == "Stem-Sequential" else "LeakyReLU")
    if name == "DepthwiseConvModule":  # ... and the activation after each norm
        assert folded.depthwise.activation == folded.pointwise.activation == "LeakyReLU"
    if name == "ShuffleV2Block-s1":  # branch2's first 1x1 reads its half in place
        assert folded.branch2[0].input_channel_offset == 8
    if name.startswith("ShuffleV2Block"):  # ... and its last stores the channel shuffle
        marked = [i for i, c in enumerate(folded.branch2) if getattr(c, "stores_interleaved", 0)]
        assert marked == [5] and not module.branch2[5].stores_interleaved
        hlo = jax.jit(lambda v: folded(v)).lower(x).as_text()
        assert ("nanodet_pointwise_bias_act_interleave" in hlo) == ffi_build.load()
    if name == "GhostBottleneck-s2":  # cheap_operation: Sequential(dw, BN, ReLU)
        cheap = folded.ghost1.cheap_operation
        assert cheap[0].activation == "ReLU" and cheap[2].name is None


def test_shufflenet_stem_pools_in_the_fused_kernel():
    from nanodet_jax.models.backbones.shufflenetv2 import ShuffleNetV2

    net = ShuffleNetV2("0.5x", rngs=nnx.Rngs(0))
    randomize_norms(net, seed=4)
    net.eval()
    folded, _ = fold_batchnorm(net)
    assert folded.conv1[0].max_pool and not net.conv1[0].max_pool
    x = np.random.default_rng(5).normal(size=(2, 64, 48, 3)).astype(np.float32)
    for want, got in zip(net(x), folded(x)):
        want, got = np.asarray(want), np.asarray(got)
        assert np.abs(got - want).max() <= TOL * np.abs(want).max()


def test_inference_model_jits_the_folded_module():
    # Whole detectors: the real-weights evaluations (tests/evaluation/test_real_data.py)
    # run through the folded Predictor against NanoDet's numbers.
    module = ShuffleV2Block(8, 16, 2, "ReLU", rngs=nnx.Rngs(0))
    randomize_norms(module, seed=2)
    module.eval()
    x = np.random.default_rng(3).normal(size=(2, 9, 11, 8)).astype(np.float32)
    want = np.asarray(module(x))
    for fold_bn, norms in ((True, 0), (False, count(module, NORMS))):
        inference = InferenceModel(module, fold_bn)
        assert count(inference.merge(inference.arrays), NORMS) == norms
        got = np.asarray(inference.jit(lambda m, v: m(v))(x))
        assert np.abs(got - want).max() <= TOL * np.abs(want).max()


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (7, 9), (8, 8), (33, 40)])
def test_max_pool_matches_reduce_window(hw):
    x = np.random.default_rng(hw[0]).normal(size=(2, *hw, 5)).astype(np.float32)
    want = lax.reduce_window(
        x, -np.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    )
    got = max_pool_3x3_s2(x)
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert jax.jit(max_pool_3x3_s2)(x).shape == want.shape
