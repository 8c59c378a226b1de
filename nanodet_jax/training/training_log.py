"""What a training run shows and keeps: a progress bar, metrics.jsonl, TensorBoard scalars,
loss / lr / mAP curves (curves.png), and the NaN guard. Only process 0 writes; every file
goes through :mod:`nanodet_jax.paths`, so the workdir may be a ``gs://`` URL."""

from __future__ import annotations

import json
import logging
import math

import jax

from nanodet_jax import paths

log = logging.getLogger("nanodet_jax")
SHORT = {"loss_qfl": "qfl", "loss_bbox": "bbox", "loss_dfl": "dfl"}


def read_records(path: str, warn: bool = True) -> tuple[list[dict], bool]:
    """The records of a metrics.jsonl, and whether lines were dropped: a last line cut short
    by a killed run (every complete line ends with a newline) or an unreadable one."""
    lines = paths.read_text(path).split("\n")
    damaged = bool(lines[-1].strip())
    if damaged and warn:
        log.warning(f"{path}: dropping an incomplete last record (a killed run)")
    records = []
    for number, line in enumerate(lines[:-1], 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                damaged = True
                if warn:
                    log.warning(f"{path}:{number}: dropping an unreadable record")
    return records, damaged


def evaluated_steps(workdir: str) -> set[int]:
    """Steps whose evaluation ``workdir``'s metrics.jsonl records (read by every process,
    not only the one that writes it: the decision to evaluate on resume must be the same
    on all of them)."""
    path = paths.join(workdir, "metrics.jsonl")
    if not paths.exists(path):
        return set()
    return {int(r["step"]) for r in read_records(path, warn=False)[0] if r.get("kind") == "eval"}


def _tensorboard_writer(logdir: str):
    """tensorboardX's writer, or None with a warning. tensorboardX writes ``gs://`` itself
    through google-cloud-storage and ``s3://`` through boto3 (not through TensorFlow or
    epath); another scheme, or a missing package, means no TensorBoard logs (metrics.jsonl
    and curves.png still hold everything)."""
    from tensorboardX import SummaryWriter, record_writer

    if paths.is_remote(logdir):
        scheme = logdir.split("://", 1)[0]
        # Checked first: tensorboardX raises only once its writer is half built.
        needs = {"gs": ("GCS_ENABLED", "google-cloud-storage"), "s3": ("S3_ENABLED", "boto3")}
        if scheme not in needs:
            log.warning(f"{logdir}: tensorboardX cannot write {scheme}:// URLs: no TensorBoard")
            return None
        flag, package = needs[scheme]
        if not getattr(record_writer, flag, False):
            log.warning(f"{logdir}: no TensorBoard logs (tensorboardX needs {package} for "
                        f"{scheme}://: pip install {package})")  # fmt: skip
            return None
    return SummaryWriter(logdir)


class TrainingLog:
    def __init__(self, workdir: str, enabled: bool = True, progress_bar: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self.progress_bar = progress_bar
        self.records: list[dict] = []
        self._damaged = False  # metrics.jsonl has lines that were dropped on reading
        self._bar = None
        self._tb = None
        if not enabled:
            return
        paths.makedirs(workdir)
        self.path = paths.join(workdir, "metrics.jsonl")
        if paths.exists(self.path):  # a resumed run keeps its history
            self.records, self._damaged = read_records(self.path)
        self._tb = _tensorboard_writer(paths.join(workdir, "tensorboard"))

    def resume_at(self, step: int) -> None:
        """Keep only the history up to ``step``, the checkpoint training resumes from: what a
        killed run logged after its last checkpoint is redone, so it is logged once, anew."""
        if not self.enabled:
            return
        kept = [r for r in self.records if r.get("step", 0) <= step]
        if len(kept) == len(self.records) and not self._damaged:
            return
        if len(kept) < len(self.records):
            since = f"the checkpoint of step {step}" if step else "the start (no checkpoint)"
            log.info(f"{self.path}: dropping {len(self.records) - len(kept)} records of steps "
                     f"after {since}: they are redone")  # fmt: skip
        self.records = kept
        # Atomic: a kill now leaves the old file or the new one.
        paths.write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def progress(self, total: int, initial: int):
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, initial=initial, unit="step", dynamic_ncols=True,
            disable=not (self.enabled and self.progress_bar), desc="train",
        )  # fmt: skip
        return self._bar

    @staticmethod
    def check_finite(step: int, epoch: int, metrics: dict) -> dict[str, float]:
        """Host values of a step's metrics; a NaN/Inf loss or gradient norm stops training
        with the terms named. (The gradient too: once the weights overflow, losses can read
        0, not NaN: no box is assigned to a NaN prediction, and the masked terms vanish.)"""
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [
            k
            for k, v in values.items()
            if k.startswith(("loss", "aux_loss", "grad_norm")) and not math.isfinite(v)
        ]
        if bad:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
            raise FloatingPointError(
                f"non-finite loss or gradient at step {step} (epoch {epoch + 1}): "
                f"{', '.join(bad)} "
                f"[{terms}]; lower the lr, check the data (degenerate boxes?) or resume from "
                "the last checkpoint"
            )
        return values

    def _write(self, record: dict) -> None:
        self.records.append(record)
        paths.append_text(self.path, json.dumps(record) + "\n")

    def log_train(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "train", "step": step, "epoch": epoch + 1, **values})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        main = " ".join(f"{SHORT[k]} {values[k]:.3f}" for k in SHORT if k in values)
        aux = sum(v for k, v in values.items() if k.startswith("aux_loss"))
        text = (
            f"ep {epoch + 1} loss {values['loss']:.3f} ({main}, aux {aux:.3f}) "
            f"lr {values.get('lr', float('nan')):.2e} {values['img_per_s']:.1f} img/s"
        )
        if "data_wait" in values:  # share of the wall time spent waiting for input
            text += f" (data wait {100 * values['data_wait']:.0f}%)"
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix_str(text, refresh=False)
            self._bar.write(f"step {step}: {text}")  # a line above the bar, kept in logs
        else:
            log.info(f"step {step}: {text}")

    def log_eval(self, step: int, epoch: int, stats: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "epoch": epoch, **stats})
        if self._tb is not None:
            for k, v in stats.items():
                self._tb.add_scalar(f"val/{k}", v, step)
        self.plot()

    def plot(self) -> None:
        from nanodet_jax.evaluation.visualize import plot_training_curves

        if self.enabled and self.records:
            plot_training_curves(self.records, paths.join(self.workdir, "curves.png"))

    def finish(self) -> None:
        if not self.enabled:
            return
        self.plot()
        if self._tb is not None:
            self._tb.close()
