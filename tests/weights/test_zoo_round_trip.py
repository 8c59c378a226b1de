"""Every model of the zoo survives our PyTorch export and import unchanged.

For each NanoDet .yml recorded in ``tests/data/golden_nanodet_yml.json`` (loaded through
our .yml mapping) and each of our ``configs/**/*.py`` that is not one of them, the model, with
its training-only branches where it has them (the whole state_dict NanoDet's
``load_state_dict(strict=True)`` wants), gets distinct random values in every variable,
is written with ``save_torch_weights`` and read into a second model built from another
init seed with ``load_torch_weights``; all variables must then be identical.
``tools/check_zoo.py`` does the same against NanoDet's own models (with a checkout);
this test needs neither the checkout nor a forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest

from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.testing import random_state_dict
from nanodet_jax.weights.pytorch import (
    load_torch_weights,
    model_variables,
    save_torch_weights,
    to_torch_layout,
)
from tests.config.test_nanodet_yml import GOLDEN, OUR_CONFIGS, write_yml
from tests.conftest import config_path
from tools.record_nanodet_yml import CONFIGS

# Our configs that are the same model as a recorded NanoDet file (test_nanodet_yml checks
# the pairs) are covered by that file.
_PAIRED = {ours for theirs, ours in CONFIGS.items() if theirs in GOLDEN}
SOURCES = [f"configs/{n}" for n in OUR_CONFIGS if n not in _PAIRED] + [f"yml:{n}" for n in GOLDEN]


def _config(source: str, tmp_path):
    if source.startswith("yml:"):
        name = source[len("yml:") :]
        return load_config(write_yml(tmp_path, GOLDEN[name], name))
    return load_config(config_path(source[len("configs/") :]))


def _values(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v[...]) for k, v in model_variables(model).items()}


@pytest.mark.needs_torch
@pytest.mark.parametrize("source", SOURCES)
def test_export_then_import_reproduces_every_variable(tmp_path, source):
    config = _config(source, tmp_path)
    first = build_model(config, seed=0)
    # Distinct values everywhere (init leaves norms at 1 / 0 in both models, which would
    # hide two same-shaped tensors exchanging places); NanoDet's layout of our shapes.
    shapes = {k: to_torch_layout(v).shape for k, v in _values(first).items()}
    load_torch_weights(first, random_state_dict(shapes, seed=3))
    second = build_model(config, seed=1)
    before = _values(second)
    expected = _values(first)
    assert any(not np.array_equal(before[k], expected[k]) for k in expected)

    path = tmp_path / "exported.pth"
    save_torch_weights(first, path)
    report = load_torch_weights(second, str(path))  # raises on a missing or stray key
    got = _values(second)

    assert list(got) == list(expected)
    assert not report.missing_aux and sorted(report.loaded) == sorted(expected)
    for k, v in expected.items():
        assert got[k].dtype == v.dtype, k
        np.testing.assert_array_equal(got[k], v, err_msg=k)
