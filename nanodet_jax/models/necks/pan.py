"""PAN: NanoDet's legacy path aggregation neck (NanoDet-m and its variants).

It is NanoDet's FPN followed by a parameter-free bottom-up path: each level, from the
second finest on, adds the bilinearly downsampled (scale factor 0.5, i.e. the mean of
each 2x2 block) finer level, already aggregated.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax

from nanodet_jax.models.necks.fpn import FPN
from nanodet_jax.models.resize import interpolate_bilinear


class PAN(FPN):
    """NanoDet's ``PAN``: the same parameters and options as :class:`FPN`."""

    def __call__(self, inputs: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        outs = self.laterals(inputs)
        for i in range(len(outs) - 1):
            outs[i + 1] = outs[i + 1] + interpolate_bilinear(outs[i], scale_factor=0.5)
        return tuple(outs)
