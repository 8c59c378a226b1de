"""The one path layer for datasets, workdirs and outputs: local paths and ``gs://`` (and the
other schemes ``etils.epath`` knows: ``s3://``, ``az://``, ``hf://``) alike.

Paths stay strings everywhere else in the package (records, configs, log lines); only
this module touches the file system for them, through ``etils.epath``. A local path goes
to epath's ``os`` backend (plain ``open`` / ``os`` calls, so local behaviour is as
before); a remote one to TensorFlow's gfile when TensorFlow is installed, else to fsspec,
which needs the scheme's package (``gcsfs`` for ``gs://``, ``s3fs`` for ``s3://``).

Object stores differ from a disk in two ways this module hides:

* no atomic rename: :func:`write_atomic` writes a local file as ``tmp`` + ``os.replace``;
  a remote object is written directly, since an object upload is already all-or-nothing
  (readers see the old object or the new one, never a part), while a "rename" there is a
  copy + delete that would not be;
* no append: :func:`append_text` rewrites a remote object with the new text added (the
  files appended to, metrics.jsonl and samples_p*.jsonl, are small).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import posixpath
import threading
from collections.abc import Iterator
from typing import IO, Any

from etils import epath

from nanodet_jax.errors import UserError

PathLike = str | os.PathLike
# The URL schemes epath routes (gpath._URI_SCHEMES) and the package fsspec needs for each.
SCHEMES = {"gs": "gcsfs", "s3": "s3fs", "az": "adlfs", "hf": "huggingface_hub"}


class RemotePathError(UserError, ValueError):
    """A URL whose scheme epath does not know, or whose backend is not installed."""


def is_remote(path: PathLike) -> bool:
    """Whether ``path`` is a URL (``gs://bucket/x``), not a local file path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
    path = os.fspath(path)
    if is_remote(path):
        _check_backend(path.split("://", 1)[0], path)
    return epath.Path(path)


def _check_backend(scheme: str, path: str) -> None:
    """One line naming the package to install, not fsspec's error deep in a data loader."""
    if scheme not in SCHEMES:
        raise RemotePathError(
            f"{path}: unsupported URL scheme {scheme}:// (epath reads "
            f"{', '.join(s + '://' for s in SCHEMES)}; or give a local path)"
        )
    problem = _backend_problem(scheme)
    if problem:
        raise RemotePathError(f"{path}: {problem}")


@functools.cache
def _backend_problem(scheme: str) -> str | None:
    if importlib.util.find_spec("tensorflow") is not None:
        return None  # epath's gfile backend
    import fsspec

    try:
        fsspec.get_filesystem_class("gcs" if scheme == "gs" else scheme)
    except ImportError:
        return (
            f"{scheme}:// paths need {SCHEMES[scheme]} (pip install {SCHEMES[scheme]}) "
            "or tensorflow (its gfile)"
        )
    return None


def join(path: PathLike, *parts: str) -> str:
    """``os.path.join``, also for URLs (always ``/``)."""
    path = os.fspath(path)
    return posixpath.join(path, *parts) if is_remote(path) else os.path.join(path, *parts)


def abspath(path: PathLike) -> str:
    """A local path made absolute; a URL as given (it is absolute already)."""
    path = os.fspath(path)
    return path if is_remote(path) else os.path.abspath(path)


def open_file(path: PathLike, mode: str = "r") -> IO[Any]:
    """Open for reading or writing (``r``/``w``/``a``, ``b`` for bytes; text is UTF-8)."""
    if "a" in mode and is_remote(path):
        raise ValueError(f"{path}: object stores cannot append; use paths.append_text")
    return as_path(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    return as_path(path).read_text()


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def isfile(path: PathLike) -> bool:
    p = as_path(path)
    return p.exists() and not p.is_dir()


def isdir(path: PathLike) -> bool:
    return as_path(path).is_dir()


def listdir(path: PathLike) -> list[str]:
    """The names in a folder (not sorted, as ``os.listdir``)."""
    return [p.name for p in as_path(path).iterdir()]


def missing_files(files: list[str]) -> list[str]:
    """The ``files`` that do not exist, in order. Local: one stat each. Remote: one listing
    per folder instead (a stat per object is a request each: minutes for a COCO split)."""
    remote = [f for f in files if is_remote(f)]
    listed: dict[str, set[str]] = {}
    for folder in dict.fromkeys(posixpath.dirname(f) for f in remote):
        try:
            listed[folder] = set(listdir(folder))
        except FileNotFoundError:
            listed[folder] = set()

    def missing(f: str) -> bool:
        if is_remote(f):
            return posixpath.basename(f) not in listed[posixpath.dirname(f)]
        return not isfile(f)

    return [f for f in files if missing(f)]


def glob(pattern: PathLike) -> list[str]:
    """Paths matching a ``*`` / ``?`` pattern (no ``**``), sorted."""
    pattern = os.fspath(pattern)
    folder, name = posixpath.split(pattern) if is_remote(pattern) else os.path.split(pattern)
    return sorted(os.fspath(p) for p in as_path(folder or ".").glob(name))


def walk_files(folder: PathLike) -> Iterator[str]:
    """Every file under ``folder``, as a path relative to it (``os.walk`` order)."""
    folder = os.fspath(folder)
    top = _without_scheme(folder).rstrip("/")
    for root, _dirs, names in as_path(folder).walk():
        # fsspec backends give the roots without their scheme (epath then reads them as
        # local paths): the part below ``folder`` is taken from the text either way.
        root_s = os.fspath(root)
        if is_remote(folder):
            rel = _without_scheme(root_s).rstrip("/")[len(top) :].lstrip("/")
            yield from (posixpath.join(rel, n) if rel else n for n in names)
        else:
            yield from (os.path.relpath(os.path.join(root_s, n), folder) for n in names)


def _without_scheme(path: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def makedirs(path: PathLike) -> None:
    """Create a folder and its parents if missing (object stores: a no-op or a marker)."""
    as_path(path).mkdir(parents=True, exist_ok=True)


def remove(path: PathLike) -> None:
    as_path(path).unlink()


def rmtree(path: PathLike) -> None:
    as_path(path).rmtree()


def write_atomic(path: PathLike, data: str | bytes) -> None:
    """Replace the file's content so that a kill leaves the old content or the new, never
    a part: a local file via a temporary file beside it and ``os.replace``; an object by
    one upload. The temporary name is per process and thread, so writers racing on one
    path (processes indexing the same shard) do not clash: the last rename wins."""
    mode = "wb" if isinstance(data, bytes) else "w"
    if is_remote(path):
        with open_file(path, mode) as f:
            f.write(data)
        return
    tmp = f"{os.fspath(path)}.{os.getpid()}-{threading.get_ident()}.tmp"
    try:
        with open_file(tmp, mode) as f:
            f.write(data)
        as_path(tmp).replace(os.fspath(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    with open_file(path, "w") as f:
        f.write(text)


def write_bytes(path: PathLike, data: bytes) -> None:
    with open_file(path, "wb") as f:
        f.write(data)


def append_text(path: PathLike, text: str) -> None:
    """Add ``text`` at the end of the file (created if missing). Remote: the object is
    rewritten whole (read + one upload), as object stores have no append."""
    if not is_remote(path):
        with open_file(path, "a") as f:
            f.write(text)
        return
    old = read_text(path) if exists(path) else ""
    write_atomic(path, old + text)
