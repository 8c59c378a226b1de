"""``F.interpolate(mode="bilinear", align_corners=False)`` on NHWC, for any sizes.

NanoDet's legacy necks resize both ways: FPN/PAN by ``scale_factor`` (2 up, 0.5 down)
and TAN by target ``size``. PyTorch maps an output pixel ``d`` to the source coordinate
``(d + 0.5) * ratio - 0.5`` (clamped at 0), where ``ratio`` is ``1 / scale_factor`` when
a scale factor is given and ``in / out`` when a size is; the two differ for odd sizes
(5 -> 2 by scale 0.5 averages pixel pairs, by size it does not), so callers say which.
There is no antialiasing: downsampling reads only the two nearest source pixels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from nanodet_jax.models.layers import upsample_bilinear_2x


def _taps(n_in: int, n_out: int, ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (i0, i1) and the weight of i1 for each output pixel along one axis.

    Float32 maths, as PyTorch's CPU kernel computes the coordinates.
    """
    dst = np.arange(n_out, dtype=np.float32)
    src = np.maximum((dst + np.float32(0.5)) * np.float32(ratio) - np.float32(0.5), 0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0.astype(np.float32)).astype(np.float32)


def _along(x: jax.Array, axis: int, n_out: int, ratio: float) -> jax.Array:
    i0, i1, lam = _taps(x.shape[axis], n_out, ratio)
    shape = [1] * x.ndim
    shape[axis] = n_out
    w1 = jnp.asarray(lam.reshape(shape), x.dtype)
    w0 = jnp.asarray((1 - lam).reshape(shape), x.dtype)
    return jnp.take(x, i0, axis=axis) * w0 + jnp.take(x, i1, axis=axis) * w1


def interpolate_bilinear(
    x: jax.Array,
    size: tuple[int, int] | None = None,
    scale_factor: float | None = None,
) -> jax.Array:
    """Resize NHWC ``x`` to ``size`` or by ``scale_factor`` (exactly one of them)."""
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate_bilinear: give exactly one of size and scale_factor")
    h, w = x.shape[1:3]
    if size is None:
        out_hw = (int(np.floor(h * scale_factor)), int(np.floor(w * scale_factor)))
        ratios = (1.0 / scale_factor, 1.0 / scale_factor)
    else:
        out_hw = (int(size[0]), int(size[1]))
        ratios = (h / out_hw[0], w / out_hw[1])
    if out_hw == (2 * h, 2 * w) and ratios == (0.5, 0.5):
        return upsample_bilinear_2x(x)  # the same weights, without a gather
    # Width first, then height: the order of PyTorch's separable sums.
    x = _along(x, 2, out_hw[1], ratios[1])
    return _along(x, 1, out_hw[0], ratios[0])
