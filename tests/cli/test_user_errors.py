"""A user's mistake through any entry point is one line on stderr and exit status 2
(``cli.common.entry_point``), with ``--debug`` / ``NANODET_JAX_DEBUG=1`` for the traceback;
a genuine bug keeps its traceback. Also: predict skips an unreadable image and still
writes predictions.json; eval names a missing or cut image. No model is built here:
every error is raised before, and predict runs a stand-in predictor."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from flax import nnx

from nanodet_jax.cli import check_dataset, predict
from nanodet_jax.cli import common as cli
from nanodet_jax.cli import eval as eval_cli
from nanodet_jax.cli import train as train_cli
from nanodet_jax.data.coco import ImageRecord
from nanodet_jax.errors import UnknownFieldError
from nanodet_jax.evaluation import coco_eval
from nanodet_jax.evaluation.predictor import Detections
from nanodet_jax.weights.pytorch import WeightMismatchError, load_torch_weights
from tests.conftest import config_path

CONFIG = config_path("nanodet_plus_m.py")
TYPO = "--config.data.val.ann_fle=x.json"
TYPO_LINE = (
    "error: --config.data.val.ann_fle: no field 'ann_fle' in data.val; did you mean "
    "'ann_file'? (fields: ann_file, difficult, img_dir, input_size, keep_ratio, name, "
    "pipeline, split)\n"
)
# What each entry point needs besides --config to get as far as reading it.
ENTRIES = {
    "train": [], "check_dataset": [], "eval": ["--torch-weights", "x.pth"],
    "predict": ["--torch-weights", "x.pth", "x.jpg"], "convert": ["--torch-weights", "x.pth"],
    "export": ["--torch-weights", "x.pth"], "nanodet_yml": ["--out", "x.yml"],
}  # fmt: skip


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stderr) of an entry point that fails."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("entry", list(ENTRIES))
def test_override_typo_is_one_line_with_close_matches(entry, capsys):
    main = importlib.import_module(f"nanodet_jax.cli.{entry}").main
    code, err = run_main(main, ["--config", CONFIG, TYPO, *ENTRIES[entry]], capsys)
    assert (code, err) == (2, TYPO_LINE)


def test_override_of_the_wrong_type_is_one_line(capsys):
    code, err = run_main(check_dataset.main, ["--config", CONFIG, "--config.class_names=a"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: --config.class_names=a: Could not override field"), err


def test_yml_mistakes_name_the_file_and_the_problem(tmp_path, capsys):
    bad_syntax, unknown = tmp_path / "syntax.yml", tmp_path / "unknown.yml"
    bad_syntax.write_text("model:\n  arch: [1, 2\n")
    unknown.write_text("model:\n  arch:\n    name: NanoDetPlus\n    bogus_key: 3\n")
    expected = {
        bad_syntax: f"error: {bad_syntax}: not valid YAML (expected ',' or ']', but got "
        "'<stream end>' at line 3)",
        unknown: f"error: {unknown}: model.arch.bogus_key: 3 is not supported yet",
        tmp_path / "gone.yml": f"error: config file '{tmp_path / 'gone.yml'}' not found",
    }
    for path, line in expected.items():
        code, err = run_main(check_dataset.main, ["--config", str(path)], capsys)
        assert code == 2 and err.startswith(line) and err.count("\n") == 1, err


def test_debug_flag_and_environment_show_the_traceback(monkeypatch, capsys):
    with pytest.raises(UnknownFieldError, match="did you mean 'ann_file'"):
        check_dataset.main(["--config", CONFIG, TYPO, "--debug"])
    monkeypatch.setenv("NANODET_JAX_DEBUG", "1")
    with pytest.raises(UnknownFieldError):
        check_dataset.main(["--config", CONFIG, TYPO])
    assert capsys.readouterr().err == ""


def test_a_genuine_bug_keeps_its_traceback(monkeypatch):
    def buggy(*args, **kwargs):
        return {}["split"]  # a KeyError from our code, not from the user's input

    monkeypatch.setattr(check_dataset, "check_dataset", buggy)
    with pytest.raises(KeyError, match="split"):
        check_dataset.main(["--config", CONFIG, "--split", "train"])


def test_deeper_exits_and_weight_mismatches_become_one_line(capsys):
    def global_batch_changed(argv):  # as training/loop.py stops a resume
        raise SystemExit("error: ckpt was written with a global batch of 4 images")

    code, err = run_main(cli.entry_point(global_batch_changed), [], capsys)
    assert (code, err) == (2, "error: ckpt was written with a global batch of 4 images\n")
    with pytest.raises(WeightMismatchError) as info:  # weights of another architecture
        load_torch_weights(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), {"conv.weight": np.zeros(3)})
    assert str(info.value).count("\n") > 2  # the full list, for --debug
    assert cli.error_line(info.value) == (
        "error: a state_dict does not fit this model (missing 2, unexpected 1 keys; --debug "
        "lists them): check that --config matches the architecture the weights were trained "
        "with"
    )


class _StandIn:
    """A predictor with a fixed detection per image (predict's own logic is under test)."""

    class_names = ["a", "b"]

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        box = np.array([[1, 1, 8, 8]], np.float32)
        return [Detections(box, np.array([0.9], np.float32), np.array([1], np.int32))] * len(images)

    def prepare(self, img: np.ndarray) -> np.ndarray:
        return img


def test_predict_skips_an_unreadable_image_and_writes_the_rest(tmp_path, monkeypatch, capsys):
    images, out = tmp_path / "images", tmp_path / "preds"
    images.mkdir()
    names = [f"{i}.png" for i in range(6)]
    for name in names:
        cv2.imwrite(str(images / name), np.full((12, 16, 3), 80, np.uint8))
    (images / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    monkeypatch.setattr(predict, "predictor_from_config", lambda *args: _StandIn())
    warnings = []
    monkeypatch.setattr(predict.log, "warning", warnings.append)
    predict.main([str(images), "--config", CONFIG, "--torch-weights", "x.pth",
                  "--out-dir", str(out)])  # fmt: skip
    bad = str(images / "3.png")
    assert warnings == [f"skipping {bad}: truncated PNG (no IEND chunk)"]
    records = json.loads((out / "predictions.json").read_text())
    assert [r["file"] for r in records] == [str(images / n) for n in names if n != "3.png"]
    assert records[0]["detections"][0]["class_name"] == "b"
    skipped = json.loads((out / "skipped.json").read_text())
    assert skipped == [{"file": bad, "error": f"{bad}: truncated PNG (no IEND chunk)"}]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".png") == sorted(
        n for n in names if n != "3.png"
    )
    assert capsys.readouterr().out == (
        f"wrote 5 drawn images and predictions.json to {out} "
        "(skipped 1 unreadable, listed in skipped.json)\n"
    )


def _coco(path: Path, names: list[str]) -> Path:
    images = [{"id": i + 1, "file_name": n, "width": 16, "height": 12} for i, n in enumerate(names)]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate("abcde")]
    path.write_text(json.dumps({"images": images, "annotations": [], "categories": cats}))
    return path


