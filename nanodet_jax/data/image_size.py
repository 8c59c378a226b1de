"""Image sizes from file headers, as ``cv2.imread`` would decode the image.

Reading (width, height) from the JPEG/PNG header is ~1000x cheaper than decoding, which
matters for formats that do not store the size (YOLO txt, TFDS COCO). JPEGs carry an
EXIF orientation that ``cv2.imread(IMREAD_COLOR)`` applies, turning the image by 90
degrees for orientations 5-8; the header size is swapped to match, so boxes meet the
image the pipeline actually sees. Any other format, or a header we cannot parse, falls
back to a full decode.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from nanodet_jax import paths
from nanodet_jax.data.coco import ImageReadError, imdecode

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Start-of-frame markers (baseline, progressive, lossless, arithmetic); not C4/C8/CC.
_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_EXIF_ORIENTATION_TAG = 0x0112


def _exif_orientation(app1: bytes) -> int:
    """The orientation (1-8) in an APP1 payload, 1 when absent or unreadable."""
    if not app1.startswith(b"Exif\x00\x00") or len(app1) < 14:
        return 1
    tiff = app1[6:]
    order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if order is None:
        return 1
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for k in range(count):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            break
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag == _EXIF_ORIENTATION_TAG and kind == 3:  # SHORT, value inline
            (value,) = struct.unpack(order + "H", entry[8:10])
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_size(f: BinaryIO) -> tuple[int, int] | None:
    """(width, height) after EXIF orientation, or None if the stream is not parseable."""
    if f.read(2) != b"\xff\xd8":
        return None
    orientation = 1
    while True:
        byte = f.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = f.read(1)
        if not byte:
            return None
        marker = byte[0]
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # markers without a length field
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        raw = f.read(2)
        if len(raw) < 2:
            return None
        (length,) = struct.unpack(">H", raw)
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            data = f.read(5)
            if len(data) < 5:
                return None
            height, width = struct.unpack(">HH", data[1:5])
            if width == 0 or height == 0:
                return None  # height 0 = defined later by DNL; let the decoder decide
            return (height, width) if orientation >= 5 else (width, height)
        if marker == 0xE1 and orientation == 1:
            orientation = _exif_orientation(f.read(length - 2))
        else:
            f.seek(length - 2, io.SEEK_CUR)


def _png_size(head: bytes) -> tuple[int, int] | None:
    if len(head) >= 24 and head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(width), int(height)
    return None


def _header_size(f: BinaryIO) -> tuple[int, int] | None:
    head = f.read(24)
    if head.startswith(b"\xff\xd8"):
        f.seek(0)
        return _jpeg_size(f)
    return _png_size(head)


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of the image file as ``read_image`` would return it."""
    try:
        with paths.open_file(path, "rb") as f:
            try:
                size = _header_size(f)
            except (struct.error, OSError, ValueError):
                size = None
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ImageReadError(f"{path}: image file not found") from None
    if size is not None:
        return size
    return encoded_image_size(paths.read_bytes(path), path)


def encoded_image_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) of encoded image bytes as ``cv2.imdecode`` would return them."""
    try:
        size = _header_size(io.BytesIO(data))
    except (struct.error, OSError, ValueError):
        size = None
    if size is not None:
        return size
    img = imdecode(data)
    if img is None:
        raise ImageReadError(f"{name}: cannot decode image (corrupt or not an image)")
    return img.shape[1], img.shape[0]
