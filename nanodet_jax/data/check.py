"""Check a detection dataset before training on it (``nanodet-check-dataset``,
``nanodet_jax/cli/check_dataset.py``).

Reads the dataset in whatever format ``config.data.<split>.name`` names and reports:
image count, boxes per class, images without boxes, broken images (missing, truncated
JPEG / PNG, undecodable), boxes outside the image or degenerate, annotations of unknown
classes, duplicate image ids and file names, image sizes that differ from the annotation.
Exits 1 when the dataset would not train correctly (errors), 0 when there are at most
warnings.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nanodet_jax.data.coco import ImageReadError, ImageRecord, load_image
from nanodet_jax.data.datasets import build_dataset
from nanodet_jax.data.image_integrity import truncation_problem
from nanodet_jax.data.image_size import image_size
from nanodet_jax.data.raw import RawImage, kept_annotation

log = logging.getLogger("nanodet_jax")
ERROR, WARNING = "error", "warning"
SHOW = 10  # examples listed per kind of problem
OUTSIDE_TOLERANCE = 1.0  # px: COCO boxes often end a rounding error past the border
BROKEN = "broken images (missing, truncated or undecodable)"


@dataclasses.dataclass
class Report:
    split: str
    images: int = 0
    class_rows: list[tuple[str, int, int, int]] = dataclasses.field(default_factory=list)
    # kind -> (severity, messages); each message names the file or image id
    problems: dict[str, tuple[str, list[str]]] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, severity: str, message: str) -> None:
        self.problems.setdefault(kind, (severity, []))[1].append(message)

    @property
    def errors(self) -> int:
        return sum(len(m) for s, m in self.problems.values() if s == ERROR)

    def format(self) -> str:
        lines = [f"== {self.split}: {self.images} images"]
        if self.class_rows:
            lines += ["| class | boxes | images | ignore boxes |", "|---|---|---|---|"]
            lines += [f"| {n} | {b} | {i} | {g} |" for n, b, i, g in self.class_rows]
        for kind, (severity, messages) in self.problems.items():
            lines.append(f"{severity.upper()}: {kind}: {len(messages)}")
            lines += [f"  {m}" for m in messages[:SHOW]]
            if len(messages) > SHOW:
                lines.append(f"  ... and {len(messages) - SHOW} more")
        if not self.problems:
            lines.append("no problems found")
        return "\n".join(lines)


def _check_boxes(report: Report, img: RawImage) -> None:
    where = f"{img.origin} ({img.file_name}, image id {img.image_id})"
    for ann in img.annotations:
        x1, y1, x2, y2 = ann.box
        box = f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}]"
        if ann.label < 0:
            report.add("unknown classes", ERROR, f"{where}: class {ann.class_name!r} box {box}")
        w, h = x2 - x1, y2 - y1
        if w <= 0 or h <= 0:
            report.add("degenerate boxes (zero/negative area)", ERROR, f"{where}: box {box}")
            continue
        if w < 1 or h < 1:
            report.add("boxes under 1 px (dropped)", WARNING, f"{where}: box {box}")
        if img.width <= 0 or img.height <= 0:
            continue
        if x2 <= 0 or y2 <= 0 or x1 >= img.width or y1 >= img.height:
            msg = f"{where}: box {box} does not overlap the {img.width}x{img.height} image"
            report.add("boxes outside the image", ERROR, msg)
        elif (
            min(x1, y1) < -OUTSIDE_TOLERANCE
            or x2 > img.width + OUTSIDE_TOLERANCE
            or y2 > img.height + OUTSIDE_TOLERANCE
        ):
            msg = f"{where}: box {box} extends past the {img.width}x{img.height} image"
            report.add("boxes partly outside the image (clipped)", WARNING, msg)


def _check_image(record: ImageRecord, decode: bool) -> tuple[str, str] | None:
    """(kind, message) of a broken image or wrong size; None when fine."""
    try:
        if decode:
            h, w = load_image(record).shape[:2]
        elif record.source is None:
            w, h = image_size(record.path)
            problem = truncation_problem(record.path)  # a few kB read: --no-decode too
            if problem is not None:
                raise ImageReadError(f"{record.path}: {problem}")
        else:
            return None  # container items are only checked by decoding them
    except ImageReadError as e:
        return BROKEN, str(e)
    if (w, h) != (record.width, record.height):
        msg = (
            f"{record.path} (image id {record.image_id}): image is {w}x{h}, "
            f"annotation says {record.width}x{record.height}"
        )
        return "image size differs from the annotation", msg
    return None


def check_dataset(
    split_cfg: Mapping[str, Any],
    class_names: Sequence[str] | None,
    role: str = "train",
    decode: bool = True,
    num_threads: int = 2,
) -> Report:
    """Load one split's dataset and collect its problems."""
    report = Report(role)
    try:
        dataset = build_dataset(split_cfg, class_names, role=role)
    except Exception as e:  # any loader failure is the first thing to report
        report.add("dataset cannot be loaded", ERROR, f"{type(e).__name__}: {e}")
        return report
    raw = dataset.raw_images()
    report.images = len(raw)
    names = list(split_cfg.get("class_names") or class_names or dataset.class_names)
    if len(dataset.class_names) != len(names):
        report.add(
            "class count", ERROR,
            f"{dataset.ann_file}: {len(dataset.class_names)} classes, the config has {len(names)}",
        )  # fmt: skip
    for message in getattr(dataset, "skipped", []):  # YOLO txt files without an image
        report.add(BROKEN, ERROR, message)

    for img in raw:
        _check_boxes(report, img)
    by_id = defaultdict(list)
    for img in raw:
        by_id[img.image_id].append(img.file_name)
    for image_id, files in sorted(by_id.items(), key=lambda kv: str(kv[0])):
        if len(files) > 1:
            msg = f"{dataset.ann_file}: image id {image_id} is used {len(files)} times: {files}"
            report.add("duplicate image ids", ERROR, msg)
    paths = defaultdict(list)
    for img in raw:
        paths[img.path].append(img.image_id)
    for path, img_ids in sorted(paths.items()):
        if len(img_ids) > 1 and len(set(img_ids)) > 1:
            report.add("duplicate file names", WARNING, f"{path}: image ids {img_ids}")

    boxes, images, ignores = Counter(), Counter(), Counter()
    for img in raw:  # what training uses: the objects NanoDet's filters keep
        kept = [a for a in img.annotations if kept_annotation(a) is not None]
        boxes.update(a.label for a in kept if not a.ignore)
        ignores.update(a.label for a in kept if a.ignore)
        images.update({a.label for a in kept if not a.ignore})
    for record in dataset.records:
        if not len(record.labels):
            msg = f"{record.path} (image id {record.image_id})"
            report.add("images without boxes", WARNING, msg)
    report.class_rows = [
        (n, boxes[i], images[i], ignores[i]) for i, n in enumerate(dataset.class_names)
    ]
    report.class_rows.append(
        ("(all)", sum(boxes.values()), len({r.image_id for r in dataset.records if len(r.labels)}),
         sum(ignores.values()))
    )  # fmt: skip

    with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:  # cv2 drops the GIL
        for found in pool.map(lambda r: _check_image(r, decode), dataset.records):
            if found is not None:
                report.add(found[0], ERROR, found[1])
    return report


if __name__ == "__main__":  # ``python -m nanodet_jax.data.check``: the command, not a no-op
    import sys

    from nanodet_jax.cli.check_dataset import main

    sys.exit(main())
