"""Loading ``configs/*.py`` files and applying ``--config.a.b=value`` overrides."""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections

from nanodet_jax.errors import ConfigError, UnknownFieldError

OVERRIDE_PREFIX = "--config."


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """Import a config file and return its ``get_config()``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    name = "nanodet_jax_config_" + os.path.splitext(os.path.basename(path))[0].replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    return module.get_config()


# Fields that take a boolean or a path (NanoDet's ``pretrain: True``, or a checkpoint).
BOOL_OR_PATH_FIELDS = ("pretrain",)
BOOLEAN_WORDS = ("true", "1", "yes", "false", "0", "no")
# Pairs of fields of which one is in force (config/batch.py): an override of one unsets
# the other, so ``--config.device.batch_size_per_device=4`` works on a config that states
# a global batch (and the reverse) without a second override.
EXCLUSIVE_FIELDS = (("device.global_batch_size", "device.batch_size_per_device"),)


def _parse_value(text: str, current: Any, leaf: str = "") -> Any:
    if leaf in BOOL_OR_PATH_FIELDS:
        lowered = text.lower()
        if lowered in BOOLEAN_WORDS:
            return lowered in ("true", "1", "yes")
        return None if lowered in ("none", "null") else text
    if isinstance(current, str):
        return text
    if isinstance(current, bool) or text.lower() in ("true", "false"):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"expected a boolean, got {text!r}")
    if text.lower() in ("none", "null"):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(value, tuple):
        value = list(value)
    return value


def _unknown_field(dotted: str, parents: Sequence[str], part: str, node: Any) -> Exception:
    """The error of an override naming no field: the closest existing names first (a
    typo is the usual cause), then every field of that level."""
    where = ".".join(parents) or "the config"
    if not hasattr(node, "keys"):
        return UnknownFieldError(f"--config.{dotted}: {where} is a value, not a group of fields")
    fields = sorted(str(k) for k in node.keys())
    close = difflib.get_close_matches(part, fields, n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return UnknownFieldError(
        f"--config.{dotted}: no field {part!r} in {where}{hint} (fields: {', '.join(fields)})"
    )


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``--config.a.b=value`` (or ``--config.a.b value``) arguments in place."""
    args = list(overrides)
    given = set()
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith(OVERRIDE_PREFIX):
            raise ConfigError(f"unrecognised argument {arg!r}")
        if "=" in arg:
            dotted, text = arg[len(OVERRIDE_PREFIX) :].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{arg} needs a value")
            dotted, text = arg[len(OVERRIDE_PREFIX) :], args[i + 1]
            i += 1
        i += 1
        *parents, leaf = dotted.split(".")
        node = config
        for depth, part in enumerate([*parents, leaf]):
            if not hasattr(node, "keys") or part not in node:
                raise _unknown_field(dotted, parents[:depth], part, node)
            if depth < len(parents):
                node = node[part]
        current = node[leaf]
        try:
            value = _parse_value(text, current, leaf)
        except ValueError as err:
            raise ConfigError(f"--config.{dotted}: {err}") from None
        if isinstance(node, ml_collections.ConfigDict):
            with node.unlocked():
                if type(value) is not type(current) and leaf in BOOL_OR_PATH_FIELDS:
                    del node[leaf]  # a path where the file said True: no type to keep
                try:
                    setattr(node, leaf, value)
                except TypeError as err:  # ml_collections keeps a field's type
                    raise ConfigError(f"--config.{dotted}={text}: {err}") from None
        else:
            node[leaf] = value
        given.add(dotted)
    for pair in EXCLUSIVE_FIELDS:
        for field, other in (pair, pair[::-1]):
            if field in given and other not in given:
                _unset(config, other)


def _unset(config: ml_collections.ConfigDict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for part in parents:
        if not hasattr(node, "keys") or part not in node:
            return
        node = node[part]
    if hasattr(node, "keys") and leaf in node:
        node[leaf] = 0


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.a.b=value`` / ``--config.a.b value`` overrides from the other
    arguments: (others, overrides).

    For parsers with positional arguments: argparse takes an argument holding a space
    (``"--config.class_names=['a', 'b']"``), and the value of the two-token form, for a
    positional, so ``parse_known_args`` alone would swap them with the real positionals.
    """
    others: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith(OVERRIDE_PREFIX):
            takes_next = "=" not in arg and i + 1 < len(args)
            overrides += args[i : i + 2] if takes_next else [arg]
            i += 2 if takes_next else 1
        else:
            others.append(arg)
            i += 1
    return others, overrides


def load_config(
    path: str | os.PathLike, overrides: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    if os.fspath(path).lower().endswith((".yml", ".yaml")):  # NanoDet's own config files
        from nanodet_jax.config.nanodet_yml import load_nanodet_yml

        config = load_nanodet_yml(path)
    else:
        config = load_config_file(path)
    apply_overrides(config, overrides)
    return config
