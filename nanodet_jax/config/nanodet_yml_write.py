"""Writing one of our configs as a NanoDet ``.yml`` (the inverse of ``nanodet_yml.py``):
NanoDet's config loader reads the file, and so does ours, giving back the same config.
Fields NanoDet has no place for go under the ``nanodet_jax:`` key, which NanoDet ignores.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import Any

import yaml

from nanodet_jax.config.batch import resolve_batch
from nanodet_jax.config.nanodet_yml import EXTRAS_KEY, PRECISION_OUT, _fail, from_nanodet_dict


def _diff(ours: Mapping, back: Mapping) -> dict:
    """The leaves of ``ours`` that ``back`` lacks or holds with another value or type."""
    out: dict = {}
    for key, value in ours.items():
        other = back.get(key)
        if isinstance(value, Mapping) and isinstance(other, Mapping):
            sub = _diff(value, other)
            if sub:
                out[key] = sub
        elif key not in back or other != value or type(other) is not type(value):
            out[key] = copy.deepcopy(value)
    return out


def to_nanodet_dict(config: Any) -> dict:
    """The content of a NanoDet .yml for one of our configs (top-level keys in NanoDet's
    order). Raises :class:`UnsupportedNanoDetConfig` for what the schema cannot hold."""
    c = config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))
    source = f"config {c.get('name', '?')!r}"
    precision = str(c["device"].get("precision", "fp32")).lower()
    if precision not in PRECISION_OUT:
        _fail(source, "device.precision", precision, list(PRECISION_OUT))
    model = {"arch": c["model"]["arch"]}
    averager = c["model"].get("weight_averager") or {}
    if float(averager.get("decay", 0.0)) != 0.0:  # decay 0 is NanoDet without an averager
        model = {"weight_averager": averager, **model}
    data = {}
    for role in ("train", "val"):
        s = c["data"][role]
        data[role] = {
            "name": s["name"],
            "img_path": s["img_dir"],
            "ann_path": s["ann_file"],
            "input_size": s["input_size"],
            "keep_ratio": s["keep_ratio"],
            "pipeline": s["pipeline"],
        }
        if "class_names" in s:
            data[role]["class_names"] = s["class_names"]
    schedule = {
        k: c["schedule"][k]
        for k in ("optimizer", "warmup", "total_epochs", "lr_schedule", "val_intervals")
    }
    if c.get("init_from"):
        schedule = {"load_model": c["init_from"], **schedule}
    y = {
        "save_dir": f"workspace/{c['name']}",
        "model": model,
        "data": data,
        "device": {
            "gpu_ids": [0],
            "workers_per_gpu": c["device"]["workers"],
            # gpu_ids [0]: NanoDet's one GPU takes the whole global batch
            "batchsize_per_gpu": resolve_batch(c["device"], 1).per_device,
            "precision": PRECISION_OUT[precision],
        },
        "schedule": schedule,
        "grad_clip": c.get("grad_clip", 0.0),
        "evaluator": c["evaluator"],
        "log": {"interval": int(c["log"]["interval"])},  # NanoDet's loader wants an int
        "class_names": c["class_names"],
    }
    y = copy.deepcopy(y)
    extras = _diff(c, from_nanodet_dict(y, source).to_dict())
    if extras:
        y[EXTRAS_KEY] = extras
    return y


def write_nanodet_yml(config: Any, path: str | os.PathLike, source: str = "") -> None:
    """Write ``config`` as a NanoDet .yml that NanoDet's loader (and ours) reads back."""
    text = yaml.safe_dump(
        to_nanodet_dict(config), sort_keys=False, default_flow_style=None, width=100
    )
    origin = f" from {source}" if source else ""
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# NanoDet config written by nanodet_jax.config.nanodet_yml{origin}\n{text}")
