"""Detection on a video file or a camera, frame by frame, as NanoDet's ``demo.py video`` /
``webcam``: a drawn video (same size and fps) and per-frame detections as JSON.

Frames from ``cv2.VideoCapture`` are BGR uint8, what ``read_image`` returns for an image,
so each goes through :class:`~nanodet_jax.evaluation.predictor.Predictor` exactly as an
image does (one frame per call: the same program and the same detections as predicting
the frame as an image; a camera also wants each frame as soon as it is read).

``nanodet-predict`` (``nanodet_jax.cli.predict``) is the command line; from Python::

    result = predict_video(predictor, "street.mp4", "out")  # out/street.mp4, out/street.json
    # any object with read() -> (ok, frame), e.g. a camera: run_stream(predictor, capture, ...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from typing import Any, Protocol

import cv2

from nanodet_jax import paths
from nanodet_jax.errors import UserError
from nanodet_jax.evaluation.predictor import Predictor
from nanodet_jax.evaluation.visualize import draw_detections

log = logging.getLogger("nanodet_jax")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".avi", ".mov", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".ts", ".3gp")  # fmt: skip
# Codecs that opencv-python(-headless)'s bundled FFmpeg writes, per container; a video in
# another container is written as .mp4.
FOURCC_BY_EXT = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".mkv": "mp4v",
                 ".avi": "MJPG", ".webm": "VP80"}  # fmt: skip
DEFAULT_FPS = 30.0  # when the source reports none (many cameras, some streams)
WINDOW = "nanodet-predict"
STOP_KEYS = (ord("q"), ord("Q"), 27)  # q or Esc in the --show window
CTRL_C = "stopped by Ctrl-C"


class VideoError(UserError):
    """A video or camera that cannot be read, or an output that cannot be written."""


class Capture(Protocol):
    """What the frame loop needs of a ``cv2.VideoCapture`` (a stand-in in tests)."""

    def read(self) -> tuple[bool, Any]: ...


@dataclasses.dataclass
class StreamResult:
    frames: list[dict]  # {"frame", "time_s", "detections"} per frame read
    end: str  # why the loop stopped
    seconds: float  # wall time of the loop


def is_video(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS


def open_video(path: str) -> cv2.VideoCapture:
    """A capture of the video file, or :class:`VideoError` naming it."""
    if paths.is_remote(path):
        raise VideoError(f"{path}: OpenCV reads videos from local files only; copy it here")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: video file not found")
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        raise VideoError(
            f"{path}: cannot open as a video (corrupt, cut short, or a codec this OpenCV's "
            "FFmpeg cannot decode; re-encode it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)"
        )
    return capture


def open_camera(index: int) -> cv2.VideoCapture:
    """A capture of camera ``index``, or :class:`VideoError` naming it."""
    capture = cv2.VideoCapture(index)
    if not capture.isOpened():
        devices = sorted(d for d in os.listdir("/dev") if d.startswith("video")) if (
            os.path.isdir("/dev")) else []  # fmt: skip
        seen = f"devices here: {', '.join(devices)}" if devices else "no /dev/video* here"
        raise VideoError(
            f"camera {index}: cannot be opened (no such camera, or in use by another "
            f"program; {seen}); give another --camera INDEX"
        )
    return capture


@dataclasses.dataclass
class Source:
    """An opened video or camera and where its results go."""

    capture: Any
    name: str  # the file, or "camera INDEX"
    video_path: str
    json_path: str


def video_source(path: str, out_dir: str) -> Source:
    """Open ``path``; results go to ``out_dir/<stem><ext>`` and ``out_dir/<stem>.json``."""
    capture = open_video(path)
    stem, ext = os.path.splitext(os.path.basename(path))
    video_path, json_path = output_paths(out_dir, stem, ext)
    if os.path.realpath(video_path) == os.path.realpath(path):
        capture.release()
        raise VideoError(f"{path}: --out-dir would overwrite this input video; give another")
    return Source(capture, path, video_path, json_path)


def camera_source(index: int, out_dir: str) -> Source:
    """Open camera ``index``; results go to ``out_dir/camera<INDEX>.mp4`` and ``.json``."""
    video_path, json_path = output_paths(out_dir, f"camera{index}", ".mp4")
    return Source(open_camera(index), f"camera {index}", video_path, json_path)


def predict_video(predictor: Predictor, path: str, out_dir: str, **kwargs: Any) -> StreamResult:
    """:func:`run_stream` on a video file, writing into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    src = video_source(path, out_dir)
    return run_stream(predictor, src.capture, src.name, src.video_path, src.json_path, **kwargs)


