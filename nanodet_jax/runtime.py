"""Process-wide XLA settings chosen by measurement (see docs/benchmarks.md).

On CPU, XLA 0.10 sends convolutions to YNNPACK by default; for NanoDet-Plus's dense
3x3 convolutions (the aux head: ~75% of a training step's FLOPs) XLA's Eigen path is
faster (weight gradient 138 vs 106 GFLOP/s, forward 206 vs 154 on this 2-core CPU),
while YNNPACK's dots and reductions stay the faster choice. The flag only affects the
CPU backend. It is applied when ``nanodet_jax`` is imported, unless the user already
chose ``--xla_cpu_experimental_ynn_fusion_type`` in ``XLA_FLAGS`` or set
``NANODET_JAX_XLA_TUNING=0``; it must precede the first JAX computation.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("nanodet_jax")
CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce",)


def configure_xla() -> bool:
    """Add our CPU flags to ``XLA_FLAGS``; returns whether they are in effect."""
    if os.environ.get("NANODET_JAX_XLA_TUNING", "1") == "0":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return False  # the user's own choice wins
    try:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            log.warning(
                "nanodet_jax was imported after JAX initialised its backend: the tuned "
                f"XLA CPU flags ({' '.join(CPU_FLAGS)}) are not applied"
            )
            return False
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        pass
    os.environ["XLA_FLAGS"] = " ".join([flags, *CPU_FLAGS]).strip()
    return True


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Persist compiled XLA programs across runs (a resumed or repeated run skips the
    ~40 s first-step compile). ``$NANODET_JAX_CACHE`` overrides the location; set it
    to an empty string to disable the cache."""
    path = os.environ.get("NANODET_JAX_CACHE", path)
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
        path = os.path.join(base, "nanodet_jax", "xla")
    if not path:
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return path
