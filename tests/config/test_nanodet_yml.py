"""NanoDet's own .yml configs: load (mapped onto ours), override, refuse, write back.

The inputs are NanoDet's config files as parsed content (tests/data/golden_nanodet_yml.json,
recorded by tools/record_nanodet_yml.py, which also checks our written files with
NanoDet's own yacs loader); each test writes them back out as YAML and loads that.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from nanodet_jax.cli import nanodet_yml as nanodet_yml_cli
from nanodet_jax.config import nanodet_yml
from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.config.loading import load_config
from nanodet_jax.config.nanodet_yml import UnsupportedNanoDetConfig, our_field
from nanodet_jax.config.nanodet_yml_write import write_nanodet_yml
from nanodet_jax.evaluation.coco_eval import STAT_NAMES
from tests.conftest import REPO, config_path
from tests.evaluation.test_real_data import foreign_host_stats, host_runs, load_golden
from tools.record_nanodet_yml import LEGACY, NOT_NANODET, PAIRS, leaves, our_configs

GOLDEN = json.load(open(os.path.join(REPO, "tests", "data", "golden_nanodet_yml.json")))["files"]
OUR_CONFIGS = our_configs(REPO)  # configs/**/*.py, relative to configs/

# Fields both sides carry whose values differ by choice, not by the mapping: (NanoDet's, ours).
# NanoDet's paths are relative to its own checkout's data folder; its 10 loader workers per
# GPU are 4 grain threads here; NanoDet's ShuffleNetV2 starts from ImageNet by default.
VALUE_DIFFERENCES = {
    "data.train.img_dir": ("coco/train2017", "data/coco/train2017"),
    "data.train.ann_file": (
        "coco/annotations/instances_train2017.json",
        "data/coco/annotations/instances_train2017.json",
    ),
    "data.val.img_dir": ("coco/val2017", "data/coco/val2017"),
    "data.val.ann_file": (
        "coco/annotations/instances_val2017.json",
        "data/coco/annotations/instances_val2017.json",
    ),
    "device.workers": (10, 4),
    "model.arch.backbone.pretrain": (True, None),
}
# Only in NanoDet's files: JAX takes the visible devices.
NANODET_ONLY = {"device.gpu_ids"}
# Only in ours (our defaults when loading a NanoDet file).
OURS_ONLY = {
    "device.global_batch_size",
    "test.score_thr",
    "test.nms_iou",
    "test.max_per_img",
    "test.nms_pre",
    "test.batch_size",
    "checkpoint.every_steps",
    "checkpoint.keep",
    "checkpoint.preemption_grace_s",
    "seed",
    "init_bn_recalibration_images",
    "data.train.split",
    "data.train.difficult",
    "data.train.max_boxes_buckets",
    "data.val.split",
    "data.val.difficult",
}
# The fields NanoDet's config.py gives defaults, which its yacs merge then type-checks
# (``Type mismatch`` on an int written as 50.0); the rest only need equal values.
NANODET_TYPED = {"save_dir": str, "device.precision": int, "log.interval": int}
# ImageNet start of the backbone (issue 10 item 5; absent before it): NanoDet's default is
# True, ours None.
_HAS_PRETRAIN = "pretrain" in nanodet_plus_config().model.arch.backbone
PRETRAIN = {"model.arch.backbone.pretrain"} if _HAS_PRETRAIN else set()
# NanoDet fields these four files leave out, so the mapping supplies NanoDet's default.
ABSENT_FROM_THE_FILES = {"init_from"} | PRETRAIN


def flat(config: Any) -> dict[str, Any]:
    return dict(leaves(config.to_dict() if hasattr(config, "to_dict") else config))


def write_yml(tmp_path, content: Any, name: str = "nanodet.yml") -> str:
    path = os.path.join(tmp_path, os.path.basename(name))
    with open(path, "w", encoding="utf-8") as f:
        f.write(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
    return path


def assert_same(a: dict[str, Any], b: dict[str, Any], skip: Mapping = ()) -> None:
    assert set(a) == set(b), f"only one side: {sorted(set(a) ^ set(b))}"
    for key in a:
        if key in skip:
            assert (a[key], b[key]) == skip[key], key
        else:
            assert a[key] == b[key] and type(a[key]) is type(b[key]), (key, a[key], b[key])


@pytest.mark.parametrize("yml", list(PAIRS))
def test_nanodet_plus_yml_equals_our_config(tmp_path, yml):
    mapped = flat(load_config(write_yml(tmp_path, GOLDEN[yml], yml)))
    ours = flat(load_config(config_path(PAIRS[yml])))
    assert_same(mapped, ours, VALUE_DIFFERENCES)

    # Where every NanoDet field went: same value at our path, or named as not carried.
    ignored, covered = set(), set()
    for field, value in leaves(GOLDEN[yml]):
        target = our_field(field)
        if target is None:
            ignored.add(field)
            continue
        covered.add(target)
        if field == "save_dir":
            value = os.path.basename(value)
        elif field == "device.precision":
            value = {32: "fp32", 16: "bf16"}[value]
        expected = value
        assert mapped[target] == expected, (field, target)
    assert ignored == NANODET_ONLY
    assert set(mapped) - covered == OURS_ONLY | ABSENT_FROM_THE_FILES


def test_overrides_apply_after_the_mapping(tmp_path):
    path = write_yml(tmp_path, GOLDEN["nanodet-plus-m_416.yml"])
    config = load_config(
        path,
        [
            "--config.device.batch_size_per_device=8",
            "--config.data.train.img_dir=/data/train",
            "--config.data.train.pipeline.rotation=2.5",  # an int (0) in the file
            "--config.grad_clip",  # 35 in the file
            "1.5",
            "--config.test.score_thr=0.3",  # ours only
        ],
    )
    assert config.device.batch_size_per_device == 8
    assert config.data.train.img_dir == "/data/train"
    assert config.data.train.pipeline.rotation == 2.5
    assert config.grad_clip == 1.5 and config.test.score_thr == 0.3
    with pytest.raises(KeyError, match="img_path"):  # overrides name our fields
        load_config(path, ["--config.data.train.img_path=/x"])


def test_legacy_yml_loads_with_its_recipe(tmp_path):
    """NanoDet's legacy nanodet-m.yml: a OneStageDetector (ShuffleNetV2, PAN, NanoDetHead)
    with its own recipe (SGD, linear warm-up, MultiStepLR, keep_ratio, no EMA: decay 0)."""
    import jax.numpy as jnp

    from nanodet_jax.models import build_model

    config = load_config(write_yml(tmp_path, GOLDEN[LEGACY], LEGACY))
    arch = config.model.arch
    assert (arch.name, arch.backbone.name, arch.fpn.name, arch.head.name) == (
        "OneStageDetector", "ShuffleNetV2", "PAN", "NanoDetHead"
    )  # fmt: skip
    schedule = config.schedule
    assert (schedule.optimizer.name, schedule.optimizer.lr, schedule.optimizer.momentum) == (
        "SGD", 0.14, 0.9
    )  # fmt: skip
    assert schedule.lr_schedule.to_dict() == {
        "name": "MultiStepLR", "milestones": [240, 260, 275], "gamma": 0.1
    }  # fmt: skip
    assert schedule.warmup.name == "linear" and config.data.train.keep_ratio is True
    assert config.model.weight_averager.decay == 0.0
    model = build_model(config, with_aux=False)
    out = model(jnp.zeros((1, 64, 64, 3)))
    assert out.shape == (1, 64 + 16 + 4, 80 + 4 * (arch.head.reg_max + 1))


def _set(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree[part]
    if value is KeyError:
        del tree[leaf]
    else:
        tree[leaf] = value


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("model.arch.backbone.name", "VoVNet", "model.arch.backbone.name: 'VoVNet'"),
        ("model.arch.fpn.name", "BiFPN", "model.arch.fpn.name: 'BiFPN' is not supported yet"),
        ("model.arch.head.share_cls_reg", True, "model.arch.head.share_cls_reg: True"),
        ("model.arch.head.loss.loss_bbox.name", "SmoothL1Loss", "loss_bbox.name: 'SmoothL1Loss'"),
        ("model.weight_averager.name", "Other", "weight_averager.name: 'Other'"),
        ("data.train.multi_scale", [0.8, 1.2], "data.train.multi_scale: [0.8, 1.2]"),
        ("data.val.pipeline.mosaic", True, "data.val.pipeline.mosaic: True"),
        ("device.precision", 8, "device.precision: 8 is not supported yet (supported: 32, 16)"),
        ("schedule.optimizer.name", "RMSprop", "schedule.optimizer.name: 'RMSprop'"),
        ("schedule.optimizer.rho", 0.9, "schedule.optimizer.rho: 0.9"),
        ("schedule.lr_schedule.name", "StepLR", "lr_schedule.name: 'StepLR'"),
        ("test.score_thr", 0.3, "test.score_thr: 0.3"),
        ("wandb", {"project": "x"}, "wandb: {'project': 'x'}"),
        ("data.val", KeyError, "data.val is missing"),
        ("schedule.total_epochs", KeyError, "schedule.total_epochs is missing"),
    ],
)
def test_unsupported_parts_stop_naming_the_field(tmp_path, field, value, expected):
    content = copy.deepcopy(GOLDEN["nanodet-plus-m_416.yml"])
    if field.startswith("test."):
        content["test"] = {}
    _set(content, field, value)
    path = write_yml(tmp_path, content)
    with pytest.raises(UnsupportedNanoDetConfig) as info:
        load_config(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_sgd_and_multistep_yml_builds_its_optimizer(tmp_path):
    """NanoDet's legacy recipes train with SGD + MultiStepLR: the section maps as is."""
    content = copy.deepcopy(GOLDEN["nanodet-plus-m_416.yml"])
    content["schedule"]["optimizer"] = {"name": "SGD", "lr": 0.14, "momentum": 0.9,
                                        "weight_decay": 0.0001}  # fmt: skip
    content["schedule"]["lr_schedule"] = {"name": "MultiStepLR", "milestones": [240, 260],
                                          "gamma": 0.1}  # fmt: skip
    config = load_config(write_yml(tmp_path, content))
    assert config.schedule.optimizer.name == "SGD" and config.schedule.optimizer.momentum == 0.9
    assert list(config.schedule.lr_schedule.milestones) == [240, 260]
    from nanodet_jax.training.optim import build_optimizer, lr_schedule

    build_optimizer(config, 10)
    lr = lr_schedule(config.schedule, 10)
    assert float(lr(260 * 10)) == pytest.approx(0.14 * 0.01, rel=1e-6)


