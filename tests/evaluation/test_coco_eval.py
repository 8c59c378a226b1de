"""COCO evaluation settings: ``evaluator.save_key`` in NanoDet's names or ours."""

from __future__ import annotations

import pytest


def test_save_key_selects_a_coco_stat():
    from nanodet_jax.evaluation.coco_eval import save_key_stat

    assert [save_key_stat(k) for k in ("mAP", "AP_50", "AP_l", "AR100")] == [
        "AP", "AP50", "APl", "AR100"
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"save_key 'map' is not a COCO metric; use one of mAP"):
        save_key_stat("map")
