"""NanoDet's own ``.yml`` configs, read as ours and written from ours.

``load_config("nanodet-plus-m_416.yml")`` maps NanoDet's schema onto the ml_collections
config of ``configs/*.py`` (those are built from NanoDet's values, so most fields are the
same path with the same value); ``nanodet_yml_write.write_nanodet_yml`` goes the other
way, for NanoDet's tools to use our exported ``.pth``::

    nanodet-yml --config configs/nanodet_plus_m.py --out m.yml

=============================  ==============================  ==========================
NanoDet ``.yml``               ours                            note
=============================  ==============================  ==========================
``save_dir``                   ``name``                        basename; written back as
                                                               ``workspace/<name>``
``model.arch.*``               ``model.arch.*``                same tree; names checked
``model.weight_averager``      ``model.weight_averager``       absent (no EMA) = decay 0
``...backbone.pretrain``       same                            absent = True, NanoDet's
                                                               ShuffleNetV2 default
``data.<s>.img_path``          ``data.<s>.img_dir``            renamed
``data.<s>.ann_path``          ``data.<s>.ann_file``           renamed
``data.<s>.name``,             same                            absent ``keep_ratio`` is
``input_size``, ``keep_ratio``,                                NanoDet's default, True
``pipeline``, ``class_names``
``device.batchsize_per_gpu``   ``device.batch_size_per_device``  renamed; written: the
                                                               per-device batch on 1 GPU
``device.workers_per_gpu``     ``device.workers``              renamed (grain threads)
``device.precision``           ``device.precision``            32 <-> fp32, 16 <-> bf16 (our
                                                               half type is bfloat16)
``device.gpu_ids``             --                              ignored: JAX takes the
                                                               visible devices
``schedule.load_model``        ``init_from``                   renamed
``schedule.resume``            --                              ignored: train.py resumes
                                                               from <workdir>/checkpoints
``schedule.*`` (optimizer,     ``schedule.*``                  same
warmup, total_epochs,
lr_schedule, val_intervals)
``grad_clip``                  ``grad_clip``                   absent = 0, no clipping
``evaluator``, ``log.interval``  same                          same
``class_names``                same                            same
``test``                       --                              NanoDet's is empty
--                             ``test.*``, ``checkpoint.*``,   ours only: our defaults,
                               ``seed``, ``init_bn_recalib...``  or the ``nanodet_jax:``
                               ``data.<s>.split``/``difficult``  block of a file we wrote
                               ``data.train.max_boxes_buckets``
                               ``device.global_batch_size``
=============================  ==============================  ==========================

A file we write holds, under a top-level ``nanodet_jax:`` key (NanoDet's loader accepts new
top-level keys and its code ignores them), only the fields of ours that the NanoDet schema
cannot carry and that differ from our defaults; for configs/nanodet_plus_*.py there are
none, and the file has the keys of NanoDet's own (plus ``backbone.pretrain``, which ours
sets: ``null``, random init, where NanoDet's file leaves its ImageNet default).
Whatever we cannot run yet (another arch, backbone, optimizer, ...) stops with
:class:`UnsupportedNanoDetConfig`: one line naming the file, the field, its value and what
is supported.
"""

from __future__ import annotations

import copy
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import ml_collections
import yaml

from nanodet_jax.config.defaults import nanodet_plus_config
from nanodet_jax.errors import ConfigError
from nanodet_jax.training.optim import OPTIMIZER_KEYS, OPTIMIZERS
from nanodet_jax.training.schedules import LR_SCHEDULES

EXTRAS_KEY = "nanodet_jax"

# NanoDet path -> our path, where they differ (``<s>``: train or val).
RENAMED = {
    "save_dir": "name",
    "data.<s>.img_path": "data.<s>.img_dir",
    "data.<s>.ann_path": "data.<s>.ann_file",
    "device.workers_per_gpu": "device.workers",
    "device.batchsize_per_gpu": "device.batch_size_per_device",
    "schedule.load_model": "init_from",
}
# NanoDet fields that have no counterpart here (see the table above).
IGNORED = ("device.gpu_ids", "schedule.resume")