def source_fps(capture: Any) -> float:
    """The source's frame rate, or :data:`DEFAULT_FPS` when it reports none."""
    fps = capture.get(cv2.CAP_PROP_FPS) if hasattr(capture, "get") else 0.0
    if not (math.isfinite(fps) and 0 < fps <= 1000):
        log.info(f"the source reports no frame rate; writing {DEFAULT_FPS:g} fps")
        return DEFAULT_FPS
    return float(fps)


def frame_count(capture: Any) -> int | None:
    """The container's frame count (None for cameras and streams that give none)."""
    count = capture.get(cv2.CAP_PROP_FRAME_COUNT) if hasattr(capture, "get") else 0.0
    return int(count) if math.isfinite(count) and count > 0 else None


def output_paths(out_dir: str, stem: str, ext: str) -> tuple[str, str]:
    """The drawn video (``ext`` if we know a codec for it, else .mp4) and its JSON."""
    if paths.is_remote(out_dir):
        raise VideoError(f"{out_dir}: OpenCV writes videos to local files only; give a local "
                         "--out-dir for videos and cameras")  # fmt: skip
    ext = ext.lower() if ext.lower() in FOURCC_BY_EXT else ".mp4"
    return os.path.join(out_dir, stem + ext), os.path.join(out_dir, stem + ".json")


def default_fourcc(path: str) -> str:
    return FOURCC_BY_EXT.get(os.path.splitext(path)[1].lower(), "mp4v")


def open_writer(path: str, fourcc: str, fps: float, size_wh: tuple[int, int]) -> cv2.VideoWriter:
    """A ``cv2.VideoWriter``, or :class:`VideoError` naming the file and a codec that works."""
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), fps, size_wh)
    if not writer.isOpened():
        raise VideoError(
            f"{path}: OpenCV cannot write codec {fourcc!r} into "
            f"{os.path.splitext(path)[1] or 'this file'} here; use --fourcc mp4v (.mp4, "
            ".mov, .mkv) or MJPG (.avi)"
        )
    return writer


def check_writer(path: str, fourcc: str) -> None:
    """Fail before the model is built when ``fourcc`` cannot be written to ``path``'s
    container: a one-frame trial file beside it, removed again."""
    trial = os.path.join(os.path.dirname(path) or ".", ".codec_check" + os.path.splitext(path)[1])
    try:
        open_writer(trial, fourcc, DEFAULT_FPS, (64, 64)).release()
    except VideoError as err:
        raise VideoError(str(err).replace(trial, path)) from None
    finally:
        if os.path.exists(trial):
            os.remove(trial)


def check_gui() -> None:
    """``--show`` needs a display and an OpenCV with a GUI: say so before starting."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise VideoError(
            "--show needs a display and none is set (no DISPLAY); drop --show: the drawn "
            "video is written to --out-dir anyway"
        )
    try:
        cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
    except cv2.error:
        raise VideoError(
            "--show needs OpenCV with a GUI and this one has none (opencv-python-headless); "
            "drop --show (the drawn video is written to --out-dir anyway) or "
            "pip install opencv-python"
        ) from None


class Progress:
    """Frames done (of the total when known), fps and ETA on stderr: a line rewritten a
    few times a second on a terminal, a log line every few seconds otherwise. The rate
    is timed from the first frame's end, so that compiling the model does not count."""

    def __init__(self, name: str, total: int | None, tty: bool | None = None):
        self.name, self.total = name, total
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.interval = 0.25 if self.tty else 5.0
        self.first = self.last = None

    def fps(self, done: int, now: float) -> float | None:
        if self.first is None or done < 2 or now <= self.first:
            return None
        return (done - 1) / (now - self.first)

    def text(self, done: int, now: float) -> str:
        fps = self.fps(done, now)
        parts = [f"{self.name}: {done}" + (f"/{self.total} frames" if self.total else " frames")]
        parts.append(f"{fps:.1f} fps" if fps else "- fps")
        if self.total and fps:
            eta = max(self.total - done, 0) / fps
            parts.append(f"ETA {int(eta // 60)}:{int(eta % 60):02d}")
        return ", ".join(parts)

    def update(self, done: int) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = self.last = now
            return
        if now - self.last < self.interval:
            return
        self.last = now
        if self.tty:
            sys.stderr.write("\r" + self.text(done, now).ljust(60))
            sys.stderr.flush()
        else:
            log.info(self.text(done, now))

    def close(self) -> None:
        if self.tty and self.first is not None:
            sys.stderr.write("\n")
            sys.stderr.flush()


