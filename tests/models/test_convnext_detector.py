"""NanoDet-Plus with the ConvNeXt-nano backbone: NanoDet's .yml loads to our config, and the
model it describes builds, runs and exports.

NanoDet's ``config/convnext/nanodet-plus_convnext-nano_640.yml`` is in the golden of
``tools/make_golden_convnext.py`` as parsed content (``meta["nanodet_yml"]``), so no
NanoDet checkout is needed.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import yaml

from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.testing import random_state_dict
from nanodet_jax.weights.pytorch import load_torch_weights, model_variables, to_torch_layout
from tests.config.test_nanodet_yml import VALUE_DIFFERENCES, assert_same, flat
from tests.conftest import REPO, config_path

GOLDEN = os.path.join(REPO, "tests", "data", "golden_convnext.npz")
# Where our config differs from the file by choice: NanoDet's paths are relative to its
# checkout's data folder (the same differences as the four NanoDet-Plus files).
PATHS = {k: v for k, v in VALUE_DIFFERENCES.items() if k.startswith("data.")}


@pytest.fixture(scope="module")
def yml_path(tmp_path_factory) -> str:
    if not os.path.isfile(GOLDEN):
        pytest.fail(
            "tests/data/golden_convnext.npz is absent: run tools/make_golden_convnext.py",
            pytrace=False,
        )
    with np.load(GOLDEN) as data:
        content = json.loads(str(data["meta"]))["nanodet_yml"]
    path = tmp_path_factory.mktemp("yml") / "nanodet-plus_convnext-nano_640.yml"
    path.write_text(yaml.safe_dump(content, sort_keys=False), encoding="utf-8")
    return str(path)


def test_yml_loads_to_our_config(yml_path: str) -> None:
    mapped = flat(load_config(yml_path))
    ours = flat(load_config(config_path("nanodet_plus_convnext_nano_640.py")))
    assert_same(mapped, ours, PATHS)
    assert mapped["model.arch.backbone.model_name"] == "convnext_nano"
    assert mapped["model.arch.fpn.activation"] == "SiLU"


def test_model_from_the_yml_runs_and_exports(yml_path: str, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    from nanodet_jax.deploy import onnx_export

    model = build_model(load_config(yml_path), with_aux=False)  # pretrained: read no file
    assert model.backbone.out_channels == [160, 320, 640]
    # The initial heads are nearly constant (std 0.01 convs): random weights show every
    # layer in the output; the last convs scaled to keep logits in a real model's range.
    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(model).items()
    }
    load_torch_weights(model, random_state_dict(shapes, seed=5))
    for gfl in model.head.gfl_cls:
        gfl.weight[...] = gfl.weight[...] * 0.02
        gfl.bias[...] = gfl.bias[...] * 0.02
    x = np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)
    raw = np.asarray(jax.jit(model)(np.concatenate([x, -x])))
    # 8^2 + 4^2 + 2^2 + 1 priors at strides 8-64; 80 classes + 4 x 8 distribution bins.
    assert raw.shape == (2, 85, 112) and np.all(np.isfinite(raw))
    assert not np.allclose(raw[0], raw[1])

    proto = onnx_export.build_onnx_model(model, (64, 64))
    path = str(tmp_path / "convnext.onnx")
    import onnx

    onnx.save(proto, path)
    theirs = onnx_export.onnxruntime_session(path).run(None, {"data": x.transpose(0, 3, 1, 2)})
    ours = raw[:1].copy()
    ours[..., :80] = 1 / (1 + np.exp(-ours[..., :80]))  # the export's sigmoid class scores
    rel = np.abs(theirs[0] - ours).max() / np.abs(ours).max()
    assert rel <= 1e-4, f"ONNX vs JAX: relative error {rel:.2e}"
