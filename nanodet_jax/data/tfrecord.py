"""Random access to TFDS datasets prepared as tfrecord (TFDS's default), without TensorFlow.

TFRecord framing: ``uint64 length``, ``uint32 masked CRC32C(length)``, ``data``,
``uint32 masked CRC32C(data)``, little endian; both checksums are checked. Random access
comes from a one-time index of the record offsets of each shard file, stored beside it as
``SHARD.nanodet-index.npz`` or, when that folder is not writable, in
``$XDG_CACHE_HOME/nanodet_jax/tfrecord_index`` (default ``~/.cache``); an index is rebuilt
when its shard file's size or modification time changes. A shard is indexed (and opened)
only when one of its records is first read, so a process that reads a subset of the
records opens only the shards holding them. Records are decoded by the dataset's own
features (``deserialize_example_np``, TFDS's NumPy parser: no TensorFlow).

Shards may be remote (``gs://...``, through :mod:`nanodet_jax.paths`): they are read with
seek + read on one open file per shard, and their index lives in the cache directory.

A damaged record (checksum mismatch, or a file cut short) raises :class:`RecordReadError`
naming the shard file and the record's byte offset; a broken length field ends the shard
there (its framing is lost), so its later records raise it too.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanodet_jax import paths
from nanodet_jax.data.coco import ImageReadError
from nanodet_jax.data.crc32c import masked_crc32c

log = logging.getLogger("nanodet_jax")
INDEX_SUFFIX = ".nanodet-index.npz"
_HEADER, _FOOTER = 12, 4


class RecordReadError(ImageReadError):
    """A tfrecord record is damaged or missing; the message names the file and offset.

    An :class:`ImageReadError`, so training skips it as it skips a damaged image file."""


def index_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nanodet_jax", "tfrecord_index")


def file_stat(path: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a local or remote file."""
    if paths.is_remote(path):
        st = paths.as_path(path).stat()
        return int(st.length), int(float(st.mtime) * 1e9)
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def scan_shard(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """(offsets, lengths, problem) of the records of one file, reading only the headers;
    ``problem`` (empty when none) says where and why the scan stopped early."""
    offsets, lengths = [], []
    size = file_stat(path)[0]
    problem = ""
    with paths.open_file(path, "rb") as f:
        pos = 0
        while pos < size:
            header = f.read(_HEADER)
            if len(header) < _HEADER:
                problem = f"record at byte {pos} cut short (the file ends at byte {size})"
                break
            (length,) = struct.unpack("<Q", header[:8])
            if struct.unpack("<I", header[8:])[0] != masked_crc32c(header[:8]):
                problem = f"record at byte {pos}: length checksum mismatch (corrupt file)"
                break
            end = pos + _HEADER + length + _FOOTER
            if end > size:
                problem = f"record at byte {pos} cut short (the file ends at byte {size})"
                break
            offsets.append(pos)
            lengths.append(length)
            pos = end
            f.seek(pos)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), problem


def _index_paths(path: str) -> list[str]:
    """Where the index of ``path`` may be: beside it (local shards), then in the cache
    directory."""
    path = paths.abspath(path)
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    cached = os.path.join(index_cache_dir(), f"{digest}-{name}{INDEX_SUFFIX}")
    return [cached] if paths.is_remote(path) else [path + INDEX_SUFFIX, cached]


def _load_index(candidate: str, stat: tuple[int, int]) -> tuple[np.ndarray, ...] | None:
    try:
        with np.load(candidate) as z:
            if (int(z["file_size"]), int(z["mtime_ns"])) == stat:
                return z["offsets"], z["lengths"], str(z["problem"])
    except (OSError, KeyError, ValueError):  # absent, stale format or half written
        pass
    return None


def _save_index(candidate: str, stat: tuple[int, int], index: tuple) -> bool:
    buf = io.BytesIO()
    np.savez(buf, offsets=index[0], lengths=index[1], problem=np.str_(index[2]),
             file_size=stat[0], mtime_ns=stat[1])  # fmt: skip
    try:
        os.makedirs(os.path.dirname(candidate), exist_ok=True)
        paths.write_atomic(candidate, buf.getvalue())
        return True
    except OSError:  # a read-only dataset folder: the caller tries the cache directory
        return False


