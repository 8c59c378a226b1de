"""Build, load and register the C++ XLA FFI kernels in ``csrc/`` (XLA:CPU only).

All ``csrc/*.cc`` files are compiled together into one shared library on first use,
with the system C++ compiler, and cached under ``${XDG_CACHE_HOME:-~/.cache}/nanodet_jax/``.
``-march=native`` is safe because the cache key includes the CPU model and feature flags
(as well as the sources, compiler, flags and jaxlib): a cache directory shared between
different machines gets one library per CPU type. If no compiler is found or the build
fails, :func:`load` logs one warning and returns False, and callers fall back to XLA.
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
import jaxlib

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC")
# -march=native first (AVX-512 etc.); the portable build is for compilers that reject it.
_ARCH_FLAGS = (("-march=native",), ())
# FFI target name -> exported handler symbol, for every kernel in the library.
TARGETS = {
    "nanodet_depthwise_fwd": "NanodetDepthwiseFwd",
    "nanodet_depthwise_fwd_fused": "NanodetDepthwiseFwdFused",
    "nanodet_depthwise_input_grad": "NanodetDepthwiseInputGrad",
    "nanodet_depthwise_weight_grad": "NanodetDepthwiseWeightGrad",
    "nanodet_winograd_conv3x3": "NanodetWinogradConv3x3",
    "nanodet_winograd_conv3x3_weight_grad": "NanodetWinogradConv3x3WeightGrad",
    "nanodet_pointwise_bias_act": "NanodetPointwiseBiasAct",
    "nanodet_pointwise_bias_act_interleave": "NanodetPointwiseBiasActInterleave",
    "nanodet_pointwise_weight_grad": "NanodetPointwiseWeightGrad",
    "nanodet_stem_conv_bias_act": "NanodetStemConvBiasAct",
}

_lock = threading.Lock()
_state: dict[str, Any] = {}  # "ok": bool once attempted, "lib": the loaded CDLL


def _sources() -> list[Path]:
    return sorted(_CSRC.glob("*.cc"))


def _headers() -> list[Path]:
    return sorted(_CSRC.glob("*.h"))


def find_compiler() -> str | None:
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
                *(p.read_text() for p in _sources() + _headers()),
                cxx,
                version,
                " ".join(flags),
                jaxlib.__version__,
                _cpu_id(),
            )
        )
    ).hexdigest()[:20]
    cache = _cache_dir()
    lib = cache / f"kernels-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent builds across processes; the atomic rename below also means
    # a reader never sees a half-written library even where flock is unavailable.
    with open(cache / f"kernels-{key}.lock", "w") as lock_file:
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
            cmd = [cxx, *flags, "-isystem", jax.ffi.include_dir(), *map(str, _sources()), "-o", tmp]
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
            cxx = find_compiler()
            if cxx is None:
                raise RuntimeError("no C++ compiler found (set CXX or install g++)")
            lib = ctypes.CDLL(str(_build_any(cxx)))
            for target, symbol in TARGETS.items():
                fn = getattr(lib, symbol)
                jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
            _state["lib"] = lib  # keep the library mapped for the life of the process
            _state["ok"] = True
        except Exception as e:  # noqa: BLE001 - any failure means "use the fallback"
            logger.warning(
                "nanodet_jax: C++ FFI kernels unavailable, using the XLA fallbacks (slower): %s",
                e,
            )
        return _state["ok"]


def library() -> ctypes.CDLL:
    """The loaded kernel library (after a successful :func:`load`)."""
    if not load():
        raise RuntimeError("the C++ FFI kernels could not be built (see the warning above)")
    return _state["lib"]


def wants_kernels(
    impl: str | None, env_var: str, impls: tuple[str, ...] = ("auto", "ffi", "lax")
) -> bool:
    """Whether an op picked by ``impl`` (else ``$env_var``, else ``auto``) runs its C++
    kernel: ``ffi`` always (raising if the kernels cannot be built), ``auto`` when CPU is
    the default backend and they build (only then is building them worth its time),
    anything else never. An unknown choice is a ValueError naming the choices."""
    choice = impl or os.environ.get(env_var, "auto") or "auto"
    if choice not in impls:
        raise ValueError(f"{env_var} must be one of {impls}, got {choice!r}")
    if choice == "ffi" and not load():
        raise RuntimeError(f"{env_var}=ffi but the C++ kernels could not be built")
    return choice == "ffi" or (choice == "auto" and jax.default_backend() == "cpu" and load())