# The keys each section may hold (NanoDet's, less those we cannot run yet).
TOP_KEYS = (*"save_dir model data device schedule grad_clip evaluator log".split(),
            *"class_names test".split(), EXTRAS_KEY)  # fmt: skip
ARCH_KEYS = "name detach_epoch backbone fpn head aux_head".split()
SPLIT_KEYS = "name img_path ann_path input_size keep_ratio pipeline class_names".split()
PIPELINE_KEYS = ("perspective scale stretch rotation shear translate flip brightness contrast "
                 "saturation normalize divisible").split()  # fmt: skip
# (field, allowed names, allowed keys) of the named sections our training implements.
NAMED_SECTIONS = (
    ("model.weight_averager", ("ExpMovingAverager",), ("name", "decay")),
    # Optimizers and lr schedules: whatever optim.py / schedules.py implement.
    (
        "schedule.optimizer",
        tuple(OPTIMIZERS),
        (*OPTIMIZER_KEYS, *sorted({k for d, _ in OPTIMIZERS.values() for k in d})),
    ),
    ("schedule.warmup", ("constant", "linear", "exp"), ("name", "steps", "ratio")),
    (
        "schedule.lr_schedule",
        tuple(LR_SCHEDULES),
        ("name", *sorted({k for d, _ in LR_SCHEDULES.values() for k in d})),
    ),
    ("evaluator", ("CocoDetectionEvaluator",), ("name", "save_key")),
)
# NanoDet backbones whose constructor defaults to pretrain=True.
PRETRAINED_BY_DEFAULT = ("ShuffleNetV2", "ResNet", "EfficientNetLite", "GhostNet")
PRECISION_IN = {32: "fp32", 16: "bf16"}
PRECISION_OUT = {"fp32": 32, "32": 32, "float32": 32, "bf16": 16, "bfloat16": 16}


def our_field(field: str) -> str | None:
    """Where a NanoDet field (dotted path) lands in our config; None for :data:`IGNORED`."""
    if field in IGNORED:
        return None
    role = field.split(".")[1] if field.startswith(("data.train.", "data.val.")) else ""
    generic = field.replace(f"data.{role}.", "data.<s>.", 1) if role else field
    if generic in RENAMED:
        return RENAMED[generic].replace("<s>", role)
    return field.removeprefix(f"{EXTRAS_KEY}.")


class UnsupportedNanoDetConfig(ConfigError):
    """A NanoDet config field we cannot map (yet); the message is one line."""


def _fail(source: str, field: str, value: Any, supported: Any) -> NoReturn:
    if isinstance(supported, (list, tuple)):
        supported = ", ".join(str(s) for s in supported)
    raise UnsupportedNanoDetConfig(
        f"{source}: {field}: {value!r} is not supported yet (supported: {supported})"
    )


def _section(source: str, node: Mapping, field: str, key: str, required: bool = True) -> dict:
    value = node.get(key)
    if value is None and not required:
        return {}
    path = f"{field}.{key}" if field else key
    if not isinstance(value, Mapping):
        what = "missing" if value is None else f"not a mapping ({value!r})"
        raise UnsupportedNanoDetConfig(f"{source}: {path} is {what}")
    return dict(value)


def _only(source: str, node: Mapping, field: str, allowed: Sequence[str]) -> None:
    for key in node:
        if key not in allowed:
            _fail(source, f"{field}.{key}" if field else key, node[key], f"keys {list(allowed)}")


def _named(source: str, node: Mapping, field: str, names: Sequence[str], keys: Sequence[str]):
    if node.get("name") not in names:
        _fail(source, f"{field}.name", node.get("name"), names)
    _only(source, node, field, keys)


def _module_keys(cls: type) -> list[str]:
    """The config keys a module class takes: its constructor's, as ``model._build`` calls it."""
    params = inspect.signature(cls.__init__).parameters
    return ["name", *(p for p in params if p not in ("self", "rngs"))]


