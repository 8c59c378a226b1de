"""Parity of our model with the PyTorch NanoDet reference, against recorded golden outputs.

``tests/data/golden_model.npz`` is written by ``python tools/make_golden.py REF_PATH``
(see that script). For each recorded variant this test rebuilds our model from the
same config and overrides, fills it with the same ``random_state_dict`` weights
(generated from OUR model's keys, in PyTorch layout; no torch needed), runs the same
input and compares every recorded tensor:

* eval mode: backbone, fpn, head, aux_fpn, aux_head outputs;
* train mode (BatchNorm on batch statistics, one forward): the same outputs and every
  BatchNorm's running_mean / running_var (PyTorch updates running_var with the
  *unbiased* batch variance) / num_batches_tracked.

Metric, per tensor: ``rel = max|ours - ref| / max|ref|`` must be <= ``tol`` and
elementwise ``|ours - ref| <= 1e-4 * |ref| + tol * max|ref|`` must hold, with
``tol = max(1e-5, 10 * noise)``. ``noise`` is the float32 reference's own error against
the same reference run in float64 (recorded by make_golden): about 1e-6 in eval mode,
so there ``tol = 1e-5``; in train mode BatchNorm normalises the coarsest levels over as
few as 2 x 1 x 2 = 4 values per channel, which amplifies float32 rounding (PyTorch's own
float32 head output is ~1e-4 away from its float64 one) and no float32 implementation
can meet 1e-5 there. ``num_batches_tracked`` must be equal. The public entry points are
checked too: ``model(x)`` against the eval head output, ``forward_train`` against both
modes' head and aux_head outputs (and, in train mode, its updated statistics).
"""

from __future__ import annotations

import os

import pytest

from tools.golden_checks import (  # compare: also used by test_backbones_2
    MODEL_GOLDEN,
    MODES,
    VARIANTS,
    compare,  # noqa: F401
    failed,
    format_rows,
    load_golden,
    parity_report,
)

GOLDEN = MODEL_GOLDEN


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_model.npz is absent (a committed fixture); create it with "
            "`python tools/make_golden.py /path/to/RangiLyu/nanodet`",
            pytrace=False,
        )
    return load_golden(GOLDEN)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_golden_parity(golden, variant: str, mode: str) -> None:
    meta, arrays = golden
    if variant not in meta["variants"]:
        pytest.fail(f"variant {variant!r} not in the fixture", pytrace=False)
    rows = parity_report(meta, arrays, variant, mode)
    bad = failed(rows)
    assert not bad, f"{variant}/{mode}: parity broken for {bad}\n{format_rows(rows)}"
