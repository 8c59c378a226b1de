"""Pieces shared by the command-line entry points (train.py, eval.py, predict, convert)."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flax import nnx

from nanodet_jax import runtime
from nanodet_jax.errors import ConfigError, UserError
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
    becomes a :class:`ConfigError` naming it, which :func:`entry_point` prints as one line.
    (KeyError / ValueError too: the .yml converter and config files raise plain ones.)"""
    from nanodet_jax.config.loading import load_config

    try:
        return load_config(path, overrides)
    except UserError:
        raise
    except (FileNotFoundError, KeyError, ValueError) as err:
        message = err.args[0] if err.args else str(err)
        raise ConfigError(str(message)) from err


def check_data_config(config: Any) -> None:
    """A mistake in ``data.<split>.resize`` (the canvas rule) ends the program with one
    line naming the field, before any data is read or program compiled."""
    from nanodet_jax.data import canvas_resize

    for split in ("train", "val"):
        try:
            canvas_resize.from_config(config.data[split], f"data.{split}")
        except ValueError as err:
            raise ConfigError(str(err)) from err


class UserExit(SystemExit):
    """Exit status 2 after a user error was printed; ``str()`` is the printed line (so a
    caller of ``main(argv)`` can read it, as from ``sys.exit("error: ...")`` before)."""

    def __init__(self, line: str):
        super().__init__(USER_ERROR_STATUS)
        self.line = line

    def __str__(self) -> str:
        return self.line


USER_ERROR_STATUS = 2  # argparse's status for a bad command line: the same kind of mistake
DEBUG_FLAG, DEBUG_ENV = "--debug", "NANODET_JAX_DEBUG"
# The named kinds of user mistakes. FileNotFoundError / PermissionError always name their
# path (weights, checkpoint directories, output folders); everything else is a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, FileNotFoundError, PermissionError)
F = TypeVar("F", bound=Callable[..., Any])


def error_line(err: BaseException) -> str:
    """The one line printed for a user error."""
    if isinstance(err, UserError):
        text = err.brief()
    elif isinstance(err, OSError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or err}"
    else:
        text = str(err.args[0]) if err.args else type(err).__name__
    text = " ".join(text.split())  # one line, whatever the message held
    return text if text.startswith("error: ") else f"error: {text}"


def entry_point(main: F) -> F:
    """Wrap an entry point's ``main(argv)``: a user error (:data:`USER_ERRORS`, or a
    ``SystemExit("error: ...")`` raised deeper, e.g. by the training loop) is printed as
    one line on stderr and exits with status 2; ``--debug`` anywhere on the command line
    or ``NANODET_JAX_DEBUG=1`` lets the exception through with its traceback."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> Any:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")
        args = [a for a in args if a != DEBUG_FLAG]
        try:
            return main(args)
        except UserExit:
            raise
        except USER_ERRORS as err:
            if debug:
                raise
            line = error_line(err)
        except SystemExit as err:
            if debug or not (isinstance(err.code, str) and err.code.startswith("error: ")):
                raise  # argparse's own exits (status 2, already printed), sys.exit(0), ...
            line = error_line(err)
        print(line, file=sys.stderr, flush=True)
        raise UserExit(line) from None

    return wrapped  # type: ignore[return-value]


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
