"""Build, load and call the C++ XLA FFI depthwise-convolution kernels (XLA:CPU only).

The kernels (``csrc/depthwise.cc``) are compiled on first use with the system C++
compiler and cached under ``${XDG_CACHE_HOME:-~/.cache}/nanodet_jax/``. ``-march=native``
is safe because the cache key includes the CPU model and feature flags: a cache directory
shared between different machines gets one library per CPU type. If no compiler is found
or the build fails, :func:`load` logs one warning and returns False and callers fall back
to the pure-XLA implementation.

An FFI custom call is opaque to the SPMD partitioner, which would all-gather a
batch-sharded input; each kernel call is therefore wrapped with ``batch_parallel``
(``custom_partitioning``: run per batch/channel shard, ``psum`` the weight gradient) and
``batchable`` (``custom_vmap``, since ``custom_partitioning`` has no batching rule), both
from ``depthwise_xla``.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from nanodet_jax.ops.depthwise_xla import (
    RawOp,
    batch_parallel,
    batchable,
    float32_depthwise,
    out_size,
)

logger = logging.getLogger(__name__)

_SRC = Path(__file__).parent / "csrc" / "depthwise.cc"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# -march=native first (AVX-512 etc.); the portable build is for compilers that reject it.
_ARCH_FLAGS = (("-march=native",), ())
_TARGET_FWD = "nanodet_depthwise_fwd"
_TARGET_DX = "nanodet_depthwise_input_grad"
_TARGET_DW = "nanodet_depthwise_weight_grad"
_SYMBOLS = {
    _TARGET_FWD: "NanodetDepthwiseFwd",
    _TARGET_DX: "NanodetDepthwiseInputGrad",
    _TARGET_DW: "NanodetDepthwiseWeightGrad",
}
MAX_KERNEL = 7  # largest K the C++ kernels accept (fast paths for K in {1, 3, 5})

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ok": bool once attempted, "lib": the loaded CDLL


# ------------------------------------------------------------------------------------
# Build and registration.


def _find_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_id() -> str:
    """Identify the CPU ISA so that -march=native binaries are never shared across CPUs."""
    info = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    info += line
                if line.strip() == "":  # the first processor's block is enough
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{info}"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanodet_jax"


def _build(cxx: str, arch: tuple[str, ...]) -> Path:
    """Compile the kernels (once per source/compiler/flags/jaxlib/CPU); return the .so path."""
    flags = (*_FLAGS, *arch)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                _SRC.read_text(),
                cxx,
                version,
                " ".join(flags),
                jaxlib.__version__,
                _cpu_id(),
            )
        )
    ).hexdigest()[:20]
    cache = _cache_dir()
    lib = cache / f"depthwise-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent builds across processes; the atomic rename below also means
    # a reader never sees a half-written library even where flock is unavailable.
    with open(cache / f"depthwise-{key}.lock", "w") as lock_file:
        try:
            import fcntl

            fcntl.flock(lock_file, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        if lib.exists():  # another process built it while we waited
            return lib
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            cmd = [cxx, *flags, "-isystem", jax.ffi.include_dir(), str(_SRC), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
            os.chmod(tmp, 0o755)  # mkstemp made it private; a shared cache needs r-x
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


def _build_any(cxx: str) -> Path:
    errors = []
    for arch in _ARCH_FLAGS:
        try:
            return _build(cxx, arch)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            errors.append(str(e))
    raise RuntimeError("\n".join(errors))


def load() -> bool:
    """Build (if needed), load and register the FFI kernels; False if unavailable."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        _state["ok"] = False
        try:
            cxx = _find_compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            lib = ctypes.CDLL(str(_build_any(cxx)))
            for target, symbol in _SYMBOLS.items():
                fn = getattr(lib, symbol)
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _state["lib"] = lib  # keep the library mapped for the life of the process
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
            logger.warning(
                "nanodet_jax: depthwise FFI kernel unavailable, using the pure-XLA "
                "fallback (slower): %s",
                e,
            )
        return _state["ok"]


def _raw(target: str) -> RawOp:
    def call(
        a: jax.Array, b: jax.Array, out_shape: tuple[int, ...], stride: int, padding: int
    ) -> jax.Array:
        ffi = jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(out_shape, jnp.float32), vmap_method="sequential"
        )
        return ffi(a, b, stride=np.int64(stride), padding=np.int64(padding))

    return call


_fwd_op = batch_parallel(_raw(_TARGET_FWD), reduce_batch=False)
_dx_op = batch_parallel(_raw(_TARGET_DX), reduce_batch=False)
_dw_op = batch_parallel(_raw(_TARGET_DW), reduce_batch=True)


def forward(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """FFI forward on float32 NHWC ``x`` and [K, K, 1, C] ``w``."""
    n, h, wd, c = x.shape
    k = w.shape[0]
    shape = (n, out_size(h, k, stride, padding), out_size(wd, k, stride, padding), c)
    return batchable(_fwd_op, shape, stride, padding, fold=True)(x, w)


def input_grad(
    g: jax.Array, w: jax.Array, stride: int, padding: int, in_hw: tuple[int, int]
) -> jax.Array:
    shape = (g.shape[0], *in_hw, g.shape[3])
    return batchable(_dx_op, shape, stride, padding, fold=True)(g, w)


def weight_grad(x: jax.Array, g: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
    shape = (k, k, 1, x.shape[3])
    return batchable(_dw_op, shape, stride, padding, fold=False)(x, g)


# Depthwise conv through the C++ kernels; call :func:`load` first (CPU only).
depthwise_conv2d_ffi = float32_depthwise(forward, input_grad, weight_grad)