def test_invalid_yaml_stops_with_one_line(tmp_path):
    path = write_yml(tmp_path, "model:\n  arch: [unclosed\n")
    with pytest.raises(UnsupportedNanoDetConfig, match=r"not valid YAML .* at line \d+\)$"):
        load_config(path)


@pytest.mark.parametrize("name", [n for n in OUR_CONFIGS if n not in NOT_NANODET])
def test_written_yml_reloads_to_an_equal_config(tmp_path, name):
    config = load_config(config_path(name))
    path = os.path.join(tmp_path, "out.yml")
    write_nanodet_yml(config, path, name)
    assert_same(flat(load_config(path)), flat(config))


@pytest.mark.parametrize("yml", list(PAIRS))
def test_written_yml_has_nanodet_keys_and_values(tmp_path, yml):
    path = os.path.join(tmp_path, "out.yml")
    write_nanodet_yml(load_config(config_path(PAIRS[yml])), path)
    written, theirs = flat(yaml.safe_load(open(path))), flat(GOLDEN[yml])
    # Our random-init default is written out; NanoDet's file relies on its True default.
    assert set(written) - set(theirs) == PRETRAIN
    assert set(theirs) <= set(written)
    assert {k: type(written[k]) for k in NANODET_TYPED} == NANODET_TYPED
    for key, value in theirs.items():
        ours = {
            "data.train.img_path": "data/coco/train2017",
            "data.val.img_path": "data/coco/val2017",
            "data.train.ann_path": "data/coco/annotations/instances_train2017.json",
            "data.val.ann_path": "data/coco/annotations/instances_val2017.json",
            "device.workers_per_gpu": 4,
        }.get(key, value)
        # Equal values; ours may be 0.0 where NanoDet's file says 0 (NanoDet reads either).
        assert written[key] == ours and isinstance(written[key], bool) == isinstance(ours, bool), (
            key
        )


