"""Activations the fused C++ inference kernels apply as their epilogue (``csrc/epilogue.h``).

Keys are NanoDet's activation names (``models.layers.ACTIVATIONS``), values the kernels'
codes; LeakyReLU with NanoDet's negative slope of 0.1. An activation missing here is
applied by XLA after the kernel.
"""

from __future__ import annotations

EPILOGUE_ACTIVATIONS: dict[str | None, int] = {
    None: 0,
    "ReLU": 1,
    "LeakyReLU": 2,
    "ReLU6": 3,
    "HardSwish": 4,
    "Hardswish": 4,
}
LEAKY_RELU_SLOPE = 0.1