def _check_arch(source: str, arch: dict) -> None:
    # Imported here: the registries pull in flax, which reading a .py config never needs.
    from nanodet_jax.losses.gfl_head import REGISTRIES as LOSSES
    from nanodet_jax.models.backbones import BACKBONES
    from nanodet_jax.models.detectors import DETECTORS
    from nanodet_jax.models.heads import HEAD_TRAINING_KEYS, HEADS
    from nanodet_jax.models.necks import NECKS as FPNS

    if arch.get("name") not in DETECTORS:
        _fail(source, "model.arch.name", arch.get("name"), DETECTORS.names())
    _only(source, arch, "model.arch", ARCH_KEYS)
    parts = (("backbone", BACKBONES, ()), ("fpn", FPNS, ()), ("head", HEADS, HEAD_TRAINING_KEYS))
    parts += (("aux_head", HEADS, HEAD_TRAINING_KEYS),) if "aux_head" in arch else ()
    for part, registry, extra in parts:
        field = f"model.arch.{part}"
        node = _section(source, arch, "model.arch", part)
        if node.get("name") not in registry:
            _fail(source, f"{field}.name", node.get("name"), sorted(registry))
        _only(source, node, field, _module_keys(registry[node["name"]]) + list(extra))
        if node.get("assigner_cfg") not in (None, {"topk": 13}):
            _fail(source, f"{field}.assigner_cfg", node["assigner_cfg"], "{topk: 13}")
        if "loss" in node:
            loss = _section(source, node, field, "loss")
            _only(source, loss, f"{field}.loss", list(LOSSES))
            for key in LOSSES:
                term = _section(source, loss, f"{field}.loss", key)
                _named(
                    source,
                    term,
                    f"{field}.loss.{key}",
                    LOSSES[key].names(),
                    ("name", "use_sigmoid", "beta", "loss_weight"),
                )
                if term.get("use_sigmoid", True) is not True:
                    _fail(source, f"{field}.loss.{key}.use_sigmoid", term["use_sigmoid"], "True")


def _split(source: str, raw: dict, role: str, default: dict) -> dict:
    from nanodet_jax.data.datasets import DATASET_NAMES

    field = f"data.{role}"
    node = _section(source, raw, "data", role)
    _only(source, node, field, SPLIT_KEYS)
    if node.get("name", "CocoDataset") not in DATASET_NAMES:
        _fail(source, f"{field}.name", node.get("name"), sorted(DATASET_NAMES))
    pipeline = _section(source, node, field, "pipeline", required=False)
    _only(source, pipeline, f"{field}.pipeline", PIPELINE_KEYS)
    out = copy.deepcopy(default)  # keeps our-only keys: split, difficult, max_boxes_buckets
    out.update(name=node.get("name", "CocoDataset"), pipeline=pipeline)
    out.update(keep_ratio=node.get("keep_ratio", True))  # NanoDet's dataset default
    for theirs, ours in (("img_path", "img_dir"), ("ann_path", "ann_file")):
        if theirs not in node:
            raise UnsupportedNanoDetConfig(f"{source}: {field}.{theirs} is missing")
        out[ours] = node[theirs]
    if "input_size" not in node:
        raise UnsupportedNanoDetConfig(f"{source}: {field}.input_size is missing")
    out["input_size"] = list(node["input_size"])
    if "class_names" in node:
        out["class_names"] = list(node["class_names"])
    return out


def _coerce(value: Any, like: Any) -> Any:
    """Give ``value`` the float type our default has where the .yml wrote an int (``35``,
    ``rotation: 0``): an ``--config.grad_clip=2.5`` override then keeps working."""
    if isinstance(like, float) and type(value) is int:
        return float(value)
    if isinstance(like, list) and isinstance(value, list) and like:
        return [_coerce(v, like[min(i, len(like) - 1)]) for i, v in enumerate(value)]
    if isinstance(like, dict) and isinstance(value, dict):
        return {k: _coerce(v, like[k]) if k in like else v for k, v in value.items()}
    return value


