"""torchvision's detection resize (``GeneralizedRCNNTransform``) onto a few fixed canvases.

torchvision scales each image by ``min(min_size / short side, max_size / long side)``
(``F.interpolate`` bilinear, no antialias, ``recompute_scale_factor=True``: the output
side is ``floor(side * scale)`` and the sampling ratio is ``in / out``), then zero-pads
the batch bottom/right to its largest image rounded up to ``size_divisible``. A padded
size per batch would compile one XLA program per shape; here every image goes top-left
onto the smallest of a fixed list of canvases (``data.<split>.resize.canvases``, (w, h)),
so there is one program per canvas, and a batch holds images of one canvas only.

Config (``data.<split>.resize``): ``min_size``, ``max_size``, ``size_divisible`` and
optionally ``canvases``. Without ``canvases`` the set is derived from min/max: for the
aspect ratios 1, 4:3, 3:2 and the widest (max / min), the resized extent rounded up to
``size_divisible``, landscape and portrait. For 800 / 1333 that is (800, 800), (1088,
800), (1216, 800), (1344, 800) and the portrait three: COCO's 640x480 and 640x427 photos
(and their portrait twins) land on canvases exactly their padded size; on coco_tiny's
160 images this pads 1.2% more pixels than torchvision's per-image padding (five canvases
without 3:2: 6.1%, two (1344x800 and 800x1344): 17.3%).

The resized image is float32 (raw 0-255 values, not rounded back to uint8): torchvision
interpolates float tensors, and the device normalises it as it does uint8 canvases.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

DERIVED_RATIOS = (1.0, 4 / 3, 3 / 2)  # plus max_size / min_size; see the module docstring
FIELDS = ("min_size", "max_size", "size_divisible", "canvases")


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as the FMA instruction PyTorch's compiled kernel
    uses (float64 holds a float32 product exactly)."""
    return (a.astype(np.float64) * b + c).astype(np.float32)


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F.interpolate's taps along one axis at ratio ``in / out`` (recompute_scale_factor):
    source indices (i0, i1) and the float32 weight of i1 per output pixel. The source
    coordinate ``ratio * (d + 0.5) - 0.5`` is one FMA in PyTorch's x86 build; rounded
    twice instead it moves 11% of COCO resized pixels by up to 0.004 (of 255)."""
    ratio = np.float32(n_in) / np.float32(n_out)
    half = np.arange(n_out, dtype=np.float32) + np.float32(0.5)
    src = np.maximum(_fma(np.float32(ratio), half, np.float32(-0.5)), np.float32(0))
    i0 = src.astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)


def _round_up(v: int, divisible: int) -> int:
    return -(-int(v) // divisible) * divisible


@dataclasses.dataclass(frozen=True)
class CanvasResize:
    """The resize rule and its canvases ((w, h), smallest area first)."""

    min_size: int
    max_size: int
    size_divisible: int
    canvases: tuple[tuple[int, int], ...]
    field: str = "data.val.resize"  # the config path named in error messages

    def scale(self, w: int, h: int) -> float:
        """torchvision's scale (Python float arithmetic, as its eager path)."""
        return min(float(self.min_size) / min(w, h), float(self.max_size) / max(w, h))

    def output_wh(self, w: int, h: int) -> tuple[int, int]:
        """The resized (w, h): ``floor(side * scale)``, as F.interpolate sizes its output."""
        s = self.scale(w, h)
        return int(math.floor(w * s)), int(math.floor(h * s))

    def canvas_for(self, w: int, h: int) -> tuple[int, int]:
        """The smallest canvas (w, h) holding the resize of a ``w x h`` image."""
        ow, oh = self.output_wh(w, h)
        for cw, ch in self.canvases:
            if cw >= ow and ch >= oh:
                return cw, ch
        raise ValueError(
            f"{self.field}.canvases: none of {[list(c) for c in self.canvases]} holds the "
            f"{ow}x{oh} resize of a {w}x{h} image; add a canvas of at least "
            f"[{_round_up(ow, self.size_divisible)}, {_round_up(oh, self.size_divisible)}]"
        )

    def resize(self, img: np.ndarray) -> np.ndarray:
        """The float32 resize of an HWC image: width then height, each output ``fma(w0,
        near, w1 * far)``. Upscaling (every COCO photo at 800 / 1333) is bit for bit
        PyTorch's x86 CPU kernel; downscaling, where that kernel sums the four weighted
        pixels in another order, is within 2 float32 ulps (3e-5 of 255)."""
        h, w = img.shape[:2]
        ow, oh = self.output_wh(w, h)
        i0, i1, lam = bilinear_taps(w, ow)
        lam = lam[None, :, None]
        x = _fma(np.float32(1) - lam, img[:, i0].astype(np.float32), lam * img[:, i1])
        j0, j1, lam = bilinear_taps(h, oh)
        lam = lam[:, None, None]
        return _fma(np.float32(1) - lam, x[j0], lam * x[j1])

    def matrix(self, w: int, h: int) -> np.ndarray:
        """Original pixels -> resized pixels: x and y scale by out / in (torchvision's
        ``resize_boxes`` ratios), so boxes go back through the inverse."""
        ow, oh = self.output_wh(w, h)
        return np.diag([ow / w, oh / h, 1.0])


