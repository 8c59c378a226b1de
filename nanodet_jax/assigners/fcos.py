"""FCOS's point-to-gt matching as torchvision's ``FCOS.compute_loss`` does it, batched over
padded ground truth (``gt_boxes [B, M, 4]``, ``gt_mask [B, M]``), jittable, static in shape.

torchvision's anchors are squares of side ``anchor_size`` centred on the points
``(j * stride_w, i * stride_h)`` (``AnchorGenerator``: no half-cell offset), so each
anchor is described here by its centre and its size. A point matches a gt when

1. centre sampling: ``max(|point - gt centre|) < radius * anchor_size`` (radius 1.5);
2. the point lies strictly inside the gt (all four distances > 0);
3. the largest of its four distances lies in the level's open range
   ``(4 * anchor_size, 8 * anchor_size)``, with the first level's lower bound 0 and the
   last level's upper bound infinite.

Among the gts a point matches, the one of smallest area wins. torchvision ranks them by
``float32(1e8 - area)`` and takes ``max``'s first index, so areas that round to the same
float32 value near 1e8 (spacing 8 there) tie, and the lower gt index wins, even when its
area is the larger; the same key and first-index argmax reproduce that here. A point
matching nothing (or only gts of area >= 1e8, whose key is not above 1e-5) gets -1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CENTER_SAMPLING_RADIUS = 1.5  # torchvision's FCOS default
AREA_KEY_BASE = 1e8  # torchvision's "1e8 - area" ranking of the matching gts
MATCH_FLOOR = 1e-5  # a best key below this means "no match"


def scale_ranges(sizes: np.ndarray, first_count: int, last_count: int) -> np.ndarray:
    """``[N, 2]`` (lower, upper) bounds on a point's largest gt distance, per anchor."""
    sizes = np.asarray(sizes, np.float32)
    lower, upper = sizes * np.float32(4), sizes * np.float32(8)
    lower[:first_count] = 0.0
    upper[len(sizes) - last_count :] = np.inf
    return np.stack([lower, upper], -1)


def assign(
    points: jax.Array,
    sizes: jax.Array,
    ranges: jax.Array,
    gt_boxes: jax.Array,
    gt_mask: jax.Array,
    radius: float = CENTER_SAMPLING_RADIUS,
) -> jax.Array:
    """Matched gt index ``[B, N]`` (int32, -1 = background) of every anchor.

    ``points [N, 2]`` (x, y) and ``sizes [N]`` are the anchors' centres and sides,
    ``ranges [N, 2]`` their scale bounds (:func:`scale_ranges`); padded gts
    (``gt_mask`` False) never match, so an image without gts is all background.
    """
    x, y = points[None, :, 0, None], points[None, :, 1, None]  # [1, N, 1]
    x0, y0, x1, y1 = (gt_boxes[:, None, :, k] for k in range(4))  # [B, 1, M]
    size = sizes[None, :, None]
    # Centre sampling against the gt centre, computed as torchvision does ((a + b) / 2).
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    near = jnp.maximum(jnp.abs(x - cx), jnp.abs(y - cy)) < np.float32(radius) * size
    left, top, right, bottom = x - x0, y - y0, x1 - x, y1 - y
    inside = jnp.minimum(jnp.minimum(left, top), jnp.minimum(right, bottom)) > 0
    reach = jnp.maximum(jnp.maximum(left, top), jnp.maximum(right, bottom))
    in_range = (reach > ranges[None, :, 0, None]) & (reach < ranges[None, :, 1, None])
    match = near & inside & in_range & gt_mask[:, None, :].astype(bool)
    # The barrier keeps the area a rounded float32 product: fused into the subtraction
    # (an FMA), it could round the key differently and break torchvision's ties.
    area = lax.optimization_barrier((x1 - x0) * (y1 - y0))
    key = jnp.where(match, np.float32(AREA_KEY_BASE) - area, 0.0)
    best = jnp.max(key, axis=-1)
    index = jnp.argmax(key, axis=-1).astype(jnp.int32)  # first index of the maximum
    return jnp.where(best < np.float32(MATCH_FLOOR), -1, index)
