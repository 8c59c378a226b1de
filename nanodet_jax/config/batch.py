"""The training batch of a config on the current devices: ``device.global_batch_size``
(split over every device of every process) or ``device.batch_size_per_device``.

Exactly one of the two is in force; 0 (or None) means unset. A config may set both only
when they agree on the devices it runs on (global = per device x devices). A
``--config.device.*`` override of one of them unsets the other (``config.loading``), so
the command line always names the one in force.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from nanodet_jax.errors import ConfigError

GLOBAL = "device.global_batch_size"
PER_DEVICE = "device.batch_size_per_device"


@dataclasses.dataclass(frozen=True)
class BatchSize:
    """The global batch, its share per device, the device count, and the field that
    set it (what the start-of-training log line names)."""

    global_size: int
    per_device: int
    devices: int
    field: str

    def describe(self) -> str:
        devices = f"{self.devices} device{'s' if self.devices != 1 else ''}"
        return (
            f"global batch {self.global_size} = {devices} x {self.per_device} per device "
            f"({self.field})"
        )


def _size(device: Mapping[str, Any], key: str) -> int:
    value = device.get(key) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"device.{key}={value!r}: expected a whole number of images >= 0")
    return value


def resolve_batch(device: Mapping[str, Any], device_count: int) -> BatchSize:
    """The batch of the config section ``device`` on ``device_count`` devices (all
    processes' devices: ``jax.device_count()``). Raises a one-line ConfigError when the
    global batch does not split evenly, neither field is set, or the two disagree."""
    global_size, per_device = (
        _size(device, "global_batch_size"),
        _size(device, "batch_size_per_device"),
    )
    n = int(device_count)
    if global_size and per_device and global_size != per_device * n:
        raise ConfigError(
            f"{GLOBAL}={global_size} and {PER_DEVICE}={per_device} disagree on {n} "
            f"device(s) ({per_device} x {n} = {per_device * n}); set one of them to 0"
        )
    if global_size:
        if global_size % n:
            lower, higher = global_size // n * n, (global_size // n + 1) * n
            nearest = f"{lower} or {higher}" if lower else f"{higher}"
            raise ConfigError(
                f"{GLOBAL}={global_size} does not split over {n} devices; use a multiple "
                f"of {n} (e.g. {nearest}) or set {PER_DEVICE} instead"
            )
        return BatchSize(global_size, global_size // n, n, GLOBAL)
    if per_device:
        return BatchSize(per_device * n, per_device, n, PER_DEVICE)
    raise ConfigError(f"no training batch: set {GLOBAL} (split over the devices) or {PER_DEVICE}")
