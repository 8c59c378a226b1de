"""Orbax checkpoints of model weights.

A checkpoint directory is an orbax ``CheckpointManager`` directory; each step holds
the item ``model`` (the model's full NNX state: parameters, BatchNorm statistics,
buffers), optionally ``ema`` (the EMA weights, which evaluation prefers), and a
JSON ``meta`` item. Training adds its own items (optimizer state, data iterator)
beside these; weight-only readers ignore them.

Directories may be ``gs://`` URLs: orbax writes them itself (through epath and
tensorstore; its commit there is a success marker, not a rename), and what this module
does around it (listing unfinished writes, directory checks) goes through
:mod:`nanodet_jax.paths`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from nanodet_jax import paths
from nanodet_jax.errors import UserError
from nanodet_jax.weights.pytorch import WeightMismatchError

log = logging.getLogger("nanodet_jax")
FORMAT_VERSION = 1
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step directory still being written


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """PRNG keys (TAN's / EfficientNet-Lite's dropout streams) as their uint32 data, the
    form orbax stores them in (a key of shape () is saved as data of shape (2,))."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _data_to_keys(like: Any, tree: Any) -> Any:
    """``tree`` (restored) with the keys of ``like`` as keys: checkpoints written before
    :func:`_keys_to_data` held orbax's own key records, which restore as keys already."""

    def wrap(t: Any, v: Any) -> Any:
        if _is_key(t) and not _is_key(v):
            return jax.random.wrap_key_data(v, impl=jax.random.key_impl(t))
        return v

    return jax.tree.map(wrap, like, tree)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = ".".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
        shape = leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)
        out[key] = tuple(shape)
    return out


def model_meta(config: Any) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "name": config.get("name", ""),
        "class_names": list(config.class_names),
        "input_size": list(config.data.val.input_size),
    }


WEIGHT_ITEMS = {
    "model": ocp.StandardCheckpointHandler,
    "ema": ocp.StandardCheckpointHandler,
    "meta": ocp.JsonCheckpointHandler,
}


def manager(
    directory: str | os.PathLike, max_to_keep: int | None = None, **options
) -> ocp.CheckpointManager:
    """A manager that knows the weight items (so it can read their metadata)."""
    opts = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, **options)
    handlers = {name: handler() for name, handler in WEIGHT_ITEMS.items()}
    return ocp.CheckpointManager(paths.abspath(directory), options=opts, item_handlers=handlers)


def save_weights(
    directory: str | os.PathLike,
    model: nnx.Module,
    config: Any,
    step: int = 0,
    keep: int | None = None,
    extra_meta: dict | None = None,
) -> None:
    """Write ``model``'s weights as step ``step`` of an orbax checkpoint directory
    (keeping the newest ``keep`` steps; all by default); ``extra_meta`` joins its meta."""
    mngr = manager(directory, max_to_keep=keep)
    state = _keys_to_data(nnx.to_pure_dict(nnx.state(model)))
    meta = {**model_meta(config), **(extra_meta or {})}
    mngr.save(
        step,
        args=ocp.args.Composite(model=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
    )
    mngr.wait_until_finished()
    mngr.close()


def restore_weights(
    directory: str | os.PathLike,
    model: nnx.Module,
    step: int | None = None,
    prefer_ema: bool = True,
) -> dict:
    """Load weights from an orbax checkpoint directory into ``model`` in place.

    Takes the latest step unless ``step`` is given, and the ``ema`` item when it
    exists (unless ``prefer_ema`` is False). Returns the checkpoint's ``meta``.
    A checkpoint of another architecture raises :class:`WeightMismatchError`.
    """
    directory = paths.abspath(directory)
    mngr, step, item, items = _open_weights(directory, step, prefer_ema)
    # The model's state may hold only the inference part (no aux branch) of a training
    # checkpoint; check shapes of what the model needs and restore just that.
    target = nnx.to_pure_dict(nnx.state(model))
    saved = _flat_shapes(items[item].tree)
    wanted = _flat_shapes(_keys_to_data(target))
    _check_shapes(saved, wanted, f"{directory} step {step}", item)
    extra = [k for k in saved if k not in wanted]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _keys_to_data(target))
    if extra:
        # Restore everything and keep the model's part: orbax needs the saved tree's structure.
        abstract = None
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(abstract)}, meta=ocp.args.JsonRestore()
        ),
    )
    values = _data_to_keys(target, _select_like(target, restored[item]))
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, values)
    nnx.update(model, state)
    mngr.close()
    log.info(f"restored {item} weights from {directory} step {step}")
    return dict(restored["meta"] or {})


