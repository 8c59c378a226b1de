"""Deterministic, multi-host training input pipeline (grain threads).

Every batch is a pure function of (seed, epoch, step): epoch ``e`` visits the dataset in a
permutation seeded by (seed, e); step ``s`` takes rows ``[s*B, (s+1)*B)`` of it (the last
partial batch is dropped, as NanoDet's ``drop_last=True``); each sample's augmentation is
drawn from a generator seeded by (seed, e, dataset index). So a run resumed at
(epoch, step) sees exactly the batches of an uninterrupted run, and any batch can be
recomputed (:meth:`TrainLoader.batch`). With ``process_count`` P each process loads only
rows ``[p*B/P, (p+1)*B/P)`` of every global batch.

Batches are numpy on the host: ``images`` uint8 BGR [b, H, W, 3] (H, W = the input size
rounded up to 32, NanoDet's batch padding), ``color`` float32 [b, 4] (see
:mod:`nanodet_jax.data.augment`; colour and normalisation run on the device), ``gt_boxes``
float32 [b, M, 4], ``gt_labels`` int32 [b, M] (-1 = padding), ``gt_mask`` bool [b, M],
``valid_hw`` int32 [b, 2] (the warped image's extent), ``image_id`` int64 [b]. M is the
smallest of ``max_boxes_buckets`` holding the largest box count of the *global* batch, so
all processes agree on it.

With ``data.train.resize`` (torchvision's min / max size rule, :mod:`nanodet_jax.data.
canvas_resize`) each image is resized by that rule (float32 ``images``), the pipeline's
warp augmentation runs in the resized frame (a pure horizontal flip exactly, as
torchvision's), and the image goes top-left on its canvas, the smallest of a few that
holds it. Batches hold one canvas each, grouped as torchvision's aspect-ratio grouping
does: walking the epoch's permutation, every canvas fills its own batch, and a batch is
emitted when it is full; partial batches at the epoch's end are dropped, as the last
partial batch of the ungrouped loader.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from nanodet_jax.data import augment, canvas_resize, transforms
from nanodet_jax.data.coco import ImageReadError, ImageRecord, load_image
from nanodet_jax.errors import ConfigError, UserError

log = logging.getLogger("nanodet_jax")

# Stream tags keep the permutation, sample and substitution generators independent.
_PERMUTATION, _SAMPLE, _SUBSTITUTE = 0x7065726D, 0x73616D70, 0x73756273
MAX_SUBSTITUTIONS = 16  # consecutive unreadable images tolerated for one sample


def box_bucket(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``count`` boxes (the largest one if none does)."""
    for b in sorted(buckets):
        if count <= b:
            return int(b)
    return int(max(buckets))


