"""Import the PyTorch NanoDet reference from a local checkout, without its heavy dependencies.

Only the model / loss / assigner / data-transform modules are used. NanoDet's
package imports pytorch_lightning, termcolor and torchvision at import time; none
of them is needed by those modules (torchvision only for ``ops.nms``), so they
are replaced by small stand-ins before the import. ``torchvision.ops.nms`` gets
a plain-torch greedy NMS with torchvision's CPU-kernel semantics (see
``torch_nms``). ``tabulate``/``termcolor`` get minimal working stand-ins if they are
not installed, and ``torch._six`` (gone in torch 2.x, imported by
``nanodet.data.collate``) a stub, so NanoDet's dataset, collate and evaluator
modules import too.

Usage: ``ref = load_reference("/path/to/nanodet")`` then ``ref.build_model(cfg)``,
``ref.module("nanodet.model.head.assigner.dsl_assigner")`` ...
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types


def torch_nms(boxes, scores, iou_threshold: float):
    """Greedy NMS with the semantics of torchvision's CPU kernel (``nms_kernel.cpp``).

    Boxes are visited in descending score order with a *stable* sort (tied scores in
    index order): the kernel calls ``scores.sort(/*stable=*/true, 0, /*descending=*/true)``.
    (ATen's default ``sort`` is not stable on torch 2.x CPU: for more than 16 elements
    it reorders ties, so using it here would make tied candidates come out in an order
    that torchvision never produces.) A kept box suppresses every
    later box whose IoU with it is strictly greater than ``iou_threshold``. Areas,
    intersection and IoU are float32 (the boxes' dtype), IoU =
    ``inter / (area_i + area_j - inter)``; the comparison is done in float64 because
    the kernel compares the float IoU with a C++ ``double`` threshold (a float32
    comparison would round 0.6 to 0.6000000238 and differ for an IoU equal to that).
    Returns the kept indices (int64) in visiting order.
    """
    import torch

    if boxes.numel() == 0:
        return torch.zeros((0,), dtype=torch.long)
    order = torch.sort(scores, stable=True, dim=0, descending=True).indices
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        xx1 = torch.maximum(x1[i], x1)
        yy1 = torch.maximum(y1[i], y1)
        xx2 = torch.minimum(x2[i], x2)
        yy2 = torch.minimum(y2[i], y2)
        inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
        iou = inter / (areas[i] + areas - inter)
        # IoU is symmetric, so also testing boxes visited before i changes nothing:
        # those are kept (and did not suppress i) or already suppressed.
        suppressed |= iou.double() > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


def _plain_tabulate(rows, headers=(), **_kwargs) -> str:
    """Minimal stand-in for ``tabulate.tabulate`` (NanoDet's per-class AP table)."""

    def fmt(v):
        if v is None:
            return ""
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = [" | ".join(str(h) for h in headers)] if headers else []
    lines += [" | ".join(fmt(v) for v in row) for row in rows]
    return "\n".join(lines)


def _stub(name: str, **attrs) -> types.ModuleType:
    mod = types.ModuleType(name)
    # A spec, so that importlib.util.find_spec (used by torch._dynamo) accepts the stub.
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod


class _Anything:
    """Stands in for any class/function of a stubbed package (never actually used)."""

    def __init__(self, *a, **k):
        pass

    def __call__(self, *a, **k):
        return self

    def __getattr__(self, name):
        return _Anything()


def _module_getattr(attr: str):
    if attr.startswith("__"):
        raise AttributeError(attr)
    return _Anything  # a class, so the reference can also subclass it


def _install_stubs() -> None:
    import torch  # noqa: F401  (import for real before any stub exists)

    if "torchvision" not in sys.modules:
        tv = _stub("torchvision")
        tv.ops = _stub("torchvision.ops", nms=torch_nms)
    # Modules whose few uses need working (not merely importable) stand-ins; a real
    # installed package is preferred.
    for name, attrs in (
        ("tabulate", {"tabulate": _plain_tabulate}),
        ("termcolor", {"colored": lambda text, *a, **k: text}),
    ):
        try:
            importlib.import_module(name)
        except ImportError:
            _stub(name, **attrs)
    # nanodet.data.collate imports torch._six, which torch 2.x removed.
    try:
        importlib.import_module("torch._six")
    except ImportError:
        _stub("torch._six", string_classes=(str, bytes))
    for name in (
        "pytorch_lightning",
        "pytorch_lightning.loggers",
        "pytorch_lightning.loggers.logger",
        "pytorch_lightning.utilities",
        "lightning_fabric",
        "lightning_fabric.utilities",
        "lightning_fabric.utilities.cloud_io",
        "imagesize",  # only NanoDet's YoloDataset uses it
    ):
        if name in sys.modules:
            continue
        mod = _stub(name)
        mod.__getattr__ = _module_getattr  # module-level __getattr__ (PEP 562)
    sys.modules["pytorch_lightning"].__version__ = "1.9.0"


class Reference:
    def __init__(self, path: str):
        path = os.path.abspath(path)
        if not os.path.isdir(os.path.join(path, "nanodet", "model")):
            raise FileNotFoundError(f"{path} is not a RangiLyu/nanodet checkout")
        _install_stubs()
        if path not in sys.path:
            sys.path.insert(0, path)
        self.path = path

    def module(self, name: str):
        return importlib.import_module(name)

    def build_model(self, arch_cfg: dict):
        """NanoDet's ``build_model`` on a plain-dict ``model.arch`` section."""
        import copy

        arch = copy.deepcopy(arch_cfg)
        arch.pop("name", None)
        arch["backbone"].setdefault("pretrain", False)  # no ImageNet download
        head = arch["head"]
        # NanoDet reads the loss config with attribute access.
        head["loss"] = _AttrDict.wrap(head["loss"])
        nanodet_plus = self.module("nanodet.model.arch.nanodet_plus")
        return nanodet_plus.NanoDetPlus(**arch)


class _AttrDict(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @classmethod
    def wrap(cls, d):
        return cls({k: cls.wrap(v) if isinstance(v, dict) else v for k, v in d.items()})


def load_reference(path: str) -> Reference:
    return Reference(path)
