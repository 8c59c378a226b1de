"""The corruption suite: seeded damage (tests/datasets/corruption_cases.py) to one image or
annotation file of a small dataset in each format, run through the data paths of the
commands: the dataset check, the training dataset and loader (every batch of an epoch),
the evaluation dataset and its image decoding, and prediction's file loading (images).

Each (case, path) must end in exactly one outcome, counted in the table printed at the
end (``pytest -s``):

* named error: a UserError whose one line names the damaged file (for a COCO json also
  the record: ``images[k]`` / ``annotations[k]`` / an id);
* logged skip: a warning naming the file that says it is skipped; the rest is used;
* correct result: what the loaders give equals the undamaged data, or (semantic damage)
  is a valid reading of it: finite boxes inside the image, known labels;
* damaged pixels / changed values: a JPEG whose flipped bytes still decode, or an
  annotation whose flipped bytes still parse, read with different pixels or numbers (still
  finite and valid): undetectable without a checksum, so counted apart, not as correct.

Anything else fails the case: another exception (a traceback on the console), NaN / inf
or a box outside the canvas in a training sample, an error not naming the file, a hang
(``CASE_TIMEOUT``). Seed 0 of every (format, target, kind) runs always (48 cases); the
other seeds (324 cases in all) with ``--corruption-suite``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import signal

import cv2
import numpy as np
import pytest

from nanodet_jax.cli import predict
from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.data.check import ERROR, check_dataset
from nanodet_jax.data.coco import ImageReadError, read_image, require_image_files
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.data.pipeline import TrainLoader
from nanodet_jax.errors import UserError
from nanodet_jax.evaluation import coco_eval
from nanodet_jax.evaluation.predictor import Detections
from tests.datasets import corruption_cases as cc

NAMED, SKIP, CORRECT = "named error", "logged skip", "correct result"
PIXELS = "decoded with damaged pixels (undetectable without a checksum)"
CHANGED = "parsed as changed values (undetectable without a checksum)"
PATHS = ("check", "train", "eval", "predict")
CASE_TIMEOUT = 30  # s per path; a hang fails the case instead of the CI job
PIPELINE = nanodet_plus_config().data.train.pipeline.to_dict()
OUTCOMES: collections.Counter = collections.Counter()  # (fmt, target, kind, path, outcome)

CASES = cc.all_cases(image_seeds=8, ann_seeds=6)
PARAMS = [
    pytest.param(c, id=c.id, marks=() if c.seed == 0 else pytest.mark.corruption_suite)
    for c in CASES
]


class CaseHang(Exception):
    pass


@contextlib.contextmanager
def time_limit(what: str):
    def expire(signum, frame):
        raise CaseHang(f"{what} ran past {CASE_TIMEOUT} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(CASE_TIMEOUT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def warnings_logged():
    handler, log = Warnings(), logging.getLogger("nanodet_jax")
    log.addHandler(handler)
    try:
        yield handler.messages
    finally:
        log.removeHandler(handler)


class StandIn:
    """A predictor without a model: no detections, for the file-loading paths."""

    class_names = cc.CLASSES

    def __call__(self, images):
        empty = np.zeros((0, 4), np.float32)
        return [Detections(empty, np.zeros(0, np.float32), np.zeros(0, np.int32))] * len(images)

    def prepare(self, img: np.ndarray) -> np.ndarray:
        return img


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    yield cc.write_base(str(tmp_path_factory.mktemp("corruption_base")))
    if OUTCOMES:
        print("\n" + outcome_table(OUTCOMES))


BASE_RECORDS: dict[tuple[str, str], list] = {}


def record_rows(records) -> list:
    return [(r.image_id, r.path, r.width, r.height, r.boxes.tolist(), r.labels.tolist(),
             r.ignore_boxes.tolist()) for r in records]  # fmt: skip


def base_records(case: cc.Case, base: dict, tmp_path) -> list:
    ext = "png" if case.target == "png" else "jpg"
    key = (case.fmt, ext)
    if key not in BASE_RECORDS:  # the same dataset undamaged, at the same paths
        prep = cc.prepare(cc.Case(case.fmt, ext, "none", 0), base, str(tmp_path / "undamaged"))
        rows = record_rows(build_dataset(prep.split_cfg, cc.CLASSES).records)
        BASE_RECORDS[key] = [(i, os.path.relpath(p, prep.img_dir), *rest)
                             for i, p, *rest in rows]  # fmt: skip
    return BASE_RECORDS[key]


def names_file(message: str, prep: cc.Prepared, case: cc.Case) -> bool:
    if prep.damaged not in message:
        return False
    if case.fmt == "coco" and case.target == "ann" and case.kind in cc.SEMANTIC_KINDS:
        return any(k in message for k in ("images[", "annotations[", "image id", "annotation id"))
    return True


def check_records(records, case: cc.Case) -> None:
    """What any loader passes on: finite boxes of positive size, known labels."""
    for r in records:
        assert r.width > 0 and r.height > 0, f"{case.id}: {r.path} size {r.width}x{r.height}"
        for boxes in (r.boxes, r.ignore_boxes):
            assert np.isfinite(boxes).all(), f"{case.id}: {r.path} non-finite box {boxes}"
            assert (boxes[:, 2:] > boxes[:, :2]).all(), f"{case.id}: {r.path} empty box {boxes}"
        assert ((r.labels >= 0) & (r.labels < len(cc.CLASSES))).all(), f"{case.id}: {r.labels}"


def unchanged(case: cc.Case, prep: cc.Prepared, records, base: dict, tmp_path) -> str:
    """CORRECT / PIXELS / CHANGED for a path that neither failed nor skipped the file."""
    if case.target != "ann":
        try:
            img = read_image(prep.damaged)
        except ImageReadError as e:
            raise AssertionError(f"{case.id}: unreadable {prep.damaged} used silently: {e}") from e
        orig = cv2.imdecode(np.frombuffer(prep.original, np.uint8), cv2.IMREAD_COLOR)
        return CORRECT if img.shape == orig.shape and np.array_equal(img, orig) else PIXELS
    if case.kind in cc.SEMANTIC_KINDS:
        return CORRECT  # a valid reading of what the damage wrote (check_records held)
    rows = [(i, os.path.relpath(p, prep.img_dir), *rest) for i, p, *rest in record_rows(records)]
    return CORRECT if rows == base_records(case, base, tmp_path) else CHANGED


def skipped(messages: list[str], prep: cc.Prepared) -> bool:
    return any(prep.damaged in m and "skip" in m for m in messages)


def path_check(case, prep, base, tmp_path) -> str:
    report = check_dataset(prep.split_cfg, cc.CLASSES, "train", decode=True, num_threads=1)
    errors = [m for sev, ms in report.problems.values() if sev == ERROR for m in ms]
    if errors:
        assert any(names_file(m, prep, case) for m in errors), f"{case.id}: {report.format()}"
        return NAMED
    dataset = build_dataset(prep.split_cfg, cc.CLASSES)
    check_records(dataset.records, case)
    return unchanged(case, prep, dataset.records, base, tmp_path)


def path_train(case, prep, base, tmp_path) -> str:
    with warnings_logged() as messages:
        try:
            dataset = build_dataset(prep.split_cfg, cc.CLASSES, role="train")
        except UserError as e:
            assert names_file(e.brief(), prep, case), f"{case.id}: {e.brief()}"
            return NAMED
        check_records(dataset.records, case)
        loader = TrainLoader(dataset.records, input_size=(64, 64), pipeline=PIPELINE,
                             global_batch_size=1, num_threads=1, prefetch_batches=0)  # fmt: skip
        batches = list(loader.epoch(0))
    assert len(batches) == loader.steps_per_epoch
    for b in batches:
        h, w = b["images"].shape[1:3]
        boxes, labels = b["gt_boxes"][b["gt_mask"]], b["gt_labels"][b["gt_mask"]]
        assert np.isfinite(boxes).all() and np.isfinite(b["color"]).all(), f"{case.id}: {b}"
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
        assert ((labels >= 0) & (labels < len(cc.CLASSES))).all(), f"{case.id}: {labels}"
    if skipped(messages, prep):
        return SKIP
    return unchanged(case, prep, dataset.records, base, tmp_path)


def path_eval(case, prep, base, tmp_path) -> str:
    with warnings_logged() as messages:
        try:
            dataset = build_dataset(prep.split_cfg, cc.CLASSES, role="val")
            require_image_files(dataset.records, dataset.ann_file)
            decoded = list(coco_eval.prepared_images(StandIn(), dataset.records, num_threads=1))
            assert dataset.coco.getImgIds(), case.id  # the ground truth evaluation uses
        except UserError as e:
            assert names_file(e.brief(), prep, case), f"{case.id}: {e.brief()}"
            return NAMED
    assert len(decoded) == len(dataset.records)
    check_records(dataset.records, case)
    if skipped(messages, prep):
        return SKIP
    return unchanged(case, prep, dataset.records, base, tmp_path)


def path_predict(case, prep, base, tmp_path) -> str:
    out = tmp_path / "preds"
    with warnings_logged() as messages:
        records = predict.predict_paths(StandIn(), prep.image_paths, str(out))
    skips = json.loads((out / "skipped.json").read_text())
    assert [r["file"] for r in records] + [s["file"] for s in skips] != [], case.id
    assert sorted([r["file"] for r in records] + [s["file"] for s in skips]) == prep.image_paths
    if skips:
        assert [s["file"] for s in skips] == [prep.damaged], f"{case.id}: {skips}"
        assert skipped(messages, prep), f"{case.id}: {messages}"
        return SKIP
    return unchanged(case, prep, None, base, tmp_path)


RUNNERS = {"check": path_check, "train": path_train, "eval": path_eval, "predict": path_predict}


@pytest.mark.parametrize("case", PARAMS)
def test_damage_ends_in_a_named_outcome(case: cc.Case, base, tmp_path):
    prep = cc.prepare(case, base, str(tmp_path / "data"))
    for path in PATHS:
        if path == "predict" and case.target == "ann":
            continue  # predict reads image files only
        with time_limit(f"{case.id} {path}"):
            outcome = RUNNERS[path](case, prep, base, tmp_path / path)
        OUTCOMES[(case.fmt, case.target, case.kind, path, outcome)] += 1


SHORT = {NAMED: "E", SKIP: "S", CORRECT: "C", PIXELS: "P", CHANGED: "V"}


def outcome_table(counts: collections.Counter) -> str:
    """One row per (format, target, kind), one column per path: ``E`` named error, ``S``
    logged skip, ``C`` correct, ``P`` damaged pixels, ``V`` changed values."""
    rows = sorted({k[:3] for k in counts})
    lines = ["| format | target | damage | " + " | ".join(PATHS) + " |",
             "|---|---|---|" + "---|" * len(PATHS)]  # fmt: skip
    for row in rows:
        cells = []
        for path in PATHS:
            got = [f"{SHORT[o]}{counts[(*row, path, o)]}" for o in SHORT
                   if counts[(*row, path, o)]]  # fmt: skip
            cells.append(" ".join(got) or "-")
        lines.append(f"| {' | '.join(row)} | " + " | ".join(cells) + " |")
    totals = collections.Counter()
    for (*_, outcome), n in counts.items():
        totals[outcome] += n
    lines.append("totals (case x path): " + ", ".join(f"{o}: {n}" for o, n in totals.items()))
    lines.append("key: " + ", ".join(f"{s} = {o}" for o, s in SHORT.items()))
    return "\n".join(lines)
