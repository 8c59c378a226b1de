"""Pieces shared by the command-line entry points (train.py, eval.py, predict, convert)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from flax import nnx

from nanodet_jax import runtime
from nanodet_jax.weights import checkpoint
from nanodet_jax.weights.pytorch import load_torch_weights


def setup_logging(level: int = logging.INFO) -> None:
    """Our messages at ``level`` on stderr; libraries (absl, orbax, jax) at WARNING."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s", force=True)
    ours = logging.getLogger("nanodet_jax")
    ours.setLevel(level)
    try:  # absl (used by orbax) routes through its own handler; keep it quiet too
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def start(compilation_cache: bool = True) -> None:
    """What every entry point does first: our XLA settings (before JAX computes
    anything), logging, and the persistent compilation cache."""
    runtime.configure_xla()
    setup_logging()
    if compilation_cache:
        runtime.enable_compilation_cache()


def read_config(path: str, overrides: list[str]) -> Any:
    """``load_config`` for an entry point: a user's mistake in the config file or an
    override (a missing file, a typo in a field, a NanoDet .yml part not supported yet)
    ends the program with one line naming it, not a traceback."""
    from nanodet_jax.config.loading import load_config

    try:
        return load_config(path, overrides)
    except (FileNotFoundError, KeyError, ValueError) as err:  # UnsupportedNanoDetConfig too
        message = err.args[0] if err.args else str(err)
        sys.exit(f"error: {message}")


def check_data_config(config: Any) -> None:
    """A mistake in ``data.<split>.resize`` (the canvas rule) ends the program with one
    line naming the field, before any data is read or program compiled."""
    from nanodet_jax.data import canvas_resize

    for split in ("train", "val"):
        try:
            canvas_resize.from_config(config.data[split], f"data.{split}")
        except ValueError as err:
            sys.exit(f"error: {err}")


def add_weight_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--torch-weights FILE`` | ``--checkpoint DIR`` (+ ``--step``)."""
    src = parser.add_mutually_exclusive_group(required=required)
    src.add_argument("--torch-weights", help="PyTorch NanoDet weights (.pth state_dict or .ckpt)")
    src.add_argument("--checkpoint", help="orbax checkpoint directory (EMA weights preferred)")
    parser.add_argument("--step", type=int, help="checkpoint step (default: latest)")


def load_weights(model: nnx.Module, args: argparse.Namespace) -> None:
    if args.torch_weights:
        load_torch_weights(model, args.torch_weights)
    else:
        checkpoint.restore_weights(args.checkpoint, model, step=args.step)


def progress_enabled() -> bool:
    """Progress bars only on a terminal; logs get plain lines instead."""
    return sys.stderr.isatty()