def read_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The ``meta`` item of a checkpoint directory's latest (or ``step``) step; no arrays."""
    mngr = manager(paths.abspath(directory))
    step = mngr.latest_step() if step is None else step
    if step is None:
        mngr.close()
        raise FileNotFoundError(f"{directory}: contains no orbax checkpoint steps")
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    mngr.close()
    return dict(meta or {})


def saved_weight_names(
    directory: str | os.PathLike, step: int | None = None, prefer_ema: bool = True
) -> list[str]:
    """The dotted names of the weights :func:`restore_weights` would read (from the
    checkpoint's metadata; no arrays are loaded), e.g. to tell whether it has the aux branch."""
    mngr, _, item, items = _open_weights(paths.abspath(directory), step, prefer_ema)
    mngr.close()
    return list(_flat_shapes(items[item].tree))


def _open_weights(directory: str, step: int | None, prefer_ema: bool) -> tuple:
    """(manager, step, item name, item metadata) of the weights to read from ``directory``."""
    if not paths.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such checkpoint directory")
    mngr = manager(directory)
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory}: contains no orbax checkpoint steps")
    items = mngr.item_metadata(step)
    names = [k for k in items.keys() if items[k] is not None]
    item = "ema" if prefer_ema and "ema" in names else "model"
    if item not in names:
        raise WeightMismatchError(f"{directory} step {step} has no model weights (items: {names})")
    return mngr, step, item, items


def _select_like(target: Any, source: Any) -> Any:
    """The subtree of ``source`` with ``target``'s structure (keys may be str in ``source``)."""
    if isinstance(target, dict):
        out = {}
        for k, v in target.items():
            sub = source[k] if k in source else source[str(k)]
            out[k] = _select_like(v, sub)
        return out
    return source


# --------------------------------------------------------------------------- training
TRAIN_ITEMS = {**WEIGHT_ITEMS, "opt_state": ocp.StandardCheckpointHandler}


def train_manager(directory: str | os.PathLike, keep: int) -> ocp.CheckpointManager:
    """Keeps the last ``keep`` training checkpoints; saves asynchronously. A write a killed
    run left unfinished (orbax's ``<step>.orbax-checkpoint-tmp-*``) is never a step to
    resume from; it is named and removed here."""
    directory = paths.abspath(directory)
    if jax.process_index() == 0 and paths.isdir(directory):
        for name in sorted(paths.listdir(directory)):
            if TMP_SUFFIX in name:
                log.warning(f"removing {paths.join(directory, name)}: an unfinished "
                            "checkpoint write (the run that wrote it was killed)")  # fmt: skip
    opts = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=True,
        cleanup_tmp_directories=True,
    )  # fmt: skip
    handlers = {name: handler() for name, handler in TRAIN_ITEMS.items()}
    return ocp.CheckpointManager(directory, options=opts, item_handlers=handlers)


def train_state_digest(state: Any) -> str:
    """SHA-256 of everything a training checkpoint holds (weights, BatchNorm statistics,
    EMA, optimizer state): a restored state that differs by one bit is caught."""
    from nanodet_jax.testing import array_digest

    trees = {
        "model": nnx.to_pure_dict(nnx.merge_state(state.params, state.model_state)),
        "ema": nnx.to_pure_dict(state.ema),
        "opt_state": state.opt_state,
    }
    leaves = jax.tree_util.tree_flatten_with_path(_keys_to_data(trees))[0]
    return array_digest(
        {jax.tree_util.keystr(path): np.asarray(a.addressable_data(0)) for path, a in leaves}
    )


def save_train_state(mngr: ocp.CheckpointManager, state: Any, meta: dict) -> None:
    """Save a ``trainer.TrainState`` (weights, EMA, optimizer) at its step, plus ``meta``
    (to which the state's digest is added, checked on restore)."""
    meta = {**meta, "state_sha256": train_state_digest(state)}
    model = nnx.to_pure_dict(nnx.merge_state(state.params, state.model_state))
    mngr.save(
        int(jax.device_get(state.step)),
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(_keys_to_data(model)),
            ema=ocp.args.StandardSave(_keys_to_data(nnx.to_pure_dict(state.ema))),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
    )


