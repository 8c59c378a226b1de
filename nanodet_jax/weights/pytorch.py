"""Convert between PyTorch NanoDet weights and our Flax NNX model.

The mapping is a rule, not a table: a variable's NNX state path joined with dots
is its PyTorch state_dict key (the modules mirror NanoDet's names), and the only
layout change is for 4-D conv kernels, OIHW in PyTorch and HWIO here.

The command line is ``nanodet-convert`` (``nanodet_jax/cli/convert.py``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from nanodet_jax.errors import UserError

log = logging.getLogger("nanodet_jax")

# Prefixes a state_dict may carry: Lightning's task attributes and DDP's wrapper.
EMA_PREFIX, MODEL_PREFIX, DDP_PREFIX = "avg_model.", "model.", "module."


class WeightMismatchError(UserError, ValueError):
    """The weights do not fit the model: the message lists every offending key."""


@dataclasses.dataclass
class LoadReport:
    loaded: list[str]
    missing_aux: list[str]  # training-only keys (the AGM) absent from an inference checkpoint
    reinitialized: list[str]  # shape-mismatched keys kept at their init (allow_reinit)
    source: str

    def summary(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors from {self.source}"]
        if self.missing_aux:
            parts.append(f"{len(self.missing_aux)} training-only tensors absent (kept at init)")
        if self.reinitialized:
            parts.append(f"re-initialised (shape differs): {', '.join(self.reinitialized)}")
        return "; ".join(parts)


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """The model's state variables keyed by their PyTorch state_dict names.

    Walks attributes in definition order, which follows NanoDet's module registration
    order, so the keys come out in the order of NanoDet's own ``state_dict()``.
    """
    out: dict[str, nnx.Variable] = {}

    def walk(node: object, prefix: str) -> None:
        # Leading underscores are kept: NanoDet names some layers so (EfficientNet-Lite's
        # ``_expand_conv``); flax's own bookkeeping attributes are neither Variables nor
        # Modules, so the type tests below leave them out.
        for name, value in vars(node).items():
            key = prefix + name
            if isinstance(value, nnx.Variable) and not isinstance(value, nnx.RngState):
                out[key] = value
            elif isinstance(value, nnx.Module):
                walk(value, key + ".")

    walk(model, "")
    return out


def to_torch_layout(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value


def from_torch_layout(value: np.ndarray) -> np.ndarray:
    return np.transpose(value, (2, 3, 1, 0)) if value.ndim == 4 else value


def read_torch_file(path: str | os.PathLike) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a .pth state_dict or a NanoDet/Lightning checkpoint."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "reading PyTorch weights needs torch: pip install 'nanodet-jax[torch]'"
        ) from e
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({e})") from e


def extract_state_dict(obj: Mapping[str, Any], prefer_ema: bool = True) -> tuple[dict, str]:
    """Plain ``name -> numpy`` state_dict from a state_dict or a Lightning/NanoDet checkpoint.

    Lightning checkpoints of NanoDet hold ``model.*`` (raw) and ``avg_model.*`` (EMA)
    weights; EMA is preferred (it is what NanoDet evaluates and exports) unless
    ``prefer_ema`` is False. Returns the state_dict and which weights were taken.
    """
    sd = (
        obj["state_dict"] if "state_dict" in obj and isinstance(obj["state_dict"], Mapping) else obj
    )
    keys = list(sd)
    which = "state_dict"
    has_ema = any(k.startswith(EMA_PREFIX) for k in keys)
    has_model = any(k.startswith(MODEL_PREFIX) for k in keys)
    if has_ema and (prefer_ema or not has_model):
        sd, which = (
            {k[len(EMA_PREFIX) :]: v for k, v in sd.items() if k.startswith(EMA_PREFIX)},
            "EMA",
        )
    elif has_model:
        sd, which = (
            {k[len(MODEL_PREFIX) :]: v for k, v in sd.items() if k.startswith(MODEL_PREFIX)},
            "model",
        )
    if sd and all(k.startswith(DDP_PREFIX) for k in sd):
        sd = {k[len(DDP_PREFIX) :]: v for k, v in sd.items()}
    out = {}
    for k, v in sd.items():
        if hasattr(v, "detach"):  # torch.Tensor
            v = v.detach().cpu().numpy()
        out[k] = np.asarray(v)
    return out, which


def load_torch_weights(
    model: nnx.Module,
    weights: str | os.PathLike | Mapping[str, Any],
    *,
    prefer_ema: bool = True,
    allow_reinit: tuple[str, ...] = (),
    source: str | None = None,
    hint: str | None = None,
) -> LoadReport:
    """Load PyTorch NanoDet weights into ``model`` in place.

    ``weights`` is a .pth/.ckpt path or a mapping of names to arrays (numpy or
    torch). Every model key must be present, except the aux branch when the
    checkpoint has none (inference checkpoints). Keys the model lacks, or of
    the wrong shape, raise :class:`WeightMismatchError` listing all of them —
    unless a mismatched key starts with one of ``allow_reinit`` (used when
    fine-tuning to a different class count), in which case it keeps its init.
    ``source`` names the weights in messages (default: the path), ``hint`` replaces the
    error's closing advice.
    """
    if source is None:
        source = str(weights) if isinstance(weights, (str, os.PathLike)) else "a state_dict"
    raw = read_torch_file(weights) if isinstance(weights, (str, os.PathLike)) else weights
    state, which = extract_state_dict(raw, prefer_ema)
    if which != "state_dict":
        source += f" ({which} weights)"
    variables = model_variables(model)

    missing = [k for k in variables if k not in state]
    unexpected = [k for k in state if k not in variables]
    # The detector's training-only branches (NanoDet-Plus's AGM): absent from inference
    # checkpoints, and ignored in a training checkpoint loaded into an inference model.
    branches = tuple(getattr(model, "TRAINING_ONLY", ()))

    def training_only(key: str) -> bool:
        return bool(branches) and key.startswith(branches)

    ckpt_has_aux = any(training_only(k) for k in state)
    missing_aux = [k for k in missing if training_only(k) and not ckpt_has_aux]
    missing = [k for k in missing if k not in missing_aux]
    if not any(training_only(k) for k in variables):
        unexpected = [k for k in unexpected if not training_only(k)]
    mismatched, reinit = [], []
    for k, var in variables.items():
        if k not in state:
            continue
        expected = tuple(var[...].shape)
        got = tuple(from_torch_layout(state[k]).shape)
        if got != expected:
            if k.startswith(allow_reinit) and allow_reinit:
                reinit.append(k)
            else:
                torch_expected = tuple(to_torch_layout(np.zeros(expected, np.int8)).shape)
                mismatched.append(
                    f"{k}: checkpoint {tuple(state[k].shape)}, model {torch_expected}"
                )
    if missing or unexpected or mismatched:
        lines = [f"{source} does not fit this model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("shape mismatch", mismatched),
        ):
            if items:
                shown = items[:40] + (
                    [f"... and {len(items) - 40} more"] if len(items) > 40 else []
                )
                lines.append(f"  {title} ({len(items)}):")
                lines += [f"    {s}" for s in shown]
        hint = hint or "check that --config matches the architecture the weights were trained with"
        lines.append(f"  ({hint})")
        counts = ", ".join(
            f"{t} {len(i)}"
            for t, i in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if i
        )
        one_line = f"{source} does not fit this model ({counts} keys; --debug lists them): {hint}"
        raise WeightMismatchError("\n".join(lines), one_line=one_line)

    loaded = []
    for k, var in variables.items():
        if k in state and k not in reinit:
            value = from_torch_layout(state[k])
            var[...] = jnp.asarray(value, dtype=var[...].dtype)
            loaded.append(k)
    report = LoadReport(loaded, missing_aux, reinit, source)
    log.info(report.summary())
    return report


def torch_state_dict(model: nnx.Module) -> OrderedDict:
    """Our weights as a PyTorch state_dict with NanoDet's exact keys (needs torch)."""
    import torch

    out = OrderedDict()
    for k, var in model_variables(model).items():
        value = to_torch_layout(np.asarray(var[...]))
        if k.endswith("num_batches_tracked"):
            value = value.astype(np.int64)
        out[k] = torch.from_numpy(np.array(value, copy=True, order="C"))
    return out


def save_torch_weights(model: nnx.Module, path: str | os.PathLike, wrap: bool = False) -> None:
    """Write a .pth that NanoDet's model loads with ``load_state_dict(strict=True)``.

    ``wrap`` writes ``{"state_dict": ...}`` instead, the layout of NanoDet's
    ``nanodet_model_best.pth`` that its tools and demos (``load_model_weight``) expect.
    """
    import torch

    sd = torch_state_dict(model)
    torch.save({"state_dict": sd} if wrap else sd, path)