def derived_canvases(min_size: int, max_size: int, divisible: int) -> list[tuple[int, int]]:
    """The default canvases for a min / max size (see the module docstring)."""
    out: list[tuple[int, int]] = []
    short = _round_up(min_size, divisible)
    for ratio in (*DERIVED_RATIOS, max_size / min_size):
        long = _round_up(min(max_size, math.floor(min_size * ratio)), divisible)
        for wh in ((long, short), (short, long)):
            if wh not in out:
                out.append(wh)
    return out


def from_config(split_cfg: Mapping[str, Any], field: str) -> CanvasResize | None:
    """The rule of ``config.data.<split>`` (``field`` names it), or None without ``resize``
    (NanoDet's warp to ``input_size``). Mistakes raise ValueError naming the field."""
    cfg = split_cfg.get("resize")
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    field = f"{field}.resize"
    unknown = sorted(set(cfg) - set(FIELDS))
    if unknown:
        raise ValueError(f"{field}: unknown field(s) {unknown}; expected {list(FIELDS)}")
    try:
        min_size, max_size = int(cfg["min_size"]), int(cfg["max_size"])
        divisible = int(cfg.get("size_divisible", 32))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{field} needs integer min_size and max_size, got {cfg}") from None
    if not 0 < min_size <= max_size or divisible < 1:
        raise ValueError(
            f"{field}: need 0 < min_size <= max_size and size_divisible >= 1, got {cfg}"
        )
    raw = cfg.get("canvases")
    if raw is None:
        canvases = derived_canvases(min_size, max_size, divisible)
    else:
        try:
            canvases = [(int(c[0]), int(c[1])) for c in raw if len(c) == 2]
        except (TypeError, ValueError):
            canvases = []
        if not canvases or len(canvases) != len(raw):
            raise ValueError(f"{field}.canvases must be a list of [w, h] pairs, got {raw}")
    for cw, ch in canvases:
        if cw % divisible or ch % divisible or cw <= 0 or ch <= 0:
            raise ValueError(
                f"{field}.canvases: [{cw}, {ch}] is not a positive multiple of "
                f"size_divisible={divisible}; round it up"
            )
    # Every resize fits in (max, min) landscape or (min, max) portrait: both must be held,
    # else some image shape has no canvas (caught here rather than mid-epoch).
    for ow, oh in ((max_size, min_size), (min_size, max_size)):
        if not any(cw >= ow and ch >= oh for cw, ch in canvases):
            need = [_round_up(ow, divisible), _round_up(oh, divisible)]
            raise ValueError(
                f"{field}.canvases: none of {[list(c) for c in canvases]} holds a {ow}x{oh} "
                f"resize (max_size={max_size}, min_size={min_size}); add {need}"
            )
    # Smallest area first: canvas_for takes the first that holds an image.
    ordered = tuple(sorted(dict.fromkeys(canvases), key=lambda c: (c[0] * c[1], c)))
    return CanvasResize(min_size, max_size, divisible, ordered, field)
