"""The corruption suite's damage through the commands themselves, in process: a damaged
annotation file of each format is one line naming it from eval.py (exit 2, before a model
is built) and an error from the dataset check (exit 1); one train.py run on a dataset
with damaged images skips them with warnings naming them and trains on finite losses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from nanodet_jax.cli import check_dataset
from nanodet_jax.cli import common as cli
from nanodet_jax.cli import eval as eval_cli
from nanodet_jax.cli import train as train_cli
from nanodet_jax.config.batch import resolve_batch
from nanodet_jax.config.loading import load_config
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.data.pipeline import TrainLoader, train_loader_from_config
from tests.conftest import REPO, config_path
from tests.datasets import corruption_cases as cc

CONFIG = config_path("nanodet_plus_m.py")
NAMES = {"coco": "CocoDataset", "voc": "XMLDataset", "yolo": "YoloDataset"}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return cc.write_base(str(tmp_path_factory.mktemp("corruption_commands")))


def split_args(prep: cc.Prepared, fmt: str, split: str) -> list[str]:
    cfg = prep.split_cfg
    return [f"--config.data.{split}.name={NAMES[fmt]}",
            f"--config.data.{split}.ann_file={cfg['ann_file']}",
            f"--config.data.{split}.img_dir={cfg['img_dir']}"]  # fmt: skip


@pytest.mark.parametrize("fmt", cc.FORMATS)
@pytest.mark.parametrize("kind", ["truncate", "nan"])
def test_damaged_annotations_are_one_line_from_eval_and_fail_the_check(
    fmt, kind, base, tmp_path, capsys
):
    prep = cc.prepare(cc.Case(fmt, "ann", kind, 0), base, str(tmp_path / "data"))
    classes = f"--config.class_names={cc.CLASSES}"
    argv = ["--config", CONFIG, "--torch-weights", "x.pth", classes, *split_args(prep, fmt, "val")]
    with pytest.raises(SystemExit) as info:
        eval_cli.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: ") and prep.damaged in err, err
    assert "Traceback" not in err

    argv = ["--config", CONFIG, "--split", "train", classes, *split_args(prep, fmt, "train")]
    assert check_dataset.main(argv) == 1
    out = capsys.readouterr().out
    assert "ERROR: " in out and prep.damaged in out and "Traceback" not in out, out


@pytest.mark.slow
def test_training_skips_damaged_images_naming_them(shapes, tmp_path, capsys):
    """One short train.py run (the small legacy NanoDet of tests/training, 2 steps) on a
    copy of ``shapes`` whose first batch holds a cut JPEG and a zero-length one."""
    from tests.training.test_train import args

    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    argv = args(data, tmp_path / "run", 2)
    parsed, overrides = train_cli.parse_args(argv)
    config = load_config(parsed.config, overrides)
    records = build_dataset(config.data.train, list(config.class_names)).records
    batch = resolve_batch(config.device, jax.device_count()).global_size
    first = train_loader_from_config(records, config, batch).local_indices(0, 0)
    damaged = [records[int(i)].path for i in first[:2]]
    with open(damaged[0], "rb") as f:
        cut = f.read()
    with open(damaged[0], "wb") as f:
        f.write(cut[: len(cut) // 3])
    open(damaged[1], "wb").close()
    train_cli.main(argv)
    err = capsys.readouterr().err
    for path in damaged:
        assert f"skipping unreadable training image {path}: " in err, err
    assert "Traceback" not in err
    lines = open(os.path.join(tmp_path, "run", "metrics.jsonl")).read().splitlines()
    losses = [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]
    assert len(losses) == 2 and np.isfinite(losses).all(), losses


def test_a_mostly_damaged_training_set_is_one_line(base, tmp_path, capsys):
    """Every image damaged: the loader's stand-ins run out (raised in grain's threads);
    fewer images than a batch (e.g. after YOLO skipped damaged ones). One line each
    through an entry point, not a traceback."""
    cli.setup_logging()  # as an entry point does: log to this test's stderr (an earlier
    # test's entry point left a handler on its own, since closed, captured stream)
    prep = cc.prepare(cc.Case("coco", "jpg", "zero", 0), base, str(tmp_path / "coco"))
    for path in prep.image_paths:
        open(path, "wb").close()
    records = build_dataset(prep.split_cfg, cc.CLASSES).records
    pipeline = load_config(CONFIG).data.train.pipeline.to_dict()
    loader = TrainLoader(records, input_size=(64, 64), pipeline=pipeline, global_batch_size=2,
                         num_threads=1)  # fmt: skip
    code, err = run_entry(lambda: list(loader.epoch(0)), capsys)
    *warnings, line = err.splitlines()  # the skip warnings, then the error
    assert code == 2 and "Traceback" not in err and line.startswith("error: "), err
    assert "unreadable images in a row" in line and "nanodet-check-dataset" in line, err
    assert all(w.startswith("skipping unreadable training image ") for w in warnings), err
    code, err = run_entry(
        lambda: TrainLoader(records[:1], input_size=(64, 64), pipeline=pipeline,
                            global_batch_size=2),
        capsys,
    )  # fmt: skip
    assert code == 2 and "1 images cannot fill one batch of 2" in err, err


def run_entry(call, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        cli.entry_point(lambda argv: call())([])
    return info.value.code, capsys.readouterr().err


def test_python_m_data_check_reports_a_jpeg_cut_to_a_third(base, tmp_path):
    """The user's command (it ran nothing and exited 0 before): a JPEG cut to a third of
    its bytes is reported by name and fails the check, not passed as a half-grey image."""
    prep = cc.prepare(cc.Case("coco", "jpg", "zero", 0), base, str(tmp_path / "data"))
    with open(prep.damaged, "wb") as f:
        f.write(prep.original[: len(prep.original) // 3])
    argv = ["--config", CONFIG, "--split", "train", f"--config.class_names={cc.CLASSES}",
            *split_args(prep, "coco", "train")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": REPO}
    run = subprocess.run([sys.executable, "-m", "nanodet_jax.data.check", *argv], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"{prep.damaged}: truncated JPEG" in run.stdout, run.stdout
