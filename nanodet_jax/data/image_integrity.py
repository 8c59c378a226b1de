"""Truncated JPEG / PNG files: found from their end markers, before decoding.

OpenCV decodes a JPEG cut short without failing: libjpeg prints "Premature end of JPEG
file" on stderr and fills the missing rows with grey, so the image would train and be
evaluated as half grey. Capturing that warning means redirecting the process's stderr
around each decode (not thread-safe; the loaders decode in threads). The end markers
are cheaper and certain:

* JPEG: an end-of-image marker (FF D9) must follow the last start-of-scan (FF DA). The
  entropy-coded data between them never holds FF D9 (a data FF is followed by 00 or a
  restart marker), so a file cut anywhere in or after its last scan has none. The fast
  path only reads the file's last bytes (the marker is normally the last two, perhaps
  followed by zero padding); data appended after the image (camera trailers) costs one
  read of the whole file.
* PNG: the IEND chunk (type and CRC, 8 constant bytes) must be present; a cut file has
  none. libpng already fails on a cut PNG (cv2 returns None, "cannot decode"); the check
  names the problem, and finds it without decoding (``nanodet-check-dataset --no-decode``).

Other formats (BMP, WebP, TIFF) are left to the decoder.
"""

from __future__ import annotations

from collections.abc import Callable

from nanodet_jax import paths

JPEG_SOI, JPEG_SOS, JPEG_EOI = b"\xff\xd8", b"\xff\xda", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + its CRC, the same in every PNG
TAIL_BYTES = 4096  # enough for zero padding or a short trailer after the end marker


def _problem(head: bytes, tail: bytes, whole: Callable[[], bytes]) -> str | None:
    if head.startswith(JPEG_SOI):
        if tail.rstrip(b"\x00").endswith(JPEG_EOI):
            return None
        data = whole()
        last_scan = data.rfind(JPEG_SOS)
        if last_scan >= 0 and data.find(JPEG_EOI, last_scan + 2) >= 0:
            return None
        return "truncated JPEG (no end-of-image marker after its last scan)"
    if head.startswith(PNG_SIGNATURE):
        if PNG_IEND in tail or PNG_IEND in whole():
            return None
        return "truncated PNG (no IEND chunk)"
    return None


def truncation_problem(path: str) -> str | None:
    """Why the JPEG / PNG file at ``path`` is cut short, or None (also for other formats)."""
    with paths.open_file(path, "rb") as f:  # seekable remotely too: ranged reads
        head = f.read(len(PNG_SIGNATURE))
        size = f.seek(0, 2)
        f.seek(max(0, size - TAIL_BYTES))
        tail = f.read()

        def whole() -> bytes:
            f.seek(0)
            return f.read()

        return _problem(head, tail, whole)


def truncation_problem_bytes(data: bytes) -> str | None:
    """:func:`truncation_problem` for an encoded image held in memory."""
    data = bytes(data)
    return _problem(data[: len(PNG_SIGNATURE)], data[-TAIL_BYTES:], lambda: data)
