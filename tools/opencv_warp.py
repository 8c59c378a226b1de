"""Which rounding this machine's OpenCV warps with: the key of host-dependent goldens.

    python tools/opencv_warp.py     # prints this machine's fingerprint and the recorded one

``cv2.warpPerspective`` (NanoDet's resize and augmentation, and ours) computes each
output pixel's source position in floating point and rounds it to 1/32 pixel; which
SIMD path runs, and so how a position within rounding of a 1/32 step falls, depends on
the CPU. Measured on the 12 warps of ``tests/data/golden_augment.npz`` (NanoDet's, on
the Zen 4 VM): a 2-core Intel Xeon VM reproduces every pixel; a 2-core AMD EPYC (Zen 5)
VM has 5 of 101 952 values off by 1, and OpenCV's scalar path
(``cv2.setUseOptimized(False)``) 1. The same matrix then gives a network input that
differs in a few pixels, and NanoDet-Plus's detections differ by up to ~0.3 px (99th
percentile) instead of the 1e-3 px of float rounding. NanoDet on such a machine warps
as we do there (``tools/reference_eval.py`` and ``eval.py`` on the Zen 5 VM: all 12
COCOeval numbers equal, every detection within 1.2e-3 px), so the goldens recorded from
NanoDet's pipeline are kept per fingerprint (``tests/data/golden_coco_tiny.json.gz``).

The fingerprint is a hash of those 12 warps; :func:`recorded` is the hash of the images
NanoDet produced when the fixture was recorded. Imports NumPy and OpenCV only.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(REPO, "tests", "data", "golden_augment.npz")


@functools.cache
def _probe() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(source image, float64 matrix, NanoDet's warped image) of each recorded trial."""
    with np.load(PROBE) as z:
        arrays = {k: z[k] for k in z.files}
    trials = json.loads(str(arrays["meta"]))["trials"]
    return [
        (
            arrays[f"source{t['source']}/image"],
            arrays[f"trial{i}/matrix"],
            arrays[f"trial{i}/image"],
        )
        for i, t in enumerate(trials)
    ]


def fingerprint(images: Iterable[np.ndarray]) -> str:
    h = hashlib.sha256()
    for img in images:
        h.update(np.ascontiguousarray(img, np.uint8).tobytes())
    return h.hexdigest()[:16]


def warp_probe() -> list[np.ndarray]:
    """This machine's ``cv2.warpPerspective`` of each probe trial (NanoDet's call)."""
    import cv2

    return [
        cv2.warpPerspective(src, m, dsize=(ref.shape[1], ref.shape[0])) for src, m, ref in _probe()
    ]


@functools.cache
def this_host() -> str:
    """The fingerprint of this machine's warps."""
    return fingerprint(warp_probe())


@functools.cache
def recorded() -> str:
    """The fingerprint of NanoDet's warps where the probe was recorded."""
    return fingerprint(ref for _, _, ref in _probe())


def main() -> None:
    ours = warp_probe()
    differ = sum(int((a != ref).sum()) for a, (_, _, ref) in zip(ours, _probe()))
    total = sum(ref.size for _, _, ref in _probe())
    print(
        f"this machine: {this_host()}  recorded: {recorded()}  ({differ} of {total} values differ)"
    )


if __name__ == "__main__":
    main()
