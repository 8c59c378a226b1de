"""Devices, hosts and shardings: one data-parallel mesh axis over every device of every host.

Parameters, optimizer state and EMA are replicated; batches are split along the
``data`` axis. Under ``jax.jit`` this makes every batch statistic global: BatchNorm
statistics and the loss normalisers (number of positives, bbox weight sum) are taken
over the whole global batch, which PyTorch needs SyncBatchNorm and all-reduces for.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger("nanodet_jax")
DATA_AXIS = "data"


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """``jax.distributed.initialize`` when running on several processes.

    Explicit arguments win; otherwise JAX auto-detects Cloud TPU pods, SLURM and
    the like (``JAX_COORDINATOR_ADDRESS`` etc.). A plain single-process run does nothing.
    """
    explicit = coordinator is not None or (num_processes or 1) > 1
    managed = any(
        k in os.environ
        for k in (
            "SLURM_JOB_ID",
            "TPU_WORKER_HOSTNAMES",
            "JAX_COORDINATOR_ADDRESS",
            "MEGASCALE_COORDINATOR_ADDRESS",
        )
    )
    if not (explicit or managed):
        return
    kwargs = {}
    if coordinator is not None:
        kwargs = dict(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    jax.distributed.initialize(**kwargs)
    log.info(
        f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local / {jax.device_count()} global devices"
    )


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all devices of all processes).

    Auto axis type: shardings propagate as in plain ``jit``.
    """
    devices = list(jax.devices() if devices is None else devices)
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble this process's rows of every field into global batch-sharded arrays."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()
    }


def local_copy(tree: Any) -> Any:
    """A process-local copy of replicated arrays (this process's first shard), as NumPy.

    PRNG keys (the dropout streams of TAN and EfficientNet-Lite) have no NumPy form:
    they stay a local single-device key array.
    """

    def local(a: jax.Array) -> Any:
        shard = a.addressable_data(0)
        return shard if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else np.asarray(shard)

    return jax.tree.map(local, tree)


def is_main_process() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