def test_quickstart_writes_its_extra_fields_in_a_block(tmp_path):
    path = os.path.join(tmp_path, "out.yml")
    write_nanodet_yml(load_config(config_path("quickstart.py")), path)
    extras = yaml.safe_load(open(path))[nanodet_yml.EXTRAS_KEY]
    assert extras["checkpoint"] == {"every_steps": 64}
    assert extras["data"]["synthetic"]["out_dir"] == "data/quickstart_shapes"


def test_command_line_writes_a_yml(tmp_path, capsys):
    out = os.path.join(tmp_path, "m.yml")
    argv = ["--config", config_path("nanodet_plus_m.py"), "--out", out]
    nanodet_yml_cli.main([*argv, "--config.device.batch_size_per_device=32"])
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert yaml.safe_load(open(out))["device"]["batchsize_per_gpu"] == 32
    assert load_config(out).device.batch_size_per_device == 32


def _entry_point(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"nanodet_yml_test_{name}", f"{REPO}/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("entry", ["train", "eval"])
def test_entry_points_take_a_nanodet_yml(tmp_path, entry):
    """``python train.py --config x.yml`` got as far as the dataset (no data here), with
    the override applied, where it used to die in importlib."""
    path = write_yml(tmp_path, GOLDEN["nanodet-plus-m_320.yml"])
    missing = os.path.join(tmp_path, "missing.json")
    role = "train" if entry == "train" else "val"
    argv = ["--config", path, f"--config.data.{role}.ann_file={missing}"]
    argv += ["--workdir", str(tmp_path)] if entry == "train" else ["--torch-weights", "x.pth"]
    with pytest.raises(SystemExit, match="missing.json: annotation file not found") as info:
        _entry_point(entry).main(argv)  # the user error as one line (cli.entry_point)
    assert info.value.code == 2


@pytest.mark.parametrize("yml", ["nanodet-plus-m_320.yml", "nanodet-plus-m_416.yml"])
def test_eval_with_a_nanodet_yml_reproduces_nanodet_map(shared_data, tmp_path, yml):
    """``eval.py --config <NanoDet's .yml>``: the 12 COCOeval numbers of NanoDet's own
    pipeline on the 80 coco_tiny val images (tests/data/golden_coco_tiny.json.gz)."""
    runs, same_warps = host_runs(load_golden())  # NanoDet's, where OpenCV warps as here
    run = runs[PAIRS[yml]]
    coco = os.path.join(shared_data, "coco_tiny")
    metrics = _entry_point("eval").main([
        "--config", write_yml(tmp_path, GOLDEN[yml], yml),
        "--torch-weights", os.path.join(shared_data, "weights", run["weights"]),
        f"--config.data.val.ann_file={coco}/annotations/{run['ann']}",
        f"--config.data.val.img_dir={coco}/val2017",
        "--out-dir", str(tmp_path), "--no-progress",
    ])  # fmt: skip
    if not same_warps:
        assert not foreign_host_stats(metrics["stats"], run["stats"])
        return
    ours = [metrics["stats"][k] for k in STAT_NAMES]  # the golden's order
    assert ours == pytest.approx(run["stats"], abs=1e-4), list(zip(STAT_NAMES, ours))
    # NanoDet-Plus-m's mAP on these 80 images, on every machine measured (to 4 decimals).
    assert ours[0] == pytest.approx(
        {"nanodet-plus-m_320.yml": 0.3115, "nanodet-plus-m_416.yml": 0.3581}[yml], abs=1e-4
    )
