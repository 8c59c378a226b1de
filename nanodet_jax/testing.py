"""Helpers shared by the test-suite and the reference tools.

``random_state_dict`` builds deterministic random weights for a NanoDet state_dict
given only its key names and shapes, so that the PyTorch reference (in ``tools/``)
and our tests (without torch) can produce bit-identical weights from one seed.
NanoDet's own initialisation leaves BatchNorm at identity and the heads nearly
constant, which would hide layout and ordering bugs; these weights exercise
every layer: conv kernels with He scale, BatchNorm affine parameters and
running statistics away from identity.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Mapping

import numpy as np


def _key_rng(name: str, seed: int) -> np.random.Generator:
    # Seed per key (not per position) so the result does not depend on key order.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def random_state_dict(
    shapes: Mapping[str, tuple[int, ...]] | Iterable[tuple[str, tuple[int, ...]]],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random weights for a NanoDet state_dict, keyed and shaped like ``shapes``.

    ``shapes`` maps PyTorch key names to PyTorch shapes (OIHW for convs).
    """
    items = shapes.items() if isinstance(shapes, Mapping) else shapes
    out: dict[str, np.ndarray] = {}
    for name, shape in items:
        shape = tuple(int(s) for s in shape)
        rng = _key_rng(name, seed)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            out[name] = np.asarray(int(rng.integers(0, 1000)), dtype=np.int64)
        elif leaf == "project":  # Integral's fixed [0, 1, ..., reg_max] buffer
            out[name] = np.linspace(0, shape[0] - 1, shape[0]).astype(np.float32)
        elif leaf == "running_mean":
            out[name] = rng.normal(0.0, 0.2, shape).astype(np.float32)
        elif leaf == "running_var":
            out[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif leaf == "scale" and len(shape) == 0:  # Scale module of the aux head
            out[name] = np.asarray(rng.uniform(0.8, 1.2), dtype=np.float32)
        elif leaf == "gamma":  # ConvNeXt layer scale: far from its 1e-6 init, or the
            # residual branches (everything but the shortcuts) would not show in the output
            out[name] = rng.uniform(0.3, 1.0, shape).astype(np.float32)
        elif leaf == "pos_embed":  # TAN's learned position embedding
            out[name] = rng.normal(0.0, 0.5, shape).astype(np.float32)
        elif leaf == "in_proj_weight" or (leaf == "weight" and len(shape) == 2):
            # nn.Linear / attention projections [out, in]: unit-variance outputs.
            out[name] = rng.normal(0.0, np.sqrt(1.0 / shape[1]), shape).astype(np.float32)
        elif len(shape) == 4:  # conv kernel, OIHW
            fan_in = shape[1] * shape[2] * shape[3]
            out[name] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
        elif leaf == "weight":  # norm scale
            out[name] = rng.uniform(0.6, 1.4, shape).astype(np.float32)
        elif leaf in ("bias", "in_proj_bias"):
            out[name] = rng.normal(0.0, 0.2, shape).astype(np.float32)
        else:
            raise ValueError(f"random_state_dict: don't know how to fill {name!r} {shape}")
    return out


# A narrow NanoDet-Plus (ShuffleNetV2 0.5x, 32-channel PAN, 5 classes) that exercises
# every code path of the full model at a fraction of its cost; used by the golden
# fixtures and by tests that only need *a* model.
SMALL_MODEL_OVERRIDES = (
    "--config.model.arch.backbone.model_size=0.5x",
    "--config.model.arch.fpn.in_channels=[48, 96, 192]",
    "--config.model.arch.fpn.out_channels=32",
    "--config.model.arch.head.num_classes=5",
    "--config.model.arch.head.input_channel=32",
    "--config.model.arch.head.feat_channels=32",
    "--config.model.arch.aux_head.num_classes=5",
    "--config.model.arch.aux_head.input_channel=64",
    "--config.model.arch.aux_head.feat_channels=64",
    "--config.class_names=['a', 'b', 'c', 'd', 'e']",
)


def normal_input(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """A seeded float32 N(0, 1) array (the golden fixtures' inputs)."""
    return np.random.default_rng(seed).normal(size=tuple(shape)).astype(np.float32)


def array_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over sorted (name, dtype, shape, bytes): detects any drift of generated data."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def randomise(model, seed: int):
    """``model`` (any module with PyTorch-named variables) loaded with
    ``random_state_dict`` of its own shapes, in eval mode; returned for chaining."""
    from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout

    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()
    }
    load_torch_weights(model, random_state_dict(shapes, seed))
    model.eval()
    return model