def _merge(base: dict, extra: Mapping) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def from_nanodet_dict(raw: Mapping, source: str = "<nanodet config>") -> ml_collections.ConfigDict:
    """Our config from the parsed content of a NanoDet .yml (``source`` names it in errors)."""
    if not isinstance(raw, Mapping):
        raise UnsupportedNanoDetConfig(f"{source}: not a NanoDet config (a {type(raw).__name__})")
    _only(source, raw, "", TOP_KEYS)
    default = nanodet_plus_config().to_dict()
    c = copy.deepcopy(default)  # our-only fields keep our defaults

    save_dir = str(raw.get("save_dir") or "").rstrip("/")
    stem = os.path.splitext(os.path.basename(source))[0]
    c["name"] = os.path.basename(save_dir) if save_dir not in ("", ".") else stem

    model = _section(source, raw, "", "model")
    _only(source, model, "model", ("arch", "weight_averager"))
    # NanoDet without an averager evaluates the trained weights; an EMA of decay 0 is those.
    averager = model.get("weight_averager") or {"name": "ExpMovingAverager", "decay": 0.0}
    arch = _section(source, model, "model", "arch")
    _check_arch(source, arch)
    from nanodet_jax.models.backbones import BACKBONES

    backbone = arch["backbone"]
    name = backbone["name"]
    if name in PRETRAINED_BY_DEFAULT and "pretrain" in _module_keys(BACKBONES[name]):
        # These NanoDet backbones start from ImageNet unless the file says otherwise.
        backbone.setdefault("pretrain", True)
    c["model"] = {"weight_averager": dict(averager), "arch": arch}

    data = _section(source, raw, "", "data")
    _only(source, data, "data", ("train", "val"))
    for role in ("train", "val"):
        c["data"][role] = _split(source, data, role, default["data"][role])

    device = _section(source, raw, "", "device")
    _only(
        source, device, "device", ("gpu_ids", "workers_per_gpu", "batchsize_per_gpu", "precision")
    )
    if "batchsize_per_gpu" not in device:
        raise UnsupportedNanoDetConfig(f"{source}: device.batchsize_per_gpu is missing")
    precision = device.get("precision", 32)  # NanoDet's default
    if precision not in PRECISION_IN:
        _fail(source, "device.precision", precision, list(PRECISION_IN))
    c["device"].update(
        batch_size_per_device=device["batchsize_per_gpu"], precision=PRECISION_IN[precision]
    )
    c["device"]["workers"] = device.get("workers_per_gpu", c["device"]["workers"])

    schedule = _section(source, raw, "", "schedule")
    keys = (
        "resume",
        "load_model",
        "optimizer",
        "warmup",
        "total_epochs",
        "lr_schedule",
        "val_intervals",
    )
    _only(source, schedule, "schedule", keys)
    for key in keys[2:]:
        if key not in schedule:
            raise UnsupportedNanoDetConfig(f"{source}: schedule.{key} is missing")
    c["schedule"] = {k: schedule[k] for k in keys[2:]}
    c["init_from"] = str(schedule.get("load_model") or "")
    c["grad_clip"] = raw.get("grad_clip", 0.0)  # NanoDet's default: no clipping
    c["evaluator"] = _section(source, raw, "", "evaluator")
    for field, names, allowed in NAMED_SECTIONS:
        *parents, key = field.split(".")
        node = c
        for part in parents:
            node = node[part]
        _named(source, _section(source, node, ".".join(parents), key), field, names, allowed)

    log = _section(source, raw, "", "log", required=False)
    _only(source, log, "log", ("interval",))
    c["log"] = {"interval": log.get("interval", 50)}
    if not isinstance(raw.get("class_names"), list):
        raise UnsupportedNanoDetConfig(f"{source}: class_names is missing (a list of names)")
    c["class_names"] = list(raw["class_names"])
    for key, value in _section(source, raw, "", "test", required=False).items():
        # NanoDet's loader refuses any key under test; ours are set with --config.test.*.
        _fail(source, f"test.{key}", value, "no keys: NanoDet's test section is empty")

    _merge(c, _section(source, raw, "", EXTRAS_KEY, required=False))
    return ml_collections.ConfigDict(_coerce(c, default))


def load_nanodet_yml(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Our config from a NanoDet .yml file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise UnsupportedNanoDetConfig(f"{path}: not valid YAML ({problem}{line})") from None
    return from_nanodet_dict(raw, path)
