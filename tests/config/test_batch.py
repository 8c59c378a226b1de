"""The training batch of a config: ``device.global_batch_size`` (split over the devices)
or ``device.batch_size_per_device``, one of them in force (nanodet_jax/config/batch.py).
The log line on 4 devices of 1 and of 2 processes: tests/training/test_distributed.py."""

from __future__ import annotations

import jax
import pytest

from nanodet_jax.cli import train as train_cli
from nanodet_jax.config.batch import resolve_batch
from nanodet_jax.config.loading import load_config
from nanodet_jax.errors import ConfigError
from tests.conftest import REPO, config_path
from tools.record_nanodet_yml import our_configs


def quickstart(*overrides: str):
    return load_config(config_path("quickstart.py"), overrides).device


@pytest.mark.parametrize("devices", [1, 2, 8, 16])
def test_quickstart_trains_one_global_batch_on_any_device_count(devices):
    batch = resolve_batch(quickstart(), devices)
    assert (batch.global_size, batch.per_device * devices) == (16, 16)
    assert batch.describe() == (
        f"global batch 16 = {devices} device{'s' * (devices > 1)} x {16 // devices} per "
        "device (device.global_batch_size)"
    )


def test_a_per_device_config_grows_with_the_devices():
    device = load_config(config_path("nanodet_plus_m.py")).device
    assert device.global_batch_size == 0
    batch = resolve_batch(device, 8)
    assert (batch.global_size, batch.per_device, batch.field) == (
        8 * device.batch_size_per_device,
        device.batch_size_per_device,
        "device.batch_size_per_device",
    )


def test_an_override_of_one_field_puts_it_in_force():
    batch = resolve_batch(quickstart("--config.device.global_batch_size=32"), 8)
    assert (batch.global_size, batch.per_device, batch.field) == (32, 4, "device.global_batch_size")
    # The other way round: a per-device override on a global-batch config unsets the global.
    device = quickstart("--config.device.batch_size_per_device=4")
    assert device.global_batch_size == 0
    assert resolve_batch(device, 8).global_size == 32
    nanodet = load_config(
        config_path("nanodet_plus_m.py"), ["--config.device.global_batch_size=64"]
    )
    assert nanodet.device.batch_size_per_device == 0
    assert resolve_batch(nanodet.device, 8).per_device == 8


@pytest.mark.parametrize("name", our_configs(REPO))
def test_every_config_takes_either_batch_override(name):
    """Every config has both fields (fcos_r50_fpn.py writes its device section whole)."""
    device = load_config(config_path(name), ["--config.device.global_batch_size=32"]).device
    assert resolve_batch(device, 8).per_device == 4
    device = load_config(config_path(name), ["--config.device.batch_size_per_device=3"]).device
    assert resolve_batch(device, 8).global_size == 24


def test_a_global_batch_that_does_not_split_names_both_numbers_and_the_fix():
    with pytest.raises(ConfigError) as err:
        resolve_batch(quickstart(), 3)
    assert str(err.value) == (
        "device.global_batch_size=16 does not split over 3 devices; use a multiple of 3 "
        "(e.g. 15 or 18) or set device.batch_size_per_device instead"
    )
    with pytest.raises(ConfigError, match=r"multiple of 32 \(e\.g\. 32\)"):
        resolve_batch(quickstart(), 32)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        (
            {"global_batch_size": 16, "batch_size_per_device": 4},
            r"disagree on 2 device.*= 8\); set one",
        ),
        ({"global_batch_size": 0, "batch_size_per_device": 0}, "no training batch"),
        ({"global_batch_size": None, "batch_size_per_device": None}, "no training batch"),
        ({"global_batch_size": -8, "batch_size_per_device": 0}, "global_batch_size=-8"),
        ({"global_batch_size": 8.0, "batch_size_per_device": 0}, "whole number"),
    ],
)
def test_inconsistent_or_missing_batches_are_config_errors(device, message):
    with pytest.raises(ConfigError, match=message):
        resolve_batch(device, 2)


def test_both_fields_may_agree():
    batch = resolve_batch({"global_batch_size": 16, "batch_size_per_device": 8}, 2)
    assert (batch.global_size, batch.per_device) == (16, 8)


def test_train_py_refuses_the_batch_in_one_line_before_reading_data(tmp_path, monkeypatch, capsys):
    """Through the entry point: exit 2, the one line, before the (absent) dataset is read."""
    monkeypatch.setattr(jax, "device_count", lambda: 3)
    with pytest.raises(SystemExit) as stop:
        train_cli.main([
            "--config", config_path("quickstart.py"), "--workdir", str(tmp_path / "run"),
            f"--config.data.synthetic.out_dir={tmp_path}/absent",
            f"--config.data.train.ann_file={tmp_path}/absent.json",
        ])  # fmt: skip
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("device.global_batch_size=16 does not split over 3 devices; use a "
                            "multiple of 3 (e.g. 15 or 18) or set device.batch_size_per_device "
                            "instead"), err  # fmt: skip
    assert not (tmp_path / "absent").exists()
