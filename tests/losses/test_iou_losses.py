"""IoU, GIoU, DIoU, CIoU and Bounded IoU losses against NanoDet's loss classes (default
eps / beta), per box, on random and degenerate pairs (``tools/make_golden_atss.py``);
gradients on the generic pairs. Also the config-facing registry entries."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nanodet_jax.losses import BOX_LOSSES
from tests.conftest import REPO

GOLDEN = os.path.join(REPO, "tests", "data", "golden_atss.npz")
MAX_REL = 1e-5


@pytest.fixture(scope="module")
def golden():
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_atss.npz is absent: run tools/make_golden_atss.py",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        arrays = {k: data[k] for k in data.files}
    return json.loads(str(arrays.pop("meta")))["iou"], arrays


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-12))


@pytest.mark.parametrize("name", ["IoULoss", "GIoULoss", "DIoULoss", "CIoULoss", "BoundedIoULoss"])
def test_iou_loss_matches_reference(golden, name):
    meta, arrays = golden
    fn = BOX_LOSSES.build({"name": name, "loss_weight": 2.0}, drop=("loss_weight",))
    pred, target = jnp.asarray(arrays["iou/pred"]), jnp.asarray(arrays["iou/target"])
    loss = jax.jit(fn)(pred, target)
    ref = arrays[f"iou/{name}/loss"]
    # NanoDet's CIoU is 0 / 0 for identical boxes (v = 0, 1 - IoU = 0): NaN must be
    # exactly where the reference has it.
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(np.isfinite(np.asarray(loss)), finite)
    assert _rel(np.asarray(loss)[finite], ref[finite]) <= MAX_REL, name
    n = meta["num_smooth"]
    grad = jax.grad(lambda p: jnp.sum(fn(p, target[:n])))(pred[:n])
    assert _rel(grad, arrays[f"iou/{name}/grad"][:n]) <= MAX_REL, name


def test_factories_take_nanodet_options():
    pred = jnp.asarray([[0.0, 0.0, 10.0, 10.0]])
    target = jnp.asarray([[5.0, 5.0, 30.0, 30.0]])
    loose = BOX_LOSSES.build({"name": "BoundedIoULoss", "beta": 5.0})(pred, target)
    tight = BOX_LOSSES.build({"name": "BoundedIoULoss", "beta": 0.2})(pred, target)
    assert float(loose[0]) < float(tight[0])
    with pytest.raises(ValueError, match="reduction"):
        BOX_LOSSES.build({"name": "DIoULoss", "reduction": "sum"})
