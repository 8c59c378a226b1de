"""An ImageNet ResNet checkpoint in torchvision's layout starts an FCOS run: it loads into
``backbone.body`` (the detector's ``imagenet_backbone``), as
``fcos_resnet50_fpn(weights_backbone=...)`` initialises torchvision's model, with frozen
or trainable BatchNorm. The quickstart's ResNet-18 stands in for ResNet-50 (the same
code path; the R50 file was checked by hand: 265 / 318 tensors, exact)."""

from __future__ import annotations

import numpy as np
import pytest

from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.models.backbones.pretrained import load_pretrained_for_training
from nanodet_jax.testing import random_state_dict
from nanodet_jax.weights.pytorch import model_variables, to_torch_layout
from tests.conftest import config_path


def imagenet_file(body, path) -> dict[str, np.ndarray]:
    """A torchvision ResNet ImageNet state_dict for ``body``'s depth: every body tensor
    (with trainable BatchNorm's counters), plus the classifier ``fc.*``."""
    import torch

    shapes = {
        k: to_torch_layout(np.asarray(v[...])).shape for k, v in model_variables(body).items()
    }
    for k in list(shapes):
        if (
            k.endswith(".running_var")
            and k.replace("running_var", "num_batches_tracked") not in shapes
        ):
            shapes[k.replace("running_var", "num_batches_tracked")] = ()
    state = random_state_dict(shapes, seed=4)
    state["fc.weight"], state["fc.bias"] = (
        np.ones((1000, 512), np.float32),
        np.ones(1000, np.float32),
    )
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, path)
    return state


@pytest.mark.needs_torch
@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_imagenet_resnet_loads_into_the_body(norm, tmp_path):
    path = tmp_path / "resnet18-5c106cde.pth"
    overrides = [f"--config.model.arch.norm_layer={norm}"]
    state = imagenet_file(build_model(load_config(config_path("fcos_quickstart.py"), overrides),
                                      with_aux=False).backbone.body, path)  # fmt: skip
    config = load_config(config_path("fcos_quickstart.py"), [
        *overrides, f"--config.model.arch.backbone.pretrain={path}"])  # fmt: skip
    model = build_model(config, with_aux=False)
    before = {k: np.asarray(v[...]) for k, v in model_variables(model.backbone.fpn).items()}
    report = load_pretrained_for_training(model, config, resuming=False)
    body = model_variables(model.backbone.body)
    assert report is not None and sorted(report.loaded) == sorted(body)
    for k, var in body.items():
        np.testing.assert_array_equal(to_torch_layout(np.asarray(var[...])), state[k], err_msg=k)
    # Only the body: the FPN (and the head) keep their init.
    for k, var in model_variables(model.backbone.fpn).items():
        np.testing.assert_array_equal(np.asarray(var[...]), before[k], err_msg=k)