class TrainLoader:
    """Augmented training batches for one process of a (possibly multi-host) run."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        input_size: Sequence[int],
        pipeline: Mapping[str, Any],
        global_batch_size: int,
        keep_ratio: bool = False,
        max_boxes_buckets: Sequence[int] = (32, 64, 128),
        seed: int = 0,
        num_threads: int = 2,
        prefetch_batches: int = 2,
        process_index: int = 0,
        process_count: int = 1,
        resize: canvas_resize.CanvasResize | None = None,
    ):
        if global_batch_size % process_count:
            raise ValueError(
                f"global batch {global_batch_size} does not split over {process_count} processes"
            )
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if len(records) < global_batch_size:
            raise ConfigError(  # e.g. damaged files skipped: a user's fix, not a traceback
                f"{len(records)} images cannot fill one batch of {global_batch_size} "
                "(the last partial batch is dropped); lower device.global_batch_size "
                "(or batch_size_per_device) or add images"
            )
        if not max_boxes_buckets or min(max_boxes_buckets) < 1:
            raise ValueError(f"max_boxes_buckets must be positive sizes: {max_boxes_buckets}")
        self.records = list(records)
        self.input_wh = (int(input_size[0]), int(input_size[1]))
        self.pipeline = dict(pipeline)
        self.divisible = int(self.pipeline.get("divisible", 0) or 0)
        self.keep_ratio = bool(keep_ratio)
        self.buckets = tuple(sorted(int(b) for b in max_boxes_buckets))
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.num_threads = int(num_threads)
        self.prefetch_batches = int(prefetch_batches)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.canvas_hw = transforms.canvas_hw(self.input_wh)
        self._box_counts = np.array([len(r.boxes) for r in self.records])
        self.resize = resize
        self._plans: dict[int, np.ndarray] = {}
        if resize is not None:
            self._group_rows(resize)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    def _group_rows(self, resize: canvas_resize.CanvasResize) -> None:
        """Each record's canvas (from the annotated image size: no image is read)."""
        ids = []
        for r in self.records:
            if r.width <= 0 or r.height <= 0:
                raise ValueError(
                    f"{r.path}: the annotations give no image size, which "
                    f"{resize.field} needs to group images by canvas"
                )
            ids.append(resize.canvases.index(resize.canvas_for(r.width, r.height)))
        self._canvas_id = np.array(ids)
        self._members = {c: np.flatnonzero(self._canvas_id == c) for c in set(ids)}
        if self.steps_per_epoch == 0:
            counts = {resize.canvases[c]: len(m) for c, m in self._members.items()}
            raise ValueError(
                f"no canvas of {resize.field}.canvases gets a full batch of "
                f"{self.global_batch_size} images (images per canvas: {counts}); lower the "
                "batch size or use fewer canvases"
            )

    @property
    def steps_per_epoch(self) -> int:
        if self.resize is None:
            return len(self.records) // self.global_batch_size
        b = self.global_batch_size
        return int(sum(len(m) // b for m in self._members.values()))

    def permutation(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s visiting order of dataset indices."""
        rng = np.random.default_rng([self.seed, epoch, _PERMUTATION])
        return rng.permutation(len(self.records))

    def batch_plan(self, epoch: int) -> np.ndarray:
        """Epoch ``epoch``'s global batches ``[steps, global batch]`` of dataset indices."""
        with self._lock:
            if epoch in self._plans:
                return self._plans[epoch]
        order, b = self.permutation(epoch), self.global_batch_size
        if self.resize is None:
            plan = order[: self.steps_per_epoch * b].reshape(-1, b)
        else:
            filling: dict[int, list[int]] = {}
            batches = []
            for i in order.tolist():
                group = filling.setdefault(int(self._canvas_id[i]), [])
                group.append(i)
                if len(group) == b:
                    batches.append(group)
                    filling[int(self._canvas_id[i])] = []
            plan = np.array(batches, np.int64).reshape(-1, b)
        with self._lock:  # the epoch being read and the next one prefetched
            self._plans = {k: v for k, v in self._plans.items() if k >= epoch - 1}
            self._plans[epoch] = plan
        return plan

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} not in [0, {self.steps_per_epoch})")
        return self.batch_plan(epoch)[step]

    def local_indices(self, epoch: int, step: int) -> np.ndarray:
        """This process's rows of the global batch (dataset indices)."""
        rows = self.global_indices(epoch, step)
        b = self.local_batch_size
        return rows[self.process_index * b : (self.process_index + 1) * b]

    def num_boxes(self, epoch: int, step: int) -> int:
        """M of a step: from the annotations of the whole global batch (no image read)."""
        count = int(self._box_counts[self.global_indices(epoch, step)].max())
        return box_bucket(count, self.buckets)

    # ------------------------------------------------------------------ samples

    def _warn_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message)

    def _read(self, epoch: int, index: int) -> tuple[ImageRecord, np.ndarray]:
        """The image of ``index``, or (deterministically) a readable stand-in for it."""
        candidate = index
        for attempt in range(MAX_SUBSTITUTIONS + 1):
            record = self.records[candidate]
            try:
                return record, load_image(record)
            except ImageReadError as e:
                self._warn_once(f"read:{record.path}", f"skipping unreadable training image {e}")
            rng = np.random.default_rng([self.seed, epoch, index, attempt, _SUBSTITUTE])
            if self.resize is None:
                candidate = int(rng.integers(len(self.records)))
            else:  # a stand-in of the same canvas, so that the batch keeps one
                pool = self._members[int(self._canvas_id[index])]
                candidate = int(pool[rng.integers(len(pool))])
        raise UserError(  # most of the dataset is damaged: one line, not a traceback
            f"{MAX_SUBSTITUTIONS + 1} unreadable images in a row while loading training "
            f"sample {index} (last: {self.records[candidate].path}); check the dataset with "
            "nanodet-check-dataset"
        )

    def load_sample(self, epoch: int, index: int, num_boxes: int) -> dict[str, np.ndarray]:
        """One augmented sample with its boxes padded to ``num_boxes`` slots."""
        record, img = self._read(epoch, index)
        # Drawn after the read, from a generator that depends only on (seed, epoch, index).
        rng = np.random.default_rng([self.seed, epoch, index, _SAMPLE])
        params = augment.sample_warp_params(rng, self.pipeline)
        color = augment.sample_color_params(rng, self.pipeline)
        if self.resize is None:
            warped, boxes, _ = augment.shape_transform(
                img, record.boxes, params, self.input_wh, self.keep_ratio, self.divisible
            )
            canvas, valid_hw = transforms.place_on_canvas(warped, self.canvas_hw)
        else:
            cw, ch = self.resize.canvases[int(self._canvas_id[index])]
            warped, boxes = self._resize_and_warp(record, img, params, (cw, ch))
            canvas, valid_hw = transforms.place_on_canvas(warped, (ch, cw))
        n = len(boxes)
        if n > num_boxes:
            self._warn_once(
                f"boxes:{record.path}",
                f"{record.path}: {n} boxes, only the first {num_boxes} are used "
                f"(max_boxes_buckets={list(self.buckets)})",
            )
            n = num_boxes
        gt_boxes = np.zeros((num_boxes, 4), np.float32)
        gt_labels = np.full((num_boxes,), -1, np.int32)
        gt_boxes[:n] = boxes[:n]
        gt_labels[:n] = record.labels[:n]
        return {
            "images": canvas,
            "color": color,
            "gt_boxes": gt_boxes,
            "gt_labels": gt_labels,
            "gt_mask": np.arange(num_boxes) < n,
            "valid_hw": np.array(valid_hw, np.int32),
            "image_id": np.int64(record.image_id),
        }

    def _resize_and_warp(
        self, record: ImageRecord, img: np.ndarray, params: augment.WarpParams,
        canvas_wh: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """torchvision's resize, then the warp augmentation in the resized frame."""
        h, w = img.shape[:2]
        ow, oh = self.resize.output_wh(w, h)
        if ow > canvas_wh[0] or oh > canvas_wh[1]:  # the file's size is not the annotated one
            self._warn_once(
                f"size:{record.path}",
                f"{record.path}: image is {w}x{h}, annotations say "
                f"{record.width}x{record.height}; its resize is cropped to the canvas",
            )
            ow, oh = min(ow, canvas_wh[0]), min(oh, canvas_wh[1])
        resized = self.resize.resize(img)[:oh, :ow]
        boxes = transforms.warp_boxes(record.boxes, self.resize.matrix(w, h), ow, oh)
        matrix = augment.warp_matrix(params, (ow, oh), (ow, oh), keep_ratio=True)
        if np.array_equal(matrix, np.eye(3)):
            return resized, boxes
        if np.array_equal(matrix, [[-1, 0, ow], [0, 1, 0], [0, 0, 1]]):
            # A pure flip, exactly (torchvision's hflip); cv2's warp would sample pixel
            # x at w - x, one pixel off, with a zero column.
            return resized[:, ::-1], np.stack(
                [ow - boxes[:, 2], boxes[:, 1], ow - boxes[:, 0], boxes[:, 3]], 1
            ).astype(np.float32)
        warped = transforms.warp_image(resized, matrix, (ow, oh))
        return warped, transforms.warp_boxes(boxes, matrix, ow, oh)

    @staticmethod
    def collate(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {k: np.stack([s[k] for s in samples]) for k in samples[0]}

    # ------------------------------------------------------------------ batches

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This process's batch at (epoch, step), computed synchronously."""
        m = self.num_boxes(epoch, step)
        idx = self.local_indices(epoch, step)
        return self.collate([self.load_sample(epoch, int(i), m) for i in idx])

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Batches ``start_step..steps_per_epoch-1`` of ``epoch``, decoded and warped in
        ``num_threads`` background threads (deterministic order)."""
        items = []
        for step in range(start_step, self.steps_per_epoch):
            m = self.num_boxes(epoch, step)
            items += [(epoch, int(i), m) for i in self.local_indices(epoch, step)]
        if not items:
            return iter(())
        ds = grain.MapDataset.source(items).map(lambda item: self.load_sample(*item))
        buffer = max(self.num_threads, self.prefetch_batches * self.local_batch_size)
        opts = grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=buffer)
        it = ds.to_iter_dataset(read_options=opts).batch(
            self.local_batch_size, drop_remainder=True, batch_fn=self.collate
        )
        if self.prefetch_batches > 0:
            # Stacking happens off the training thread too.
            it = grain.experimental.ThreadPrefetchIterDataset(
                it, prefetch_buffer_size=self.prefetch_batches
            )
        return iter(it)

    def __call__(
        self, start_epoch: int = 0, start_step: int = 0, num_epochs: int | None = None
    ) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(epoch, step, batch) from (start_epoch, start_step) on, epoch after epoch."""
        epoch = start_epoch
        while num_epochs is None or epoch < start_epoch + num_epochs:
            for step, batch in enumerate(self.epoch(epoch, start_step), start=start_step):
                yield epoch, step, batch
            epoch, start_step = epoch + 1, 0


def train_loader_from_config(
    records: Sequence[ImageRecord],
    config: Any,
    global_batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainLoader:
    """A :class:`TrainLoader` with ``config.data.train``, ``config.seed`` and
    ``config.device.workers`` (grain threads)."""
    train = config.data.train
    return TrainLoader(
        records,
        input_size=train.input_size,
        pipeline=train.pipeline.to_dict() if hasattr(train.pipeline, "to_dict") else train.pipeline,
        global_batch_size=global_batch_size,
        keep_ratio=bool(train.keep_ratio),
        max_boxes_buckets=train.get("max_boxes_buckets", (32, 64, 128)),
        seed=int(config.get("seed", 0)),
        num_threads=int(config.device.workers),
        process_index=process_index,
        process_count=process_count,
        resize=canvas_resize.from_config(train, "data.train"),
    )
