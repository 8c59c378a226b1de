"""Our PyTorch export has exactly the state_dict layout of NanoDet's own NanoDetPlus.

``load_state_dict(strict=True)`` checks that the key sets are equal and that every
shape matches (and copies values, casting dtypes); the golden layout also fixes the key
order and the dtypes, which NanoDet's own checkpoints have. The layouts are data, so
neither the NanoDet checkout nor its model is needed here; only torch, to read the file.
"""

from __future__ import annotations

import functools
import json
import os

import numpy as np
import pytest

from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.testing import random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, save_torch_weights
from tests.conftest import REPO

GOLDEN_KEYS = os.path.join(REPO, "tests", "data", "golden_torch_keys.json")
CONFIGS = (
    "configs/nanodet_plus_m.py",
    "configs/nanodet_plus_m_416.py",
    "configs/nanodet_plus_m_1.5x.py",
    "configs/nanodet_plus_m_1.5x_416.py",
)


@functools.cache
def golden_keys() -> dict:
    with open(GOLDEN_KEYS) as f:
        return json.load(f)


def file_layout(state_dict) -> list[list]:
    """``[key, shape, dtype]`` per entry, in order, as the golden records them."""
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state_dict.items()]


@pytest.mark.needs_torch
@pytest.mark.parametrize("config_path", CONFIGS)
def test_export_has_nanodet_state_dict_layout(tmp_path, config_path):
    """``save_torch_weights`` (plain and ``wrap=True``) against NanoDet's recorded layout.

    Golden: ``tests/data/golden_torch_keys.json``, written by
    ``python tools/check_export_torch.py /path/to/nanodet --record-keys
    tests/data/golden_torch_keys.json``: for every config, the ordered keys, shapes and
    dtypes of NanoDet's own ``NanoDetPlus(**config.model.arch).state_dict()`` (aux
    branch included), one list per distinct architecture (the 416 configs share the
    320 ones'). Our model (with aux) gets seeded random weights in that layout, is
    written, read back with ``torch.load(weights_only=True)`` and must have exactly that
    layout -- what NanoDet's ``load_state_dict(strict=True)`` requires, plus order and
    dtypes -- and the values written.
    """
    import torch

    golden = golden_keys()
    assert set(golden["configs"]) == set(CONFIGS)
    layout = golden["architectures"][golden["configs"][config_path]]
    assert len(layout) > 800 and len({k for k, _, _ in layout}) == len(layout)

    model = build_model(load_config(os.path.join(REPO, config_path)))
    weights = random_state_dict([(k, shape) for k, shape, _ in layout], seed=11)
    load_torch_weights(model, weights)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    save_torch_weights(model, plain)
    save_torch_weights(model, wrapped, wrap=True)

    sd = torch.load(plain, weights_only=True)
    got = file_layout(sd)
    missing = [k for k, _, _ in layout if k not in sd]
    unexpected = [k for k in sd if k not in {k for k, _, _ in layout}]
    assert not missing and not unexpected, f"missing {missing}, unexpected {unexpected}"
    assert got == layout  # order, shapes and dtypes too
    for k, v in sd.items():
        np.testing.assert_array_equal(v.numpy(), weights[k], err_msg=k)

    outer = torch.load(wrapped, weights_only=True)
    assert list(outer) == ["state_dict"]
    assert file_layout(outer["state_dict"]) == layout
    for k, v in outer["state_dict"].items():
        assert torch.equal(v, sd[k]), k
