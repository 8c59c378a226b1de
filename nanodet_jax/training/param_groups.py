"""Per-parameter learning-rate multiplier and weight decay, as NanoDet's ``build_optimizer``
assigns them from ``schedule.optimizer``.

* ``param_level_cfg: {key: {lr_mult, decay_mult}}``: the *first* key (in config order)
  that is a substring of the parameter's name sets its lr to ``lr * lr_mult`` and its
  weight decay to ``weight_decay * decay_mult`` (each only when the base value is
  non-zero, as NanoDet does). A ConfigDict sorts its keys, so there keys that match the
  same parameter are refused rather than resolved in the wrong order;
* ``no_norm_decay``: no weight decay on the weight and bias of normalisation layers
  (BatchNorm, GroupNorm, LayerNorm), whatever ``param_level_cfg`` said;
* ``no_bias_decay``: no weight decay on any ``bias``. (NanoDet's own loop stops with a
  ``KeyError`` on a convolution built without bias, so no NanoDet model can use it;
  this is what it means to do.)

Names are the PyTorch ``state_dict`` keys (the parameter tree's path joined with dots,
see ``convert.py``). A normalisation layer is recognised from the tree alone: it is the
module whose ``weight`` is 1-D (convolution and linear weights have 2 or more
dimensions; PReLU, the one other 1-D ``weight`` in NanoDet, is not supported here), so
the optimizer needs no model. ``tests/training/test_optim_torch.py`` checks this rule against
the module types of the NanoDet-Plus model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from ml_collections import ConfigDict


class LeafHyper(NamedTuple):
    lr_mult: float
    weight_decay: float


def leaf_name(path: tuple) -> str:
    """The dotted PyTorch-style name of a tree path (nnx.State, dicts or lists)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey) and key.name != "value":
            parts.append(key.name)  # nnx.Variable leaves end in ``.value``: not part of the name
    return ".".join(parts)


def norm_parameter_names(shapes: Mapping[str, tuple[int, ...]]) -> set[str]:
    """Names of normalisation-layer parameters: the module's ``weight`` is 1-D."""
    out = set()
    for name, shape in shapes.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 1:
            out.add(name)
            bias = f"{module}.bias" if module else "bias"
            if bias in shapes:
                out.add(bias)
    return out


def assign(
    opt_cfg: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], default_wd: float
) -> dict[str, LeafHyper]:
    """``{name: LeafHyper}`` for every parameter, in NanoDet's order of precedence."""
    base_lr = float(opt_cfg.get("lr", 0.0) or 0.0)
    base_wd = float(opt_cfg.get("weight_decay", 0.0) or 0.0)
    level = opt_cfg.get("param_level_cfg") or {}
    norms = norm_parameter_names(shapes) if opt_cfg.get("no_norm_decay", False) else set()
    no_bias = bool(opt_cfg.get("no_bias_decay", False))
    # ml_collections sorts a ConfigDict's keys, so "first in the file" is lost there: a
    # parameter that two keys match would silently get the alphabetically first.
    order_lost = isinstance(level, ConfigDict)
    out = {}
    for name in shapes:
        lr_mult, wd = 1.0, default_wd
        if order_lost and sum(key in name for key in level) > 1:
            raise ValueError(
                f"param_level_cfg: {name!r} matches {sorted(k for k in level if k in name)}; "
                "NanoDet applies the first key in its file order, which a ConfigDict does not "
                "keep: make the keys match disjoint parameters"
            )
        for key, sub in level.items():
            if key in name:  # substring match, first key wins
                if "lr_mult" in sub and base_lr:
                    lr_mult = float(sub["lr_mult"])
                if "decay_mult" in sub and base_wd:
                    wd = base_wd * float(sub["decay_mult"])
                break
        if name in norms or (no_bias and name.rpartition(".")[2] == "bias"):
            wd = 0.0
        out[name] = LeafHyper(lr_mult, wd)
    return out


def leaf_hypers(opt_cfg: Mapping[str, Any], tree: Any, default_wd: float) -> list[LeafHyper]:
    """One :class:`LeafHyper` per leaf of ``tree`` (arrays or shapes), in flatten order."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    names = [leaf_name(p) for p, _ in leaves]
    if len(set(names)) != len(names):
        raise ValueError("parameter names are not unique; cannot assign per-parameter settings")
    hyper = assign(opt_cfg, {n: tuple(x.shape) for n, (_, x) in zip(names, leaves)}, default_wd)
    return [hyper[n] for n in names]