def shard_index(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The (cached) :func:`scan_shard` of ``path``."""
    stat = file_stat(path)
    candidates = _index_paths(path)
    for candidate in candidates:
        found = _load_index(candidate, stat)
        if found is not None:
            return found
    index = scan_shard(path)
    if not any(_save_index(c, stat, index) for c in candidates):
        log.warning(f"{path}: cannot store its record index in {candidates}; rescanning each run")
    return index


class TFRecordSource:
    """Records of a split (after TFDS's slicing) as a random-access sequence of examples.

    ``file_instructions``: TFDS's ``(filename, skip, take)`` for the split; ``features``:
    the dataset's FeaturesDict, whose NumPy parser decodes each ``tf.train.Example``."""

    def __init__(self, file_instructions: Sequence[Any], features: Any, decoders: Any = None):
        self.files = [str(fi.filename) for fi in file_instructions]
        self.skips = np.array([int(fi.skip) for fi in file_instructions], np.int64)
        takes = np.array([int(fi.take) for fi in file_instructions], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(takes)])
        self.features, self.decoders = features, decoders
        self._index: dict[int, tuple] = {}
        self._fds: dict[int, int] = {}  # local shards: descriptors for os.pread
        self._remote: dict[int, tuple[Any, threading.Lock]] = {}  # remote: file, its lock
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _shard(self, k: int) -> tuple:
        with self._lock:  # one scan and one descriptor per shard, shared by threads
            if k not in self._index:
                self._index[k] = shard_index(self.files[k])
                if paths.is_remote(self.files[k]):
                    self._remote[k] = (paths.open_file(self.files[k], "rb"), threading.Lock())
                else:
                    self._fds[k] = os.open(self.files[k], os.O_RDONLY)
            return self._index[k]

    def _read(self, k: int, offset: int, size: int) -> bytes:
        if k in self._fds:
            return os.pread(self._fds[k], size, offset)
        f, lock = self._remote[k]
        with lock:  # seek + read on one shared file object
            f.seek(offset)
            return f.read(size)

    def opened_files(self) -> list[str]:
        return [self.files[k] for k in sorted({*self._fds, *self._remote})]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard number, record number in its file) of item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} not in [0, {len(self)})")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, int(self.skips[k] + i - self.starts[k])

    def read_bytes(self, i: int) -> bytes:
        """The checked serialized example of item ``i``."""
        k, j = self.locate(i)
        offsets, lengths, problem = self._shard(k)
        path = self.files[k]
        if j >= len(offsets):
            why = problem or f"the file ends after {len(offsets)} records"  # cut at a boundary
            raise RecordReadError(f"{path}: record {j} unreadable: {why}")
        offset, length = int(offsets[j]), int(lengths[j])
        buf = self._read(k, offset, _HEADER + length + _FOOTER)
        data = memoryview(buf)[_HEADER : _HEADER + length]
        if len(buf) < _HEADER + length + _FOOTER:  # the file shrank after indexing
            raise RecordReadError(f"{path}: record {j} at byte {offset} cut short")
        if struct.unpack("<I", buf[-_FOOTER:])[0] != masked_crc32c(data):
            raise RecordReadError(
                f"{path}: record {j} at byte {offset}: data checksum mismatch (corrupt file)"
            )
        return bytes(data)

    def __getitem__(self, i: int) -> Any:
        data = self.read_bytes(i)
        try:
            return self.features.deserialize_example_np(data, decoders=self.decoders)
        except Exception as e:  # a proto that passed its checksum but does not parse
            k, j = self.locate(i)
            raise RecordReadError(
                f"{self.files[k]}: record {j} at byte {int(self._index[k][0][j])}: cannot "
                f"parse the example ({e})"
            ) from e

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            for f, _ in self._remote.values():
                f.close()
            self._fds.clear()
            self._remote.clear()
            self._index.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass
