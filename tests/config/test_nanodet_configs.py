"""Each of NanoDet's 18 config files has a ``configs/`` counterpart: the .yml loads to a
config equal to ours in every field, but for the differences by choice named here; and
every one of our configs builds its model.

NanoDet's files are the parsed content in tests/data/golden_nanodet_yml.json (recorded,
with the file -> config table, by tools/record_nanodet_yml.py).
"""

from __future__ import annotations

import pytest

from nanodet_jax.config.loading import load_config
from nanodet_jax.models import build_model
from nanodet_jax.models.detectors import DETECTORS
from tests.config.test_nanodet_yml import (
    GOLDEN,
    NOT_NANODET,
    VALUE_DIFFERENCES,
    assert_same,
    flat,
    write_yml,
)
from tests.conftest import REPO, config_path
from tools.record_nanodet_yml import CONFIGS, LEGACY, PAIRS, our_configs

# Differences by choice: field -> (NanoDet's value, ours). NanoDet's data paths are
# relative to its checkout's data folder; ours to this repository's data/.
COCO_PATHS = {k: v for k, v in VALUE_DIFFERENCES.items() if k.startswith("data.")}
# Some v0.x files point at /coco/..., a folder of their authors' machine: ours stay in data/.
ROOT_COCO_PATHS = {k: ("/" + theirs, ours) for k, (theirs, ours) in COCO_PATHS.items()}
# YOLO labels sit beside the images, so both paths are the image folder, under data/ here.
YOLO_PATHS = {
    f"data.{role}.{field}": (f"coco/{role}2017", f"data/coco/{role}2017")
    for role in ("train", "val")
    for field in ("img_dir", "ann_file")
}
# NanoDet's ShuffleNetV2 / EfficientNet-Lite download ImageNet weights by default; ours
# start from random init unless pretrain names the weights (nothing is downloaded here).
PRETRAIN = {"model.arch.backbone.pretrain": (True, None)}


def workers(n: int) -> dict:
    """NanoDet's loader processes per GPU, sized for its authors' machines, are our default
    4 grain threads."""
    return {"device.workers": (n, 4)}


def renamed(theirs: str, ours: str) -> dict:
    """NanoDet's file kept the save_dir of the file it was copied from; ours is named after
    the file, so that its workdir (workdir/<name>) is its own."""
    return {"name": (theirs, ours)}


_V0 = "legacy_v0.x_configs/"
DIFFERENCES = {
    **{yml: VALUE_DIFFERENCES for yml in PAIRS},  # COCO_PATHS, workers(10), PRETRAIN
    "convnext/nanodet-plus_convnext-nano_640.yml": COCO_PATHS,
    "nanodet-plus-m_416-yolo.yml": {
        **YOLO_PATHS, **workers(10), **PRETRAIN,
        **renamed("nanodet-plus-m_416", "nanodet-plus-m_416-yolo"),
    },
    "nanodet_custom_xml_dataset.yml": {  # its paths are placeholders to fill in: kept
        **workers(8), **PRETRAIN, **renamed("nanodet_m", "nanodet_custom_xml_dataset"),
    },
    **{
        f"{_V0}{name}": {**COCO_PATHS, **workers(8), **PRETRAIN}
        for name in ("nanodet-m.yml", "nanodet-m-0.5x.yml", "nanodet-m-416.yml",
                     "nanodet-m-1.5x.yml", "nanodet-m-1.5x-416.yml", "Transformer/nanodet-t.yml")
    },
    f"{_V0}nanodet-g.yml": {**COCO_PATHS, **workers(10)},  # CustomCspNet: no pretrain key
    f"{_V0}RepVGG/nanodet-RepVGG-A0_416.yml": {**ROOT_COCO_PATHS, **workers(1)},  # neither
    **{
        f"{_V0}EfficientNet-Lite/nanodet-EfficientNet-{name}.yml": {
            **ROOT_COCO_PATHS, **workers(12), **PRETRAIN
        }
        for name in ("Lite0_320", "Lite1_416", "Lite2_512")
    },
}  # fmt: skip


def test_every_nanodet_file_has_a_config():
    """All 18 files are recorded, each maps to one of our configs, and each of ours but
    the quickstart and the models NanoDet lacks (torchvision's FCOS) mirrors one."""
    assert len(GOLDEN) == 18 and set(GOLDEN) == set(CONFIGS) == set(DIFFERENCES)
    assert LEGACY in GOLDEN and len(set(CONFIGS.values())) == len(CONFIGS)
    assert set(our_configs(REPO)) - set(CONFIGS.values()) == {"quickstart.py", *NOT_NANODET}


@pytest.mark.parametrize("yml", list(CONFIGS))
def test_nanodet_yml_equals_our_config(tmp_path, yml):
    mapped = flat(load_config(write_yml(tmp_path, GOLDEN[yml], yml)))
    ours = flat(load_config(config_path(CONFIGS[yml])))
    assert_same(mapped, ours, DIFFERENCES[yml])
    docstring = open(config_path(CONFIGS[yml]), encoding="utf-8").read().split('"""')[1]
    assert yml in " ".join(docstring.split()), "the docstring names the NanoDet file"


@pytest.mark.parametrize("name", our_configs(REPO))
def test_every_config_builds_its_model(name):
    """Building is cheap (no forward): the detector class is the config's, and the backbone
    gives the channels the neck is configured to take."""
    config = load_config(config_path(name))
    model = build_model(config)
    arch = config.model.arch
    assert type(model) is DETECTORS[arch.name]
    # FCOS's ``backbone`` is torchvision's BackboneWithFPN: the ResNet is its ``body``.
    body = getattr(model.backbone, "body", model.backbone)
    assert list(body.out_channels) == list(arch.fpn.in_channels)