@pytest.mark.parametrize("entry", ["eval", "train"])
def test_a_missing_val_image_stops_eval_and_train_naming_it(tmp_path, capsys, entry):
    """Evaluation is over the whole annotation file (NanoDet's mAP): a missing image ends
    eval, and training, before a model is built (not after an epoch), naming the file."""
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((12, 16, 3), np.uint8))
    ann = _coco(tmp_path / "ann.json", ["a.png", "gone.png"])
    data = [f"--config.data.{s}.{k}={v}" for s in ("train", "val")
            for k, v in (("ann_file", ann), ("img_dir", tmp_path))]  # fmt: skip
    argv = ["--config", CONFIG, *data, "--config.class_names=['a', 'b', 'c', 'd', 'e']"]
    argv += ["--torch-weights", "x.pth"] if entry == "eval" else ["--workdir", str(tmp_path)]
    main = eval_cli.main if entry == "eval" else train_cli.main
    code, err = run_main(main, argv, capsys)
    assert code == 2
    assert err == (
        f"error: 1 of the 2 images of {ann} not found: {tmp_path / 'gone.png'} "
        "(nanodet-check-dataset --split val lists every broken image)\n"
    )


def test_eval_decoding_a_cut_image_is_one_line_naming_it(tmp_path, capsys):
    """A cut image found while eval decodes (grain's threads re-raise its ImageReadError,
    an OSError that does not run UserError.__init__): one line through the entry point."""
    records = []
    for i, data in enumerate([None, b"\xff\xd8\xff\xe0 cut short"]):
        path = tmp_path / f"{i}.jpg"
        if data is None:
            cv2.imwrite(str(path), np.zeros((12, 16, 3), np.uint8))
        else:
            path.write_bytes(data)
        empty = np.zeros((0, 4), np.float32)
        records.append(ImageRecord(i, str(path), 16, 12, empty, np.zeros(0, np.int32), empty))
    decode_all = cli.entry_point(lambda argv: list(coco_eval.prepared_images(_StandIn(), records)))
    code, err = run_main(decode_all, [], capsys)
    assert (code, err) == (
        2,
        f"error: {tmp_path / '1.jpg'}: truncated JPEG (no end-of-image marker after its last "
        "scan)\n",
    )
