"""nanodet-predict on a video file and a camera (``nanodet_jax.evaluation.video``).

The real NanoDet-Plus-m-320 weights on a clip made of the demo photos: every frame's
detections equal the frame's own prediction as an image, and the drawn clip has the
input's frame count, size and fps. The camera, a cut video and the user's mistakes run
with a stand-in predictor (the loop's logic is under test, no model is compiled).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from nanodet_jax.cli import predict
from nanodet_jax.evaluation import video
from nanodet_jax.evaluation.predictor import Detections
from nanodet_jax.evaluation.visualize import draw_detections
from tests.conftest import config_path

CONFIG = config_path("nanodet_plus_m.py")  # NanoDet-Plus-m 320
CLIP_WH, CLIP_FPS, CLIP_FRAMES = (320, 240), 12.0, 8


def write_clip(path: Path, frames: list[np.ndarray], fps: float, fourcc: str) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps,
                             frames[0].shape[1::-1])  # fmt: skip
    assert writer.isOpened()
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path


def read_frames(path: Path) -> list[np.ndarray]:
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    return info.value.code, capsys.readouterr().err


class StandIn:
    """A predictor with one fixed detection per image."""

    class_names = ["a", "b"]

    def __call__(self, images: list[np.ndarray]) -> list[Detections]:
        box = np.array([[2, 2, 20, 16]], np.float32)
        return [Detections(box, np.array([0.9], np.float32), np.array([1], np.int32))] * len(images)


@pytest.fixture
def stand_in(monkeypatch) -> None:
    monkeypatch.setattr(predict, "predictor_from_config", lambda *args: StandIn())


def args(*inputs: str, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    return [*inputs, "--config", CONFIG, "--torch-weights", "x.pth", "--out-dir", str(out),
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def m320(shared_data):
    weights = os.path.join(shared_data, "weights", "nanodet-plus-m_320.pth")
    return predict.load_predictor(CONFIG, torch_weights=weights)


@pytest.fixture(scope="module")
def clip(shared_data, tmp_path_factory) -> Path:
    """8 frames of the demo photos (each shifted a little), mp4v at 12 fps."""
    folder = os.path.join(shared_data, "images")
    photos = [cv2.resize(cv2.imread(os.path.join(folder, n)), CLIP_WH)
              for n in sorted(os.listdir(folder))]  # fmt: skip
    frames = [np.roll(photos[i % len(photos)], 4 * i, axis=1) for i in range(CLIP_FRAMES)]
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", frames, CLIP_FPS, "mp4v")


def test_video_frames_are_predicted_as_images(m320, clip, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(predict, "predictor_from_config", lambda *args: m320)
    out = tmp_path / "preds"
    predict.main(args(str(clip), out=out))
    assert capsys.readouterr().out == (
        f"wrote {out / 'clip.mp4'} ({CLIP_FRAMES} frames, end of stream) and {out / 'clip.json'}\n"
    )
    record = json.loads((out / "clip.json").read_text())
    assert {k: v for k, v in record.items() if k != "frames"} == {
        "source": str(clip), "fps": CLIP_FPS, "width": CLIP_WH[0], "height": CLIP_WH[1],
        "frames_total": CLIP_FRAMES, "end": "end of stream",
    }  # fmt: skip
    frames = read_frames(clip)  # decoded as the video path decodes them
    assert len(frames) == len(record["frames"]) == CLIP_FRAMES
    confident, want = 0, []
    for i, (frame, got) in enumerate(zip(frames, record["frames"])):
        [det] = m320([frame])
        assert got["frame"] == i and got["time_s"] == round(i / CLIP_FPS, 3)
        assert got["detections"] == det.to_json(m320.class_names), f"frame {i}"
        confident += int(np.sum(det.scores > 0.35))
        want.append(draw_detections(frame, det.boxes, det.scores, det.labels, m320.class_names))
    assert confident >= 2 * CLIP_FRAMES  # real detections on every photo
    assert cv2.VideoCapture(str(out / "clip.mp4")).get(cv2.CAP_PROP_FPS) == CLIP_FPS
    drawn = read_frames(out / "clip.mp4")
    assert len(drawn) == CLIP_FRAMES and drawn[0].shape == (CLIP_WH[1], CLIP_WH[0], 3)
    # Those frames drawn and encoded here: the same bytes (the encoder is deterministic).
    again = read_frames(write_clip(tmp_path / "want.mp4", want, CLIP_FPS, "mp4v"))
    for i, (a, b) in enumerate(zip(drawn, again)):
        np.testing.assert_array_equal(a, b, err_msg=f"frame {i}")
    assert not np.array_equal(drawn[0], frames[0])


class FakeCamera:
    """cv2.VideoCapture(index) stand-in: a few frames, then Ctrl-C; reports no fps."""

    opened: list = []

    def __init__(self, index):
        self.opened.append(index)
        self.left = 5

    def isOpened(self) -> bool:  # noqa: N802 (cv2's name)
        return True

    def get(self, prop: int) -> float:
        return 0.0

    def read(self):
        if not self.left:
            raise KeyboardInterrupt
        self.left -= 1
        return True, np.full((48, 64, 3), 40 * self.left, np.uint8)

    def release(self) -> None:
        pass


def test_camera_until_ctrl_c(stand_in, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(FakeCamera, "opened", [])
    monkeypatch.setattr(cv2, "VideoCapture", FakeCamera)
    out = tmp_path / "cam"
    predict.main(args(out=out, extra=("--camera", "1")))
    assert FakeCamera.opened == [1]
    written = f"{out / 'camera1.mp4'} (5 frames, stopped by Ctrl-C) and {out / 'camera1.json'}"
    assert capsys.readouterr().out == f"wrote {written}\n"
    record = json.loads((out / "camera1.json").read_text())
    assert (record["source"], record["fps"], record["frames_total"]) == ("camera 1", 30.0, None)
    assert [f["detections"][0]["class_name"] for f in record["frames"]] == ["b"] * 5
    predict.main(args(out=tmp_path / "three", extra=("--camera", "0", "--max-frames", "3")))
    assert "(3 frames, --max-frames 3 reached)" in capsys.readouterr().out
    monkeypatch.undo()  # the real VideoCapture again
    frames = read_frames(out / "camera1.mp4")
    assert len(frames) == 5 and frames[0].shape == (48, 64, 3)
    assert len(read_frames(tmp_path / "three" / "camera0.mp4")) == 3


class Frames:
    """Any object with read() feeds the loop: here a list of frames."""

    def __init__(self, frames: list[np.ndarray]):
        self.frames = frames

    def read(self):
        return (True, self.frames.pop(0)) if self.frames else (False, None)


def test_a_frame_of_another_size_ends_the_run(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(video.log, "warning", warnings.append)
    frames = [np.zeros((48, 64, 3), np.uint8)] * 2 + [np.zeros((30, 40, 3), np.uint8)]
    paths = str(tmp_path / "s.avi"), str(tmp_path / "s.json")
    result = video.run_stream(StandIn(), Frames(frames), "stream", *paths)
    assert len(result.frames) == 2 and result.end == "frame 2 is 40x30, not 64x48: stopped there"
    assert warnings == [f"stream: {result.end}"]
    assert len(read_frames(tmp_path / "s.avi")) == 2


def test_a_cut_video_keeps_the_frames_before_the_cut(stand_in, tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), np.uint8) for _ in range(10)]
    whole = write_clip(tmp_path / "whole.avi", frames, 10.0, "MJPG").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])
    readable = len(read_frames(cut))
    assert 0 < readable < 10
    warnings = []
    monkeypatch.setattr(video.log, "warning", warnings.append)
    predict.main(args(str(cut), out=tmp_path / "out"))
    end = f"frame {readable} of 10 unreadable: stopped there"
    assert warnings == [f"{cut}: {end}; keeping the {readable} frames before it"]
    assert f"({readable} frames, {end})" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "out" / "cut.json").read_text())["frames"]) == readable
    assert len(read_frames(tmp_path / "out" / "cut.avi")) == readable


def test_mistakes_are_one_line(stand_in, tmp_path, monkeypatch, capsys):
    small = write_clip(tmp_path / "small.mp4", [np.zeros((48, 64, 3), np.uint8)] * 3, 5, "mp4v")
    (tmp_path / "text.mp4").write_text("not a video")
    empty = cv2.VideoWriter(str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5,
                            (64, 48))  # fmt: skip
    empty.release()  # opens as a video with no frame
    out = tmp_path / "out"
    cases = {  # name: (inputs and options, --out-dir, what the line says)
        "missing": ((str(tmp_path / "missing.mp4"),), out, "video file not found"),
        "text": ((str(tmp_path / "text.mp4"),), out, "cannot open as a video"),
        "empty": ((str(tmp_path / "empty.avi"),), out, "no readable frame"),
        "codec": ((str(small), "--fourcc", "ZZZZ"), out, "OpenCV cannot write codec 'ZZZZ'"),
        "in place": ((str(small),), tmp_path, "--out-dir would overwrite this input"),
        "show": ((str(small), "--show"), out, "--show needs"),
    }
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    for name, (inputs, out_dir, want) in cases.items():
        code, err = run_main(args(*inputs, out=out_dir), capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), (name, err)
        assert want in err, (name, err)
        if name != "show":
            assert os.path.basename(inputs[0]) in err, (name, err)
    if not any(d.startswith("video") for d in os.listdir("/dev")):
        code, err = run_main(args(out=out, extra=("--camera", "7")), capsys)
        assert code == 2 and err.endswith(
            "error: camera 7: cannot be opened (no such camera, or in use by another "
            "program; no /dev/video* here); give another --camera INDEX\n"
        ), err
    assert not any(p.suffix in (".mp4", ".avi", ".json") for p in out.iterdir())


def test_progress_line_and_throttle(monkeypatch):
    progress = video.Progress("clip.mp4", total=10, tty=False)
    progress.first = 100.0
    assert progress.text(6, 102.5) == "clip.mp4: 6/10 frames, 2.0 fps, ETA 0:02"
    assert video.Progress("camera 0", None).text(1, 0.0) == "camera 0: 1 frames, - fps"
    lines = []
    monkeypatch.setattr(video.log, "info", lines.append)
    progress = video.Progress("clip.mp4", total=1000, tty=False)
    for done in range(1, 1001):
        progress.update(done)
    assert len(lines) <= 1  # a log line every 5 s at most
    progress.interval = 0.0
    progress.update(1000)
    assert lines[-1].startswith("clip.mp4: 1000/1000 frames, ")