def restore_train_state(mngr: ocp.CheckpointManager, template: Any, step: int | None = None):
    """The ``TrainState`` saved at ``step`` (default: latest) and its meta.

    ``template`` (a freshly created state, placed with the shardings wanted now) gives
    the structure, dtypes and target shardings, so a checkpoint written on N devices
    restores onto M.
    """
    step = mngr.latest_step() if step is None else step
    full = nnx.merge_state(template.params, template.model_state)

    def abstract(tree):
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)

    targets = {
        "model": _keys_to_data(nnx.to_pure_dict(full)),
        "ema": _keys_to_data(nnx.to_pure_dict(template.ema)),
        "opt_state": template.opt_state,
    }
    saved = mngr.item_metadata(step)
    missing = [k for k in targets if saved[k] is None]
    if missing:
        raise WeightMismatchError(f"training checkpoint step {step} lacks items {missing}")
    for name in ("model", "ema"):
        where = f"{mngr.directory} step {step}"
        _check_shapes(_flat_shapes(saved[name].tree), _flat_shapes(targets[name]), where, name)
    restored = mngr.restore(
        step,
        args=ocp.args.Composite(
            **{k: ocp.args.StandardRestore(abstract(v)) for k, v in targets.items()},
            meta=ocp.args.JsonRestore(),
        ),
    )
    params, model_state, ema = template.params, template.model_state, template.ema
    nnx.replace_by_pure_dict(params, _select_like(nnx.to_pure_dict(params), restored["model"]))
    state_like, ema_like = nnx.to_pure_dict(model_state), nnx.to_pure_dict(ema)
    nnx.replace_by_pure_dict(
        model_state, _data_to_keys(state_like, _select_like(state_like, restored["model"]))
    )
    nnx.replace_by_pure_dict(ema, _data_to_keys(ema_like, _select_like(ema_like, restored["ema"])))
    state = template.replace(
        step=jax.numpy.asarray(step, jax.numpy.int32),
        params=params,
        model_state=model_state,
        opt_state=restored["opt_state"],
        ema=ema,
    )
    meta = dict(restored["meta"] or {})
    if "state_sha256" in meta and train_state_digest(state) != meta["state_sha256"]:
        raise CorruptCheckpointError(
            f"{mngr.directory} step {step}: the restored state's digest differs from the "
            "one written with it (damaged files)"
        )
    return state, meta


class CorruptCheckpointError(UserError, RuntimeError):
    """A training checkpoint whose files are incomplete, unreadable or damaged."""


def restore_latest_train_state(mngr: ocp.CheckpointManager, template: Any) -> tuple:
    """(state, meta) of the newest training checkpoint that restores whole; a partial or
    damaged newer one is skipped with a warning naming it. A checkpoint of another model
    (:class:`WeightMismatchError`) is the user's error and is raised, not skipped."""
    steps = sorted(mngr.all_steps(), reverse=True)
    for step in steps:
        try:
            return restore_train_state(mngr, template, step)
        except WeightMismatchError:
            raise
        except Exception as e:  # orbax / tensorstore raise many types for damaged files
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            log.warning(
                f"checkpoint {paths.join(mngr.directory, str(step))} cannot be "
                f"restored ({type(e).__name__}: {reason}); using the previous one"
            )
    raise CorruptCheckpointError(
        f"{mngr.directory}: none of its checkpoints (steps {steps}) can be restored; "
        "move the directory away to train from the start"
    )


def _check_shapes(saved: dict, wanted: dict, where: Any, item: str) -> None:
    """Raise :class:`WeightMismatchError` listing every missing or mis-shaped key."""
    missing = [k for k in wanted if k not in saved]
    mismatched = [
        f"{k}: checkpoint {saved[k]}, model {s}"
        for k, s in wanted.items()
        if k in saved and saved[k] != s
    ]
    if missing or mismatched:
        lines = [f"checkpoint {where} (item {item!r}) does not fit this model:"]
        for title, keys in (("missing", missing), ("shape mismatch", mismatched)):
            if keys:
                lines += [f"  {title} ({len(keys)}):"] + [f"    {k}" for k in keys[:40]]
        lines.append("  (was it written with another config?)")
        raise WeightMismatchError("\n".join(lines))