def run_stream(
    predictor: Predictor,
    capture: Capture,
    name: str,
    video_path: str,
    json_path: str,
    fourcc: str | None = None,
    score_thr: float = 0.35,
    max_frames: int | None = None,
    show: bool = False,
) -> StreamResult:
    """Predict every frame ``capture.read()`` gives until it gives none (or ``max_frames``,
    Ctrl-C, q / Esc in the ``show`` window); write the drawn frames to ``video_path`` and
    ``{source, fps, width, height, frames_total, end, frames}`` to ``json_path``. A frame
    that cannot be read ends the run with the frames before it (a warning says so); no
    readable frame at all is a :class:`VideoError`."""
    fps, total = source_fps(capture), frame_count(capture)
    fourcc = fourcc or default_fourcc(video_path)
    frames: list[dict] = []
    writer, size, end = None, None, "end of stream"
    progress = Progress(name, min(total, max_frames) if total and max_frames else total)
    start = time.monotonic()
    try:
        while max_frames is None or len(frames) < max_frames:
            try:
                ok, frame = capture.read()
            except cv2.error as err:  # a decoder failure surfaces as either
                ok, frame = False, None
                log.warning(f"{name}: frame {len(frames)} cannot be decoded ({err})")
            if not ok or frame is None:
                if total and len(frames) < total:
                    end = f"frame {len(frames)} of {total} unreadable: stopped there"
                    log.warning(f"{name}: {end}; keeping the {len(frames)} frames before it")
                break
            if size is not None and frame.shape[1::-1] != size:  # the writer would drop it
                end = f"frame {len(frames)} is {frame.shape[1]}x{frame.shape[0]}, not "
                end += f"{size[0]}x{size[1]}: stopped there"
                log.warning(f"{name}: {end}")
                break
            [det] = predictor([frame])
            drawn = draw_detections(
                frame, det.boxes, det.scores, det.labels, predictor.class_names, score_thr
            )
            if writer is None:  # the first frame's size: what a camera actually delivers
                size = frame.shape[1::-1]
                writer = open_writer(video_path, fourcc, fps, size)
            writer.write(drawn)
            frames.append({"frame": len(frames), "time_s": round(len(frames) / fps, 3),
                           "detections": det.to_json(predictor.class_names)})  # fmt: skip
            progress.update(len(frames))
            if show:
                cv2.imshow(WINDOW, drawn)
                if cv2.waitKey(1) & 0xFF in STOP_KEYS:
                    end = "stopped by key"
                    break
        else:
            end = f"--max-frames {max_frames} reached"
    except KeyboardInterrupt:  # how a headless camera run is stopped: keep what it has
        end = CTRL_C
    finally:
        progress.close()
        if writer is not None:
            writer.release()
        if hasattr(capture, "release"):
            capture.release()
        if show:
            cv2.destroyAllWindows()
    seconds = time.monotonic() - start
    if not frames and end == CTRL_C:
        raise VideoError(f"{name}: stopped by Ctrl-C before the first frame; nothing written")
    if not frames:
        raise VideoError(
            f"{name}: no readable frame (empty, corrupt, or a codec this OpenCV's FFmpeg "
            "cannot decode)"
        )
    record = {"source": name, "fps": fps, "width": size[0], "height": size[1],
              "frames_total": total, "end": end, "frames": frames}  # fmt: skip
    with open(json_path, "w") as f:
        json.dump(record, f, indent=1)
    rate = progress.fps(len(frames), time.monotonic())  # the first frame compiles
    rate_text = f", {rate:.1f} fps after the first" if rate else ""
    log.info(f"{name}: {len(frames)} frames in {seconds:.1f} s{rate_text}, {end}; wrote "
             f"{video_path} and {json_path}")  # fmt: skip
    return StreamResult(frames, end, seconds)
